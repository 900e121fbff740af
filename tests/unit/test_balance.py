"""Aux-loss-free balancing: the bias step and update_expert_bias bring a skewed router into balance."""

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
