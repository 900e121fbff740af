"""Noisy top-k gating with the smooth load estimator (Shazeer et al. 2017, eq. 3-10).

Legend: T tokens, D model dim, E experts, K slots per token (top-k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


@register_router("noisy_topk")
class NoisyTopKRouter(nn.Module):
    """``G(x) = Softmax(KeepTopK(x W_g + N(0,1) * (Softplus(x W_noise) + eps), k))``.

    ``w_gate`` and ``w_noise`` start at zero ("no signal and some noise", §4 of the paper): routing
    starts uniform at random. Noise is drawn only in training mode; then the load is the smooth
    estimate of eq. 10, else the hard count.

    Args:
        dim: D, the input width.
        num_experts: E.
        k: experts per token (k >= 2 gives the gate a gradient through the softmax).
        noise_epsilon: added to the noise std (tensor2tensor's default 1e-2) so it never vanishes.
        w_importance, w_load: coefficients of CV^2(importance) and CV^2(load) in ``aux_loss``.
    """

    def __init__(self, dim: int, num_experts: int, k: int = 2, noise_epsilon: float = 1e-2,
                 w_importance: float = 0.1, w_load: float = 0.1, device=None, dtype=None):
        super().__init__()
        check_router_args(dim, num_experts, k)
        if noise_epsilon < 0:
            raise ValueError(f"noise_epsilon={noise_epsilon} must be >= 0")
        self.dim, self.num_experts, self.k = dim, num_experts, k
        self.noise_epsilon = noise_epsilon
        self.w_importance, self.w_load = w_importance, w_load
        self.w_gate = nn.Parameter(torch.zeros(dim, num_experts, device=device, dtype=dtype))
        self.w_noise = nn.Parameter(torch.zeros(dim, num_experts, device=device, dtype=dtype))
        # The whole batch the balancing losses see; moekit.parallel swaps it when tokens are sharded.
        self.shards = LOCAL_SHARDS

    def forward(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None = None) -> Routing:
        check_router_input(x_TD, mask_T, self.dim)
        x_TD = x_TD.float()
        clean_TE = x_TD @ self.w_gate.float()
        noise_std_TE = None
        if self.training:
            noise_std_TE = F.softplus(x_TD @ self.w_noise.float()) + self.noise_epsilon
        top = noisy_top_k(clean_TE, noise_std_TE, self.k, self.shards)
        weight_T = token_weights(mask_T, x_TD)
        load_E = None
        if top.load_prob is not None:
            prob_TE = top.load_prob if weight_T is None else top.load_prob * weight_T[:, None]
            load_E = prob_TE.sum(0)  # this shard's; summed with the counts and importance
        return finish_routing(top.indices, top.gates, self.num_experts, weight_T, load_E, {},
                              {"importance": self.w_importance, "load": self.w_load}, self.shards)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, k={self.k}, noise_epsilon={self.noise_epsilon}"
