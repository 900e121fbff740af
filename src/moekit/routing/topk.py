"""Plain softmax top-k gating (renormalised over the k kept logits), without noise.

Legend: T tokens, D model dim, E experts, K slots per token (top-k).
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.routing.base import (
    check_router_args,
    check_router_input,
    finish_routing,
    noisy_top_k,
    register_router,
    token_weights,
)
from moekit.shards import LOCAL_SHARDS
from moekit.types import Routing


@register_router("topk")
class TopKRouter(nn.Module):
    """``G(x) = Softmax(KeepTopK(x W_g, k))``; the balancing losses use the hard load.

    The hard load has no gradient, so only the importance loss shapes the gate.
    Without noise a zero-initialised gate would send every token to the same k experts, so
    ``w_gate`` starts from N(0, init_std^2).
    """

    def __init__(self, dim: int, num_experts: int, k: int = 2, w_importance: float = 0.1,
                 w_load: float = 0.1, init_std: float = 0.02, device=None, dtype=None):
        super().__init__()
        check_router_args(dim, num_experts, k)
        self.dim, self.num_experts, self.k = dim, num_experts, k
        self.w_importance, self.w_load = w_importance, w_load
        self.w_gate = nn.Parameter(torch.randn(dim, num_experts, device=device, dtype=dtype) * init_std)
        self.shards = LOCAL_SHARDS  # the whole batch the balancing losses see (see moekit.shards)

    def forward(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None = None) -> Routing:
        check_router_input(x_TD, mask_T, self.dim)
        clean_TE = x_TD.float() @ self.w_gate.float()
        top = noisy_top_k(clean_TE, None, self.k)
        return finish_routing(top.indices, top.gates, self.num_experts, token_weights(mask_T, x_TD), None,
                              {}, {"importance": self.w_importance, "load": self.w_load}, self.shards)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, k={self.k}"
