"""Balancing losses and the smooth load estimator, as pure functions.

Legend: T tokens, E experts, K slots per token (top-k).

Everything here is differentiable where the paper needs a gradient and works in whatever
dtype it is given (routers call it in float32).
"""

from __future__ import annotations

import math

import torch

from moekit.shards import LOCAL_SHARDS, BatchShards

# Added to the denominator of CV^2 (as tensor2tensor's cv_squared does) so an all-zero vector
# gives 0 instead of NaN.
CV_EPS = 1e-10

# ``shards`` arguments below: the batch split across processes that a mean over tokens covers
# (``moekit.shards``); the default is a whole batch in one process.


def cv_squared(x_E: torch.Tensor, eps: float = CV_EPS) -> torch.Tensor:
    """Squared coefficient of variation, ``var / (mean^2 + eps)``, with the population variance.

    Shazeer et al. 2017 eq. 7 and 11 use CV^2 of the per-expert importance and load. A vector of
    fewer than two elements has no spread: the result is 0.

    Args:
        x_E: [E] non-negative values.
    Returns:
        scalar tensor.
    """
    if x_E.numel() < 2:
        return x_E.new_zeros(())
    x_E = x_E.float() if not x_E.is_floating_point() else x_E
    mean = x_E.mean()
    var = (x_E - mean).pow(2).mean()
    return var / (mean * mean + eps)


def normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Phi(z), the standard normal CDF."""
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def prob_in_top_k(
    clean_TE: torch.Tensor,
    noisy_TE: torch.Tensor,
    noise_std_TE: torch.Tensor,
    top_values_TK1: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """P(x, i) of Shazeer eq. 8-9: probability that expert i is in the top k of token x.

    The probability is taken over a fresh draw of the noise on element i, the noise on the
    other elements held fixed. Expert i is in the top k iff its noisy logit beats the k-th largest
    of the *other* noisy logits (``kth_excluding``). If i is currently in the top k, that threshold
    is the (k+1)-th largest noisy logit; otherwise it is the k-th largest. The numerator uses the
    clean logit, the denominator the noise std (eq. 9).

    Args:
        clean_TE: [..., E] clean logits ``x @ W_g``.
        noisy_TE: [..., E] noisy logits H(x).
        noise_std_TE: [..., E] noise standard deviation (> 0).
        top_values_TK1: [..., k+1] the k+1 largest noisy logits, descending (requires k < E).
        k: the number of experts kept per token.
    Returns:
        [..., E] probabilities; ``sum`` over tokens gives the smooth load of eq. 10.
    """
    threshold_if_in = top_values_TK1[..., k : k + 1]
    threshold_if_out = top_values_TK1[..., k - 1 : k]
    threshold_TE = torch.where(noisy_TE > threshold_if_in, threshold_if_in, threshold_if_out)
    return normal_cdf((clean_TE - threshold_TE) / noise_std_TE)


def switch_loss(probs_TE: torch.Tensor, indices_TK: torch.Tensor, num_experts: int,
                weight_T: torch.Tensor | None = None, shards: BatchShards = LOCAL_SHARDS) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``E * sum_i f_i * P_i``.

    ``f_i`` is the fraction of routed slots sent to expert i (no gradient), ``P_i`` the mean router
    probability of expert i. It equals 1 under perfectly uniform routing.

    Args:
        probs_TE: [T, E] router softmax probabilities.
        indices_TK: [T, K] chosen experts (-1 for an empty slot).
        num_experts: E.
        weight_T: optional [T] 0/1 weights (0 for padding tokens).
        shards: the batch the T tokens are a shard of (see above).
    """
    if weight_T is None:
        weight_T = probs_TE.new_ones(probs_TE.shape[0])
    n_tokens, slot_counts_E, p_sum_E = shards.sum_many(weight_T.sum(), hard_counts(indices_TK, num_experts),
                                                       (probs_TE * weight_T[:, None]).sum(0))
    return switch_loss_from_sums(slot_counts_E, p_sum_E, n_tokens)


def switch_loss_from_sums(slot_counts_E: torch.Tensor, p_sum_E: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """``switch_loss`` from the whole batch's sums: routed slots per expert [E], router probabilities
    summed over real tokens [E], and the number of real tokens (scalar)."""
    slot_counts_E = slot_counts_E.to(p_sum_E.dtype)
    f_E = slot_counts_E / slot_counts_E.sum().clamp_min(1.0)
    p_E = p_sum_E / n_tokens.clamp_min(1.0)
    return slot_counts_E.numel() * (f_E * p_E).sum()


def z_loss(logits_TE: torch.Tensor, weight_T: torch.Tensor | None = None,
           shards: BatchShards = LOCAL_SHARDS) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of ``logsumexp(logits)^2``.

    Keeps router logits small, which keeps the softmax out of its saturated, round-off-prone regime.
    """
    lse_T = torch.logsumexp(logits_TE, dim=-1).pow(2)
    return _weighted_mean(lse_T, weight_T, shards)


def _weighted_mean(v_T: torch.Tensor, weight_T: torch.Tensor | None, shards: BatchShards) -> torch.Tensor:
    """``sum(v * w) / sum(w)`` over the whole batch (0 when it has no real token)."""
    if weight_T is None:
        weight_T = v_T.new_ones(v_T.shape)
    total, count = shards.sum_many((v_T * weight_T).sum(), weight_T.sum())
    return total / count.clamp_min(1.0)


def hard_counts(indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] long: how many slots route to each expert; -1 (empty) slots are ignored."""
    flat = indices_TK.reshape(-1)
    flat = torch.where(flat < 0, num_experts, flat)
    # index_add into a fixed [E+1], not bincount: the output shape must not depend on the data
    # (torch.compile traces it then).
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    return counts.index_add_(0, flat, torch.ones_like(flat))[:num_experts]


def scatter_to_experts(indices_TK: torch.Tensor, values_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] sum of ``values`` per expert; -1 (empty) slots are ignored. Differentiable in ``values``."""
    flat_idx = torch.where(indices_TK < 0, num_experts, indices_TK).reshape(-1)
    out = values_TK.new_zeros(num_experts + 1)
    out = out.index_add(0, flat_idx, values_TK.reshape(-1))
    return out[:num_experts]


def batchwise_threshold_loss(
    logits_TE: torch.Tensor, thresholds_E: torch.Tensor, batch_mask_TE: torch.Tensor,
    weight_T: torch.Tensor | None = None, shards: BatchShards = LOCAL_SHARDS,
) -> torch.Tensor:
    """Appendix F's threshold loss, averaged over tokens.

    ``L = sum_j sum_i (M_threshold(x_j)_i - M_batchwise(X)_{j,i}) * (X_{j,i} - T_i)``: where the
    threshold mask disagrees with the batch mask, it pushes T_i (and the logit) towards agreement.
    The paper sums over the batch; we average over tokens so the scale does not grow with T.

    Args:
        logits_TE: [T, E] gate logits X.
        thresholds_E: [E] learned thresholds T.
        batch_mask_TE: [T, E] bool, the batchwise (top-m per expert) mask.
        weight_T: optional [T] 0/1 weights (0 for padding tokens).
        shards: the batch the T tokens are a shard of (see above).
    """
    return _weighted_mean(batchwise_threshold_terms(logits_TE, thresholds_E, batch_mask_TE), weight_T, shards)


def batchwise_threshold_terms(logits_TE: torch.Tensor, thresholds_E: torch.Tensor,
                              batch_mask_TE: torch.Tensor) -> torch.Tensor:
    """[T] each token's term of ``batchwise_threshold_loss`` (its sum over experts)."""
    thr_mask = (logits_TE > thresholds_E).to(logits_TE.dtype)
    diff = (thr_mask - batch_mask_TE.to(logits_TE.dtype)) * (logits_TE - thresholds_E)
    return diff.sum(-1)
