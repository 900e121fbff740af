"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Legend: T tokens (this shard), E experts, K' slots per token (the most experts any token got).

The experts choose the tokens, not the other way round. ``S = softmax(x @ W_g)`` over the experts
[T, E]; every expert takes the ``m = ceil(k*T/E)`` real tokens of the batch with the largest
``S[:, e]`` (m capped at T; T counts real tokens only, and padding is never taken), so every
expert computes exactly m tokens and the load is balanced by construction, with no balancing
loss. A token's output is ``sum_e S[t, e] * FFN_e(x_t)`` over the experts that took it: any
number of them, from 0 (its output is 0, the residual carries it) to E. ``k`` is thus the *mean*
number of experts per token (the paper's capacity factor c, 2 in its experiments).

**Not causal.** Whether a token is taken depends on the scores of every other token of the batch,
later ones included: a token's output can change when a later token changes. Do not use it for
autoregressive training or decoding (the paper trains encoder-style; decoding one token at a time
would see a batch of one). Equal scores are broken by token order (the earlier token wins).

Under expert parallelism the top-m is over the whole sharded batch: each rank gathers every
shard's scores (two collectives), as the batchwise router does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.routing.base import LocalRouting, Router, register_router, routing_sums, token_weights
from moekit.routing.batchwise import mask_to_routing


def expert_choice_m(num_tokens: int, num_experts: int, k: int) -> int:
    """Tokens per expert, ``ceil(k*T/E)`` capped at T (0 for an empty batch)."""
    return min(num_tokens, math.ceil(k * num_tokens / num_experts))


def expert_choice_mask(scores_TE: torch.Tensor, m: int) -> torch.Tensor:
    """[T, E] bool: each expert's m highest-scoring rows (ties: the earlier row). -inf rows are never
    taken as long as m does not exceed the finite rows."""
    out = torch.zeros_like(scores_TE, dtype=torch.bool)
    if m:
        # A stable sort, not topk: topk's choice among equal scores is unspecified.
        order_TE = torch.sort(scores_TE, dim=0, descending=True, stable=True).indices
        out.scatter_(0, order_TE[:m], True)
    return out


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Each expert takes its ``ceil(k*T/E)`` best tokens of the (whole) batch; weights ``softmax(x W_g)``.

    Args:
        dim, num_experts: D and E.
        k: the mean number of experts per token (the paper's capacity factor).
        w_importance, w_load: coefficients of CV^2(importance) and CV^2(load); the paper uses no
            balancing loss (the load is equal by construction), hence the defaults of 0.
        init_std: ``w_gate`` [D, E] starts from N(0, init_std^2).

    The routing is padded to the widest token of the batch with empty (-1) slots; a token's
    experts come in index order. ``stats.counts`` is m for every expert.
    """

    def __init__(self, dim: int, num_experts: int, k: int = 2, w_importance: float = 0.0, w_load: float = 0.0,
                 init_std: float = 0.02, device=None, dtype=None):
        super().__init__(dim, num_experts, k, {"importance": w_importance, "load": w_load})
        self.w_gate = nn.Parameter(torch.randn(dim, num_experts, device=device, dtype=dtype) * init_std)

    def _whole_batch_choice(self, probs_TE: torch.Tensor, mask_T: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """([T_all, E] bool choice over the rows of every shard, this shard's first row)."""
        scores_TE = probs_TE.detach()
        if mask_T is not None:
            scores_TE = scores_TE.masked_fill(~mask_T[:, None], float("-inf"))
        all_scores_TE, start = self.shards.gather(scores_TE)
        # Padding rows are -inf and real rows finite: the gathered rows give the real-token count.
        num_real = int(torch.isfinite(all_scores_TE[:, 0]).sum()) if all_scores_TE.numel() else 0
        return expert_choice_mask(all_scores_TE, expert_choice_m(num_real, self.num_experts, self.k)), start

    def local_routing(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None,
                      rows: tuple[int, int] | None = None) -> LocalRouting:
        probs_TE = torch.softmax(x_TD.float() @ self.w_gate.float(), dim=-1)
        all_keep_TE, start = self._whole_batch_choice(probs_TE, mask_T)
        keep_TE = all_keep_TE[start : start + probs_TE.shape[0]]
        # The widest token of the whole batch sets K' on every shard (the capacity step reads it as k).
        width = max(1, int(all_keep_TE.sum(-1).max())) if all_keep_TE.numel() else 1
        indices_TK, weights_TK = mask_to_routing(keep_TE, probs_TE, width)
        return routing_sums(indices_TK, weights_TK, self.num_experts, token_weights(mask_T))
