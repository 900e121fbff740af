"""Few-shot ridge probes: the closed form by hand, both solution forms, the protocol's split."""

import numpy as np
import pytest

from moekit.metrics.fewshot import fewshot_accuracy, fewshot_report, max_shots, ridge_fit


def test_ridge_fit_by_hand():
    # x = [-1, 1] with labels [0, 1]. Centred: xc = [-1, 1], one-hot minus its mean [.5, .5] gives
    # yc = [[.5, -.5], [-.5, .5]]. W = (xc.xc + l2)^-1 xc.yc = [-1, 1] / (2 + l2) = [-.25, .25] at
    # l2 = 2, and b = y_mean - x_mean W = [.5, .5] (x_mean = 0).
    w, b = ridge_fit(np.array([[-1.0], [1.0]]), np.array([0, 1]), 2, l2=2.0)
    np.testing.assert_allclose(w, [[-0.25, 0.25]])
    np.testing.assert_allclose(b, [0.5, 0.5])


@pytest.mark.parametrize("n, f", [(6, 9), (12, 4)])
def test_both_forms_equal_the_normal_equations(n, f):
    # Fewer examples than features uses the kernel form, more uses the primal; both must equal the
    # direct solution of the centred normal equations.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, f)), np.arange(n) % 3
    w, b = ridge_fit(x, y, 3, l2=0.7)
    onehot = np.eye(3)[y]
    xc, yc = x - x.mean(0), onehot - onehot.mean(0)
    np.testing.assert_allclose(w, np.linalg.inv(xc.T @ xc + 0.7 * np.eye(f)) @ xc.T @ yc, atol=1e-10)
    np.testing.assert_allclose(x.mean(0) @ w + b, onehot.mean(0), atol=1e-10)  # the fit passes the means


def test_ridge_rejects_a_bad_coefficient():
    with pytest.raises(ValueError, match="l2=0.0 must be"):
        ridge_fit(np.ones((2, 1)), np.array([0, 1]), 2, 0.0)


def _clusters(n_per_class, classes, dims, spread, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dims)) * 3
    y = np.repeat(np.arange(classes), n_per_class)
    return centres[y] + spread * rng.normal(size=(len(y), dims)), y


def test_separable_features_are_probed_perfectly_and_noise_at_chance():
    x, y = _clusters(40, 4, 8, spread=0.1)
    out = fewshot_accuracy(x, y, shots=1, draws=3)
    assert out["accuracy"] == 1.0 and out["std"] == 0.0 and len(out["per_draw"]) == 3
    noise = np.random.default_rng(1).normal(size=x.shape)
    assert abs(fewshot_accuracy(noise, y, shots=5, draws=5)["accuracy"] - 0.25) < 0.1


def test_more_shots_help_on_overlapping_classes():
    x, y = _clusters(100, 5, 16, spread=3.0)
    acc = {s: fewshot_accuracy(x, y, shots=s, draws=5)["accuracy"] for s in (1, 10)}
    assert acc[10] > acc[1] + 0.05


def test_the_evaluation_half_chooses_nothing():
    # Scrambling the features of the evaluation half changes the reported accuracy but neither the
    # chosen coefficient nor anything else drawn: it is used for the final measurement only.
    x, y = _clusters(30, 3, 6, spread=2.0)
    held_out = np.random.default_rng(0).permutation(len(y))[len(y) // 2:]
    scrambled = x.copy()
    scrambled[held_out] = np.random.default_rng(5).normal(size=(len(held_out), 6))
    a, b = fewshot_accuracy(x, y, 2, draws=4), fewshot_accuracy(scrambled, y, 2, draws=4)
    assert a["l2"] == b["l2"] and a["per_draw"] != b["per_draw"]


def test_report_leaves_out_shot_counts_the_pool_cannot_hold():
    x, y = _clusters(6, 3, 4, spread=0.5)  # 18 examples, a pool of 9: about 3 per class
    limit = max_shots(y)
    assert 0 < limit < 5
    report = fewshot_report(x, y, shots=(1, 5))
    assert report["1"] is not None and report["5"] is None
    with pytest.raises(ValueError, match="too few for 5 shots"):
        fewshot_accuracy(x, y, 5)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="features must be"):
        fewshot_accuracy(np.ones(4), np.zeros(4, int), 1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        fewshot_accuracy(np.full((4, 2), np.nan), np.array([0, 1, 0, 1]), 1)
    with pytest.raises(ValueError, match="shots=0"):
        fewshot_accuracy(np.ones((4, 2)), np.array([0, 1, 0, 1]), 0)
