"""Switch Transformer routing: top-1 (or top-k) of the full softmax, with its balancing loss and z-loss.

Legend: T tokens, D model dim, E experts, K slots per token (top-k).
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.routing.base import LocalRouting, Router, register_router, routing_from_sums, routing_sums, token_weights
from moekit.routing.losses import switch_loss_from_sums
from moekit.types import Routing


@register_router("switch")
class SwitchRouter(Router):
    """Softmax over all E experts; each token goes to its top k (default 1) with gate ``p_i(x)``.

    The gates are not renormalised (Fedus et al. 2021), so the gate value carries the router's
    confidence and the router gets a gradient even at k = 1.

    aux_loss = ``w_load * E * sum_i f_i P_i + w_z * mean(logsumexp(logits)^2)``
    (``w_importance`` optionally adds CV^2 of the importance).
    """

    def __init__(self, dim: int, num_experts: int, k: int = 1, w_importance: float = 0.0,
                 w_load: float = 0.01, w_z: float = 1e-3, init_std: float = 0.02, device=None, dtype=None):
        # The switch loss is this router's load loss: --w-load weighs it.
        super().__init__(dim, num_experts, k, {"importance": w_importance, "switch": w_load, "z": w_z})
        self.w_gate = nn.Parameter(torch.randn(dim, num_experts, device=device, dtype=dtype) * init_std)

    @property
    def w_load(self) -> float:
        return self.loss_weights["switch"]

    @property
    def w_z(self) -> float:
        return self.loss_weights["z"]

    def local_routing(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None,
                      rows: tuple[int, int] | None = None) -> LocalRouting:
        logits_TE = x_TD.float() @ self.w_gate.float()
        probs_TE = torch.softmax(logits_TE, dim=-1)
        gates_TK, indices_TK = probs_TE.topk(self.k, dim=-1)
        weight_T = token_weights(mask_T)
        # The counts are also the switch loss's routed slots: padding slots are -1 in both.
        local = routing_sums(indices_TK, gates_TK, self.num_experts, weight_T)
        w_T = probs_TE.new_ones(probs_TE.shape[0]) if weight_T is None else weight_T
        lse2_T = torch.logsumexp(logits_TE, dim=-1).pow(2)  # the z-loss's per-token term
        local.sums.update(tokens=w_T.sum(), probs=(probs_TE * w_T[:, None]).sum(0), z=(lse2_T * w_T).sum())
        return local

    def finish(self, local: LocalRouting, sums: dict[str, torch.Tensor]) -> Routing:
        extra = {"switch": switch_loss_from_sums(sums["counts"], sums["probs"], sums["tokens"]),
                 "z": sums["z"] / sums["tokens"].clamp_min(1.0)}
        return routing_from_sums(local.indices, local.weights, sums["counts"], sums["importance"], None, extra,
                                 self.loss_weights)
