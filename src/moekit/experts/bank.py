"""A bank of E feed-forward experts in stacked weight tensors, computed per contiguous segment.

Legend: N routed token-slots (grouped by expert), D model dim, F expert hidden dim, E experts.

Expert e computes ``act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]`` (SwiGLU: ``silu(x @ w1[e] + b1[e]) *
(x @ w3[e]) @ w2[e] + b2[e]``). Keeping all experts in one tensor per weight lets the layer be
built on the meta device and sharded by slicing the E axis.

The bank owns its compute: ``Experts.forward(x_ND, counts)`` is the one entry every dispatcher
(local or all-to-all) calls, and ``choose_compute`` the one place a backend is picked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts.grouped import GroupPlan, grouped_linear, grouped_relu_mlp, one_group, plan_groups

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swiglu": F.silu}
BACKENDS = ("auto", "loop", "bmm", "grouped_mm")
# "auto" pads groups of experts to their largest segment while that costs at most this factor of
# the real rows.
MAX_PADDING_WASTE = 2.0


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """torch's grouped GEMM: CUDA, bfloat16, compute capability >= 9.0 (Hopper)."""
    return (hasattr(F, "grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def choose_compute(backend: str, x_ND: torch.Tensor, counts: list[int]) -> tuple[str, GroupPlan | None]:
    """The backend to use for segments of sizes ``counts``, and for "bmm" its padded layout.

    "auto" stands for grouped_mm where supported; else bmm over padded groups of experts (see
    ``moekit.experts.grouped``) unless that computes more than ``MAX_PADDING_WASTE`` times the real rows
    (tiny batches: fewer than 2 rows per expert on average go straight to the loop); else loop.
    Off the CPU the padded layout is one group: a kernel launch per group would cost more there
    than the padding saves.
    """
    if backend == "bmm":
        return backend, _plan(x_ND, counts)
    if backend != "auto":
        return backend, None
    if grouped_mm_supported(x_ND):
        return "grouped_mm", None
    n = sum(counts)
    if n == 0 or n < 2 * len(counts):
        return "loop", None
    plan = _plan(x_ND, counts)
    if plan.rows <= MAX_PADDING_WASTE * n:
        return "bmm", plan
    return "loop", None


def _plan(x_ND: torch.Tensor, counts: list[int]) -> GroupPlan:
    return plan_groups(counts) if x_ND.device.type == "cpu" else one_group(counts)


class Experts(nn.Module):
    """E independent FFNs D -> F -> D.

    Args:
        num_experts: E.
        dim: D.
        hidden_dim: F.
        activation: "relu", "gelu", "silu" or "swiglu" (adds ``w3`` [E, D, F]).
        backend: how the segments are computed: "loop" (one matmul pair per expert), "bmm" (pad
            segments to the largest and use one batched matmul), "grouped_mm" (torch's grouped
            GEMM), or "auto" (see ``choose_compute``). Settable after construction.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "relu",
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
        for name, value in (("num_experts", num_experts), ("dim", dim), ("hidden_dim", hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.activation = activation
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
        self.backend = backend
        kw = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **kw))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim, **kw))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **kw))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim, **kw))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **kw)) if activation == "swiglu" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised like an ``nn.Linear`` pair: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        if self.w1.is_meta:
            return
        with torch.no_grad():
            for w, fan_in in ((self.w1, self.dim), (self.w2, self.hidden_dim), (self.w3, self.dim)):
                if w is not None:
                    bound = 1.0 / math.sqrt(fan_in)
                    w.uniform_(-bound, bound)
            self.b1.uniform_(-1.0 / math.sqrt(self.dim), 1.0 / math.sqrt(self.dim))
            self.b2.uniform_(-1.0 / math.sqrt(self.hidden_dim), 1.0 / math.sqrt(self.hidden_dim))

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on [N, D] tokens (the readable definition; used by the reference)."""
        h = x_ND @ self.w1[e] + self.b1[e]
        h = F.silu(h) * (x_ND @ self.w3[e]) if self.w3 is not None else ACTIVATIONS[self.activation](h)
        return h @ self.w2[e] + self.b2[e]

    def forward(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Apply expert e to the e-th contiguous segment of ``x_ND`` (sizes ``counts``). Returns [N, D]."""
        if len(counts) != self.num_experts:
            raise ValueError(f"counts has {len(counts)} entries for {self.num_experts} experts")
        backend, plan = choose_compute(self.backend, x_ND, counts)
        if backend == "bmm":
            return self._forward_padded(x_ND, counts, plan)
        if backend == "grouped_mm":
            return self._forward_grouped(x_ND, counts)
        return self._forward_loop(x_ND, counts)

    def _weights(self, dtype: torch.dtype):
        ws = (self.w1, self.b1, self.w2, self.b2, self.w3)
        return tuple(None if w is None else w.to(dtype) for w in ws)

    def _act(self, h: torch.Tensor, gate_in: torch.Tensor | None) -> torch.Tensor:
        return F.silu(h) * gate_in if gate_in is not None else ACTIVATIONS[self.activation](h)

    def _forward_loop(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # unbind, not w1[e]: indexing a stacked parameter inside autograd makes each expert's
        # backward allocate a full [E, D, F] gradient; unbind's backward stacks them once.
        w1, b1, w2, b2, w3 = (None if w is None else w.unbind(0) for w in self._weights(x_ND.dtype))
        # With no rows at all, expert 0 still runs on the empty input: the [0, D] output then
        # belongs to the autograd graph of the input and the weights, as with rows. Under expert
        # parallelism a rank whose experts receive no token must still take part in the backward
        # all-to-alls, which run only for outputs in the graph.
        live = [e for e, n in enumerate(counts) if n > 0] or [0]
        segments = x_ND.split(counts)
        outs = []
        for e in live:
            x_e = segments[e]
            h = self._act(torch.addmm(b1[e], x_e, w1[e]), None if w3 is None else x_e @ w3[e])
            outs.append(torch.addmm(b2[e], h, w2[e]))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def forward_rows(self, x_RD: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
        """All experts on the padded [R, D] row layout of ``plan`` (``moekit.experts.grouped``): one
        batched matmul per group of experts and weight. Returns [R, D]; padding rows hold
        ``act(b1) @ w2 + b2`` and are meant to be ignored."""
        w1, b1, w2, b2, w3 = self._weights(x_RD.dtype)
        if self.activation == "relu":
            return grouped_relu_mlp(x_RD, w1, b1, w2, b2, plan)
        h = grouped_linear(x_RD, w1, b1, plan)
        h = F.silu(h) * grouped_linear(x_RD, w3, None, plan) if w3 is not None else ACTIVATIONS[self.activation](h)
        return grouped_linear(h, w2, b2, plan)

    def _forward_padded(self, x_ND: torch.Tensor, counts: list[int], plan: GroupPlan) -> torch.Tensor:
        # On CPU a batched matmul over a few experts' [C, D] blocks runs at the speed of one big
        # matmul, while one small matmul per expert loses ~1.4x to threading overhead. Padding
        # rows are zero and never read back, so they get no gradient.
        rows_N = plan.padded_rows(torch.tensor(counts, device=x_ND.device))
        x_RD = x_ND.new_zeros(plan.rows, self.dim).index_put((rows_N,), x_ND)
        return self.forward_rows(x_RD, plan).index_select(0, rows_N)

    def _forward_grouped(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # torch's grouped GEMM takes the segments as offsets: no padding, one kernel per matmul.
        w1, b1, w2, b2, w3 = self._weights(x_ND.dtype)
        offs = torch.tensor(counts, device=x_ND.device).cumsum(0).to(torch.int32)
        expert_N = torch.repeat_interleave(torch.arange(self.num_experts, device=x_ND.device),
                                           torch.tensor(counts, device=x_ND.device))
        h = F.grouped_mm(x_ND, w1, offs=offs) + b1[expert_N]
        h = self._act(h, None if w3 is None else F.grouped_mm(x_ND, w3, offs=offs))
        return F.grouped_mm(h, w2, offs=offs) + b2[expert_N]

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"activation={self.activation}")
