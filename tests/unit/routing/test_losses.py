"""Hand-derived values for the balancing losses, and their properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.routing.losses import (
    batchwise_threshold_loss,
    cv_squared,
    hard_counts,
    normal_cdf,
    prob_in_top_k,
    scatter_to_experts,
    switch_loss,
    z_loss,
)


def test_cv_squared_hand_value():
    # [1, 2, 3]: mean 2, population variance ((1)^2 + 0 + 1^2) / 3 = 2/3, CV^2 = (2/3) / 4 = 1/6.
    assert cv_squared(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(1 / 6, rel=1e-6)
    # [0, 0, 4]: mean 4/3, var = (16/9 + 16/9 + 64/9) / 3 = 32/9, mean^2 = 16/9 -> CV^2 = 2.
    assert cv_squared(torch.tensor([0.0, 0.0, 4.0])).item() == pytest.approx(2.0, rel=1e-6)


def test_cv_squared_degenerate_inputs():
    assert cv_squared(torch.zeros(5)).item() == 0.0  # eps keeps 0/0 away
    assert cv_squared(torch.tensor([3.0])).item() == 0.0


@settings(max_examples=40, deadline=None)
@given(value=st.floats(1e-3, 1e3), n=st.integers(2, 64))
def test_cv_squared_zero_and_finite_gradient_at_perfect_balance(value, n):
    x = torch.full((n,), value, dtype=torch.float64, requires_grad=True)
    loss = cv_squared(x)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().max().item() < 1e-6


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(0.1, 100.0), min_size=2, max_size=16), scale=st.floats(0.5, 10.0))
def test_cv_squared_is_scale_invariant_and_nonnegative(values, scale):
    x = torch.tensor(values, dtype=torch.float64)
    assert cv_squared(x).item() >= 0
    # Exact up to the eps in the denominator (relative effect eps / mean^2 <= 1e-8 here).
    assert cv_squared(x * scale).item() == pytest.approx(cv_squared(x).item(), rel=1e-6, abs=1e-9)


def test_prob_in_top_k_three_experts_by_hand():
    # One token, E = 3, k = 1. Clean logits c = [1, 0, -1], noise std s = [1, 2, 0.5],
    # noisy logits h = [1.5, 0.2, -2.0] (so expert 0 is the top-1).
    # Expert 0 is in the top k: its threshold is the 2nd largest noisy logit, 0.2:
    #   P0 = Phi((1 - 0.2) / 1) = Phi(0.8)
    # Experts 1 and 2 are out: threshold is the 1st largest noisy logit, 1.5:
    #   P1 = Phi((0 - 1.5) / 2) = Phi(-0.75);  P2 = Phi((-1 - 1.5) / 0.5) = Phi(-5)
    clean = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    noisy = torch.tensor([[1.5, 0.2, -2.0]], dtype=torch.float64)
    std = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    top = noisy.topk(2, dim=-1).values
    p = prob_in_top_k(clean, noisy, std, top, k=1)[0]

    def phi(z):
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    assert p.tolist() == pytest.approx([phi(0.8), phi(-0.75), phi(-5.0)], rel=1e-12)


def test_prob_in_top_k_k2_uses_kplus1_threshold_for_members():
    # E = 3, k = 2: noisy = [3, 2, 1]; members 0,1 compare with the 3rd largest (1), expert 2 with the 2nd (2).
    clean = torch.tensor([[2.0, 2.0, 2.0]], dtype=torch.float64)
    noisy = torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64)
    std = torch.ones(1, 3, dtype=torch.float64)
    p = prob_in_top_k(clean, noisy, std, noisy.topk(3).values, k=2)[0]
    expected = normal_cdf(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(p, expected)


def test_switch_loss_hand_value():
    # 4 tokens, E = 2, top-1 choices [0, 0, 0, 1] -> f = [3/4, 1/4].
    # Mean router probs P = [0.6, 0.4]. Loss = E * (0.75*0.6 + 0.25*0.4) = 2 * 0.55 = 1.1.
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.5, 0.5], [0.3, 0.7]])
    idx = torch.tensor([[0], [0], [0], [1]])
    assert switch_loss(probs, idx, 2).item() == pytest.approx(1.1, rel=1e-6)
    # Perfectly uniform routing gives exactly 1.
    uniform = torch.full((4, 2), 0.5)
    assert switch_loss(uniform, torch.tensor([[0], [1], [0], [1]]), 2).item() == pytest.approx(1.0)


def test_switch_loss_ignores_padding():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    idx = torch.tensor([[0], [1], [-1]])
    weight = torch.tensor([1.0, 1.0, 0.0])
    # f = [1/2, 1/2], P = [(0.9+0.2)/2, (0.1+0.8)/2] = [0.55, 0.45] -> 2 * 0.5 = 1.0
    assert switch_loss(probs, idx, 2, weight).item() == pytest.approx(1.0, rel=1e-6)


def test_z_loss_hand_value():
    # logsumexp([0, 0]) = log 2; logsumexp([log 3, 0]) = log 4. Mean of squares.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    assert z_loss(logits, torch.tensor([1.0, 0.0])).item() == pytest.approx(math.log(2) ** 2, rel=1e-6)


def test_hard_counts_and_scatter_skip_empty_slots():
    idx = torch.tensor([[0, 2], [2, -1], [-1, -1]])
    assert hard_counts(idx, 3).tolist() == [1, 0, 2]
    w = torch.tensor([[0.5, 0.5], [1.0, 7.0], [3.0, 3.0]])
    assert scatter_to_experts(idx, w, 3).tolist() == [0.5, 0.0, 1.5]


def test_batchwise_threshold_loss_by_hand():
    # One token, E = 2, logits [1, -1], thresholds [0, 0]: threshold mask [1, 0].
    # Batch mask [0, 1]: diff = (1-0)*(1-0) + (0-1)*(-1-0) = 1 + 1 = 2.
    logits = torch.tensor([[1.0, -1.0]])
    thr = torch.zeros(2, requires_grad=True)
    loss = batchwise_threshold_loss(logits, thr, torch.tensor([[False, True]]))
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    # d/dT_i = -(M_thr - M_batch): expert 0 has too low a threshold (gradient -1 -> raised by descent),
    # expert 1 too high (+1 -> lowered).
    assert thr.grad.tolist() == [-1.0, 1.0]
