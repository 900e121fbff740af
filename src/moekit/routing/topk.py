"""Plain softmax top-k gating (renormalised over the k kept logits), without noise.

Legend: T tokens, D model dim, E experts, K slots per token (top-k).
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.routing.base import LocalRouting, Router, noisy_top_k, register_router, routing_sums, token_weights


@register_router("topk")
class TopKRouter(Router):
    """``G(x) = Softmax(KeepTopK(x W_g, k))``; the balancing losses use the hard load.

    The hard load has no gradient, so only the importance loss shapes the gate.
    Without noise a zero-initialised gate would send every token to the same k experts, so
    ``w_gate`` starts from N(0, init_std^2).
    """

    def __init__(self, dim: int, num_experts: int, k: int = 2, w_importance: float = 0.1,
                 w_load: float = 0.1, init_std: float = 0.02, device=None, dtype=None):
        super().__init__(dim, num_experts, k, {"importance": w_importance, "load": w_load})
        self.w_gate = nn.Parameter(torch.randn(dim, num_experts, device=device, dtype=dtype) * init_std)

    def local_routing(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None,
                      rows: tuple[int, int] | None = None) -> LocalRouting:
        clean_TE = x_TD.float() @ self.w_gate.float()
        top = noisy_top_k(clean_TE, None, self.k)
        return routing_sums(top.indices, top.gates, self.num_experts, token_weights(mask_T))
