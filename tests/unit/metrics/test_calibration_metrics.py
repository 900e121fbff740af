"""Metrics on hand-made cases: accuracy, NLL, Brier, ECE (15 bins), OOD AUROC, FLOPs."""

import math

import numpy as np
import pytest
import torch

import moekit
from moekit.metrics.calibration import accuracy, brier, ece, nll, reliability_bins
from moekit.metrics.diversity import disagreement, mean_pairwise_kl
from moekit.metrics.flops import flops_per_example, routed_flops_per_example
from moekit.metrics.ood import ood_auroc, predictive_entropy

# Four examples, three classes:
#   [0.70, 0.20, 0.10] label 0: correct, confidence 0.70 (bin 10 of 15: [0.667, 0.733))
#   [0.38, 0.62, 0.00] label 0: wrong,   confidence 0.62 (bin 9:  [0.600, 0.667))
#   [1.00, 0.00, 0.00] label 0: correct, confidence 1.00 (bin 14: [0.933, 1.000])
#   [0.30, 0.25, 0.45] label 1: wrong,   confidence 0.45 (bin 6:  [0.400, 0.467))
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


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="label 3 is outside"):
        accuracy(PROBS, [0, 0, 3, 1])
    with pytest.raises(ValueError, match="does not match"):
        nll(PROBS, [0, 1])
    with pytest.raises(ValueError, match="integers"):
        brier(PROBS, [0.0, 1.0, 0.0, 1.0])


def test_flops_are_counted_not_derived():
    # A bias-free Linear(4, 3): 4*3 multiply-adds = 24 FLOPs per example.
    assert flops_per_example(torch.nn.Linear(4, 3, bias=False), torch.randn(5, 4)) == 24
    # A dropless top-1 V-MoE layer (D=4, E=4, F=6) per token: router 2*4*4 = 32, one expert
    # 2*4*6 + 2*6*4 = 96: 128. A dense FFN of the same width would also cost 96 per expert computed.
    # The bmm backend would also be charged for the rows it pads each expert's segment with.
    moe = moekit.MoE(4, 4, k=1, hidden_dim=6, router="vmoe", expert_backend="bmm").eval()
    assert routed_flops_per_example(moe, torch.randn(10, 4)) == 128
    assert moe.experts.backend == "bmm"


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
