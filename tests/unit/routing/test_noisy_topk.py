"""Noisy top-k gating (Shazeer eq. 3-10): zero init, the equations token by token, the smooth load."""

import torch

import moekit
from moekit.reference import reference_noisy_top_k


def _randomised_noisy_router(dim=6, num_experts=5, k=2, scale=1.0):
    r = moekit.NoisyTopKRouter(dim, num_experts, k)
    with torch.no_grad():
        r.w_gate.normal_(0, scale)
        r.w_noise.normal_(0, scale)
    return r


def test_noisy_topk_parameters_start_at_zero_and_route_uniformly_in_eval():
    r = moekit.NoisyTopKRouter(8, 4, 2).eval()
    assert r.w_gate.shape == (8, 4) and r.w_noise.shape == (8, 4)
    assert r.w_gate.abs().sum() == 0 and r.w_noise.abs().sum() == 0
    routing = r(torch.randn(10, 8))
    torch.testing.assert_close(routing.weights, torch.full((10, 2), 0.5))


def test_noisy_topk_matches_the_token_by_token_equations():
    r = _randomised_noisy_router().train()
    x = torch.randn(7, 6)
    torch.manual_seed(123)
    routing = r(x)
    # Re-draw the same noise: the router draws one randn_like([T, E]) after computing its logits.
    torch.manual_seed(123)
    noise = torch.randn(7, 5)
    clean = x @ r.w_gate.detach()
    std = torch.nn.functional.softplus(x @ r.w_noise.detach()) + r.noise_epsilon
    idx, gates, probs = reference_noisy_top_k(clean, noise, std, k=2)
    assert routing.indices.tolist() == idx.tolist()
    torch.testing.assert_close(routing.weights.double(), gates, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routing.stats.load.double(), probs.sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routing.stats.importance.double(),
                               torch.zeros(5, dtype=torch.float64).index_add(0, idx.flatten(), gates.flatten()))


def test_noisy_topk_is_deterministic_in_eval_and_uses_hard_load():
    r = _randomised_noisy_router().eval()
    x = torch.randn(9, 6)
    a, b = r(x), r(x)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    assert a.stats.load.tolist() == a.stats.counts.float().tolist()
    assert a.stats.load.grad_fn is None


def test_noisy_topk_k_equals_e_load_is_hard_count():
    r = _randomised_noisy_router(num_experts=3, k=3).train()
    routing = r(torch.randn(4, 6))
    assert routing.stats.load.tolist() == [4.0, 4.0, 4.0]
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(4))


def test_noisy_topk_aux_loss_is_weighted_sum_and_load_loss_reaches_the_gate():
    r = moekit.NoisyTopKRouter(6, 5, 2, w_importance=0.3, w_load=0.7)
    with torch.no_grad():
        r.w_gate.normal_()
    routing = r(torch.randn(16, 6))
    expected = 0.3 * routing.stats.losses["importance"] + 0.7 * routing.stats.losses["load"]
    torch.testing.assert_close(routing.aux_loss, expected)
    # The smooth load estimator is differentiable: the load loss alone moves both gate matrices.
    g_gate, g_noise = torch.autograd.grad(routing.stats.losses["load"], [r.w_gate, r.w_noise])
    assert g_gate.abs().sum() > 0 and g_noise.abs().sum() > 0
