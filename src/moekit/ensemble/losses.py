"""Ensemble training loss and prediction, as pure functions on tiled logits.

Legend: B examples, M ensemble members, R = B*M rows (row b*M + m is member m on example b), C classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def member_logits(logits_RC: torch.Tensor, ensemble_size: int) -> torch.Tensor:
    """[B*M, C] -> [B, M, C]."""
    if logits_RC.shape[0] % ensemble_size:
        raise ValueError(f"{logits_RC.shape[0]} rows is not a multiple of ensemble_size={ensemble_size}")
    return logits_RC.unflatten(0, (-1, ensemble_size))


def ensemble_cross_entropy(logits_RC: torch.Tensor, labels_B: torch.Tensor, ensemble_size: int) -> torch.Tensor:
    """E^3's training loss: the mean over members of each member's cross-entropy.

    Each member is trained on its own prediction, not on the ensemble average: the average would
    let members specialise into a mixture rather than stay individually good (and diverse).
    """
    logits_BMC = member_logits(logits_RC, ensemble_size)
    if labels_B.shape != logits_BMC.shape[:1]:
        raise ValueError(f"labels shape {tuple(labels_B.shape)} does not match {logits_BMC.shape[0]} examples")
    return F.cross_entropy(logits_RC.float(), labels_B.repeat_interleave(ensemble_size))


def ensemble_log_probs(logits_RC: torch.Tensor, ensemble_size: int) -> torch.Tensor:
    """[B, C] log of the mean of the members' softmax probabilities: ``logsumexp_m log_softmax - log M``."""
    log_p_BMC = torch.log_softmax(member_logits(logits_RC, ensemble_size).float(), dim=-1)
    return torch.logsumexp(log_p_BMC, dim=1) - math.log(ensemble_size)


def ensemble_probs(logits_RC: torch.Tensor, ensemble_size: int) -> torch.Tensor:
    """[B, C] the ensemble's prediction, the mean of the members' probabilities."""
    return ensemble_log_probs(logits_RC, ensemble_size).exp()


def ensemble_nll(logits_RC: torch.Tensor, labels_B: torch.Tensor, ensemble_size: int) -> torch.Tensor:
    """Mean over examples of ``-log(mean_m p_m(label))``."""
    log_p_BC = ensemble_log_probs(logits_RC, ensemble_size)
    return -log_p_BC.gather(1, labels_B[:, None]).mean()
