"""Switch Transformer routing: top-1 (or top-k) of the full softmax, with its balancing loss and z-loss.

Legend: T tokens, D model dim, E experts, K slots per token (top-k).
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.routing.base import (
    check_router_args,
    check_router_input,
    register_router,
    routing_from_sums,
    routing_sums,
)
from moekit.routing.losses import switch_loss_from_sums
from moekit.shards import LOCAL_SHARDS
from moekit.types import Routing


@register_router("switch")
class SwitchRouter(nn.Module):
    """Softmax over all E experts; each token goes to its top k (default 1) with gate ``p_i(x)``.

    The gates are not renormalised (Fedus et al. 2021), so the gate value carries the router's
    confidence and the router gets a gradient even at k = 1.

    aux_loss = ``w_load * E * sum_i f_i P_i + w_z * mean(logsumexp(logits)^2)``
    (``w_importance`` optionally adds CV^2 of the importance).
    """

    def __init__(self, dim: int, num_experts: int, k: int = 1, w_importance: float = 0.0,
                 w_load: float = 0.01, w_z: float = 1e-3, init_std: float = 0.02, device=None, dtype=None):
        super().__init__()
        check_router_args(dim, num_experts, k)
        self.dim, self.num_experts, self.k = dim, num_experts, k
        self.w_importance, self.w_load, self.w_z = w_importance, w_load, w_z
        self.w_gate = nn.Parameter(torch.randn(dim, num_experts, device=device, dtype=dtype) * init_std)
        self.shards = LOCAL_SHARDS  # the whole batch the balancing losses see (see moekit.shards)

    def forward(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None = None) -> Routing:
        check_router_input(x_TD, mask_T, self.dim)
        logits_TE = x_TD.float() @ self.w_gate.float()
        probs_TE = torch.softmax(logits_TE, dim=-1)
        gates_TK, indices_TK = probs_TE.topk(self.k, dim=-1)
        weight_T = None if mask_T is None else mask_T.float()
        # The counts are also the switch loss's routed slots: padding slots are -1 in both.
        indices_TK, gates_TK, counts_E, importance_E = routing_sums(indices_TK, gates_TK, self.num_experts, weight_T)
        w_T = probs_TE.new_ones(probs_TE.shape[0]) if weight_T is None else weight_T
        lse2_T = torch.logsumexp(logits_TE, dim=-1).pow(2)  # the z-loss's per-token term
        # Every statistic and both losses' sums over the whole batch, in one collective.
        counts_E, importance_E, n_tokens, p_sum_E, z_sum = self.shards.sum_many(
            counts_E, importance_E, w_T.sum(), (probs_TE * w_T[:, None]).sum(0), (lse2_T * w_T).sum())
        extra = {"switch": switch_loss_from_sums(counts_E, p_sum_E, n_tokens), "z": z_sum / n_tokens.clamp_min(1.0)}
        return routing_from_sums(indices_TK, gates_TK, counts_E, importance_E, None, extra,
                                 {"importance": self.w_importance, "switch": self.w_load, "z": self.w_z})

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, k={self.k}"
