"""The expert bank: its parameters by option, the activations by hand, the backend choice."""

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


def test_auto_backend_choice_on_cpu():
    from moekit.experts import choose_compute

    x = torch.zeros(1, 4)
    backend, plan = choose_compute("auto", x, [100] * 8)
    assert backend == "bmm" and plan.rows == 800
    assert choose_compute("auto", x, [1] + [0] * 63, grad=False) == ("loop", None)  # memory-bound: touched experts only
    assert choose_compute("auto", x, [8] * 8, grad=False) == ("loop", None)
    assert choose_compute("auto", x, [9] * 8, grad=False)[0] == "bmm"
    assert choose_compute("auto", x, [1] + [0] * 63)[0] == "bmm"  # a backward: never the loop's stacked gradients
    assert choose_compute("auto", x, [0] * 8) == ("loop", None)  # no rows: the loop keeps the output in the graph
    assert choose_compute("loop", x, [100] * 8) == ("loop", None)
    backend, plan = choose_compute("bmm", x, [1] + [0] * 63)  # forced: padded all the same
    assert backend == "bmm" and plan.rows >= 1


def test_without_biases_torch_grouped_gemm_takes_the_loops_and_at_few_rows_the_padded_groups_place(monkeypatch):
    import moekit.experts.bank as bank
    from moekit.experts import choose_compute

    x = torch.zeros(1, 4)
    counts = [2] * 8  # 16 rows: the loop's regime
    if bank.cpu_grouped_mm_available(torch.float32):
        assert choose_compute("auto", x, counts, grad=False, cpu_grouped=True) == ("grouped_mm", None)
        # With a backward, up to MEMORY_BOUND_ROWS rows per expert, however few in all.
        assert choose_compute("auto", x, counts, grad=True, cpu_grouped=True) == ("grouped_mm", None)
        assert choose_compute("auto", x, [1] + [0] * 63, grad=True, cpu_grouped=True) == ("grouped_mm", None)
        # ... in float32 only (TRAIN_GROUPED_DTYPES): in bfloat16 the padded groups were as fast.
        assert choose_compute("auto", x.bfloat16(), counts, grad=True, cpu_grouped=True)[0] == "bmm"
    assert choose_compute("auto", x, counts, grad=False, cpu_grouped=False) == ("loop", None)  # e.g. biases
    assert choose_compute("auto", x, counts, grad=True, cpu_grouped=False)[0] == "bmm"
    assert choose_compute("auto", x, [1] * 8 + [0] * 8, grad=False, cpu_grouped=True) == ("loop", None)  # few rows
    assert choose_compute("auto", x, [9] * 8, grad=False, cpu_grouped=True)[0] == "bmm"  # past the memory-bound regime
    assert choose_compute("auto", x, [9] * 8, grad=True, cpu_grouped=True)[0] == "bmm"
    assert choose_compute("auto", x, [0] * 8, grad=True, cpu_grouped=True) == ("loop", None)  # no rows: see above
    monkeypatch.setattr(bank, "cpu_grouped_mm_available", lambda dtype: False)  # an older torch
    assert choose_compute("auto", x, counts, grad=False, cpu_grouped=True) == ("loop", None)
    assert choose_compute("auto", x, counts, grad=True, cpu_grouped=True)[0] == "bmm"
    # The bank decides whether it can: no biases, and rows a multiple of 16 bytes.
    assert moekit.MoE(32, 4, 2, 64, bias=False).experts.cpu_grouped(torch.zeros(1, 32))
    assert not moekit.MoE(32, 4, 2, 64).experts.cpu_grouped(torch.zeros(1, 32))
    assert not moekit.MoE(32, 4, 2, 66, bias=False).experts.cpu_grouped(torch.zeros(1, 32))  # 66 * 4 bytes


@pytest.mark.parametrize("activation", ["relu", "swiglu", "clamped_swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_gives_the_loops_values(activation, dtype):
    torch.manual_seed(0)
    moe = moekit.MoE(32, 8, 2, 64, router="topk", activation=activation, bias=False).to(dtype).eval()
    x = torch.randn(24, 32, dtype=dtype)
    with torch.no_grad():
        moe.experts.backend = "loop"
        want = moe(x).y
        moe.experts.backend = "auto"
        got = moe(x).y
    assert torch.equal(got, want)


def test_the_bank_tells_the_backend_choice_whether_a_backward_follows(monkeypatch):
    import moekit.experts.bank as bank

    seen = []
    real = bank.choose_compute

    def spy(backend, x, counts, grad=True, cpu_grouped=False):
        seen.append(grad)
        return real(backend, x, counts, grad, cpu_grouped)

    monkeypatch.setattr(bank, "choose_compute", spy)
    moe = moekit.MoE(8, 4, 2, 12)
    x = torch.randn(5, 8)
    moe(x)
    with torch.no_grad():
        moe(x)
    with torch.inference_mode():
        moe(x)
    moe.requires_grad_(False)
    moe(x)
    moe(x.requires_grad_())
    assert seen == [True, False, False, False, True]


def _routed(num_experts, k, tokens, activation, bias, dtype, seed=0):
    """A bank, its input, and a top-k routing with one empty slot (as a padding token leaves)."""
    torch.manual_seed(seed)
    moe = moekit.MoE(16, num_experts, k, 24, router="topk", activation=activation, bias=bias).to(dtype).eval()
    x = torch.randn(tokens, 16, dtype=dtype)
    with torch.no_grad():
        routing = moe.route(x, None)
    indices = routing.indices.clone()
    if tokens > 1:
        indices[0, 0] = -1
    return moe.experts, x, indices, routing.weights


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu", "clamped_swiglu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_experts,k,tokens", [(4, 1, 1), (8, 2, 1), (8, 4, 1), (4, 2, 2), (8, 4, 3), (2, 2, 6)])
def test_forward_few_equals_the_sorted_path_bit_for_bit(activation, bias, dtype, num_experts, k, tokens):
    from moekit.dispatch.sort import sort_by_expert

    experts, x, indices, weights = _routed(num_experts, k, tokens, activation, bias, dtype)
    with torch.no_grad():
        want = experts.forward_tokens(x, sort_by_expert(indices, num_experts), weights)
        got = experts.forward_few(x, indices, weights)
    # Several rows for one expert (tokens > 1), several outputs for one token (k > 1), bfloat16's
    # float32 accumulation: all as the sorted combine does them.
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_forward_few_is_taken_only_for_a_few_tokens_without_a_backward():
    from moekit.experts.bank import FEW_TOKENS

    experts, x, indices, _ = _routed(8, 2, FEW_TOKENS, "relu", True, torch.float32)
    with torch.no_grad():
        assert experts.takes_few(x, indices)
        assert not experts.takes_few(torch.cat([x, x]), torch.cat([indices, indices]))  # more tokens: the sort
        experts.backend = "bmm"
        assert not experts.takes_few(x, indices)  # a forced backend is kept
        experts.backend = "loop"
        assert experts.takes_few(x, indices)
    assert not experts.takes_few(x, indices)  # a backward may follow: the weights require grad


def test_a_layer_at_one_token_takes_the_few_path_and_gives_what_the_sort_gives(monkeypatch):
    import moekit.experts.bank as bank

    moe = moekit.MoE(16, 8, 2, 24, router="topk", activation="swiglu", bias=False).eval()
    x = torch.randn(1, 1, 16)
    calls = []
    real = bank.Experts.forward_few
    monkeypatch.setattr(bank.Experts, "forward_few", lambda self, *a: calls.append(1) or real(self, *a))
    with torch.no_grad():
        few = moe(x)
        monkeypatch.setattr(bank, "FEW_TOKENS", 0)
        sorted_ = moe(x)
    assert calls == [1]
    assert torch.equal(few.y, sorted_.y) and torch.equal(few.stats.counts, sorted_.stats.counts)


def test_forward_few_refuses_an_expert_index_out_of_range():
    experts, x, indices, weights = _routed(4, 2, 1, "relu", True, torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match="expert index 4 is out of range for 4 experts"):
        experts.forward_few(x, torch.tensor([[1, 4]]), weights)
