"""Calibration metrics by hand: accuracy, NLL, Brier, ECE and its reliability bins."""

import math

import numpy as np
import pytest

from moekit.metrics.calibration import accuracy, brier, ece, nll, reliability_bins

PROBS = np.array([[0.7, 0.2, 0.1], [0.38, 0.62, 0.0], [1.0, 0.0, 0.0], [0.3, 0.25, 0.45]])


LABELS = np.array([0, 0, 0, 1])


def test_hand_made_case():
    assert accuracy(PROBS, LABELS) == 0.5
    # NLL = -(ln 0.7 + ln 0.38 + ln 1 + ln 0.25) / 4 = 0.677638
    assert nll(PROBS, LABELS) == pytest.approx(-(math.log(0.7) + math.log(0.38) + math.log(0.25)) / 4)
    # Brier: 0.09+0.04+0.01 = 0.14; 0.3844+0.3844 = 0.7688; 0; 0.09+0.5625+0.2025 = 0.855 -> mean 0.44095
    assert brier(PROBS, LABELS) == pytest.approx(0.44095)
    # Each example alone in its bin: ECE = (|1-0.7| + |0-0.62| + |1-1| + |0-0.45|) / 4 = 0.3425
    assert ece(PROBS, LABELS) == pytest.approx(0.3425)


def test_ece_puts_confidence_one_in_the_top_bin():
    # [1.0, 0.0] label 1 (wrong) and [0.95, 0.05] label 0 (right) share bin 14: accuracy 0.5,
    # confidence 0.975, ECE = 0.475. (A 16th bin for exactly 1.0 would give 0.5*1 + 0.5*0.05 = 0.525.)
    assert ece([[1.0, 0.0], [0.95, 0.05]], [1, 0]) == pytest.approx(0.475)


def test_ece_equals_the_reliability_bins():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 6)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 6, 500)
    bins = reliability_bins(probs, labels)
    used = bins.counts > 0
    by_hand = (bins.counts[used] / 500 * np.abs(bins.accuracy[used] - bins.confidence[used])).sum()
    assert ece(probs, labels) == pytest.approx(by_hand, abs=1e-6)  # torchmetrics runs in float32
    assert bins.counts.sum() == 500 and len(bins.edges) == 16


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="label 3 is outside"):
        accuracy(PROBS, [0, 0, 3, 1])
    with pytest.raises(ValueError, match="does not match"):
        nll(PROBS, [0, 1])
    with pytest.raises(ValueError, match="integers"):
        brier(PROBS, [0.0, 1.0, 0.0, 1.0])
