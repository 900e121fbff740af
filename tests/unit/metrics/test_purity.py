"""Pattern purity by majority mapping."""

from moekit.metrics.purity import purity


def test_purity_by_majority_mapping():
    p = purity([0, 0, 0, 1, 1, 2], [1, 1, 0, 2, 2, 0], 4)
    assert p["mapping"] == [1, 2, 0, None]
    assert p["per_pattern"] == [2 / 3, 1.0, 1.0, None]
    assert p["purity"] == 5 / 6
