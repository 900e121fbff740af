"""The smooth load estimator (eq. 8-10, 14) checked against Monte-Carlo counts of top-k membership.

P(x, i) is the probability that expert i is in the top k of token x under a fresh noise draw on
element i with the other noise held fixed; its average over the other noise is the marginal
probability of membership. So over many independent noise draws the mean of ``stats.load`` must
match the mean hard count. We get R independent draws in one forward pass by repeating each token
R times (each copy gets its own noise).
"""

import torch

import moekit

DRAWS = 4000


def _repeat(x_TD, draws=DRAWS):
    return x_TD.repeat_interleave(draws, dim=0)


def _per_token_estimates(moe, x_TD, draws=DRAWS):
    """(mean smooth load, mean hard membership) per (token, expert), each [T, E]."""
    num_tokens, E = x_TD.shape[0], moe.num_experts
    smooth, hard = torch.zeros(num_tokens, E), torch.zeros(num_tokens, E)
    with torch.no_grad():
        for t in range(num_tokens):
            out = moe.train()(_repeat(x_TD[t : t + 1], draws))
            smooth[t] = out.stats.load / draws
            hard[t] = out.stats.counts.float() / draws
    return smooth, hard


def _assert_within_sampling_error(smooth, hard, draws=DRAWS, sigmas=4.5, slack=0.0):
    # The hard frequency is a binomial proportion: its standard error is sqrt(p (1 - p) / R).
    # The smooth estimate has a smaller variance (it is a conditional expectation), so it is
    # compared against the hard count's error alone, doubled for safety.
    se = (hard * (1 - hard) / draws).sqrt().clamp_min(1.0 / draws)
    err = (smooth - hard).abs()
    assert (err <= sigmas * 2 * se + slack).all(), f"max error {err.max():.4f}, bound {(sigmas * 2 * se).min():.4f}"


def test_flat_noisy_topk_load_matches_monte_carlo_membership():
    torch.manual_seed(0)
    moe = moekit.MoE(6, 5, k=2, hidden_dim=4)
    with torch.no_grad():
        moe.router.w_gate.normal_(0, 0.6)
        moe.router.w_noise.normal_(0, 0.6)
    x = torch.randn(6, 6)
    smooth, hard = _per_token_estimates(moe, x)
    assert (hard > 0.05).sum() > 12 and (hard < 0.95).sum() > 12  # the test exercises uncertain routing
    _assert_within_sampling_error(smooth, hard)
    # Expected per-expert load over the batch equals the expected count (eq. 10's purpose).
    torch.testing.assert_close(smooth.sum(0), hard.sum(0), atol=0.06, rtol=0.0)


def test_estimator_detects_a_wrong_threshold(monkeypatch):
    # Guard against a check that cannot fail: the estimator with kth_excluding replaced by the
    # k-th largest noisy logit for every expert (a plausible bug) is rejected by the same check.
    import pytest

    from moekit.routing import base
    from moekit.routing.losses import normal_cdf

    def wrong(clean, noisy, std, top, k):
        return normal_cdf((clean - top[..., k - 1 : k]) / std)

    monkeypatch.setattr(base, "prob_in_top_k", wrong)
    torch.manual_seed(0)
    moe = moekit.MoE(6, 5, k=2, hidden_dim=4)
    with torch.no_grad():
        moe.router.w_gate.normal_(0, 0.6)
        moe.router.w_noise.normal_(0, 0.6)
    smooth, hard = _per_token_estimates(moe, torch.randn(6, 6))
    with pytest.raises(AssertionError, match="max error"):
        _assert_within_sampling_error(smooth, hard)


def test_hierarchical_load_matches_monte_carlo_membership():
    # Eq. 14 is the product of the primary load and the group's mean secondary probability, an
    # exact expectation when one token is routed (then |X^(i)| is that token's membership count
    # and the product factorises per draw only in expectation). We compare the batch-level load
    # over R copies of one token against the hard count, as the paper uses it.
    torch.manual_seed(1)
    moe = moekit.HierarchicalMoE(6, num_groups=3, experts_per_group=3, k_primary=2, k_secondary=2, hidden_dim=4)
    with torch.no_grad():
        for p in moe.router.parameters():
            p.normal_(0, 0.6)
    x = torch.randn(5, 6)
    smooth, hard = _per_token_estimates(moe, x)
    assert (hard > 0.05).sum() > 10 and (hard < 0.95).sum() > 10
    _assert_within_sampling_error(smooth, hard)


def test_hierarchical_primary_gate_gets_a_gradient_from_the_load_loss():
    # The reason for eq. 14's product form: Load_i(X^(i))_j alone would give w_gate of the
    # primary router no gradient.
    torch.manual_seed(2)
    moe = moekit.HierarchicalMoE(6, num_groups=3, experts_per_group=3, hidden_dim=4)
    with torch.no_grad():
        for p in moe.router.parameters():
            p.normal_(0, 0.3)
    out = moe.train()(torch.randn(32, 6))
    g_gate, g_noise = torch.autograd.grad(out.stats.losses["load"], [moe.router.w_gate, moe.router.w_noise])
    assert g_gate.abs().sum() > 0 and g_noise.abs().sum() > 0
