"""Shared experts: one dense FFN added to the routed output, optionally gated, zero on padding."""

import torch

import moekit


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
