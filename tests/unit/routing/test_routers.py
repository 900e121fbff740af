"""Router behaviour: the gating equations, empty slots, masks and argument errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.reference import reference_noisy_top_k
from moekit.routing.batchwise import batchwise_m

ALL_ROUTERS = ["noisy_topk", "topk", "switch", "batchwise", "vmoe", "expert_choice"]


def test_registry_lists_every_router():
    assert moekit.routers() == sorted([*ALL_ROUTERS, "e3"])  # e3: moekit.ensemble.PartitionedRouter
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        moekit.build_router("nope", 4, 4, 1)


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


def test_topk_gates_are_renormalised_over_the_kept_logits():
    r = moekit.TopKRouter(6, 5, 3)
    x = torch.randn(8, 6)
    routing = r(x)
    logits = x @ r.w_gate.detach()
    top, idx = logits.topk(3, dim=-1)
    assert routing.indices.tolist() == idx.tolist()
    torch.testing.assert_close(routing.weights, torch.softmax(top, -1))
    assert routing.stats.load.tolist() == routing.stats.counts.float().tolist()


def test_switch_gate_is_the_unnormalised_router_probability():
    r = moekit.SwitchRouter(6, 4)
    x = torch.randn(8, 6)
    routing = r(x)
    probs = torch.softmax(x @ r.w_gate.detach(), -1)
    assert routing.indices.shape == (8, 1)
    torch.testing.assert_close(routing.weights[:, 0], probs.max(-1).values)
    losses = routing.stats.losses
    torch.testing.assert_close(routing.aux_loss, 0.01 * losses["switch"] + 1e-3 * losses["z"])


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


@pytest.mark.parametrize("name", ALL_ROUTERS)
def test_masked_tokens_get_empty_slots_and_do_not_count(name):
    torch.manual_seed(3)
    r = moekit.build_router(name, 6, 4, 2).eval()
    x = torch.randn(12, 6)
    mask = torch.rand(12) > 0.4
    full = r(x, mask)
    assert (full.indices[~mask] == -1).all() and (full.weights[~mask] == 0).all()
    # Importance and counts are those of the real tokens alone.
    alone = r(x[mask])
    if name != "batchwise":  # batchwise's inference thresholds are per token, so it matches too
        torch.testing.assert_close(full.indices[mask], alone.indices)
    torch.testing.assert_close(full.stats.importance, alone.stats.importance)
    assert full.stats.counts.tolist() == alone.stats.counts.tolist()
    torch.testing.assert_close(full.aux_loss, alone.aux_loss)


@pytest.mark.parametrize("name", ALL_ROUTERS)
def test_router_errors_name_the_bad_value(name):
    with pytest.raises(ValueError, match="k=5 exceeds num_experts=4"):
        moekit.build_router(name, 8, 4, 5)
    with pytest.raises(ValueError, match="num_experts=0"):
        moekit.build_router(name, 8, 0, 1)
    with pytest.raises(TypeError, match="k must be an int"):
        moekit.build_router(name, 8, 4, 1.5)
    r = moekit.build_router(name, 8, 4, 2)
    with pytest.raises(ValueError, match=r"shape \[T, 8\], got \(3, 7\)"):
        r(torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating point, got dtype=torch.int64"):
        r(torch.ones(3, 8, dtype=torch.long))
    bad = torch.randn(3, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf \(first at index \[1, 2\]"):
        r(bad)
    with pytest.raises(ValueError, match=r"mask shape \(2,\)"):
        r(torch.randn(3, 8), torch.ones(2, dtype=torch.bool))


@pytest.mark.parametrize("name", ALL_ROUTERS)
@pytest.mark.parametrize("coefficient", ["w_importance", "w_load"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_router_loss_coefficients_must_be_finite_and_non_negative(name, coefficient, value):
    with pytest.raises(ValueError, match=r"w_\w+=(nan|inf|-1\.0) must be a finite number >= 0"):
        moekit.build_router(name, 8, 4, 1, **{coefficient: value})


def test_input_that_overflows_the_gate_is_refused_not_turned_into_an_inf_loss():
    # 1e38 is a finite float32, but its logits (x @ w_gate) overflow: the switch router's z-loss,
    # logsumexp(logits)^2, would be inf and train silently on it.
    r = moekit.build_router("switch", 8, 4, 1)
    with torch.no_grad():
        r.w_gate.fill_(1.0)
    with pytest.raises(ValueError, match=r"SwitchRouter: finite input \(largest \|x\| = 1e\+38\) gave a non-finite"):
        r(torch.full((3, 8), 1e38))
    r(torch.full((3, 8), 1e3))  # large but representable logits are fine
