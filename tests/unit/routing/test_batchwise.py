"""Strictly balanced (batchwise) gating: m tokens per expert, thresholds at inference."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.routing.batchwise import batchwise_m


@settings(max_examples=25, deadline=None)
@given(num_tokens=st.integers(1, 40), num_experts=st.integers(1, 8), k=st.integers(1, 4), seed=st.integers(0, 99))
def test_batchwise_gives_every_expert_exactly_m_tokens(num_tokens, num_experts, k, seed):
    k = min(k, num_experts)
    torch.manual_seed(seed)
    r = moekit.BatchwiseRouter(5, num_experts, k).train()
    routing = r(torch.randn(num_tokens, 5))
    m = batchwise_m(num_tokens, num_experts, k)
    assert routing.stats.counts.tolist() == [m] * num_experts
    # Gates of a token are renormalised over its kept experts (or all zero if it kept none).
    sums = routing.weights.sum(-1)
    has_expert = (routing.indices >= 0).any(-1)
    torch.testing.assert_close(sums[has_expert], torch.ones(int(has_expert.sum())))
    assert (sums[~has_expert] == 0).all()


def test_batchwise_m_with_padding_counts_only_real_tokens():
    r = moekit.BatchwiseRouter(5, 4, 2).train()
    mask = torch.tensor([True] * 6 + [False] * 4)
    routing = r(torch.randn(10, 5), mask)
    assert routing.stats.counts.tolist() == [3, 3, 3, 3]  # m = 2 * 6 // 4
    assert (routing.indices[~mask] == -1).all()


def test_batchwise_uses_learned_thresholds_at_inference():
    r = moekit.BatchwiseRouter(5, 3, 1).eval()
    with torch.no_grad():
        r.thresholds.copy_(torch.tensor([1e9, -1e9, 1e9]))  # only expert 1 can pass
    routing = r(torch.randn(6, 5))
    assert routing.indices.tolist() == [[1]] * 6
    torch.testing.assert_close(routing.weights, torch.ones(6, 1))
    assert "threshold" not in routing.stats.losses


def test_batchwise_threshold_training_tracks_the_batch_mask():
    torch.manual_seed(1)
    r = moekit.BatchwiseRouter(4, 4, 1, w_importance=0.0, init_std=1.0)
    opt = torch.optim.SGD([r.thresholds], lr=0.1)
    x = torch.randn(256, 4)
    for _ in range(300):
        opt.zero_grad()
        r.train()(x).aux_loss.backward()
        opt.step()
    r.eval()
    with torch.no_grad():
        logits = x @ r.w_gate
        batch_mask = r.batch_mask(logits, None)
        agreement = ((logits > r.thresholds) == batch_mask).float().mean().item()
    assert agreement > 0.95
