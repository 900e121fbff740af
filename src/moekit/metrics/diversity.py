"""How different the members of an ensemble are, as pure functions of their probabilities.

Legend: N examples, M members, C classes.

An ensemble can only improve on its members where they disagree; these numbers say how much
room there was. ``member_probs`` is [N, M, C] (numpy or tensor), M >= 2.
"""

from __future__ import annotations

import numpy as np


def _members(member_probs) -> np.ndarray:
    p = np.asarray(member_probs, dtype=np.float64)
    if p.ndim != 3 or p.shape[1] < 2 or p.shape[0] == 0:
        raise ValueError(f"member_probs must have shape [N, M, C] with N >= 1 and M >= 2, got {p.shape}")
    return p


def disagreement(member_probs) -> float:
    """Mean over member pairs of the fraction of examples whose top-1 classes differ."""
    pred = _members(member_probs).argmax(axis=2)
    m = pred.shape[1]
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    return float(np.mean([(pred[:, i] != pred[:, j]).mean() for i, j in pairs]))


def mean_pairwise_kl(member_probs, eps: float = 1e-12) -> float:
    """Mean over ordered member pairs (i != j) and examples of ``KL(p_i || p_j)`` in nats.

    Probabilities are clamped at ``eps`` inside the logarithms, so a zero cannot make it infinite.
    """
    p = _members(member_probs)
    log_p = np.log(np.clip(p, eps, None))
    m = p.shape[1]
    kls = [(p[:, i] * (log_p[:, i] - log_p[:, j])).sum(axis=1).mean() for i in range(m) for j in range(m) if i != j]
    return float(np.mean(kls))
