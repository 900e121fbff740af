"""The top-k router: today's renormalised softmax, and the variants of today's models."""

import math

import pytest
import torch

import moekit


def test_topk_gates_are_renormalised_over_the_kept_logits():
    r = moekit.TopKRouter(6, 5, 3)
    x = torch.randn(8, 6)
    routing = r(x)
    logits = x @ r.w_gate.detach()
    top, idx = logits.topk(3, dim=-1)
    assert routing.indices.tolist() == idx.tolist()
    torch.testing.assert_close(routing.weights, torch.softmax(top, -1))
    assert routing.stats.load.tolist() == routing.stats.counts.float().tolist()


def _router_with_logits(logits: list[float], **kwargs) -> tuple[moekit.TopKRouter, torch.Tensor]:
    """A router whose single token [1, 0, ...] has exactly these logits."""
    num_experts = len(logits)
    r = moekit.TopKRouter(num_experts, num_experts, **kwargs)
    with torch.no_grad():
        r.w_gate.zero_()
        r.w_gate[0] = torch.tensor(logits)
    x = torch.zeros(1, num_experts)
    x[0, 0] = 1.0
    return r, x


def test_default_is_the_old_router_bit_for_bit():
    r = moekit.TopKRouter(6, 5, 3)
    x = torch.randn(9, 6)
    routing = r(x)
    top, idx = (x @ r.w_gate.detach()).topk(3, dim=-1)
    assert torch.equal(routing.indices, idx) and torch.equal(routing.weights, torch.softmax(top, -1))
    assert set(r.state_dict()) == {"w_gate"}  # no new parameter or buffer by default
    assert r.extra_repr() == "dim=6, num_experts=5, k=3"


def test_deepseek_group_limited_sigmoid_routing_by_hand():
    # sigmoid([2, -1, 1, 1.5]) = [0.8808, 0.2689, 0.7311, 0.8176]. Groups {0, 1} and {2, 3} score
    # 0.8808 + 0.2689 = 1.1497 and 0.7311 + 0.8176 = 1.5487: only group 1 is eligible, so the best
    # expert overall (0) is not taken. Weights 0.8176 / 1.5487 = 0.5279 and 0.4721, times 2.5.
    r, x = _router_with_logits([2.0, -1.0, 1.0, 1.5], k=2, score="sigmoid", scale=2.5, num_groups=2,
                               topk_groups=1)
    routing = r(x)
    assert routing.indices.tolist() == [[3, 2]]
    s = torch.sigmoid(torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(routing.weights, (2.5 * s / s.sum())[None])
    torch.testing.assert_close(routing.weights, torch.tensor([[1.3198, 1.1802]]), atol=1e-4, rtol=0)


def test_sigmoid_group_score_is_the_sum_of_the_two_best():
    # Groups of 3: {0,1,2} has the single best expert (0.99) but sums 0.99+0.1 = 1.09 at best;
    # {3,4,5} sums 0.65+0.6 = 1.25 and wins with topk_groups=1.
    probs = torch.tensor([0.99, 0.1, 0.05, 0.6, 0.65, 0.01])
    r, x = _router_with_logits(torch.logit(probs).tolist(), k=1, score="sigmoid", num_groups=2, topk_groups=1)
    assert r(x).indices.tolist() == [[4]]
    r_all, _ = _router_with_logits(torch.logit(probs).tolist(), k=1, score="sigmoid", num_groups=2, topk_groups=2)
    assert r_all(x).indices.tolist() == [[0]]


def test_expert_bias_changes_the_selection_but_not_the_weights():
    # softmax([2, 1, 0, -1]) = [0.6439, 0.2369, 0.0871, 0.0321]; a bias of 1 on expert 3 makes its
    # choice score 1.0321 > 0.6439: it is selected, and its weight is its unbiased probability.
    r, x = _router_with_logits([2.0, 1.0, 0.0, -1.0], k=1, normalize=False, expert_bias=True)
    assert r(x).indices.tolist() == [[0]]
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    routing = r(x)
    assert routing.indices.tolist() == [[3]]
    expected = math.exp(-1.0) / sum(math.exp(v) for v in (2.0, 1.0, 0.0, -1.0))
    assert routing.weights.item() == pytest.approx(expected, rel=1e-6)  # 0.0321


def test_softmax_unnormalised_weights_are_the_full_softmax_values():
    # Qwen2-MoE / OLMoE: softmax over all experts, keep the top k values as they are.
    r, x = _router_with_logits([0.5, 2.0, -1.0, 1.0], k=2, normalize=False)
    routing = r(x)
    p = torch.softmax(torch.tensor([0.5, 2.0, -1.0, 1.0]), -1)
    assert routing.indices.tolist() == [[1, 3]]
    torch.testing.assert_close(routing.weights, p[[1, 3]][None])
    assert routing.weights.sum() < 1


def test_sigmoid_unnormalised_is_llama4s_score():
    r, x = _router_with_logits([0.5, 2.0, -1.0, 1.0], k=1, score="sigmoid", normalize=False)
    routing = r(x)
    assert routing.indices.tolist() == [[1]]
    assert routing.weights.item() == pytest.approx(1 / (1 + math.exp(-2.0)), rel=1e-6)


def test_logit_bias_is_learned_and_enters_selection_and_weights():
    r, x = _router_with_logits([1.0, 0.0, 0.0], k=2, logit_bias=True)
    assert r.logit_bias.shape == (3,) and r.logit_bias.abs().sum() == 0
    with torch.no_grad():
        r.logit_bias.copy_(torch.tensor([0.0, 3.0, 0.5]))  # logits become [1, 3, 0.5]
    routing = r(x)
    assert routing.indices.tolist() == [[1, 0]]
    torch.testing.assert_close(routing.weights, torch.softmax(torch.tensor([[3.0, 1.0]]), -1))
    (grad,) = torch.autograd.grad(routing.weights[0, 0], [r.logit_bias])
    assert grad[1] > 0 and grad[0] < 0 and grad[2] == 0


def test_scale_multiplies_the_weights_and_the_importance():
    x = torch.randn(10, 6)
    torch.manual_seed(1)
    plain = moekit.TopKRouter(6, 4, 2, score="sigmoid")
    torch.manual_seed(1)
    scaled = moekit.TopKRouter(6, 4, 2, score="sigmoid", scale=2.5)
    a, b = plain(x), scaled(x)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(b.weights, 2.5 * a.weights)
    torch.testing.assert_close(b.stats.importance, 2.5 * a.stats.importance)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"score": "tanh"}, ValueError, "score='tanh'"),
        ({"topk_groups": 3, "num_groups": 2}, ValueError, "topk_groups=3 exceeds num_groups=2"),
        ({"num_groups": 3}, ValueError, "num_groups=3 does not divide num_experts=8"),
        ({"num_groups": 4, "topk_groups": 1, "k": 3}, ValueError, "k=3 exceeds the 2 eligible experts"),
        ({"scale": -2.5}, ValueError, "scale=-2.5"),
        ({"scale": float("nan")}, ValueError, "scale=nan"),
        ({"num_groups": 0}, ValueError, "num_groups=0"),
        ({"topk_groups": 0}, ValueError, "topk_groups=0"),
        ({"normalize": 1}, TypeError, "normalize must be a bool"),
        ({"expert_bias": "yes"}, TypeError, "expert_bias must be a bool"),
    ],
)
def test_bad_options_name_the_value(kwargs, exc, match):
    args = {"k": 2, **kwargs}
    with pytest.raises(exc, match=match):
        moekit.TopKRouter(6, 8, **args)
    with pytest.raises(exc, match=match):  # the same through the layer
        moekit.MoE(6, 8, args.pop("k"), 4, router="topk", router_kwargs=args)


def test_expert_bias_is_a_saved_buffer_and_the_load_is_not():
    r = moekit.TopKRouter(6, 4, 2, expert_bias=True)
    state = r.state_dict()
    assert set(state) == {"w_gate", "expert_bias"} and state["expert_bias"].dtype == torch.float32
    assert "expert_bias" not in dict(r.named_parameters())
    r2 = moekit.TopKRouter(6, 4, 2, expert_bias=True)
    r.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    r2.load_state_dict(r.state_dict())
    assert torch.equal(r2.expert_bias, r.expert_bias)


def test_expert_bias_does_not_change_gradients_of_the_gate_beyond_the_selection():
    # With the selection fixed, the weights (and their gradient) do not depend on the bias value.
    torch.manual_seed(2)
    r = moekit.TopKRouter(5, 4, 2, score="sigmoid", expert_bias=True)
    x = torch.randn(6, 5)
    a = r(x)
    (ga,) = torch.autograd.grad(a.weights.sum(), [r.w_gate])
    r.expert_bias.fill_(7.0)  # the same shift for every expert: the same selection
    b = r(x)
    (gb,) = torch.autograd.grad(b.weights.sum(), [r.w_gate])
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights) and torch.equal(ga, gb)
