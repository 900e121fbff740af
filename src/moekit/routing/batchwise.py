"""Strictly balanced (batchwise) gating, Shazeer et al. 2017 appendix F.

Legend: T tokens, D model dim, E experts, K slots per token (varies per token here).

In training every expert takes exactly its top ``m = k*T/E`` tokens of the batch (column-wise
top-m of the gate logits), so loads are balanced by construction. A token may thus get any number
of experts, from 0 to E; the routing is padded to the widest token with empty (-1) slots. At
inference a batch is not available (or not representative), so each expert keeps the tokens whose
logit exceeds a learned threshold T_i, trained with the appendix's loss to agree with the batch mask.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.routing.base import (
    LocalRouting,
    Router,
    register_router,
    routing_from_sums,
    routing_sums,
    token_weights,
)
from moekit.routing.losses import batchwise_threshold_terms
from moekit.types import Routing


def batchwise_m(num_tokens: int, num_experts: int, k: int) -> int:
    """Tokens per expert, ``m = k*T/E`` rounded down, at least 1 and at most T."""
    return max(1, min(num_tokens, (k * num_tokens) // num_experts)) if num_tokens else 0


def mask_to_routing(mask_TE: torch.Tensor, gates_TE: torch.Tensor,
                    width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a [T, E] bool expert mask into padded ([T, K'], [T, K']) indices and weights.

    K' is ``width``, by default the largest number of experts any token got (at least 1); the
    remaining slots are -1.
    """
    if width is None:
        width = max(1, int(mask_TE.sum(-1).max().item())) if mask_TE.numel() else 1
    # A stable descending sort of the 0/1 mask puts each token's chosen experts first, in index order.
    _, order_TE = torch.sort(mask_TE.to(torch.int8), dim=-1, descending=True, stable=True)
    idx_TK = order_TE[:, :width]
    chosen_TK = mask_TE.gather(1, idx_TK)
    indices_TK = torch.where(chosen_TK, idx_TK, torch.full_like(idx_TK, -1))
    weights_TK = gates_TE.gather(1, idx_TK) * chosen_TK.to(gates_TE.dtype)
    return indices_TK, weights_TK


@register_router("batchwise")
class BatchwiseRouter(Router):
    """``G(x)_i = Softmax(x W_g)_i M_i / sum_j Softmax(x W_g)_j M_j`` with a batchwise mask M.

    Args:
        k: average experts per token; sets ``m = k*T/E``.
        w_threshold: coefficient of the threshold loss (mean over tokens of appendix F's sum).
        w_importance, w_load: coefficients of the usual CV^2 losses (the load is balanced by
            construction in training, so both default to 0).
    """

    def __init__(self, dim: int, num_experts: int, k: int = 2, w_importance: float = 0.0,
                 w_load: float = 0.0, w_threshold: float = 1.0, init_std: float = 0.02,
                 device=None, dtype=None):
        super().__init__(dim, num_experts, k, {"importance": w_importance, "load": w_load, "threshold": w_threshold})
        self.w_gate = nn.Parameter(torch.randn(dim, num_experts, device=device, dtype=dtype) * init_std)
        self.thresholds = nn.Parameter(torch.zeros(num_experts, device=device, dtype=dtype))

    @property
    def w_threshold(self) -> float:
        return self.loss_weights["threshold"]

    def batch_mask(self, logits_TE: torch.Tensor, mask_T: torch.Tensor | None) -> torch.Tensor:
        """[T, E] bool: each expert's top-m real tokens of the whole batch (every shard of it)."""
        all_mask_TE, start = self._whole_batch_mask(logits_TE, mask_T)
        return all_mask_TE[start : start + logits_TE.shape[0]]

    def _whole_batch_mask(self, logits_TE: torch.Tensor, mask_T: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """([T_all, E] bool top-m mask over the rows of every shard, this shard's first row)."""
        scores_TE = logits_TE.detach()
        if mask_T is not None:
            scores_TE = scores_TE.masked_fill(~mask_T[:, None], float("-inf"))
        all_scores_TE, start = self.shards.gather(scores_TE)
        # Padding rows are -inf and real rows finite, so the gathered rows give the real-token count.
        num_real = int(torch.isfinite(all_scores_TE[:, 0]).sum())
        m = batchwise_m(num_real, self.num_experts, self.k)
        out = torch.zeros_like(all_scores_TE, dtype=torch.bool)
        if m:
            top_tokens_mE = all_scores_TE.topk(m, dim=0).indices
            out.scatter_(0, top_tokens_mE, True)
        return out, start

    def local_routing(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None,
                      rows: tuple[int, int] | None = None) -> LocalRouting:
        logits_TE = x_TD.float() @ self.w_gate.float()
        thresholds_E = self.thresholds.float()
        weight_T = token_weights(mask_T)
        if self.training:
            all_keep_TE, start = self._whole_batch_mask(logits_TE, mask_T)
            keep_TE = all_keep_TE[start : start + logits_TE.shape[0]]
            if mask_T is not None:
                keep_TE = keep_TE & mask_T[:, None]
            # The widest token of the whole batch sets K', which the capacity step reads as k; the
            # whole batch's mask is at hand (top-m never picks a padding row: m <= real tokens).
            width = max(1, int(all_keep_TE.sum(-1).max())) if all_keep_TE.numel() else 1
        else:
            keep_TE = logits_TE > thresholds_E
            if mask_T is not None:
                keep_TE = keep_TE & mask_T[:, None]
            width_1 = keep_TE.sum(-1).max().reshape(1) if keep_TE.numel() else keep_TE.new_zeros(1, dtype=torch.long)
            width = max(1, int(self.shards.gather(width_1)[0].max()))
        probs_TE = torch.softmax(logits_TE, dim=-1) * keep_TE
        gates_TE = probs_TE / probs_TE.sum(-1, keepdim=True).clamp_min(torch.finfo(probs_TE.dtype).tiny)
        indices_TK, weights_TK = mask_to_routing(keep_TE, gates_TE, width)
        local = routing_sums(indices_TK, weights_TK, self.num_experts, weight_T)
        if self.training:  # the threshold loss's sums travel with the statistics, in one collective
            w_T = logits_TE.new_ones(logits_TE.shape[0]) if weight_T is None else weight_T
            terms_T = batchwise_threshold_terms(logits_TE, thresholds_E, keep_TE)
            local.sums.update(threshold=(terms_T * w_T).sum(), tokens=w_T.sum())
        return local

    def finish(self, local: LocalRouting, sums: dict[str, torch.Tensor]) -> Routing:
        extra = {}
        if "threshold" in sums:
            extra["threshold"] = sums["threshold"] / sums["tokens"].clamp_min(1.0)
        return routing_from_sums(local.indices, local.weights, sums["counts"], sums["importance"], None, extra,
                                 self.loss_weights)
