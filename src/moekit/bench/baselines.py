"""The layers moekit's MoE is measured against, each written the way its family of code does it.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k, C capacity per expert.

All baselines route with a plain softmax top-k (renormalised) and compute relu FFN experts with
the same sizes as the moekit layer they are compared with. They are benchmark subjects only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DenseFFN(nn.Module):
    """The limit: one FFN D -> F -> D applied to T*K tokens, i.e. the MoE's active FLOPs.

    ``activation="swiglu"``: ``(silu(x W1) * (x W3)) W2`` (a Mixtral expert), with ``bias`` as the
    experts it is compared with.
    """

    def __init__(self, dim: int, hidden: int, dtype=None, activation: str = "relu", bias: bool = True):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(dim, hidden, bias=bias, dtype=dtype)
        self.fc3 = nn.Linear(dim, hidden, bias=bias, dtype=dtype) if activation == "swiglu" else None
        self.fc2 = nn.Linear(hidden, dim, bias=bias, dtype=dtype)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        if self.fc3 is not None:
            return self.fc2(F.silu(self.fc1(x_ND)) * self.fc3(x_ND))
        return self.fc2(F.relu(self.fc1(x_ND)))


def _topk_route(x_TD: torch.Tensor, w_gate_DE: torch.Tensor, k: int):
    logits = x_TD.float() @ w_gate_DE.float()
    top, idx = logits.topk(k, dim=-1)
    return idx, torch.softmax(top, dim=-1).to(x_TD.dtype)


class MaskedLoopMoE(nn.Module):
    """Hugging Face Mixtral style: a ModuleList of experts, a one-hot expert mask, and for each
    expert a ``where`` over the mask, a gather, the FFN and an ``index_add_`` into the output."""

    def __init__(self, dim: int, num_experts: int, k: int, hidden: int, dtype=None):
        super().__init__()
        self.k = k
        self.gate = nn.Parameter(torch.randn(dim, num_experts, dtype=dtype) * 0.02)
        self.experts = nn.ModuleList(DenseFFN(dim, hidden, dtype) for _ in range(num_experts))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        idx_TK, w_TK = _topk_route(x_TD, self.gate, self.k)
        mask_EKT = F.one_hot(idx_TK, len(self.experts)).permute(2, 1, 0)
        y_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            slot, tok = torch.where(mask_EKT[e])
            if tok.numel() == 0:
                continue
            y_TD.index_add_(0, tok, expert(x_TD[tok]) * w_TK[tok, slot, None])
        return y_TD


class OneHotEinsumMoE(nn.Module):
    """GShard / lucidrains style: dense [T, E, C] dispatch and combine tensors and einsums, with
    capacity ``C = ceil(T*K*cf/E)``; stacked expert weights computed with one batched matmul."""

    def __init__(self, dim: int, num_experts: int, k: int, hidden: int, capacity_factor: float = 1.25, dtype=None):
        super().__init__()
        self.k, self.num_experts, self.capacity_factor = k, num_experts, capacity_factor
        self.gate = nn.Parameter(torch.randn(dim, num_experts, dtype=dtype) * 0.02)
        self.w1 = nn.Parameter(torch.randn(num_experts, dim, hidden, dtype=dtype) / math.sqrt(dim))
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, dim, dtype=dtype) / math.sqrt(hidden))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        T, E = x_TD.shape[0], self.num_experts
        C = math.ceil(T * self.k * self.capacity_factor / E)
        idx_TK, w_TK = _topk_route(x_TD, self.gate, self.k)
        dispatch_TEC = x_TD.new_zeros(T, E, C)
        combine_TEC = x_TD.new_zeros(T, E, C)
        filled_E = torch.zeros(E, dtype=torch.long, device=x_TD.device)
        tokens = torch.arange(T, device=x_TD.device)
        for j in range(self.k):  # choice rank j fills buffers after ranks < j
            onehot_TE = F.one_hot(idx_TK[:, j], E)
            pos_T = ((torch.cumsum(onehot_TE, 0) - 1) * onehot_TE).sum(-1) + filled_E[idx_TK[:, j]]
            keep = pos_T < C
            dispatch_TEC[tokens[keep], idx_TK[keep, j], pos_T[keep]] = 1
            combine_TEC[tokens[keep], idx_TK[keep, j], pos_T[keep]] = w_TK[keep, j]
            filled_E += onehot_TE.sum(0)
        x_ECD = torch.einsum("tec,td->ecd", dispatch_TEC, x_TD)
        h_ECD = torch.bmm(F.relu(torch.bmm(x_ECD, self.w1)), self.w2)
        return torch.einsum("tec,ecd->td", combine_TEC, h_ECD)


class NonzeroSplitMoE(nn.Module):
    """tensor2tensor SparseDispatcher style (as in davidmrau/mixture-of-experts): a dense [T, E]
    gate matrix, ``nonzero`` + sort by expert, ``split`` into per-expert inputs, a ModuleList of
    experts, then the gate-weighted outputs ``index_add``-ed back."""

    def __init__(self, dim: int, num_experts: int, k: int, hidden: int, dtype=None):
        super().__init__()
        self.k = k
        self.gate = nn.Parameter(torch.randn(dim, num_experts, dtype=dtype) * 0.02)
        self.experts = nn.ModuleList(DenseFFN(dim, hidden, dtype) for _ in range(num_experts))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        idx_TK, w_TK = _topk_route(x_TD, self.gate, self.k)
        gates_TE = x_TD.new_zeros(x_TD.shape[0], len(self.experts)).scatter(1, idx_TK, w_TK)
        pairs = torch.nonzero(gates_TE)  # [N, 2] (token, expert), token-major
        order = torch.argsort(pairs[:, 1], stable=True)
        token_N, expert_N = pairs[order, 0], pairs[order, 1]
        sizes = (gates_TE > 0).sum(0).tolist()
        inputs = torch.split(x_TD[token_N], sizes)
        outs = [expert(inp) for expert, inp in zip(self.experts, inputs, strict=True) if inp.numel()]
        stitched = torch.cat(outs) * gates_TE[token_N, expert_N][:, None]
        return x_TD.new_zeros(x_TD.shape).index_add(0, token_N, stitched)
