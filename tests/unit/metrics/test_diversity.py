"""Ensemble member diversity by hand: disagreement and pairwise KL."""

import math

import pytest

from moekit.metrics.diversity import disagreement, mean_pairwise_kl


def test_member_diversity_hand_made():
    # Two examples, two members. Example 0: both pick class 0; example 1: member 0 picks class 0,
    # member 1 class 1 -> disagreement 1/2. KL: example 0 equal (0); example 1 p = [0.75, 0.25],
    # q = [0.25, 0.75]: KL(p||q) = 0.75 ln 3 + 0.25 ln(1/3) = 0.5 ln 3, the same both ways.
    # Mean over the two ordered pairs and the two examples: 0.25 ln 3.
    member_probs = [[[0.6, 0.4], [0.6, 0.4]], [[0.75, 0.25], [0.25, 0.75]]]
    assert disagreement(member_probs) == 0.5
    assert mean_pairwise_kl(member_probs) == pytest.approx(0.25 * math.log(3))
    with pytest.raises(ValueError, match="M >= 2"):
        disagreement([[[1.0, 0.0]]])
