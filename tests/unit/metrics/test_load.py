"""Load metrics: hand-derived values, the window, and errors."""

import pytest
import torch

import moekit
from moekit.metrics.load import LoadWindow, load_metrics


def test_hand_derived_values():
    # counts [6, 2, 0, 4]: 12 slots, ideal 3 -> fractions [2, 2/3, 0, 4/3], max 2, one dead expert.
    m = load_metrics(torch.tensor([6, 2, 0, 4]))
    assert m.fraction_of_ideal.tolist() == pytest.approx([2.0, 2 / 3, 0.0, 4 / 3])
    assert m.max_over_ideal == 2.0 and m.dead == 1 and m.tokens == 12


def test_perfect_balance_and_total_collapse():
    assert load_metrics(torch.tensor([5, 5, 5])).max_over_ideal == 1.0
    m = load_metrics(torch.tensor([9, 0, 0]))
    assert m.max_over_ideal == 3.0 and m.dead == 2  # E when one expert takes everything
    empty = load_metrics(torch.zeros(4, dtype=torch.long))
    assert empty.max_over_ideal == 0.0 and empty.dead == 4 and empty.tokens == 0


def test_reads_routing_stats_of_a_layer():
    moe = moekit.MoE(6, 4, 2, 8)
    out = moe(torch.randn(10, 6))
    m = load_metrics(out.stats)
    assert m.tokens == 20 and m.fraction_of_ideal.sum().item() == pytest.approx(4.0)


def test_window_sums_the_last_steps_and_forgets_older_ones():
    w = LoadWindow(3, window=2)
    w.update(torch.tensor([4, 0, 0]))
    w.update(torch.tensor([0, 2, 0]))
    assert w.counts().tolist() == [4, 2, 0] and w.metrics().dead == 1  # expert 2 idle in both steps
    w.update(torch.tensor([0, 0, 6]))  # the first step leaves the window
    m = w.metrics()
    assert w.counts().tolist() == [0, 2, 6] and len(w) == 2
    assert m.dead == 1 and m.max_over_ideal == pytest.approx(6 / (8 / 3))


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="window=0"):
        LoadWindow(3, window=0)
    with pytest.raises(ValueError, match="counts have 2 experts, the window 3"):
        LoadWindow(3).update(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="non-negative integers"):
        load_metrics(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="non-negative integers"):
        load_metrics(torch.tensor([1, -2]))
