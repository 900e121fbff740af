"""The ("dp", "ep") mesh layout (expert parallelism inside groups, FSDP2 or replicate across) on 2 and 4
gloo processes, against one process trained on the union of the ranks' batches.

Each spawn trains the same small model (embedding, LSTM, a flat MoE, a hierarchical MoE, a probe
whose 3 rows leave one rank of 4 without a shard, a head of 13 rows) for three Adam steps with
gradient clipping, on every layout it covers, and returns the losses, the gradient norms, the
gradients right after ``backward``, the gathered state dict and optimizer state. One process
running the same steps on the concatenated batches must give the same numbers: this holds only if
the batch statistics cover all W ranks, the experts see the right tokens, and every gradient
(dense: mean over W; expert: sum over the replicas / W) is reduced with the right scale.

Router noise: every process reseeds torch before each forward (``train_step``); the routers draw
their noise for the whole batch and keep their rows (``moekit.shards.randn_rows``), so every
layout draws what the single process draws.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

import moekit
from moekit.parallel import (
    ParallelTraining,
    clip_grad_norm_,
    expert_parameter_names,
    full_optimizer_state_dict,
    full_state_dict,
    layout_of,
    load_distributed,
    load_full_state_dict,
    mesh_of,
    parallelize,
    save_distributed,
    spawn_local,
    sync_gradients,
)

VOCAB, BATCH, SEQ, STEPS, LR, MAX_NORM = 13, 2, 3, 3, 0.01, 0.35
TIMEOUT_S = 60.0


class TinyLM(nn.Module):
    """Embedding -> LSTM -> MoE (8 experts) -> hierarchical MoE (2 x 2) -> head; residual around each MoE."""

    def __init__(self, seed: int = 0, dtype=torch.float32, device=None):
        super().__init__()
        torch.manual_seed(seed)
        kw = {"dtype": dtype, "device": device}
        self.embed = nn.Embedding(VOCAB, 8, **kw)
        self.lstm = nn.LSTM(8, 8, batch_first=True, **kw)
        self.moe = moekit.MoE(8, 8, k=2, hidden_dim=6, **kw)
        self.hmoe = moekit.HierarchicalMoE(8, 2, 2, k_primary=2, k_secondary=1, hidden_dim=6, **kw)
        self.probe = nn.Linear(8, 3, **kw)  # 3 rows: rank 3 of 4 holds no shard of it under FSDP
        self.out = nn.Linear(8, VOCAB, **kw)
        if device != "meta":
            with torch.no_grad():  # gates with signal, so routing is not decided by ties
                for n, p in self.named_parameters():
                    if "router.w_" in n:
                        p.normal_(0, 0.5)

    def forward(self, tokens):
        h, _ = self.lstm(self.embed(tokens))
        a = self.moe(h)
        h = h + a.y
        b = self.hmoe(h)
        h = h + b.y
        return self.out(h), a.aux_loss + b.aux_loss + 0.01 * self.probe(h).pow(2).mean()


def eval_tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(99))


def batches(step: int, world: int) -> list[torch.Tensor]:
    """Step ``step``'s global batch of ``world * BATCH`` rows, as the ranks' shards (rank order)."""
    gen = torch.Generator().manual_seed(100 + step)
    return list(torch.randint(0, VOCAB, (world * BATCH, SEQ + 1), generator=gen).split(BATCH))


def train_step(model, opt, tokens, step, distributed, after_backward=None) -> tuple[float, float]:
    """One step of next-token loss + aux, clipped to MAX_NORM: (loss of the global batch, norm before clipping)."""
    torch.manual_seed(1000 + step)  # the same noise draws in every process and layout
    logits, aux = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)) + aux
    opt.zero_grad()
    loss.backward()
    if after_backward is not None:
        after_backward()
    if distributed:
        sync_gradients(model)  # a no-op on the mesh layout (checked below); a loop may call it always
        norm = clip_grad_norm_(model, MAX_NORM)
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    else:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    opt.step()
    return loss.item(), norm.item()


def train_local(world: int, steps: int, dtype=torch.float32) -> dict:
    """The reference: one process, ``steps`` steps on the concatenations of the ranks' batches."""
    model = TinyLM(dtype=dtype)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    ref: dict = {}

    def keep_grads():
        ref["first_grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}

    results = [train_step(model, opt, torch.cat(batches(s, world)), s, False, keep_grads if s == 0 else None)
               for s in range(steps)]
    ref["losses"], ref["norms"] = [r[0] for r in results], [r[1] for r in results]
    ref["state"], ref["optim"] = model.state_dict(), opt.state_dict()
    return ref


def whole_grads(model) -> dict[str, torch.Tensor]:
    """Every gradient as one process would hold it: DTensor pieces joined, expert blocks joined over "ep"."""
    experts = expert_parameter_names(model)
    ep_group = mesh_of(model)["ep"].get_group()
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        if name in experts:
            parts = [torch.empty_like(g) for _ in range(dist.get_world_size(ep_group))]
            dist.all_gather(parts, g.contiguous(), group=ep_group)
            g = torch.cat(parts)
        out[name] = g.clone()
    return out


@contextlib.contextmanager
def recording_reductions(log: list, model):
    """Log ``(collective, group)`` for each gradient reduction FSDP2 / replicate issue, and ``("input
    gradient", None)`` when the backward reaches the embedding's output (the last module it visits)."""
    names = {"all_reduce": "all_reduce", "reduce_scatter_single": "reduce_scatter"}
    originals = {name: getattr(dist, name) for name in names}
    world = tuple(range(dist.get_world_size()))

    def group_name(group) -> str:
        ranks = world if group is None else tuple(dist.get_process_group_ranks(group))
        mesh = mesh_of(model)
        for dim in ("dp", "ep"):
            if ranks == tuple(mesh[dim].mesh.tolist()) and len(ranks) < len(world):
                return dim
        return "world" if ranks == world else str(ranks)

    def recorder(name):
        def call(*args, **kwargs):
            log.append((names[name], group_name(kwargs.get("group"))))
            return originals[name](*args, **kwargs)
        return call

    def mark(module, inputs, out) -> None:
        if out.requires_grad:
            out.register_hook(lambda grad: log.append(("input gradient", None)))

    hook = model.embed.register_forward_hook(mark)
    try:
        for name in names:
            setattr(dist, name, recorder(name))
        yield log
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        hook.remove()


def snapshot(model) -> dict[str, torch.Tensor]:
    """``full_state_dict(model)`` copied: tensors that need no gathering share storage with the model's."""
    return copy.deepcopy(full_state_dict(model))


def train_layout(rank: int, world: int, ep_size, fsdp: bool, dtype=torch.float32, units=None) -> tuple:
    """Three steps on ``rank``'s rows on the given layout. Returns (model, opt, results)."""
    model = TinyLM(dtype=dtype)
    model = parallelize(model, ep_size, fsdp, units=None if units is None else [getattr(model, u) for u in units])
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    res: dict = {"log": []}

    def inspect():
        res["log"].append(("backward done", None))
        res["first_grads"] = whole_grads(model)
        before = {n: p.grad.to_local().clone() if isinstance(p.grad, DTensor) else p.grad.clone()
                  for n, p in model.named_parameters()}
        sync_gradients(model)
        res["sync_is_noop"] = all(torch.equal(before[n], p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad)
                                  for n, p in model.named_parameters())

    steps = []
    for s in range(STEPS):
        tokens = batches(s, world)[rank]
        with recording_reductions(res["log"] if s == 0 else [], model):
            steps.append(train_step(model, opt, tokens, s, True, inspect if s == 0 else None))
    res["losses"], res["norms"] = [r[0] for r in steps], [r[1] for r in steps]
    res["state"] = snapshot(model)
    res["optim"] = copy.deepcopy(full_optimizer_state_dict(model, opt))
    res["layout"] = tuple(layout_of(model)[1:])
    res["mesh"] = (mesh_of(model).mesh_dim_names, tuple(mesh_of(model).mesh.shape))
    return model, opt, res


def four_rank_run(rank: int, world: int, ckpt_2x2: str, ckpt_ep4: str) -> dict:
    res = {}
    for fsdp in (False, True):
        model, opt, res[fsdp] = train_layout(rank, world, 2, fsdp)
    # The FSDP 2x2 run goes on: saved after step 3, then one more step.
    save_distributed(ckpt_2x2, model, opt)
    train_step(model, opt, batches(STEPS, world)[rank], STEPS, True)
    res["2x2_after_step_4"] = snapshot(model)

    # Loaded on 4-way expert parallelism (replicated dense parameters), the same step 4 from it.
    ep4 = parallelize(TinyLM(seed=9), 4)
    ep4_opt = torch.optim.Adam(ep4.parameters(), lr=LR)
    load_distributed(ckpt_2x2, ep4, ep4_opt)
    res["ep4_loaded"] = snapshot(ep4)
    res["ep4_layout"] = tuple(layout_of(ep4)[1:])
    save_distributed(ckpt_ep4, ep4, ep4_opt)
    train_step(ep4, ep4_opt, batches(STEPS, world)[rank], STEPS, True)
    res["ep4_after_step_4"] = snapshot(ep4)

    # Today's layout reads the same checkpoint.
    legacy = parallelize(TinyLM(seed=8))
    load_distributed(ckpt_2x2, legacy)
    res["legacy_loaded"] = snapshot(legacy)

    # Full state dicts through the loop object: gathered on rank 0 only, loaded on any layout, a
    # model built on the meta device included.
    par = ParallelTraining(ep_size=2, fsdp=True)
    model_sd, opt_sd = par.full_state(ep4, ep4_opt)
    res["full_state_on_rank"] = (model_sd is not None, opt_sd is not None)
    meta = par.parallelize(TinyLM(seed=7, device="meta"))
    meta.to_empty(device="cpu")
    load_full_state_dict(meta, res["ep4_after_step_4"])
    res["meta_loaded"] = snapshot(meta)
    return res


def two_rank_run(rank: int, world: int) -> dict:
    res = {}
    for ep_size, fsdp, dtype in ((2, True, torch.float64), (2, False, torch.float32), (1, True, torch.float32),
                                 (1, False, torch.float64)):
        units = ("lstm", "out") if (ep_size, fsdp) == (2, True) else None
        model, _, res[ep_size, fsdp] = train_layout(rank, world, ep_size, fsdp, dtype, units)
        if units:
            res["units_are_fsdp"] = [type(getattr(model, u)).__name__ for u in units]
        if (ep_size, fsdp) == (2, False):  # evaluation on a batch that splits 2 + 1
            par = ParallelTraining(ep_size=2)
            with torch.no_grad():
                res["eval_logits"] = par.gather(model.eval()(par.split(eval_tokens()))[0])
    res["errors"] = {
        "ep_size=3": errors_of(lambda: parallelize(TinyLM(), 3)),
        "ep_size=True": errors_of(lambda: parallelize(TinyLM(), True)),
        "experts": errors_of(lambda: parallelize(nn.Sequential(moekit.MoE(4, 3, k=2)), 2)),
        "group": errors_of(lambda: parallelize(TinyLM(), 2, group=dist.new_group([0, 1]))),
        "unit": errors_of(lambda: parallelize(TinyLM(), 2, units=[nn.Linear(2, 2)])),
        "twice": errors_of(lambda: parallelize(parallelize(TinyLM(), 1), 1)),
        "shard": errors_of(lambda: ParallelTraining().shard(torch.zeros(3, 2))),
    }
    legacy = parallelize(TinyLM())
    res["legacy_layout"] = tuple(layout_of(legacy)[1:]), tuple(mesh_of(legacy).mesh.shape)
    par = ParallelTraining(ep_size=1)
    res["rows"] = [par.shard(torch.arange(6)).tolist(), par.split(torch.arange(3)).tolist(),
                   par.gather(par.split(torch.arange(3))).tolist()]
    return res


def errors_of(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def dying_rank(rank: int, world: int) -> None:
    model = parallelize(TinyLM(), 2, True)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for s in range(2):
        torch.manual_seed(s)
        logits, aux = model(batches(s, world)[rank][:, :-1])
        if s == 1 and rank == 1:  # the others are in this step's backward by now, or soon
            raise RuntimeError("rank 1 gives up")
        (logits.square().mean() + aux).backward()
        opt.step()


# --- the tests ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 4-rank spawn, one 2-rank spawn, single-process references and a single-process load."""
    tmp = tmp_path_factory.mktemp("mesh")
    ckpt_2x2, ckpt_ep4 = str(tmp / "2x2"), str(tmp / "ep4")
    four = spawn_local(four_rank_run, 4, (ckpt_2x2, ckpt_ep4), timeout_s=TIMEOUT_S)
    two = spawn_local(two_rank_run, 2, timeout_s=TIMEOUT_S)
    refs = {(4, torch.float32): train_local(4, STEPS), (2, torch.float32): train_local(2, STEPS),
            (2, torch.float64): train_local(2, STEPS, torch.float64)}
    single = TinyLM(seed=5)  # saved on 4-way expert parallelism, loaded and continued in one process
    single_opt = torch.optim.Adam(single.parameters(), lr=LR)
    load_distributed(ckpt_ep4, single, single_opt)
    single_loaded = {k: v.clone() for k, v in single.state_dict().items()}
    train_step(single, single_opt, torch.cat(batches(STEPS, 4)), STEPS, False)
    trained = TinyLM().eval()
    trained.load_state_dict(refs[2, torch.float32]["state"])
    with torch.no_grad():
        eval_logits = trained(eval_tokens())[0]
    return {4: four, 2: two, "refs": refs, "eval_logits": eval_logits,
            "ref_4_steps": train_local(4, STEPS + 1)["state"], "single_loaded": single_loaded,
            "single_after_4": single.state_dict()}


# One bound for both dtypes: the routers compute in float32 whatever the model's dtype
# (moekit.MoE.route), and a matmul over another number of rows may round differently there; Adam
# turns such differences in small gradients into parameter differences of ~1e-6 relative even in
# float64. The float64 cases check FSDP's other reduction path (divide before and after the sum).
TOL = {"rtol": 1e-5, "atol": 1e-6}


def assert_same_state(got: dict, want: dict, tol: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, **tol, msg=lambda m, k=key: f"{what}, {k}: {m}")


def assert_same_optim(got: dict, want: dict, tol: dict, what: str) -> None:
    assert got["param_groups"] == want["param_groups"], what
    assert got["state"].keys() == want["state"].keys(), what
    for index, state in want["state"].items():
        assert got["state"][index].keys() == state.keys(), what
        for key, value in state.items():
            torch.testing.assert_close(got["state"][index][key], value, **tol,
                                       msg=lambda m, i=index, k=key: f"{what}, state {i}.{k}: {m}")


LAYOUT_CASES = [(4, 2, False, torch.float32), (4, 2, True, torch.float32), (2, 2, True, torch.float64),
                (2, 2, False, torch.float32), (2, 1, True, torch.float32), (2, 1, False, torch.float64)]


@pytest.mark.parametrize("world,ep,fsdp,dtype", LAYOUT_CASES, ids=[
    f"{w // e}x{e}-{'fsdp' if f else 'replicate'}-{str(d).removeprefix('torch.')}" for w, e, f, d in LAYOUT_CASES])
def test_three_adam_steps_match_one_process_on_the_union_of_batches(runs, world, ep, fsdp, dtype):
    ref, tol = runs["refs"][world, dtype], TOL
    assert max(ref["norms"]) > MAX_NORM  # clipping acts
    assert len(set(ref["losses"])) == STEPS  # the model did train
    for rank, res in enumerate(runs[world]):
        got = res[fsdp] if world == 4 else res[ep, fsdp]
        where = f"{world // ep}x{ep} fsdp={fsdp}, rank {rank}"
        assert got["layout"] == (world // ep, ep, fsdp, True), where
        assert got["mesh"] == (("dp", "ep"), (world // ep, ep)), where
        assert got["losses"] == pytest.approx(ref["losses"], rel=tol["rtol"]), where
        assert got["norms"] == pytest.approx(ref["norms"], rel=tol["rtol"]), where
        # Reduced by backward itself: sync_gradients has nothing left to do.
        assert_same_state(got["first_grads"], ref["first_grads"], tol, f"gradients after backward ({where})")
        assert got["sync_is_noop"], where
        assert_same_state(got["state"], ref["state"], tol, f"state dict ({where})")
        assert_same_optim(got["optim"], ref["optim"], tol, f"optimizer state ({where})")


def test_gradients_are_reduced_during_backward_unit_by_unit(runs):
    # Each expert bank is its own unit, reduced over its "dp" replicas as soon as its backward is
    # done, before the backward reaches the embedding; the root unit (everything else) is reduced
    # once over all ranks at the end. FSDP reduce-scatters, replicate all-reduces.
    for fsdp, op in ((True, "reduce_scatter"), (False, "all_reduce")):
        for res in runs[4]:
            log = res[fsdp]["log"]
            marker, end = log.index(("input gradient", None)), log.index(("backward done", None))
            assert log[:marker].count((op, "dp")) == 2, log  # the two MoE layers' expert banks
            assert [entry for entry in log[marker:end] if entry[0] == op] == [(op, "world")], log


def test_a_checkpoint_moves_between_layouts_and_training_goes_on(runs):
    saved = runs[4][0][True]["state"]  # 2x2 FSDP after STEPS steps
    tol = TOL
    for rank, res in enumerate(runs[4]):
        assert res["ep4_layout"] == (1, 4, False, True)
        assert_same_state(res["ep4_loaded"], saved, {"rtol": 0, "atol": 0}, f"2x2 FSDP -> 4-way EP, rank {rank}")
        assert_same_state(res["legacy_loaded"], saved, {"rtol": 0, "atol": 0}, f"2x2 FSDP -> today's, rank {rank}")
        # The optimizer state travelled too: step 4 on either layout is step 4 of one process.
        assert_same_state(res["2x2_after_step_4"], runs["ref_4_steps"], tol, f"2x2 step 4, rank {rank}")
        assert_same_state(res["ep4_after_step_4"], runs["ref_4_steps"], tol, f"4-way EP step 4, rank {rank}")
    assert_same_state(runs["single_loaded"], saved, {"rtol": 0, "atol": 0}, "4-way EP -> 1 process")
    assert_same_state(runs["single_after_4"], runs["ref_4_steps"], tol, "1 process step 4")


def test_full_state_gathers_on_rank_0_and_loads_into_a_meta_built_fsdp_model(runs):
    assert [res["full_state_on_rank"] for res in runs[4]] == [(True, True)] + [(False, False)] * 3
    for rank, res in enumerate(runs[4]):
        assert_same_state(res["meta_loaded"], res["ep4_after_step_4"], {"rtol": 0, "atol": 0}, f"rank {rank}")


def test_evaluation_on_an_uneven_split_gathers_the_single_process_outputs(runs):
    for rank, res in enumerate(runs[2]):
        torch.testing.assert_close(res["eval_logits"], runs["eval_logits"], **TOL,
                                   msg=lambda m, r=rank: f"rank {r}: {m}")


def test_units_become_fsdp_units(runs):
    assert runs[2][0]["units_are_fsdp"] == ["FSDPLSTM", "FSDPLinear"]


def test_todays_layout_has_a_one_row_mesh(runs):
    assert runs[2][0]["legacy_layout"] == ((1, 2, False, False), (1, 2))


def test_batch_rows_of_each_rank(runs):
    # 6 rows over 2 ranks: rank r trains on rows [3r, 3r + 3); an evaluation batch of 3 splits 2 + 1.
    assert [res["rows"] for res in runs[2]] == [[[0, 1, 2], [0, 1], [0, 1, 2]], [[3, 4, 5], [2], [0, 1, 2]]]


def test_bad_layouts_are_named(runs):
    errors = runs[2][0]["errors"]
    assert errors["ep_size=3"] == "ValueError: ep_size=3 must be a positive divisor of the world size 2"
    assert errors["ep_size=True"].startswith("TypeError: ep_size=True must be an int")
    assert errors["experts"] == "ValueError: num_experts=3 is not divisible by ep_size=2"
    assert errors["group"].startswith("ValueError: parallelize(ep_size=..., fsdp=..., units=...) lays out every rank")
    assert errors["unit"] == "ValueError: units holds Linear, which is not a submodule of the model"
    assert errors["twice"] == "ValueError: this model is already parallelized"
    assert errors["shard"] == "ValueError: a batch of 3 rows does not split over 2 ranks"


def test_a_dying_rank_ends_every_rank_with_a_named_cause():
    with pytest.raises(RuntimeError) as info:
        spawn_local(dying_rank, 4, timeout_s=15.0)
    message = str(info.value)
    assert "4 of 4 ranks failed" in message and "rank 1 gives up" in message
    assert "killed" not in message  # every rank ended by itself, none hung until spawn_local's deadline
    for rank in (0, 2, 3):
        part = message.split(f"rank {rank}:")[1].split("\nrank ")[0]
        assert "Connection closed by peer" in part or "Timed out" in part, part[-2000:]
