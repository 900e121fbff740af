"""The MoE layer's contract: shapes, dtypes, masks, stats and errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit


def test_output_is_a_named_tuple_with_documented_fields():
    moe = moekit.MoE(dim=8, num_experts=4, k=2, hidden_dim=16)
    x = torch.randn(2, 3, 8)
    out = moe(x)
    y, aux_loss, stats = out
    assert isinstance(out, moekit.MoEOutput) and y is out.y
    assert y.shape == x.shape and y.dtype == x.dtype
    assert aux_loss.shape == ()
    assert isinstance(stats, moekit.RoutingStats)
    assert stats.importance.shape == (4,) and stats.load.shape == (4,)
    assert stats.counts.dtype == torch.long and stats.counts.sum().item() == 12
    assert isinstance(stats.dropped, int) and stats.dropped == 0
    assert set(stats.losses) == {"importance", "load"}


def test_parameter_layout_matches_contract():
    moe = moekit.MoE(dim=8, num_experts=4, k=2, hidden_dim=16)
    e = moe.experts
    assert (e.w1.shape, e.b1.shape, e.w2.shape, e.b2.shape) == ((4, 8, 16), (4, 16), (4, 16, 8), (4, 8))
    assert moe.router.w_gate.shape == (8, 4) and moe.router.w_noise.shape == (8, 4)


def test_device_and_dtype_arguments_including_meta():
    moe = moekit.MoE(8, 4, 2, 16, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in moe.parameters())
    big = moekit.MoE(1024, 512, 4, 4096, device="meta")
    assert big.experts.w1.is_meta and big.experts.w1.shape == (512, 1024, 4096)


def test_router_runs_in_float32_under_autocast():
    moe = moekit.MoE(8, 4, 2, 16)
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)
    assert out.stats.importance.dtype == torch.float32 and out.aux_loss.dtype == torch.float32
    assert out.y.dtype == torch.float32  # same dtype as the input


def test_bfloat16_layer_keeps_dtype():
    moe = moekit.MoE(8, 4, 2, 16, dtype=torch.bfloat16)
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    out = moe(x)
    assert out.y.dtype == torch.bfloat16 and torch.isfinite(out.y.float()).all()


def test_capacity_drops_are_reported():
    moe = moekit.MoE(8, 4, k=2, hidden_dim=16, router="topk", capacity_factor=0.5)
    out = moe(torch.randn(40, 8))
    cap = 10  # ceil(40 * 2 * 0.5 / 4)
    assert (out.stats.counts <= cap).all()
    assert out.stats.counts.sum().item() + out.stats.dropped == 80
    assert out.stats.dropped >= 40


@settings(max_examples=20, deadline=None)
@given(router=st.sampled_from(["noisy_topk", "topk", "switch"]), cf=st.sampled_from([None, 1.0]),
       seed=st.integers(0, 1000), n_pad=st.integers(1, 5))
def test_masked_tokens_change_neither_other_outputs_nor_stats(router, cf, seed, n_pad):
    # Appending padding tokens with arbitrary values must leave the real tokens' outputs, the
    # aux loss and every statistic as they are without them (eval: no noise draw to disturb).
    torch.manual_seed(seed)
    moe = moekit.MoE(6, 4, k=2, hidden_dim=8, router=router, capacity_factor=cf, dtype=torch.float64).eval()
    with torch.no_grad():
        moe.router.w_gate.normal_()
    real = torch.randn(7, 6, dtype=torch.float64)
    pad = torch.randn(n_pad, 6, dtype=torch.float64) * 100
    alone = moe(real)
    padded = moe(torch.cat([real, pad]), mask=torch.arange(7 + n_pad) < 7)
    torch.testing.assert_close(padded.y[:7], alone.y)
    assert (padded.y[7:] == 0).all()
    torch.testing.assert_close(padded.aux_loss, alone.aux_loss)
    for a, b in zip(padded.stats[:3], alone.stats[:3], strict=True):
        torch.testing.assert_close(a, b)
    assert padded.stats.dropped == alone.stats.dropped


def test_masked_padding_gets_no_gradient_in_training():
    moe = moekit.MoE(6, 4, k=2, hidden_dim=8).train()
    x = torch.randn(2, 5, 6, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out = moe(x, mask)
    (out.y.sum() + out.aux_loss).backward()
    assert (x.grad[~mask] == 0).all() and (x.grad[mask] != 0).any()


def test_torch_compile_matches_eager():
    moe = moekit.MoE(8, 4, k=2, hidden_dim=16, router="topk").eval()
    x = torch.randn(12, 8)
    compiled = torch.compile(moe, backend="eager")
    torch.testing.assert_close(compiled(x).y, moe(x).y)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"k": 5}, ValueError, "k=5 exceeds num_experts=4"),
        ({"router": "nope"}, ValueError, "unknown router 'nope'"),
        ({"router": 3}, TypeError, "router must be a registered name or an nn.Module"),
        ({"capacity_factor": 0.0}, ValueError, "capacity_factor=0.0"),
        ({"activation": "tanh"}, ValueError, "activation='tanh'"),
        ({"hidden_dim": 0}, ValueError, "hidden_dim=0"),
    ],
)
def test_constructor_errors_name_the_bad_value(kwargs, exc, match):
    args = {"dim": 8, "num_experts": 4, "k": 2, "hidden_dim": 16, **kwargs}
    with pytest.raises(exc, match=match):
        moekit.MoE(**args)


def test_forward_errors_name_the_bad_value():
    moe = moekit.MoE(8, 4, 2, 16)
    with pytest.raises(ValueError, match=r"last dimension must be dim=8, got shape \(2, 3, 7\)"):
        moe(torch.randn(2, 3, 7))
    with pytest.raises(TypeError, match="floating point, got dtype=torch.int32"):
        moe(torch.ones(3, 8, dtype=torch.int32))
    x = torch.randn(2, 3, 8)
    x[1, 0, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        moe(x)
    with pytest.raises(ValueError, match=r"mask shape \(2, 4\) must equal .* \(2, 3\)"):
        moe(torch.randn(2, 3, 8), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        moe(torch.randn(2, 3, 8), mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        moe([[0.0] * 8])


def test_hierarchical_errors_and_shapes():
    with pytest.raises(ValueError, match="k=3 exceeds num_experts=2"):
        moekit.HierarchicalMoE(8, num_groups=2, experts_per_group=4, k_primary=3)
    h = moekit.HierarchicalMoE(8, num_groups=2, experts_per_group=4, hidden_dim=8)
    out = h(torch.randn(3, 4, 8))
    assert out.y.shape == (3, 4, 8) and out.stats.counts.shape == (8,)


def test_torch_compile_inductor_matches_eager_in_eval():
    # Inductor draws its own random numbers, so noisy routing in training differs by design;
    # in eval the compiled layer must reproduce eager exactly (up to float rounding).
    moe = moekit.MoE(16, 4, k=2, hidden_dim=32).eval()
    with torch.no_grad():
        moe.router.w_gate.normal_()
    x = torch.randn(24, 16)
    compiled = torch.compile(moe)
    out, ref = compiled(x), moe(x)
    torch.testing.assert_close(out.y, ref.y, rtol=1e-4, atol=1e-5)
    assert out.stats.counts.tolist() == ref.stats.counts.tolist()


@pytest.mark.parametrize("backend", ["loop", "bmm"])
def test_all_padding_batch_routes_nothing(backend):
    moe = moekit.MoE(8, 4, 2, 16, expert_backend=backend).train()
    x = torch.randn(3, 8, requires_grad=True)
    out = moe(x, mask=torch.zeros(3, dtype=torch.bool))
    out.y.sum().backward()
    assert (out.y == 0).all() and out.stats.counts.sum() == 0 and (x.grad == 0).all()


@pytest.mark.parametrize("router", [*moekit.routers(), "hierarchical"])
@pytest.mark.parametrize("cf", [None, 1.0])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_gives_empty_output_and_zero_losses(router, cf, training):
    # A rank of a sharded batch may hold no token; so may the last batch of a data loader.
    if router == "hierarchical":
        moe = moekit.HierarchicalMoE(8, 2, 2, k_primary=2, k_secondary=1, hidden_dim=6, capacity_factor=cf)
    else:
        moe = moekit.MoE(8, 4, k=1 if router == "switch" else 2, hidden_dim=6, router=router, capacity_factor=cf)
    x = torch.randn(0, 8, requires_grad=True)
    out = moe.train(training)(x)
    (out.y.sum() + out.aux_loss).backward()
    assert out.y.shape == (0, 8) and x.grad.shape == (0, 8)
    assert out.aux_loss.item() == 0.0 and out.stats.counts.sum() == 0 and out.stats.dropped == 0
    assert all(torch.isfinite(loss) for loss in out.stats.losses.values()), out.stats.losses


def test_gate_input_equals_gate_output_for_a_bias_free_relu_expert():
    # relu(w x W1) W2 = w relu(x W1) W2 for w >= 0: input and output gating agree exactly here,
    # and differ for SwiGLU (silu(w h) (w u) is not w silu(h) u).
    torch.manual_seed(0)
    kw = dict(router="topk", bias=False, dtype=torch.float64)
    out_gated = moekit.MoE(6, 4, 2, 5, **kw)
    in_gated = moekit.MoE(6, 4, 2, 5, gate_input=True, **kw)
    in_gated.load_state_dict(out_gated.state_dict())
    x = torch.randn(9, 6, dtype=torch.float64)
    torch.testing.assert_close(in_gated(x).y, out_gated(x).y)
    kw["activation"] = "swiglu"
    out_gated, in_gated = moekit.MoE(6, 4, 2, 5, **kw), moekit.MoE(6, 4, 2, 5, gate_input=True, **kw)
    in_gated.load_state_dict(out_gated.state_dict())
    assert not torch.allclose(in_gated(x).y, out_gated(x).y)


def test_sequence_capacity_keeps_the_first_tokens_of_each_sequence():
    # Every token prefers expert 0 (SwitchTransformers' top-1 router); C = 2 per sequence: tokens
    # 0 and 1 of each sequence are computed, 2 and 3 dropped (output 0), as HF's cumsum <= C keeps.
    moe = moekit.MoE(4, 2, 1, 3, router="switch", sequence_capacity=2, bias=False)
    with torch.no_grad():
        moe.router.w_gate.copy_(torch.tensor([[5.0, -5.0]] * 4))
    x = torch.rand(2, 4, 4) + 0.1  # positive: expert 0 wins everywhere
    out = moe(x)
    assert out.stats.counts.tolist() == [4, 0] and out.stats.dropped == 4
    assert (out.y[:, 2:] == 0).all() and (out.y[:, :2] != 0).all()
    # A padding token claims no place: with token 0 padded, tokens 1 and 2 of sequence 0 are kept.
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 0] = False
    out = moe(x, mask)
    assert (out.y[0, 1:3] != 0).all() and (out.y[0, 3] == 0).all() and out.stats.counts.tolist() == [4, 0]


def test_sequence_capacity_with_batch_priority_keeps_the_most_confident_tokens():
    moe = moekit.MoE(2, 2, 1, 3, router="switch", sequence_capacity=1, batch_prioritized=True)
    with torch.no_grad():
        moe.router.w_gate.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    x = torch.tensor([[[0.5, 0.0], [2.0, 0.0], [1.0, 0.0]]])  # token 1 is the most confident for expert 0
    out = moe(x)
    kept = (out.y[0] != 0).any(-1).tolist()
    assert kept == [False, True, False]


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"shared_experts": -1}, ValueError, "shared_experts=-1"),
        ({"shared_gate": True}, ValueError, "need shared_experts >= 1"),
        ({"shared_hidden_dim": 4}, ValueError, "need shared_experts >= 1"),
        ({"shared_experts": 1, "shared_hidden_dim": 0}, ValueError, "shared_hidden_dim=0"),
        ({"sequence_capacity": 0}, ValueError, "sequence_capacity=0"),
        ({"sequence_capacity": 2, "capacity_factor": 1.0}, ValueError, "cannot both be set"),
        ({"gate_input": "yes"}, TypeError, "gate_input must be a bool"),
        ({"bias": 0}, TypeError, "bias must be a bool"),
        ({"activation": "clamped_swiglu", "activation_kwargs": {"limit": -1}}, ValueError, "limit=-1"),
        ({"activation": "clamped_swiglu", "activation_kwargs": {"beta": 1}}, ValueError, r"\['beta'\]"),
        ({"activation": "relu", "activation_kwargs": {"alpha": 1}}, ValueError, "do not apply to activation='relu'"),
        ({"activation": "clamped_swiglu", "activation_kwargs": {"alpha": float("nan")}}, ValueError, "alpha=nan"),
        ({"activation": "clamped_swiglu", "activation_kwargs": 3}, TypeError, "activation_kwargs must be a dict"),
        # NaN slips through "<= 0"; inf would give every expert an infinite buffer.
        ({"capacity_factor": float("nan")}, ValueError, "capacity_factor=nan must be a finite number > 0"),
        ({"capacity_factor": float("inf")}, ValueError, "capacity_factor=inf must be a finite number > 0"),
        ({"capacity_factor": -1.0}, ValueError, "capacity_factor=-1.0"),
        ({"capacity_factor": True}, TypeError, "capacity_factor must be a number"),
        ({"capacity_factor": "1.5"}, TypeError, "capacity_factor must be a number"),
        ({"capacity_factor": 1.0, "batch_prioritized": "yes"}, TypeError, "batch_prioritized must be a bool"),
        ({"w_importance": float("nan")}, ValueError, "w_importance=nan must be a finite number >= 0"),
        ({"w_load": -0.1}, ValueError, "w_load=-0.1 must be a finite number >= 0"),
        ({"w_load": float("inf")}, ValueError, "w_load=inf"),
    ],
)
def test_option_errors_name_the_bad_value(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        moekit.MoE(8, 4, 2, 16, **kwargs)


def test_sequence_capacity_needs_sequences():
    moe = moekit.MoE(8, 4, 2, 16, sequence_capacity=3)
    with pytest.raises(ValueError, match=r"sequence_capacity=3 needs an input .* got shape \(5, 8\)"):
        moe(torch.randn(5, 8))


def test_a_layer_on_the_meta_device_is_built_but_not_run():
    # Building on the meta device is supported (shapes only, to shard or materialise later);
    # running it, or giving any layer meta input, is a ValueError naming the cause.
    moe = moekit.MoE(8, 4, 2, 16, device="meta")
    assert moe.experts.w1.device.type == "meta"
    with pytest.raises(ValueError, match="weights are on the meta device"):
        moe(torch.randn(3, 8))
    with pytest.raises(ValueError, match="input is on the meta device"):
        moekit.MoE(8, 4, 2, 16)(torch.randn(3, 8, device="meta"))
    moe.to_empty(device="cpu")  # materialised (and initialised: to_empty leaves whatever memory held), it runs
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)
    assert moe(torch.randn(3, 8)).y.shape == (3, 8)


ROUTING_STATS_CASES = [
    {"router": "noisy_topk"},
    {"router": "topk", "activation": "swiglu", "bias": False},
    {"router": "topk", "router_kwargs": {"score": "sigmoid", "num_groups": 4, "topk_groups": 2, "expert_bias": True,
                                         "scale": 2.5}, "shared_experts": 1},
    {"router": "switch", "k": 1, "capacity_factor": 1.0},
    {"router": "batchwise"},
    {"router": "vmoe", "capacity_factor": 1.25, "batch_prioritized": True},
    {"router": "expert_choice"},
    {"router": "topk", "sequence_capacity": 3},
    {"router": "topk", "gate_input": True, "activation": "relu", "bias": False},
]


@pytest.mark.parametrize("kwargs", ROUTING_STATS_CASES)
@pytest.mark.parametrize("tokens", [1, 2, 13])
def test_without_routing_stats_an_eval_forward_gives_the_same_output(kwargs, tokens):
    kwargs = {"k": 2, **kwargs}
    torch.manual_seed(0)
    moe = moekit.MoE(16, 8, hidden_dim=24, **kwargs).eval()
    x = torch.randn(1, tokens, 16)
    mask = torch.ones(1, tokens, dtype=torch.bool)
    mask[0, -1] = tokens < 2  # a padding token, where there are several
    with torch.no_grad():
        full = moe(x, mask)
        moe.routing_stats = False
        lean = moe(x, mask)
    assert lean.stats is None and lean.aux_loss.item() == 0.0
    assert full.stats is not None
    assert torch.equal(lean.y, full.y)


def test_routing_stats_are_always_kept_in_training_and_checked_in_eval():
    moe = moekit.MoE(8, 4, 2, 12, router="topk", routing_stats=False)
    out = moe(torch.randn(5, 8))  # training mode: the balancing losses are needed
    assert out.stats is not None and out.aux_loss.item() > 0
    moe.eval()
    with pytest.raises(ValueError, match=r"NaN or Inf \(first at index \[2, 3\]"):
        bad = torch.randn(5, 8)
        bad[2, 3] = float("nan")
        moe(bad)
    with torch.no_grad():
        moe.router.w_gate.fill_(1.0)
    with pytest.raises(ValueError, match="gave non-finite combine weights"):
        moe(torch.full((3, 8), 1e38))
    with pytest.raises(TypeError, match="routing_stats must be a bool"):
        moekit.MoE(8, 4, 2, 12, routing_stats=1)


def test_a_router_of_ones_own_without_decide_still_serves_without_stats():
    class OwnRouter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = moekit.build_router("topk", 8, 4, 2)

        def forward(self, x_TD, mask_T=None):
            return self.inner(x_TD, mask_T)

    moe = moekit.MoE(8, 4, 2, 12, router=OwnRouter(), routing_stats=False).eval()
    with torch.no_grad():
        out = moe(torch.randn(3, 8))
    assert out.stats is None and out.y.shape == (3, 8)
