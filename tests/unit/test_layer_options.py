"""The layer options of today's MoE models: shared experts, biases, input gating, the clamped SwiGLU,
the per-sequence capacity; hand-derived values and argument errors."""

import math

import pytest
import torch

import moekit
from moekit.experts import clamped_swiglu


def test_default_state_dict_keys_are_unchanged():
    relu = moekit.MoE(8, 4, 2, 16)
    assert list(relu.state_dict()) == ["router.w_gate", "router.w_noise", "experts.w1", "experts.b1", "experts.w2",
                                       "experts.b2"]
    swiglu = moekit.MoE(8, 4, 2, 16, activation="swiglu")
    assert list(swiglu.state_dict())[2:] == ["experts.w1", "experts.b1", "experts.w2", "experts.b2", "experts.w3"]


def test_bias_false_builds_no_biases_at_all():
    moe = moekit.MoE(8, 4, 2, 16, bias=False, activation="swiglu")
    assert moe.experts.b1 is None and moe.experts.b2 is None and moe.experts.b3 is None
    assert list(moe.state_dict())[2:] == ["experts.w1", "experts.w2", "experts.w3"]
    # Without biases an all-zero input gives an all-zero output (with them it would not).
    assert moe(torch.zeros(3, 8)).y.abs().max() == 0


def test_clamped_swiglu_has_its_up_bias_and_settings():
    moe = moekit.MoE(8, 4, 2, 16, activation="clamped_swiglu", activation_kwargs={"limit": 5.0})
    assert moe.experts.b3.shape == (4, 16) and moe.experts.settings == {"alpha": 1.702, "limit": 5.0}
    assert "alpha=1.702, limit=5" in repr(moe.experts)
    assert list(moe.state_dict())[2:] == ["experts.w1", "experts.b1", "experts.w2", "experts.b2", "experts.w3",
                                          "experts.b3"]


def test_clamped_swiglu_values_by_hand():
    # gate 10 -> clamped to 7, up -9 -> clamped to -7: (-7 + 1) * 7 * sigmoid(1.702 * 7) = -42 * 0.99999...
    # gate -3 (no lower clamp), up 0.5: 1.5 * -3 * sigmoid(-5.106) = -4.5 * 0.006028
    gate, up = torch.tensor([10.0, -3.0]), torch.tensor([-9.0, 0.5])
    out = clamped_swiglu(gate, up, alpha=1.702, limit=7.0)
    expected = [-42.0 / (1 + math.exp(-1.702 * 7)), -4.5 / (1 + math.exp(1.702 * 3))]
    assert out.tolist() == pytest.approx(expected, rel=1e-6)
    # Clamped inputs get no gradient through the clamp.
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    clamped_swiglu(g, u, 1.702, 7.0).sum().backward()
    assert g.grad[0] == 0 and u.grad[0] == 0 and g.grad[1] != 0 and u.grad[1] != 0


def test_shared_experts_are_one_dense_ffn_added_to_the_routed_output():
    torch.manual_seed(0)
    moe = moekit.MoE(6, 4, 2, 5, router="topk", shared_experts=3, shared_hidden_dim=2)
    names = [n for n, _ in moe.named_parameters() if n.startswith("shared")]
    assert names == ["shared.w1", "shared.b1", "shared.w2", "shared.b2"] and all("shared" in n for n in names)
    assert moe.shared.w1.shape == (6, 6) and moe.shared.w2.shape == (6, 6)  # 3 experts of width 2
    x = torch.randn(2, 5, 6)
    with_shared = moe(x).y
    shared = moe.shared
    moe.shared = None
    routed = moe(x).y
    expected = torch.relu(x @ shared.w1 + shared.b1) @ shared.w2 + shared.b2
    torch.testing.assert_close(with_shared, routed + expected)


def test_shared_hidden_dim_defaults_to_hidden_dim_and_gate_is_sigmoid_of_a_dot_product():
    torch.manual_seed(0)
    moe = moekit.MoE(6, 4, 2, 5, router="topk", shared_experts=1, shared_gate=True, activation="swiglu", bias=False)
    assert moe.shared.w1.shape == (6, 5) and moe.shared.w_gate.shape == (6,) and moe.shared.b1 is None
    x = torch.randn(7, 6)
    s = moe.shared
    plain = (torch.nn.functional.silu(x @ s.w1) * (x @ s.w3)) @ s.w2
    torch.testing.assert_close(s(x), torch.sigmoid(x @ s.w_gate)[:, None] * plain)


def test_padding_gets_zero_output_and_no_gradient_with_shared_experts():
    moe = moekit.MoE(6, 4, 2, 5, router="topk", shared_experts=1, shared_gate=True)
    x = torch.randn(2, 4, 6, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    out = moe(x, mask)
    (out.y.sum() + out.aux_loss).backward()
    assert (out.y[~mask] == 0).all() and (out.y[mask] != 0).all()
    assert (x.grad[~mask] == 0).all()
    assert moe.shared.w_gate.grad.abs().sum() > 0


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
    moe.to_empty(device="cpu")  # materialised, it runs
    assert moe(torch.randn(3, 8)).y.shape == (3, 8)
