"""Capacity from a recall sweep, worked out by hand."""

import math

import pytest

from moekit.jobs.facts.report import Capacity, capacity, compact, last_rise


def test_capacity_interpolates_in_log_facts():
    # 0.9 lies halfway between 0.95 (1000 facts) and 0.85 (2000): the geometric mean, sqrt(2e6) = 1414.2.
    cap = capacity([1000, 2000, 4000], [0.95, 0.85, 0.4])
    assert cap.bound == "" and cap.facts == pytest.approx(math.sqrt(1000 * 2000))
    # (0.98 - 0.9) / (0.98 - 0.66) = a quarter of the way: 1000 * 2**0.25 = 1189.2.
    assert capacity([2000, 1000], [0.66, 0.98]).facts == pytest.approx(1000 * 2 ** 0.25)


def test_capacity_takes_the_last_crossing_and_reports_bounds():
    # A dip below 0.9 at 2000, recovered at 4000: the crossing after 4000 counts (halfway to 8000).
    assert capacity([1000, 2000, 4000, 8000], [1.0, 0.88, 0.95, 0.85]).facts == pytest.approx(math.sqrt(4000 * 8000))
    assert capacity([1000, 2000], [0.99, 0.95]) == Capacity(2000, ">=")
    assert capacity([1000, 2000], [0.5, 0.2]) == Capacity(1000, "<")
    assert str(Capacity(2000, ">=")) == ">=2,000"
    assert capacity([1000, 2000], [0.9, 0.5]).facts == pytest.approx(1000)  # exactly at the threshold


def test_last_rise_of_recall():
    assert last_rise({"history": {"recall": [0.5, 0.8, 0.85]}}) == pytest.approx(0.05)
    assert last_rise({"history": {"recall": [0.9]}}) == 0.0 and last_rise({"history": {}}) == 0.0


def test_compact_averages_the_loss_over_windows_and_keeps_the_recall():
    run = {"name": "x", "history": {"train_step": [1, 2, 3, 4], "train_loss": [1.0, 2.0, 3.0, 4.0],
                                    "valid_step": [2, 4], "recall": [0.5, 0.7]}}
    out = compact(run, windows=2)
    assert out["history"] == {"valid_step": [2, 4], "recall": [0.5, 0.7], "train_loss_windows": [1.5, 3.5]}
    assert run["history"]["train_loss"] == [1.0, 2.0, 3.0, 4.0]  # the run itself is left alone
    assert compact({"history": {"train_loss": [2.0]}}, windows=3)["history"]["train_loss_windows"] == [2.0]
