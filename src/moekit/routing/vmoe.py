"""V-MoE routing (Riquelme et al. 2021, as released in google-research/vmoe).

Legend: T tokens, D model dim, E experts, K slots per token (top-k).

``probs = softmax(x @ W)`` over all E experts (no bias). In training, Gaussian noise of fixed std
``1/E`` is added to the logits before the softmax, and each token goes to the top K of that noisy
softmax. The combine weights are those softmax values themselves, *not* renormalised over the K
kept experts: the gate keeps the router's confidence and gives it a gradient even at K = 1.

Balancing losses (0.005 each in V-MoE):
- importance: CV^2 of the per-expert sum of the *clean* softmax over all experts (not only the
  kept K), as the released code computes it;
- load: CV^2 of the smooth load, the probability that each expert is in a token's top K under a
  fresh noise draw (normal CDF). We use Shazeer's estimator, whose threshold is the k-th largest
  noisy logit *excluding* the expert (``moekit.routing.losses.prob_in_top_k``); the released code
  uses the k-th largest including it, which only differs for the experts already in the top K.
Without noise (evaluation) the load is the hard count.

Capacity ``ceil(T*K*cf/E)`` rounded up to a multiple of 4 and batch-prioritised routing are the
layer's business: ``moekit.MoE(router="vmoe", capacity_factor=1.05, capacity_multiple=4,
batch_prioritized=True)``. The E^3 router (``moekit.routing.ensemble``) is M of these side by side.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.routing.base import (
    LocalRouting,
    Router,
    check_coefficient,
    masked_sum,
    register_router,
    routing_sums,
    token_weights,
)
from moekit.routing.losses import prob_in_top_k
from moekit.shards import LOCAL_SHARDS, BatchShards, randn_rows


def vmoe_gates(logits_TE: torch.Tensor, k: int, noise_std: float | None,
               shards: BatchShards = LOCAL_SHARDS, rows: tuple[int, int] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-k of the (noisy) softmax, without renormalisation.

    Args:
        logits_TE: [T, E] clean router logits.
        k: experts per token.
        noise_std: std of the Gaussian noise added to the logits, or None for none.
        shards: the batch the T tokens are a shard of; the noise is this shard's rows of one draw
            for the whole batch (``moekit.shards.randn_rows``; ``rows``: its shard sizes, if known).
    Returns:
        (indices [T, K], gates [T, K], load_prob [T, E] or None). ``load_prob`` is P(x, i) when noise
        was drawn and K < E.
    """
    num_experts = logits_TE.shape[-1]
    if noise_std is None or noise_std == 0:
        gates_TK, indices_TK = torch.softmax(logits_TE, dim=-1).topk(k, dim=-1)
        return indices_TK, gates_TK, None
    noisy_TE = logits_TE + noise_std * randn_rows(logits_TE, shards, rows)
    gates_TK, indices_TK = torch.softmax(noisy_TE, dim=-1).topk(k, dim=-1)
    load_prob_TE = None
    if k < num_experts:
        top_values = noisy_TE.topk(k + 1, dim=-1).values
        std_TE = torch.full_like(logits_TE, noise_std)
        load_prob_TE = prob_in_top_k(logits_TE, noisy_TE, std_TE, top_values, k)
    return indices_TK, gates_TK, load_prob_TE


@register_router("vmoe")
class VMoERouter(Router):
    """The V-MoE router: noisy top-K of the softmax over all experts, gates not renormalised.

    Args:
        dim: D, the input width.
        num_experts: E.
        k: experts per token (V-MoE: 1 or 2).
        w_importance, w_load: coefficients of the two CV^2 losses (V-MoE: 0.005 each).
        noise_std: std of the training noise on the logits; None means V-MoE's ``1/E``.
        init_std: ``w_gate`` starts from N(0, init_std^2), so tokens already differ in their routing
            at step 0 (with zero init every token would see the same uniform softmax).
    """

    def __init__(self, dim: int, num_experts: int, k: int = 1, w_importance: float = 0.005,
                 w_load: float = 0.005, noise_std: float | None = None, init_std: float = 0.02,
                 device=None, dtype=None):
        super().__init__(dim, num_experts, k, {"importance": w_importance, "load": w_load})
        self.noise_std = check_coefficient("noise_std", 1.0 / num_experts if noise_std is None else float(noise_std))
        self.w_gate = nn.Parameter(torch.randn(dim, num_experts, device=device, dtype=dtype) * init_std)

    def local_routing(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None,
                      rows: tuple[int, int] | None = None) -> LocalRouting:
        logits_TE = x_TD.float() @ self.w_gate.float()
        noise_std = self.noise_std if self.training else None
        indices_TK, gates_TK, load_prob_TE = vmoe_gates(logits_TE, self.k, noise_std, self.shards, rows)
        weight_T = token_weights(mask_T)
        # V-MoE's importance is over the whole clean softmax, not only the kept gates.
        importance_E = masked_sum(torch.softmax(logits_TE, dim=-1), weight_T)
        local = routing_sums(indices_TK, gates_TK, self.num_experts, weight_T, importance_E)
        if load_prob_TE is not None:
            local.sums["load"] = masked_sum(load_prob_TE, weight_T)
        return local

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise_std={self.noise_std:g}"
