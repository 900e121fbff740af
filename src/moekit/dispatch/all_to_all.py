"""Expert-parallel dispatch: each rank holds a contiguous block of experts; tokens travel all-to-all.

Legend: T tokens (this rank), D model dim, E experts (all ranks), L = E/W experts per rank,
W ranks, K slots per token, N slots this rank sends, M slots this rank receives.

Rank r owns experts [r*L, (r+1)*L). Sorting the slots by expert therefore also sorts them by
destination rank, so one ``all_to_all_single`` sends every rank its contiguous run. The steps:

1. sort this rank's slots by expert (``sort_by_expert``, as the local dispatcher does);
2. exchange the per-expert slot counts (an all-to-all of [W, L] integers), so every rank knows
   how many rows it will receive from whom, and for which of its experts;
3. all-to-all of the slot rows (autograd-aware: its backward is the reverse all-to-all);
4. regroup the received rows (source-major) expert-major, source rank order kept within an
   expert, so each local expert sees the whole batch's tokens in global token order; compute;
5. undo the regrouping, reverse all-to-all, and combine on the tokens' own rank.

Every rank must call the layer, forward and backward, the same number of times in the same order
(an empty batch is fine), with inputs that agree on ``requires_grad``: the collectives pair up by
call order, and the input's all-to-all runs backward only where the input needs a gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moekit.dispatch.sort import combine, sort_by_expert


class _AllToAll(torch.autograd.Function):
    """Rows ``x_ND`` split by ``send`` go to the ranks in order; ``recv`` rows arrive. Backward reverses it."""

    @staticmethod
    def forward(ctx, x_ND, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x_ND.new_empty((sum(recv), *x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_MD):
        grad_ND = grad_MD.new_empty((sum(ctx.send), *grad_MD.shape[1:]))
        dist.all_to_all_single(grad_ND, grad_MD.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return grad_ND, None, None, None


def all_to_all(x_ND: torch.Tensor, send: list[int], recv: list[int], group=None) -> torch.Tensor:
    """Differentiable ``all_to_all_single``: ``send[r]`` rows of ``x_ND`` go to rank r, ``recv[r]`` come from it."""
    return _AllToAll.apply(x_ND, send, recv, group)


class AllToAllDispatcher:
    """Dropless dispatch to experts sharded over the ranks of ``group`` (a contiguous block per rank).

    Args:
        num_experts: E, the number of experts of the whole layer (the router's index range).
        group: the process group the experts are sharded over (None: the default group).

    Called like the local dispatcher, ``dispatcher(x_TD, indices_TK, weights_TK, experts) -> y_TD``,
    with ``experts`` holding this rank's L = E/W experts.
    """

    def __init__(self, num_experts: int, group=None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.world_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel "
                             f"world size {self.world_size}")
        self.num_experts = num_experts
        self.local_experts = num_experts // self.world_size

    @property
    def first_expert(self) -> int:
        """Global index of this rank's first expert."""
        return self.rank * self.local_experts

    def __call__(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                 experts) -> torch.Tensor:
        W, L = self.world_size, self.local_experts
        if experts.num_experts != L:
            raise ValueError(f"experts hold {experts.num_experts} experts; rank {self.rank} of {W} "
                             f"should hold {L} of {self.num_experts}")
        perm = sort_by_expert(indices_TK, self.num_experts)
        # Step 2: recv_WL[s, l] = slots rank s sends to this rank's expert l.
        recv_WL = torch.empty(W, L, dtype=perm.counts_E.dtype, device=perm.counts_E.device)
        dist.all_to_all_single(recv_WL, perm.counts_E.view(W, L).contiguous(), group=self.group)
        send = perm.counts_E.view(W, L).sum(1).tolist()
        recv = recv_WL.sum(1).tolist()

        x_MD = all_to_all(x_TD[perm.token_ids_N], send, recv, self.group)

        # Step 4: received rows are ordered (source rank, local expert); experts need them expert-major.
        expert_M = torch.arange(L, device=recv_WL.device).repeat(W).repeat_interleave(recv_WL.reshape(-1))
        order_M = torch.argsort(expert_M, stable=True)
        # index_select, not x[order]: its backward is an index_add, cheaper than advanced indexing's.
        h_MD = experts(x_MD.index_select(0, order_M), recv_WL.sum(0).tolist())
        h_MD = h_MD.index_select(0, torch.argsort(order_M))

        h_ND = all_to_all(h_MD, recv, send, self.group)
        return combine(h_ND, perm, weights_TK, x_TD.shape[0])

    def __repr__(self) -> str:
        lo, hi = self.first_expert, self.first_expert + self.local_experts
        return (f"AllToAllDispatcher(num_experts={self.num_experts}, rank={self.rank}, "
                f"world_size={self.world_size}, experts=[{lo}, {hi}))")
