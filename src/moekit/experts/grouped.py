"""Batched matmuls over contiguous groups of experts, each group padded to its own largest count.

Legend: E experts, N routed rows (grouped by expert), R padded rows, I/O in/out features.

One batched matmul over all E experts needs every expert padded to the largest count: under
uniform random routing that is ~1.25x the real rows at E=256. Splitting the experts into
contiguous groups (views of the stacked weights, no copy) and padding each group only to its
own largest count brings that to ~1.05x, while groups of a multiple of the thread count still
keep every thread busy with whole matrices, as one big batched matmul does. ``plan_groups`` picks
the split and leaves each group's experts without rows out of its matmuls (``one_group`` is the
single padded batch, for GPUs); ``grouped_linear`` computes ``x @ w[e] + b[e]`` over the padded
layout, ``grouped_relu_mlp`` and ``grouped_swiglu_mlp`` a whole expert, and ``mlp_groups`` a whole
expert without autograd, with backwards that write every expert's weight gradient straight into
one [E, I, O] tensor. ``grouped_mm_linear`` is the unpadded alternative for a few rows per expert:
torch's grouped GEMM, with the same kind of backward.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

# torch's CPU bmm hands whole matrices to its threads: a group of 3 experts on 2 threads runs at the
# speed of 4 (measured: [136, 512] x [512, 1024] blocks cost 7.0 us/row in groups of 3, 5.4-6.0 in
# groups of 2, 5.2-5.5 in groups of 4 or 6). A group is therefore costed as ceil(size / threads) *
# threads experts.
# Groups longer than MAX_GROUP only lengthen the search.
MAX_GROUP = 16
# The fixed cost of one more group (its six matmul calls per step), in padded rows.
GROUP_OVERHEAD_ROWS = 4


def group_cost(size: int, cap: int, threads: int, overhead_rows: int = GROUP_OVERHEAD_ROWS) -> int:
    """Cost, in padded rows, of one batched matmul over ``size`` experts of ``cap`` rows each."""
    return -(-size // threads) * threads * cap + overhead_rows


class GradientBuffers:
    """Storage for the [E, I, O] weight gradients of the grouped kernels, kept from one backward to the next.

    With glibc's default settings every allocation above its mmap threshold (at most 32 MiB) gets
    fresh pages from the kernel and gives them back when freed, so a bank's weight gradients, the
    same shapes every step (512 MiB each at E=256, D=512, F=1024 in float32), would be page-faulted
    in anew each step (~0.45 s per GiB on the CPUs measured). The bank keeps their storage instead
    and hands autograd a new tensor over it each backward, which autograd then stores as the
    parameter's ``.grad`` without a copy.

    A buffer is reused only when nothing else holds its storage any more: not the tensor handed out
    last time (alive while it is still a ``.grad``, e.g. when gradients accumulate over several
    backwards), nor any view of it; otherwise a new buffer is made. It costs the memory of the
    gradients between steps, as ``zero_grad(set_to_none=False)`` would.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._handed: dict[str, weakref.ref[torch.Tensor]] = {}

    def empty_like(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor shaped like ``like`` (contiguous), over reused storage when free."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device \
                or self._in_use(name, buf):
            buf = self._buffers[name] = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        # A new tensor object over the buffer's storage: autograd takes it as the .grad only when no
        # other reference to the object exists (else it copies), and ours is to the buffer.
        out = torch.empty(0, dtype=buf.dtype, device=buf.device).set_(buf.untyped_storage(), 0, buf.shape,
                                                                      buf.stride())
        self._handed[name] = weakref.ref(out)
        return out

    def _in_use(self, name: str, buf: torch.Tensor) -> bool:
        handed = self._handed.get(name)
        if handed is not None and handed() is not None:
            return True
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        if use_count is None:  # no way to see views: never risk overwriting one
            return True
        # The buffer holds its storage once, and the temporary wrapper below once more.
        return use_count(buf.untyped_storage()._cdata) > 2


class Group(NamedTuple):
    """Experts [start, end) computed as one batched matmul over an [end-start, cap, I] block of rows
    beginning at padded row ``row``."""

    start: int
    end: int
    cap: int
    row: int


class GroupPlan(NamedTuple):
    """How N rows grouped by expert (sizes ``counts``) sit in the padded [R, I] buffer.

    Attributes:
        groups: contiguous expert ranges covering [0, E), in order.
        rows: R, the padded rows of all groups.
        base: [E] padded row of each expert's first row.
    """

    groups: list[Group]
    rows: int
    base: list[int]

    def block_rows(self) -> float:
        """The mean padded rows of a group's block, over the groups that have rows."""
        live = sum(1 for g in self.groups if g.cap > 0)
        return self.rows / live if live else 0.0

    def padded_rows(self, counts_E: torch.Tensor) -> torch.Tensor:
        """[N] padded row of each routed row, for rows grouped by expert with sizes ``counts_E``."""
        device = counts_E.device
        num_experts = counts_E.numel()
        expert_N = torch.repeat_interleave(torch.arange(num_experts, device=device), counts_E)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        base_E = torch.tensor(self.base, dtype=torch.long, device=device)
        offset_E = base_E - starts_E  # row n of expert e goes to base[e] + (n - starts[e])
        return torch.arange(expert_N.numel(), device=device) + offset_E[expert_N]


def plan_groups(counts: list[int], threads: int | None = None, max_group: int | None = None,
                overhead_rows: int = GROUP_OVERHEAD_ROWS) -> GroupPlan:
    """The padded layout of rows grouped by expert (sizes ``counts``) on the CPU: the groups of
    ``group_bounds``, each padded to its largest count, less the experts without rows
    (``_skip_empty``), which become groups of cap 0.

    Args:
        counts: rows per expert.
        threads: threads sharing a batched matmul (default: ``torch.get_num_threads()``).
        max_group: longest group considered (default: max(16, 2 * threads)).
    """
    bounds = group_bounds(counts, threads, max_group, overhead_rows)
    return _layout([span for start, end in bounds for span in _skip_empty(start, end, counts)])


def group_bounds(counts: list[int], threads: int | None = None, max_group: int | None = None,
                 overhead_rows: int = GROUP_OVERHEAD_ROWS) -> list[tuple[int, int]]:
    """Split experts into contiguous groups [start, end) minimising the summed ``group_cost``
    (padded rows, rounded up to whole rounds of ``threads``, plus a fixed cost per group), by
    dynamic programming over the group ends. O(E * max_group). Arguments as ``plan_groups``."""
    threads = torch.get_num_threads() if threads is None else threads
    max_group = max(MAX_GROUP, 2 * threads) if max_group is None else max_group
    num_experts = len(counts)
    best = [0.0] + [math.inf] * num_experts  # the cheapest cost of a split of the first i experts
    prev = [0] * (num_experts + 1)
    for end in range(1, num_experts + 1):
        top = 0
        for size in range(1, min(max_group, end) + 1):
            start = end - size
            top = max(top, counts[start])
            cost = best[start] + group_cost(size, top, threads, overhead_rows)
            if cost < best[end]:
                best[end], prev[end] = cost, start
    bounds, end = [], num_experts
    while end > 0:
        bounds.append((prev[end], end))
        end = prev[end]
    bounds.reverse()
    return bounds


def _skip_empty(start: int, end: int, counts: list[int]) -> list[tuple[int, int, int]]:
    """The group of experts [start, end) as spans (start, end, cap) that leave out its experts without
    rows: those become spans of cap 0, which no matmul reads and whose weights get a zero gradient.

    At a few rows per expert (training at small batches) a padded expert costs the reading of its
    weights, forward and backward, far more than its rows; a group mixing experts with and without
    rows read every one. The spans keep the group's cap, so every computed expert sees the same
    [cap, I] block as in the whole group, and every span computed has at least two experts (an
    expert without rows is kept beside a lone one): torch's CPU bmm gave the same values on any
    sub-batch of at least two matrices, but a single one may split its sums across threads.
    """
    cap = max(counts[start:end])
    if cap == 0 or end - start == 1:
        return [(start, end, cap)]
    keep = [c > 0 for c in counts[start:end]]
    size = end - start
    for i in range(size):
        if counts[start + i] > 0 and not (i > 0 and keep[i - 1]) and not (i + 1 < size and keep[i + 1]):
            keep[i + 1 if i + 1 < size else i - 1] = True  # a lone expert with rows gets a neighbour
    spans: list[tuple[int, int, int]] = []
    first = start
    for kept, run in itertools.groupby(keep):
        last = first + len(list(run))
        spans.append((first, last, cap if kept else 0))
        first = last
    return spans


def _layout(spans: list[tuple[int, int, int]]) -> GroupPlan:
    groups: list[Group] = []
    base: list[int] = []
    row = 0
    for start, end, cap in spans:
        groups.append(Group(start, end, cap, row))
        base.extend(row + i * cap for i in range(end - start))
        row += (end - start) * cap
    return GroupPlan(groups, row, base)


def one_group(counts: list[int]) -> GroupPlan:
    """Every expert in one group padded to the largest count (one batched matmul per weight)."""
    return _layout([(0, len(counts), max(counts, default=0))])


def _blocks(t_R: torch.Tensor, g: Group) -> torch.Tensor:
    return t_R[g.row:g.row + (g.end - g.start) * g.cap].view(g.end - g.start, g.cap, t_R.shape[-1])


def _largest_block(groups: list[Group]) -> int:
    """The rows of the largest group's block: the size of a scratch block reused group after group."""
    return max(((g.end - g.start) * g.cap for g in groups), default=0)


def _project(x_GCI: torch.Tensor, w_EIO: torch.Tensor, b_EO: torch.Tensor | None, g: Group,
             out: torch.Tensor) -> torch.Tensor:
    """``x @ w[e] + b[e]`` for group ``g``'s experts, written to ``out`` [G, C, O] (``b`` None: no bias)."""
    if b_EO is None:
        return torch.bmm(x_GCI, w_EIO[g.start:g.end], out=out)
    return torch.baddbmm(b_EO[g.start:g.end, None, :], x_GCI, w_EIO[g.start:g.end], out=out)


def _weight_grad(buffers: tuple[GradientBuffers, str] | None, name: str, w: torch.Tensor) -> torch.Tensor:
    """The weight gradient's tensor: from ``buffers`` (a bank's, and the prefix of its names) if given."""
    if buffers is None:
        return torch.empty_like(w)
    bank, prefix = buffers
    return bank.empty_like(prefix + name, w)


def _zero_gradients(start: int, end: int, *grads: torch.Tensor | None) -> None:
    """A zero gradient for experts [start, end), which had no row, in each given [E, ...] tensor."""
    for t in grads:
        if t is not None:
            t[start:end].zero_()


def _linear_groups(x_RI: torch.Tensor, w_EIO: torch.Tensor, b_EO: torch.Tensor | None,
                   groups: list[Group]) -> torch.Tensor:
    """The forward of ``grouped_linear`` on a contiguous ``x_RI``. Returns [R, O]."""
    y_RO = x_RI.new_empty(x_RI.shape[0], w_EIO.shape[-1])
    for g in groups:
        if g.cap == 0:
            continue
        _project(_blocks(x_RI, g), w_EIO, b_EO, g, _blocks(y_RO, g))
    return y_RO


def swiglu_in_place(h: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
    """``silu(h) * up`` written over ``h``: the kernels of the out-of-place form, so its values."""
    if up is None:
        raise ValueError("SwiGLU needs the up projection")
    return torch.nn.functional.silu(h, inplace=True).mul_(up)


def _mlp_groups(x_RD: torch.Tensor, w1_EDF: torch.Tensor, b1_EF: torch.Tensor | None, w3_EDF: torch.Tensor | None,
                b3_EF: torch.Tensor | None, w2_EFD: torch.Tensor, b2_ED: torch.Tensor | None, groups: list[Group],
                hidden: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
    """A whole expert FFN on a contiguous ``x_RD``, group by group, without autograd. Returns [R, D].

    ``hidden(h, up)`` is the activation on one group's [G, C, F] blocks of ``x @ w1 + b1`` and (gated)
    ``x @ w3 + b3``; it may overwrite ``h``. Each group's hidden blocks are one reused scratch,
    still in cache when the second layer reads them: the [R, F] activations are never written out,
    where the layer by layer computation (``grouped_linear`` twice or thrice) sends them to memory
    and back three or four times. The same batched matmuls and elementwise operations, so the
    same values.
    """
    y_RD = x_RD.new_empty(x_RD.shape[0], w2_EFD.shape[-1])
    hidden_dim = w1_EDF.shape[-1]
    scratch_h = x_RD.new_empty(_largest_block(groups) * hidden_dim)
    scratch_up = None if w3_EDF is None else torch.empty_like(scratch_h)
    for g in groups:
        if g.cap == 0:
            continue
        shape = (g.end - g.start, g.cap, hidden_dim)
        size = shape[0] * shape[1] * shape[2]
        x_GCD = _blocks(x_RD, g)
        h_GCF = _project(x_GCD, w1_EDF, b1_EF, g, scratch_h[:size].view(shape))
        up_GCF = None if w3_EDF is None or scratch_up is None else _project(x_GCD, w3_EDF, b3_EF, g,
                                                                             scratch_up[:size].view(shape))
        _project(hidden(h_GCF, up_GCF), w2_EFD, b2_ED, g, _blocks(y_RD, g))
    return y_RD


def mlp_groups(x_RD: torch.Tensor, w1_EDF: torch.Tensor, b1_EF: torch.Tensor | None, w3_EDF: torch.Tensor | None,
               b3_EF: torch.Tensor | None, w2_EFD: torch.Tensor, b2_ED: torch.Tensor | None, plan: GroupPlan,
               hidden: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
    """``hidden(x[r] @ w1[e] + b1[e], x[r] @ w3[e] + b3[e]) @ w2[e] + b2[e]`` for every padded row r
    of expert e (layout of ``plan``; ``w3`` None: ungated, ``hidden`` gets None), for a forward
    that records no autograd graph. Returns [R, D].

    The values of ``grouped_linear`` -> ``hidden`` -> ``grouped_linear`` (see ``_mlp_groups``).
    """
    if x_RD.shape[0] != plan.rows:
        raise ValueError(f"x has {x_RD.shape[0]} rows; the plan lays out {plan.rows}")
    if needs_graph(x_RD, w1_EDF, b1_EF, w3_EDF, b3_EF, w2_EFD, b2_ED):
        raise RuntimeError("mlp_groups records no autograd graph: call it under torch.no_grad() "
                           "or with inputs that do not require grad")
    return _mlp_groups(x_RD.contiguous(), w1_EDF, b1_EF, w3_EDF, b3_EF, w2_EFD, b2_ED, plan.groups, hidden)


def needs_graph(*tensors: torch.Tensor | None) -> bool:
    """Whether an autograd graph must be recorded: grad mode on and some input requiring grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RI, w_EIO, b_EO, groups, buffers):
        x_RI = x_RI.contiguous()
        y_RO = _linear_groups(x_RI, w_EIO, b_EO, groups)
        ctx.save_for_backward(x_RI, w_EIO)
        ctx.groups, ctx.has_bias, ctx.buffers = groups, b_EO is not None, buffers
        return y_RO

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_RO):
        x_RI, w_EIO = ctx.saved_tensors
        dy_RO = dy_RO.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx_RI = torch.empty_like(x_RI) if need_x else None
        dw_EIO = _weight_grad(ctx.buffers, "", w_EIO) if need_w else None
        db_EO = w_EIO.new_empty(w_EIO.shape[0], w_EIO.shape[-1]) if need_b and ctx.has_bias else None
        for g in ctx.groups:
            if g.cap == 0:  # no row: nothing of dx, and a zero gradient for these experts
                _zero_gradients(g.start, g.end, dw_EIO, db_EO)
                continue
            dy_GCO = _blocks(dy_RO, g)
            if dx_RI is not None:
                torch.bmm(dy_GCO, w_EIO[g.start:g.end].transpose(1, 2), out=_blocks(dx_RI, g))
            if dw_EIO is not None:
                torch.bmm(_blocks(x_RI, g).transpose(1, 2), dy_GCO, out=dw_EIO[g.start:g.end])
            if db_EO is not None:
                torch.sum(dy_GCO, 1, out=db_EO[g.start:g.end])
        return dx_RI, dw_EIO, db_EO, None, None


def grouped_linear(x_RI: torch.Tensor, w_EIO: torch.Tensor, b_EO: torch.Tensor | None,
                   plan: GroupPlan, buffers: tuple[GradientBuffers, str] | None = None) -> torch.Tensor:
    """``y[r] = x[r] @ w[e] + b[e]`` for every padded row r of expert e (layout of ``plan``). Returns [R, O].

    Differentiable once in ``x``, ``w`` and ``b``; the weight gradient is one [E, I, O] tensor
    written group by group (no per-expert or per-group full-size gradient is ever made).
    """
    if x_RI.shape[0] != plan.rows:
        raise ValueError(f"x has {x_RI.shape[0]} rows; the plan lays out {plan.rows}")
    if not needs_graph(x_RI, w_EIO, b_EO):  # the same computation, without autograd's bookkeeping
        return _linear_groups(x_RI.contiguous(), w_EIO, b_EO, plan.groups)
    return _GroupedLinear.apply(x_RI, w_EIO, b_EO, plan.groups, buffers)


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NI, w_EIO, offs, counts, buffers):
        ctx.save_for_backward(x_NI, w_EIO)
        ctx.offs, ctx.counts, ctx.buffers = offs, counts, buffers
        return torch.nn.functional.grouped_mm(x_NI, w_EIO, offs=offs)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_NO):
        x_NI, w_EIO = ctx.saved_tensors
        dy_NO = dy_NO.contiguous()
        need_x, need_w = ctx.needs_input_grad[:2]
        dx_NI = torch.nn.functional.grouped_mm(dy_NO, w_EIO.transpose(1, 2), offs=ctx.offs) if need_x else None
        dw_EIO = None
        if need_w:
            dw_EIO = _weight_grad(ctx.buffers, "", w_EIO)
            row = 0
            for empty, run in itertools.groupby(range(len(ctx.counts)), key=lambda e: ctx.counts[e] == 0):
                experts = list(run)
                if empty:  # a run of experts without rows, zeroed in one call
                    _zero_gradients(experts[0], experts[-1] + 1, dw_EIO)
                    continue
                for e in experts:
                    n = ctx.counts[e]
                    torch.mm(x_NI[row:row + n].T, dy_NO[row:row + n], out=dw_EIO[e])
                    row += n
        return dx_NI, dw_EIO, None, None, None


def grouped_mm_linear(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: list[int],
                      buffers: tuple[GradientBuffers, str] | None = None) -> torch.Tensor:
    """``y[n] = x[n] @ w[e]`` for the rows of each expert e, contiguous and in expert order
    (sizes ``counts``), with torch's grouped GEMM (``F.grouped_mm``: one matmul per expert that
    has rows, no padding). Returns [N, O].

    Differentiable once: the input gradient is a grouped GEMM on the transposed weights, and
    the weight gradient one [E, I, O] tensor written expert by expert, over the reused storage
    of ``buffers`` when given (its experts without rows get zeros).
    """
    if sum(counts) != x_NI.shape[0] or len(counts) != w_EIO.shape[0]:
        raise ValueError(f"counts {counts} do not lay out x's {x_NI.shape[0]} rows over {w_EIO.shape[0]} experts")
    offs = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=x_NI.device)
    x_NI = x_NI.contiguous()
    if not needs_graph(x_NI, w_EIO):
        return torch.nn.functional.grouped_mm(x_NI, w_EIO, offs=offs)
    return _GroupedMM.apply(x_NI, w_EIO, offs, list(counts), buffers)


def _relu_mlp_groups(x_RD: torch.Tensor, w1_EDF: torch.Tensor, b1_EF: torch.Tensor, w2_EFD: torch.Tensor,
                     b2_ED: torch.Tensor, groups: list[Group]) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of ``grouped_relu_mlp`` on a contiguous ``x_RD``: (y [R, D], the hidden h [R, F])."""
    h_RF = x_RD.new_empty(x_RD.shape[0], w1_EDF.shape[-1])
    y_RD = x_RD.new_empty(x_RD.shape[0], w2_EFD.shape[-1])
    for g in groups:
        if g.cap == 0:
            continue
        h_GCF = _project(_blocks(x_RD, g), w1_EDF, b1_EF, g, _blocks(h_RF, g)).relu_()
        _project(h_GCF, w2_EFD, b2_ED, g, _blocks(y_RD, g))
    return y_RD, h_RF


class _GroupedReluMLP(torch.autograd.Function):
    """``relu(x @ w1[e] + b1[e]) @ w2[e] + b2[e]`` group by group, both layers back to back so
    that each group's hidden block is still in cache when the second layer (or, backward, the
    ReLU mask and the first layer) reads it: the [R, F] hidden gradient is never materialised,
    and the hidden activations make one trip to memory instead of three."""

    @staticmethod
    def forward(ctx, x_RD, w1_EDF, b1_EF, w2_EFD, b2_ED, groups, buffers):
        x_RD = x_RD.contiguous()
        y_RD, h_RF = _relu_mlp_groups(x_RD, w1_EDF, b1_EF, w2_EFD, b2_ED, groups)
        ctx.save_for_backward(x_RD, w1_EDF, w2_EFD, h_RF)
        ctx.groups, ctx.buffers = groups, buffers
        return y_RD

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_RD):
        x_RD, w1_EDF, w2_EFD, h_RF = ctx.saved_tensors
        dy_RD = dy_RD.contiguous()
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        dx_RD = torch.empty_like(x_RD) if need_x else None
        dw1 = _weight_grad(ctx.buffers, "w1", w1_EDF) if need_w1 else None
        db1 = w1_EDF.new_empty(w1_EDF.shape[0], w1_EDF.shape[-1]) if need_b1 else None
        dw2 = _weight_grad(ctx.buffers, "w2", w2_EFD) if need_w2 else None
        db2 = w2_EFD.new_empty(w2_EFD.shape[0], w2_EFD.shape[-1]) if need_b2 else None
        # One scratch block for the hidden gradient of a group, reused group after group.
        largest = _largest_block(ctx.groups)
        scratch_F = h_RF.new_empty(largest * h_RF.shape[-1])
        for g in ctx.groups:
            s, e = g.start, g.end
            if g.cap == 0:  # no row: a zero gradient for these experts
                _zero_gradients(s, e, dw1, db1, dw2, db2)
                continue
            dy_GCD, h_GCF = _blocks(dy_RD, g), _blocks(h_RF, g)
            dh_GCF = scratch_F[:(e - s) * g.cap * h_RF.shape[-1]].view(e - s, g.cap, h_RF.shape[-1])
            torch.bmm(dy_GCD, w2_EFD[s:e].transpose(1, 2), out=dh_GCF)
            if dw2 is not None:
                torch.bmm(h_GCF.transpose(1, 2), dy_GCD, out=dw2[s:e])
            if db2 is not None:
                torch.sum(dy_GCD, 1, out=db2[s:e])
            # ReLU's backward, in place: h is its output, > 0 exactly where the gradient passes.
            torch.ops.aten.threshold_backward.grad_input(dh_GCF, h_GCF, 0, grad_input=dh_GCF)
            if dx_RD is not None:
                torch.bmm(dh_GCF, w1_EDF[s:e].transpose(1, 2), out=_blocks(dx_RD, g))
            if dw1 is not None:
                torch.bmm(_blocks(x_RD, g).transpose(1, 2), dh_GCF, out=dw1[s:e])
            if db1 is not None:
                torch.sum(dh_GCF, 1, out=db1[s:e])
        return dx_RD, dw1, db1, dw2, db2, None, None


def grouped_relu_mlp(x_RD: torch.Tensor, w1_EDF: torch.Tensor, b1_EF: torch.Tensor, w2_EFD: torch.Tensor,
                     b2_ED: torch.Tensor, plan: GroupPlan, buffers: tuple[GradientBuffers, str] | None = None,
                     ) -> torch.Tensor:
    """``relu(x[r] @ w1[e] + b1[e]) @ w2[e] + b2[e]`` for every padded row r of expert e. Returns [R, D].

    The same values and gradients as ``grouped_linear`` -> ReLU -> ``grouped_linear``, computed
    group by group with both layers together (see ``_GroupedReluMLP``). Differentiable once.
    """
    if x_RD.shape[0] != plan.rows:
        raise ValueError(f"x has {x_RD.shape[0]} rows; the plan lays out {plan.rows}")
    if not needs_graph(x_RD, w1_EDF, b1_EF, w2_EFD, b2_ED):  # nothing kept: the hidden block in scratch
        return _mlp_groups(x_RD.contiguous(), w1_EDF, b1_EF, None, None, w2_EFD, b2_ED, plan.groups,
                           lambda h, _: h.relu_())
    return _GroupedReluMLP.apply(x_RD, w1_EDF, b1_EF, w2_EFD, b2_ED, plan.groups, buffers)


def _swiglu_groups(x_RD: torch.Tensor, w1_EDF: torch.Tensor, b1_EF: torch.Tensor | None, w3_EDF: torch.Tensor,
                   w2_EFD: torch.Tensor, b2_ED: torch.Tensor | None, groups: list[Group],
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward of ``grouped_swiglu_mlp`` on a contiguous ``x_RD``: (y [R, D], the gate
    projection h [R, F], the up projection u [R, F]); the activation ``silu(h) * u`` of a group is
    one reused scratch block."""
    hidden_dim = w1_EDF.shape[-1]
    h_RF, u_RF = x_RD.new_empty(x_RD.shape[0], hidden_dim), x_RD.new_empty(x_RD.shape[0], hidden_dim)
    y_RD = x_RD.new_empty(x_RD.shape[0], w2_EFD.shape[-1])
    scratch = x_RD.new_empty(_largest_block(groups) * hidden_dim)
    for g in groups:
        if g.cap == 0:
            continue
        x_GCD = _blocks(x_RD, g)
        u_GCF = _project(x_GCD, w3_EDF, None, g, _blocks(u_RF, g))
        h_GCF = _project(x_GCD, w1_EDF, b1_EF, g, _blocks(h_RF, g))
        a_GCF = torch.ops.aten.silu.out(h_GCF, out=scratch[:h_GCF.numel()].view(h_GCF.shape)).mul_(u_GCF)
        _project(a_GCF, w2_EFD, b2_ED, g, _blocks(y_RD, g))
    return y_RD, h_RF, u_RF


class _GroupedSwiGLU(torch.autograd.Function):
    """``(silu(x @ w1[e] + b1[e]) * (x @ w3[e])) @ w2[e] + b2[e]`` group by group, the three
    projections of a group back to back: only the two projections h and u are kept for the
    backward; the activation and, backward, every [F]-wide gradient of a group live in scratch
    blocks still in cache when the next matmul reads them."""

    @staticmethod
    def forward(ctx, x_RD, w1_EDF, b1_EF, w3_EDF, w2_EFD, b2_ED, groups, buffers):
        x_RD = x_RD.contiguous()
        y_RD, h_RF, u_RF = _swiglu_groups(x_RD, w1_EDF, b1_EF, w3_EDF, w2_EFD, b2_ED, groups)
        ctx.save_for_backward(x_RD, w1_EDF, w3_EDF, w2_EFD, h_RF, u_RF)
        ctx.groups, ctx.buffers = groups, buffers
        ctx.has_bias = (b1_EF is not None, b2_ED is not None)
        return y_RD

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_RD):
        x_RD, w1_EDF, w3_EDF, w2_EFD, h_RF, u_RF = ctx.saved_tensors
        dy_RD = dy_RD.contiguous()
        need_x, need_w1, need_b1, need_w3, need_w2, need_b2 = ctx.needs_input_grad[:6]
        dx_RD = torch.empty_like(x_RD) if need_x else None
        dw1 = _weight_grad(ctx.buffers, "w1", w1_EDF) if need_w1 else None
        dw3 = _weight_grad(ctx.buffers, "w3", w3_EDF) if need_w3 else None
        dw2 = _weight_grad(ctx.buffers, "w2", w2_EFD) if need_w2 else None
        db1 = w1_EDF.new_empty(w1_EDF.shape[0], w1_EDF.shape[-1]) if need_b1 and ctx.has_bias[0] else None
        db2 = w2_EFD.new_empty(w2_EFD.shape[0], w2_EFD.shape[-1]) if need_b2 and ctx.has_bias[1] else None
        hidden_dim, dim = h_RF.shape[-1], x_RD.shape[-1]
        largest = _largest_block(ctx.groups)
        # Three [G, C, F] scratch blocks and one [G, C, D], reused group after group.
        scratch = [h_RF.new_empty(largest * hidden_dim) for _ in range(3)]
        scratch_d = x_RD.new_empty(largest * dim) if dx_RD is not None else None
        for g in ctx.groups:
            s, e = g.start, g.end
            if g.cap == 0:  # no row: a zero gradient for these experts
                _zero_gradients(s, e, dw1, db1, dw3, dw2, db2)
                continue
            dy_GCD, h_GCF, u_GCF, x_GCD = _blocks(dy_RD, g), _blocks(h_RF, g), _blocks(u_RF, g), _blocks(x_RD, g)
            da_GCF, act_GCF, silu_GCF = (t[:h_GCF.numel()].view(h_GCF.shape) for t in scratch)
            torch.bmm(dy_GCD, w2_EFD[s:e].transpose(1, 2), out=da_GCF)
            torch.ops.aten.silu.out(h_GCF, out=silu_GCF)
            if dw2 is not None:
                torch.mul(silu_GCF, u_GCF, out=act_GCF)  # the activation, recomputed in cache
                torch.bmm(act_GCF.transpose(1, 2), dy_GCD, out=dw2[s:e])
            if db2 is not None:
                torch.sum(dy_GCD, 1, out=db2[s:e])
            du_GCF = torch.mul(da_GCF, silu_GCF, out=act_GCF)  # d(silu(h) * u)/du
            ds_GCF = da_GCF.mul_(u_GCF)  # ... / d silu(h)
            dh_GCF = torch.ops.aten.silu_backward.grad_input(ds_GCF, h_GCF, grad_input=silu_GCF)
            if dx_RD is not None and scratch_d is not None:
                dx_GCD = torch.bmm(dh_GCF, w1_EDF[s:e].transpose(1, 2), out=_blocks(dx_RD, g))
                dx_GCD.add_(torch.bmm(du_GCF, w3_EDF[s:e].transpose(1, 2),
                                      out=scratch_d[:dx_GCD.numel()].view(dx_GCD.shape)))
            if dw1 is not None:
                torch.bmm(x_GCD.transpose(1, 2), dh_GCF, out=dw1[s:e])
            if db1 is not None:
                torch.sum(dh_GCF, 1, out=db1[s:e])
            if dw3 is not None:
                torch.bmm(x_GCD.transpose(1, 2), du_GCF, out=dw3[s:e])
        return dx_RD, dw1, db1, dw3, dw2, db2, None, None


def grouped_swiglu_mlp(x_RD: torch.Tensor, w1_EDF: torch.Tensor, b1_EF: torch.Tensor | None, w3_EDF: torch.Tensor,
                       w2_EFD: torch.Tensor, b2_ED: torch.Tensor | None, plan: GroupPlan,
                       buffers: tuple[GradientBuffers, str] | None = None) -> torch.Tensor:
    """``(silu(x[r] @ w1[e] + b1[e]) * (x[r] @ w3[e])) @ w2[e] + b2[e]`` for every padded row r of
    expert e (``b1``, ``b2`` None: no bias). Returns [R, D].

    The values and gradients of ``grouped_linear`` -> silu * up -> ``grouped_linear``, computed
    group by group with the three projections together (see ``_GroupedSwiGLU``); it keeps two
    [R, F] tensors for the backward where the layer by layer graph keeps four. Differentiable once.
    """
    if x_RD.shape[0] != plan.rows:
        raise ValueError(f"x has {x_RD.shape[0]} rows; the plan lays out {plan.rows}")
    if not needs_graph(x_RD, w1_EDF, b1_EF, w3_EDF, w2_EFD, b2_ED):  # nothing kept: both projections in scratch
        return _mlp_groups(x_RD.contiguous(), w1_EDF, b1_EF, w3_EDF, None, w2_EFD, b2_ED, plan.groups,
                           swiglu_in_place)
    return _GroupedSwiGLU.apply(x_RD, w1_EDF, b1_EF, w3_EDF, w2_EFD, b2_ED, plan.groups, buffers)
