"""Switch Transformer routing: top-1 (or top-k) of the full softmax, with its balancing loss and z-loss.

Legend: T tokens, D model dim, E experts, K slots per token (top-k).
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.routing.base import check_router_args, check_router_input, finish_routing, register_router
from moekit.routing.losses import switch_loss, z_loss
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
        routed_TK = indices_TK if mask_T is None else indices_TK.masked_fill(~mask_T[:, None], -1)
        extra = {"switch": switch_loss(probs_TE, routed_TK, self.num_experts, weight_T, self.shards),
                 "z": z_loss(logits_TE, weight_T, self.shards)}
        return finish_routing(indices_TK, gates_TK, self.num_experts, weight_T, None, extra,
                              {"importance": self.w_importance, "switch": self.w_load, "z": self.w_z}, self.shards)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, k={self.k}"
