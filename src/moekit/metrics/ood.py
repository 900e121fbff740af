"""Out-of-distribution detection from predictive probabilities, as pure functions.

Legend: N in-distribution examples, O out-of-distribution examples, C classes.

An uncertainty score should be higher on OOD inputs. AUROC treats OOD as the positive class:
0.5 is chance, 1.0 separates the two sets perfectly. Computed by scikit-learn's ``roc_auc_score``.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

OOD_SCORES = ("msp", "entropy")


def _probs(probs, name: str) -> np.ndarray:
    array = np.asarray(probs, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{name} must have shape [N, C] with N >= 1, got {array.shape}")
    return array


def max_softmax_probability(probs) -> np.ndarray:
    """[N] the top-1 probability (Hendrycks & Gimpel's baseline confidence)."""
    return _probs(probs, "probs").max(axis=1)


def predictive_entropy(probs) -> np.ndarray:
    """[N] ``-sum_c p_c log p_c`` in nats (0 log 0 = 0)."""
    p = _probs(probs, "probs")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=1)


def uncertainty(probs, score: str) -> np.ndarray:
    """[N] the uncertainty score: ``-MSP`` for "msp", the entropy for "entropy"."""
    if score == "msp":
        return -max_softmax_probability(probs)
    if score == "entropy":
        return predictive_entropy(probs)
    raise ValueError(f"score={score!r} is not one of {OOD_SCORES}")


def ood_auroc(in_probs, ood_probs, score: str = "msp") -> float:
    """AUROC of telling OOD (positive) from in-distribution examples by the uncertainty ``score``."""
    in_score = uncertainty(_probs(in_probs, "in_probs"), score)
    ood_score = uncertainty(_probs(ood_probs, "ood_probs"), score)
    targets = np.concatenate([np.zeros(len(in_score)), np.ones(len(ood_score))])
    return float(roc_auc_score(targets, np.concatenate([in_score, ood_score])))
