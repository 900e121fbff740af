"""Noisy top-k gating with the smooth load estimator (Shazeer et al. 2017, eq. 3-10).

Legend: T tokens, D model dim, E experts, K slots per token (top-k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.routing.base import (
    LocalRouting,
    Router,
    check_coefficient,
    mask_slots,
    masked_sum,
    noisy_top_k,
    register_router,
    routing_sums,
    token_weights,
)


@register_router("noisy_topk")
class NoisyTopKRouter(Router):
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
        super().__init__(dim, num_experts, k, {"importance": w_importance, "load": w_load})
        self.noise_epsilon = check_coefficient("noise_epsilon", noise_epsilon)
        self.w_gate = nn.Parameter(torch.zeros(dim, num_experts, device=device, dtype=dtype))
        self.w_noise = nn.Parameter(torch.zeros(dim, num_experts, device=device, dtype=dtype))

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, E] float32 clean gate logits ``x @ W_g``."""
        return x_TD.float() @ self.w_gate.float()

    def local_routing(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None,
                      rows: tuple[int, int] | None = None) -> LocalRouting:
        x_TD = x_TD.float()
        clean_TE = self.logits(x_TD)
        noise_std_TE = None
        if self.training:
            noise_std_TE = F.softplus(x_TD @ self.w_noise.float()) + self.noise_epsilon
        top = noisy_top_k(clean_TE, noise_std_TE, self.k, self.shards, rows)
        weight_T = token_weights(mask_T)
        local = routing_sums(top.indices, top.gates, self.num_experts, weight_T)
        if top.load_prob is not None:  # the smooth load of eq. 10, summed with the counts and importance
            local.sums["load"] = masked_sum(top.load_prob, weight_T)
        return local

    def local_decision(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:  # the noise is drawn for the whole batch: the full routing knows how
            return super().local_decision(x_TD, mask_T)
        top = noisy_top_k(self.logits(x_TD), None, self.k)
        return mask_slots(top.indices, top.gates, token_weights(mask_T))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise_epsilon={self.noise_epsilon}"
