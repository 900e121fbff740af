"""Expert parallelism on 2 and 4 CPU processes (gloo) against the single-process layer on the gathered batch.

Each spawn runs many checks and returns raw tensors; the tests below compare them. A check passes
when the expert-parallel layer on rank r, fed rank r's tokens, gives the rows of the local layer
run on the concatenation of every rank's tokens (rank-major), with the same aux loss and stats, and
the same gradients: the input's and the experts' directly, the router's after summing over ranks.

Noise: a noisy router in training draws its noise for the whole batch and keeps its own rows
(``moekit.shards.randn_rows``), so the rank holding token t draws what the single process draws for
t when both start from the same generator state. ``token_noise`` makes the i-th ``randn_like`` of
each path start from the same state.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from datetime import timedelta
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import moekit
from moekit.parallel import (
    ProcessGroupShards,
    apply_expert_parallel,
    check_same_config,
    clip_grad_norm_,
    counting_collectives,
    expert_parameter_names,
    full_state_dict,
    load_distributed,
    parallelize,
    save_distributed,
    spawn_local,
    sync_gradients,
)
from moekit.routing.losses import hard_counts

DIM, HIDDEN = 6, 5
TIMEOUT_S = 60.0


@contextlib.contextmanager
def token_noise(seed: int):
    """Make the i-th ``torch.randn_like(t)`` draw from a generator seeded by ``(seed, i)``.

    A rank that drew for its own rows only would get the first rows of the table, not its own.
    """
    calls = itertools.count()

    def randn_like(t, **_):
        g = torch.Generator().manual_seed(seed * 1000 + next(calls))
        return torch.randn(t.shape, generator=g).to(t.dtype)

    with mock.patch("torch.randn_like", randn_like):
        yield


# --- layer equivalence -------------------------------------------------------------------------------
# tokens: tokens per rank, by world size. A 0 is an empty batch; a 1 routes to k experts only.
CASES = {
    "noisy-eval-dropless": dict(router="noisy_topk", train=False, tokens={2: (5, 3)}),
    "noisy-train-dropless": dict(router="noisy_topk", train=True, tokens={2: (4, 7)}),
    "noisy-train-capacity": dict(router="noisy_topk", train=True, cf=0.75, tokens={2: (6, 5), 4: (3, 5, 1, 4)}),
    "topk-capacity-bpr": dict(router="topk", train=True, cf=0.75, bpr=True, tokens={2: (7, 4)}),
    "vmoe-train-capacity-bpr": dict(router="vmoe", train=True, cf=1.0, bpr=True, tokens={2: (5, 7)}),
    # E^3: 2 members of 2 experts each; token t belongs to member t % 2, so shards hold even counts.
    "e3-train-masked": dict(router="e3", train=True, masked=True, tokens={2: (6, 4), 4: (2, 4, 0, 2)}),
    "empty-rank-capacity": dict(router="noisy_topk", train=True, cf=1.0, tokens={2: (6, 0), 4: (4, 0, 3, 2)}),
    "idle-experts": dict(router="noisy_topk", train=False, experts=8, tokens={2: (9, 1)}),
    # Every token goes to experts 0 and 1: the last rank's experts receive no row from anyone.
    "starved-rank": dict(router="noisy_topk", train=True, starve=True, tokens={2: (5, 4)}),
    "switch-masked": dict(router="switch", train=True, masked=True, tokens={2: (5, 6)}),
    "batchwise-train-capacity": dict(router="batchwise", train=True, cf=1.0, tokens={2: (5, 7)}),
    "batchwise-masked": dict(router="batchwise", train=True, masked=True, tokens={2: (6, 5)}),
    "hierarchical-empty-rank": dict(router="hierarchical", train=True, tokens={2: (5, 0)}),
    "hierarchical-train-bpr": dict(router="hierarchical", train=True, cf=1.0, bpr=True, tokens={2: (5, 6),
                                                                                               4: (2, 6, 3, 5)}),
    # Today's models: the topk variants, expert choice, shared experts, input gating, new activations.
    "deepseek-v3-masked": dict(router="topk", train=True, masked=True, tokens={2: (6, 5), 4: (3, 4, 0, 4)},
                               layer=dict(router_kwargs=dict(score="sigmoid", scale=2.5, num_groups=2, topk_groups=1,
                                                             expert_bias=True), shared_experts=1, bias=False,
                                          activation="swiglu")),
    "qwen2-capacity": dict(router="topk", train=True, cf=0.75, tokens={2: (7, 4)},
                           layer=dict(router_kwargs=dict(normalize=False), shared_experts=1, shared_gate=True)),
    "gpt-oss-bpr": dict(router="topk", train=True, cf=1.0, bpr=True, tokens={2: (5, 6)},
                        layer=dict(router_kwargs=dict(logit_bias=True), activation="clamped_swiglu",
                                   activation_kwargs=dict(limit=0.5))),
    "llama4-gate-input": dict(router="topk", k=1, train=True, masked=True, tokens={2: (6, 5)},
                              layer=dict(router_kwargs=dict(score="sigmoid", normalize=False), gate_input=True,
                                         shared_experts=1, bias=False, activation="swiglu")),
    "expert-choice-masked": dict(router="expert_choice", train=True, masked=True, tokens={2: (6, 5), 4: (2, 5, 3, 4)}),
    "expert-choice-empty-rank": dict(router="expert_choice", train=False, tokens={2: (7, 0)}),
    "switch-sequence-capacity": dict(router="switch", k=1, train=True, seq=3, tokens={2: (6, 9)},
                                     layer=dict(sequence_capacity=1)),
    # Rows of 8 floats and no biases: each rank's experts train through torch's CPU grouped GEMM.
    "mixtral-grouped-gemm": dict(router="topk", train=True, dim=8, hidden=8, tokens={2: (6, 5), 4: (3, 4, 0, 4)},
                                 layer=dict(bias=False, activation="swiglu")),
}


def build_layer(spec: dict) -> moekit.MoE:
    torch.manual_seed(0)
    kw = dict(hidden_dim=spec.get("hidden", HIDDEN), capacity_factor=spec.get("cf"),
              batch_prioritized=spec.get("bpr", False))
    if spec["router"] == "hierarchical":
        moe = moekit.HierarchicalMoE(DIM, 2, 4, k_primary=2, k_secondary=2, **kw)
    else:
        kw = {**kw, **spec.get("layer", {})}
        if "sequence_capacity" in kw:
            kw.pop("capacity_factor")
        moe = moekit.MoE(spec.get("dim", DIM), spec.get("experts", 4), k=spec.get("k", 2), router=spec["router"], **kw)
    with torch.no_grad():  # a gate with signal, so routing is not decided by ties
        for name, p in moe.router.named_parameters():
            if name.split(".")[-1].startswith("w_") or name == "logit_bias":
                p.normal_(0, 0.7)
        if getattr(moe.router, "expert_bias", None) is not None:
            moe.router.expert_bias.normal_(0, 0.1)
        if spec.get("starve"):  # with positive inputs, experts 2.. never win
            moe.router.w_gate[:, 2:] = -5.0
    return moe.train(spec["train"])


def run_layer(moe, x, mask, g, aux_scale, seq=None):
    """The layer on [T, D] tokens (as [T/seq, seq, D] sequences when ``seq`` is given); y and x.grad [T, D]."""
    x = x.clone().requires_grad_()
    x_in = x if seq is None else x.view(-1, seq, x.shape[-1])
    mask_in = mask if seq is None or mask is None else mask.view(-1, seq)
    with token_noise(seed=7):
        out = moe(x_in, mask_in)
    y = out.y.reshape(-1, x.shape[-1])
    ((y * g).sum() + out.aux_loss * aux_scale).backward()
    return out._replace(y=y), x.grad


def layer_case(rank: int, world: int, name: str) -> dict:
    spec = CASES[name]
    sizes = spec["tokens"][world]
    total, start = sum(sizes), sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    gen = torch.Generator().manual_seed(3)
    dim = spec.get("dim", DIM)
    x_all, g_all = torch.randn(total, dim, generator=gen), torch.randn(total, dim, generator=gen)
    if spec.get("starve"):
        x_all = x_all.abs()
    mask_all = torch.rand(total, generator=gen) > 0.3 if spec.get("masked") else None
    full = build_layer(spec)
    ep = apply_expert_parallel(copy.deepcopy(full))
    seq = spec.get("seq")
    ref, ref_gx = run_layer(full, x_all, mask_all, g_all, 1.0, seq)
    out, gx = run_layer(ep, x_all[rows], None if mask_all is None else mask_all[rows], g_all[rows], 1.0 / world, seq)
    with token_noise(seed=7):  # which experts rank r's own tokens chose
        routed = full.route(x_all, mask_all).indices[rows]
    lo, hi = ep.dispatcher.first_expert, ep.dispatcher.first_expert + ep.dispatcher.local_experts
    replicated_grads = {}  # the router's and the shared experts': each rank holds part of their gradient
    for n, p in ep.named_parameters():  # an unused parameter (w_noise in eval) counts as 0
        if n.startswith("experts."):
            continue
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)
        want = full.get_parameter(n).grad
        replicated_grads[n] = (grad, torch.zeros_like(p) if want is None else want)
    return {
        "y": (out.y, ref.y[rows]), "x_grad": (gx, ref_gx[rows]), "aux": (out.aux_loss, ref.aux_loss),
        "stats": (out.stats, ref.stats), "replicated_grads": replicated_grads,
        "expert_grads": {n: (torch.zeros_like(p) if p.grad is None else p.grad,
                             full.experts.get_parameter(n).grad[lo:hi])
                         for n, p in ep.experts.named_parameters()},
        "local_counts": hard_counts(routed, full.num_experts),
    }


# --- training, checkpoints, failures -----------------------------------------------------------------
VOCAB, BATCH, SEQ, STEPS = 13, 2, 3, 3


class TinyLM(nn.Module):
    """Embedding -> LSTM -> MoE -> hierarchical MoE -> logits, residual around each MoE."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.moe = moekit.MoE(8, 4, k=2, hidden_dim=6)
        self.hmoe = moekit.HierarchicalMoE(8, 2, 2, k_primary=2, k_secondary=1, hidden_dim=6)
        self.out = nn.Linear(8, VOCAB)
        with torch.no_grad():
            for n, p in self.named_parameters():
                if "router.w_" in n:
                    p.normal_(0, 0.5)

    def forward(self, tokens):
        h, _ = self.lstm(self.embed(tokens))
        a = self.moe(h)
        h = h + a.y
        b = self.hmoe(h)
        return self.out(h + b.y), a.aux_loss + b.aux_loss


def batches(step: int, world: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return list(torch.randint(0, VOCAB, (world * BATCH, SEQ + 1), generator=gen).split(BATCH))


def train_step(model, opt, tokens, step, distributed):
    """Mean next-token loss + aux; returns the loss of the whole batch (mean over ranks)."""
    with token_noise(seed=step):
        logits, aux = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)) + aux
    opt.zero_grad()
    loss.backward()
    if distributed:
        sync_gradients(model)
        clip_grad_norm_(model, 0.5)
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    opt.step()
    return loss.item()


def train_ep(rank: int, world: int, steps: range, model, opt):
    """Train the expert-parallel model on rank r's batch of each step; returns losses."""
    return [train_step(model, opt, batches(s, world)[rank], s, True) for s in steps]


def train_local(world: int, steps: range, model, opt):
    """The same steps in one process on the union of the ranks' batches."""
    return [train_step(model, opt, torch.cat(batches(s, world)), s, False) for s in steps]


def errors_of(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def collectives_per_step(capacity_factor: float | None, router: str = "noisy_topk") -> tuple[dict, dict]:
    """The collectives one training step of a layer makes: (forward, backward) by name."""
    moe = apply_expert_parallel(build_layer(dict(router=router, train=True, cf=capacity_factor)))
    x = torch.randn(6, DIM, requires_grad=True)
    with counting_collectives() as counts:
        out = moe(x)
        forward = dict(counts)
        counts.clear()
        (out.y.sum() + out.aux_loss).backward()
    return forward, dict(counts)


def sum_many_case(rank: int) -> tuple:
    """ProcessGroupShards.sum_many on integers too large for float32 and a differentiable tensor."""
    counts = torch.tensor([2**40 + rank, 3])
    v = torch.tensor([1.0 + rank, 2.0], requires_grad=True)
    total_counts, total_v = ProcessGroupShards().sum_many(counts, v)
    (total_v * torch.tensor([1.0, 10.0])).sum().backward()
    return total_counts, total_v.detach(), v.grad


def expert_bias_case(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the expert-parallel layer's selection bias, the local layer's) after three steps of
    ``update_expert_bias``, each rank training on its own tokens, the local layer on all of them."""
    spec = dict(router="topk", train=True, layer=dict(router_kwargs=dict(score="sigmoid", expert_bias=True)))
    full = build_layer(spec)
    ep = apply_expert_parallel(copy.deepcopy(full))
    for step in range(3):
        gen = torch.Generator().manual_seed(20 + step)
        x_all = torch.randn(4 * world, DIM, generator=gen) + torch.linspace(-1, 1, DIM)  # a skew to correct
        for moe, x in ((full, x_all), (ep, x_all.view(world, 4, DIM)[rank])):
            out = moe(x)
            (out.y.sum() + out.aux_loss).backward()
            moekit.update_expert_bias(moe, rate=0.05)
    return ep.router.expert_bias.clone(), full.router.expert_bias.clone()


def two_rank_run(rank: int, world: int, ckpt_1: str, ckpt_2: str) -> dict:
    res = {"layer": {name: layer_case(rank, world, name) for name, spec in CASES.items() if world in spec["tokens"]}}
    res["expert_bias"] = expert_bias_case(rank, world)
    shared = apply_expert_parallel(moekit.MoE(DIM, 4, 2, HIDDEN, shared_experts=2, shared_gate=True))
    res["shared_layout"] = (sorted(expert_parameter_names(shared)), shared.shared.w1.shape, shared.experts.w1.shape)
    res["collectives"] = {cf: collectives_per_step(cf) for cf in (None, 1.0)}
    res["collectives_by_router"] = {router: collectives_per_step(None, router) for router in ROUTER_COLLECTIVES}
    res["sum_many"] = sum_many_case(rank)
    res["bad_config"] = errors_of(lambda: check_same_config(TinyLM(0) if rank == 0 else nn.Linear(2, 2)))
    res["bad_split"] = errors_of(lambda: apply_expert_parallel(moekit.MoE(4, 3, k=2)))

    model = parallelize(TinyLM(seed=0))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    res["ep_losses"] = train_ep(rank, world, range(STEPS), model, opt)
    ref = TinyLM(seed=0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    res["local_losses"] = train_local(world, range(STEPS), ref, ref_opt)
    save_distributed(ckpt_2, model, opt)
    res["saved_state"] = {k: v.clone() for k, v in full_state_dict(model).items()}  # training goes on
    train_ep(rank, world, range(STEPS, STEPS + 1), model, opt)
    res["after_extra_step"] = full_state_dict(model)
    train_local(world, range(STEPS, STEPS + 1), ref, ref_opt)
    res["local_after_extra_step"] = ref.state_dict()

    single = parallelize(TinyLM(seed=5))  # a single-process checkpoint into an expert-parallel model
    load_distributed(ckpt_1, single)
    res["from_single"] = full_state_dict(single)

    # A collective one rank never joins must fail with a timeout, not hang.
    group = dist.new_group(timeout=timedelta(seconds=2))
    if rank == 0:
        t0 = time.monotonic()
        res["timeout"] = errors_of(lambda: dist.all_reduce(torch.ones(1), group=group))
        res["timeout_s"] = time.monotonic() - t0
    return res


def four_rank_run(rank: int, world: int, ckpt_2: str, ckpt_4: str) -> dict:
    res = {"layer": {name: layer_case(rank, world, name) for name, spec in CASES.items() if world in spec["tokens"]}}
    model = parallelize(TinyLM(seed=6))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    load_distributed(ckpt_2, model, opt)
    res["loaded_state"] = full_state_dict(model)
    save_distributed(ckpt_4, model, opt)
    return res


def dying_rank(rank: int, world: int) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 gives up")
    dist.all_reduce(torch.ones(1))


# --- the tests ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-rank spawn, one 4-rank spawn, and a single-process load, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("ep")
    ckpt_1, ckpt_2, ckpt_4 = (str(tmp / n) for n in ("ckpt1", "ckpt2", "ckpt4"))
    save_distributed(ckpt_1, TinyLM(seed=4))
    two = spawn_local(two_rank_run, 2, (ckpt_1, ckpt_2), timeout_s=TIMEOUT_S)
    four = spawn_local(four_rank_run, 4, (ckpt_2, ckpt_4), timeout_s=TIMEOUT_S)
    single = TinyLM(seed=7)
    opt = torch.optim.SGD(single.parameters(), lr=0.2, momentum=0.9)
    load_distributed(ckpt_4, single, opt)
    loaded_on_1 = copy.deepcopy(single.state_dict())
    train_local(2, range(STEPS, STEPS + 1), single, opt)
    return {2: two, 4: four, "loaded_on_1": loaded_on_1, "single_after_extra_step": single.state_dict()}


TOL = {"rtol": 1e-4, "atol": 1e-5}


def assert_pair(pair, what):
    got, want = pair
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{what}: {m}")


LAYER_RUNS = [(w, name) for name, spec in CASES.items() for w in sorted(spec["tokens"])]


@pytest.mark.parametrize("world,name", LAYER_RUNS, ids=[f"{n}-w{w}" for w, n in LAYER_RUNS])
def test_expert_parallel_layer_equals_local_layer_on_gathered_batch(runs, world, name):
    for rank, res in enumerate(runs[world]):
        case = res["layer"][name]
        where = f"{name}, rank {rank} of {world}"
        assert_pair(case["y"], f"output ({where})")
        assert_pair(case["x_grad"], f"input gradient ({where})")
        assert_pair(case["aux"], f"aux loss ({where})")
        got, want = case["stats"]
        assert_pair((got.importance, want.importance), f"importance ({where})")
        assert_pair((got.load, want.load), f"load ({where})")
        assert got.counts.tolist() == want.counts.tolist(), where
        assert got.dropped == want.dropped, where
        assert got.losses.keys() == want.losses.keys()
        for key in got.losses:
            assert_pair((got.losses[key], want.losses[key]), f"loss {key} ({where})")
        for n, pair in {**case["replicated_grads"], **case["expert_grads"]}.items():
            assert_pair(pair, f"gradient of {n} ({where})")
        if CASES[name].get("cf", 1.0) < 1.0:
            assert got.dropped > 0, "capacity below 1 must drop something, or this case tests nothing"


def test_update_expert_bias_is_identical_on_every_rank_and_equals_the_local_update(runs):
    biases = [res["expert_bias"] for res in runs[2]]
    for ep_bias, local_bias in biases:
        assert torch.equal(ep_bias, biases[0][0])
        torch.testing.assert_close(ep_bias, local_bias, rtol=0, atol=1e-7)
    assert biases[0][0].abs().sum() > 0


def test_shared_experts_are_replicated_not_sharded(runs):
    names, shared_shape, experts_shape = runs[2][0]["shared_layout"]
    assert names == ["experts.b1", "experts.b2", "experts.w1", "experts.w2"]
    assert tuple(shared_shape) == (DIM, 2 * HIDDEN) and tuple(experts_shape) == (2, DIM, HIDDEN)


def test_cases_cover_empty_batches_and_idle_experts(runs):
    assert runs[2][1]["layer"]["idle-experts"]["local_counts"].eq(0).any()  # rank 1 sends no token to some expert
    assert runs[2][1]["layer"]["empty-rank-capacity"]["y"][0].shape == (0, DIM)
    starved = runs[2][1]["layer"]["starved-rank"]["stats"][0].counts
    assert starved[2:].eq(0).all() and starved[:2].gt(0).all()  # rank 1's experts receive nothing


def test_training_steps_match_single_process_training_on_the_union_of_batches(runs):
    for res in runs[2]:
        assert res["ep_losses"] == pytest.approx(res["local_losses"], rel=1e-5)
        assert len(set(res["ep_losses"])) == STEPS  # the model did train
    for key, value in runs[2][0]["local_after_extra_step"].items():
        assert_pair((runs[2][0]["after_extra_step"][key], value), f"parameter {key} after training")


def test_checkpoint_resharding_round_trips(runs):
    saved = runs[2][0]["saved_state"]
    for rank, res in enumerate(runs[4]):  # saved on 2 ranks, loaded on 4
        for key, value in saved.items():
            assert torch.equal(res["loaded_state"][key], value), f"{key} on rank {rank} of 4"
    for key, value in saved.items():  # saved on 4 ranks, loaded in one process
        assert torch.equal(runs["loaded_on_1"][key], value), key
    # The optimizer state travelled too: one more step from it matches the uninterrupted run.
    for key, value in runs[2][0]["after_extra_step"].items():
        assert_pair((runs["single_after_extra_step"][key], value), f"{key} after resuming on 1 process")


def test_single_process_checkpoint_loads_into_expert_parallel_model(runs):
    want = TinyLM(seed=4).state_dict()
    for res in runs[2]:
        for key, value in want.items():
            assert torch.equal(res["from_single"][key], value), key


def test_sum_many_is_one_exact_differentiable_sum(runs):
    for res in runs[2]:
        counts, v, grad = res["sum_many"]
        assert counts.dtype == torch.long and counts.tolist() == [2 * 2**40 + 1, 6]  # exact past 2^24
        assert v.tolist() == [3.0, 4.0]
        assert grad.tolist() == [2.0, 20.0]  # every rank's loss reads the sum: the gradients add up


def test_a_layer_step_makes_few_collectives(runs):
    # Noisy top-k in training, per layer and step: the batch size for the noise draw, one all-reduce
    # of counts, importance and load together, and the three all-to-alls of dispatch (counts, rows
    # there, rows back); backward: the statistics' all-reduce and the two row all-to-alls.
    forward, backward = runs[2][0]["collectives"][None]
    assert forward == {"all_gather": 1, "all_reduce": 1, "all_to_all_single": 3}
    assert backward == {"all_reduce": 1, "all_to_all_single": 2}
    # A capacity adds the gathered routing (sizes, indices) and the post-drop counts.
    forward, backward = runs[2][0]["collectives"][1.0]
    assert forward == {"all_gather": 3, "all_reduce": 2, "all_to_all_single": 3}
    assert backward == {"all_reduce": 1, "all_to_all_single": 2}


# Collectives per training step (forward + backward) of a dropless layer, as docs/scaling.md states.
ROUTER_COLLECTIVES = {"topk": 7, "noisy_topk": 8, "vmoe": 8, "e3": 8, "hierarchical": 8, "switch": 7, "batchwise": 9,
                      "expert_choice": 9}


def test_every_router_fuses_its_statistics_into_one_all_reduce(runs):
    for router, (forward, backward) in runs[2][0]["collectives_by_router"].items():
        total = sum(forward.values()) + sum(backward.values())
        assert total == ROUTER_COLLECTIVES[router], (router, forward, backward)
        assert forward.get("all_reduce", 0) == 1 and backward.get("all_reduce", 0) == 1, (router, forward, backward)


def test_failures_are_loud(runs):
    first = runs[2][0]
    assert "rank 1" in first["bad_config"] and first["bad_config"].startswith("ValueError")
    assert "num_experts=3" in first["bad_split"] and "world size 2" in first["bad_split"]
    assert first["timeout"].startswith("RuntimeError") and first["timeout_s"] < 30


def test_a_dying_rank_ends_every_rank_with_an_error():
    with pytest.raises(RuntimeError) as info:
        spawn_local(dying_rank, 2, timeout_s=10.0)
    message = str(info.value)
    assert "2 of 2 ranks failed" in message and "rank 1 gives up" in message
