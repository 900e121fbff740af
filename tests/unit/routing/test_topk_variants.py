"""The token-choice variants of the "topk" router: hand-derived decisions, defaults, errors, and
auxiliary-loss-free balancing with ``update_expert_bias``."""

import math

import pytest
import torch

import moekit
from moekit.balance import bias_step, update_expert_bias


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


def test_bias_step_is_rate_times_the_sign_of_the_deviation_from_the_mean():
    # load [6, 2, 4, 0]: mean 3 -> signs [-1, +1, -1, +1]
    assert bias_step(torch.tensor([6.0, 2.0, 4.0, 0.0]), 0.01).tolist() == pytest.approx([-0.01, 0.01, -0.01, 0.01])
    assert bias_step(torch.tensor([3.0, 3.0]), 0.01).tolist() == [0.0, 0.0]  # at the mean: no move


def test_update_expert_bias_uses_training_counts_only_and_resets_them():
    torch.manual_seed(0)
    moe = moekit.MoE(6, 4, 2, 8, router="topk", router_kwargs={"expert_bias": True})
    router = moe.router
    x = torch.randn(20, 6)
    moe.eval()(x)
    assert router.expert_load.sum() == 0 and update_expert_bias(moe) == 0  # eval forwards do not count
    moe.train()
    counts_a = moe(x).stats.counts
    counts_b = moe(x[:7]).stats.counts
    load = (counts_a + counts_b).float()
    torch.testing.assert_close(router.expert_load, load)  # the step's micro-batches add up
    params = {n: p.detach().clone() for n, p in moe.named_parameters()}
    assert update_expert_bias(moe, rate=0.5) == 1
    torch.testing.assert_close(router.expert_bias, 0.5 * torch.sign(load.mean() - load))
    assert router.expert_load.sum() == 0
    assert all(torch.equal(p, params[n]) for n, p in moe.named_parameters())  # parameters untouched
    before = router.expert_bias.clone()
    update_expert_bias(moe)  # nothing counted since: no move
    assert torch.equal(router.expert_bias, before)
    with pytest.raises(ValueError, match="rate=-0.1"):
        update_expert_bias(moe, rate=-0.1)


def _cv(counts: torch.Tensor) -> float:
    c = counts.float()
    return (c.std(unbiased=False) / c.mean()).item()


def test_aux_loss_free_balancing_brings_a_skewed_router_into_balance():
    # The gate prefers low expert indices strongly (a constant feature times a descending row), so
    # CV(counts) starts above 1; only the bias moves, with no loss and no optimizer.
    torch.manual_seed(0)
    router = moekit.TopKRouter(8, 8, 2, score="sigmoid", expert_bias=True, w_importance=0.0, w_load=0.0,
                               init_std=1.0).train()
    with torch.no_grad():
        router.w_gate[0] = torch.linspace(6, -6, 8)
    w_gate = router.w_gate.detach().clone()
    gen = torch.Generator().manual_seed(1)
    cvs = []
    for _ in range(400):
        x = torch.randn(512, 8, generator=gen)
        x[:, 0] = 1.0
        routing = router(x)
        cvs.append(_cv(routing.stats.counts))
        update_expert_bias(router, rate=3e-3)
    assert cvs[0] > 1.0
    assert max(cvs[-20:]) < 0.25, cvs[-20:]
    assert torch.equal(router.w_gate, w_gate)
    # The combine weights are the unbiased scores of the chosen experts, renormalised.
    s = torch.sigmoid(x @ w_gate).gather(1, routing.indices)
    torch.testing.assert_close(routing.weights, s / s.sum(-1, keepdim=True))
    assert router.expert_bias.abs().max() > 0.1  # the balance came from the bias


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
