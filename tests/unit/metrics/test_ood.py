"""OOD detection AUROC by hand."""

import math

import pytest

from moekit.metrics.ood import ood_auroc, predictive_entropy


def test_ood_auroc_hand_made():
    # In: MSP 0.9 and 0.7, entropies 0.394 and 0.819 nats. OOD: MSP 0.6, entropy 0.673.
    # By MSP the OOD example is less confident than both: AUROC 1. By entropy it beats one of two: 0.5.
    in_probs = [[0.9, 0.05, 0.05], [0.7, 0.15, 0.15]]
    ood_probs = [[0.6, 0.4, 0.0]]
    assert ood_auroc(in_probs, ood_probs, "msp") == 1.0
    assert ood_auroc(in_probs, ood_probs, "entropy") == 0.5
    assert predictive_entropy(ood_probs)[0] == pytest.approx(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)))
    with pytest.raises(ValueError, match="score='max'"):
        ood_auroc(in_probs, ood_probs, "max")
