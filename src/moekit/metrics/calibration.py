"""Classification quality and calibration, as pure functions of (probabilities, labels).

Legend: N examples, C classes, B bins.

Inputs may be numpy arrays or tensors: ``probs`` [N, C] (each row a distribution) and ``labels``
[N] integers in [0, C). Everything is computed in float64 and returned as a Python float.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

ECE_BINS = 15
_BELOW_ONE = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


def as_probs_labels(probs, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert to (float64 [N, C], long [N]); ``ValueError`` names what is wrong."""
    probs_NC = torch.as_tensor(np.asarray(probs), dtype=torch.float64)
    labels_N = torch.as_tensor(np.asarray(labels))
    if probs_NC.dim() != 2 or probs_NC.shape[0] == 0:
        raise ValueError(f"probs must have shape [N, C] with N >= 1, got {tuple(probs_NC.shape)}")
    if labels_N.shape != probs_NC.shape[:1]:
        raise ValueError(f"labels shape {tuple(labels_N.shape)} does not match probs {tuple(probs_NC.shape)}")
    if labels_N.is_floating_point() or labels_N.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype={labels_N.dtype}")
    labels_N = labels_N.long()
    num_classes = probs_NC.shape[1]
    if bool(((labels_N < 0) | (labels_N >= num_classes)).any()):
        bad = labels_N[(labels_N < 0) | (labels_N >= num_classes)][0].item()
        raise ValueError(f"label {bad} is outside [0, {num_classes}) for probs with {num_classes} classes")
    if not bool(torch.isfinite(probs_NC).all()) or bool((probs_NC < 0).any()):
        raise ValueError("probs must be finite and non-negative")
    return probs_NC, labels_N


def accuracy(probs, labels) -> float:
    """Fraction of examples whose most probable class (the first, on ties) is the label."""
    probs_NC, labels_N = as_probs_labels(probs, labels)
    return float((probs_NC.argmax(dim=1) == labels_N).double().mean())


def nll(probs, labels) -> float:
    """Mean negative log-likelihood of the labels, ``-mean log p(label)``.

    A probability of exactly 0 is clamped to the smallest positive float64, so a confidently wrong
    prediction costs about 708 nats instead of making the mean infinite.
    """
    probs_NC, labels_N = as_probs_labels(probs, labels)
    p_N = probs_NC.gather(1, labels_N[:, None])[:, 0]
    return float(-p_N.clamp_min(torch.finfo(torch.float64).tiny).log().mean())


def brier(probs, labels) -> float:
    """Multi-class Brier score: mean over examples of ``sum_c (p_c - onehot_c)^2`` (0 is perfect, 2 worst)."""
    probs_NC, labels_N = as_probs_labels(probs, labels)
    onehot_NC = torch.nn.functional.one_hot(labels_N, probs_NC.shape[1]).double()
    return float((probs_NC - onehot_NC).pow(2).sum(dim=1).mean())


def ece(probs, labels, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 confidence, ``sum_b (N_b/N) |acc_b - conf_b|``.

    ``n_bins`` equal-width bins ``[b/B, (b+1)/B)``, the last one closed at 1. Computed by torchmetrics.
    torchmetrics works in float32 and gives a confidence of exactly 1.0 a bin of its own (one past
    the B-th); it is moved to the largest float32 below 1 so that it falls in the top bin, as the
    definition above says.
    """
    probs_NC, labels_N = as_probs_labels(probs, labels)
    probs_NC = probs_NC.float().clamp(max=_BELOW_ONE)
    return float(multiclass_calibration_error(probs_NC, labels_N, probs_NC.shape[1], n_bins=n_bins, norm="l1"))


class ReliabilityBins(NamedTuple):
    """Per-bin data of a reliability diagram (B equal-width bins over [0, 1]).

    ``confidence`` and ``accuracy`` are NaN in an empty bin; ``counts`` are example counts.
    """

    edges: np.ndarray  # [B+1]
    confidence: np.ndarray  # [B] mean top-1 confidence
    accuracy: np.ndarray  # [B] fraction correct
    counts: np.ndarray  # [B] int


def reliability_bins(probs, labels, n_bins: int = ECE_BINS) -> ReliabilityBins:
    """The bins ``ece`` uses: ``ece == sum(counts/N * |accuracy - confidence|)`` over non-empty bins."""
    probs_NC, labels_N = as_probs_labels(probs, labels)
    conf_N, pred_N = probs_NC.max(dim=1)
    correct_N = (pred_N == labels_N).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    bin_N = (torch.bucketize(conf_N, edges, right=True) - 1).clamp(0, n_bins - 1)
    counts = torch.bincount(bin_N, minlength=n_bins).double()
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add(0, bin_N, conf_N)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add(0, bin_N, correct_N)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = (conf_sum / counts).numpy()
        acc = (acc_sum / counts).numpy()
    return ReliabilityBins(edges.numpy(), confidence, acc, counts.long().numpy())
