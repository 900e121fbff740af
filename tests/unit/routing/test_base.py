"""What every router shares (the Router base): the registry, padding as empty slots, errors naming the value."""

import pytest
import torch

import moekit

ALL_ROUTERS = ["noisy_topk", "topk", "switch", "batchwise", "vmoe", "expert_choice"]


def test_registry_lists_every_router():
    assert moekit.routers() == sorted([*ALL_ROUTERS, "e3"])  # e3: moekit.ensemble.PartitionedRouter
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        moekit.build_router("nope", 4, 4, 1)


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


def test_a_finite_input_whose_sum_overflows_is_accepted():
    # Every value is a finite float32, so the input is valid; only the one-sum check overflows,
    # and the element-wise checks it falls back on pass (the zero gate keeps the logits finite).
    r = moekit.build_router("noisy_topk", 8, 4, 2)
    x = torch.full((3, 8), 3e38)
    assert not torch.isfinite(x.sum())
    routing = r(x)
    assert torch.isfinite(routing.aux_loss) and routing.stats.counts.sum() == 6


@pytest.mark.parametrize("name", ALL_ROUTERS)
def test_an_inf_is_named_by_every_router(name):
    r = moekit.build_router(name, 8, 4, 2)
    bad = torch.randn(5, 8)
    bad[4, 7] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf \(first at index \[4, 7\], value inf\)"):
        r(bad)
