"""A bank of E feed-forward experts in stacked weight tensors, computed per contiguous segment.

Legend: N routed token-slots (grouped by expert), D model dim, F expert hidden dim, E experts.

Expert e computes ``act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]`` (SwiGLU: ``silu(x @ w1[e] + b1[e]) *
(x @ w3[e]) @ w2[e] + b2[e]``; GPT-OSS's clamped SwiGLU: ``clamped_swiglu(x @ w1[e] + b1[e],
x @ w3[e] + b3[e]) @ w2[e] + b2[e]``; without biases, every ``+ b`` is left out). Keeping all experts
in one tensor per weight lets the layer be built on the meta device and sharded by slicing the E axis.

The bank owns its compute: ``Experts.forward(x_ND, counts)`` is the one entry every dispatcher
(local or all-to-all) calls, and ``choose_compute`` the one place a backend is picked.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moekit.dispatch.sort import Permutation, combine
from moekit.experts.grouped import (
    GradientBuffers,
    GroupPlan,
    grouped_linear,
    grouped_mm_linear,
    grouped_relu_mlp,
    grouped_swiglu_mlp,
    mlp_groups,
    needs_graph,
    one_group,
    plan_groups,
    swiglu_in_place,
)

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swiglu": F.silu, "clamped_swiglu": F.silu}
# Activations with a second (up) projection ``w3`` multiplying the activated gate projection.
GATED = ("swiglu", "clamped_swiglu")
# GPT-OSS's settings of its clamped SwiGLU (``swiglu_alpha``, ``swiglu_limit`` in its config).
CLAMPED_SWIGLU_DEFAULTS = {"alpha": 1.702, "limit": 7.0}
BACKENDS = ("auto", "loop", "bmm", "grouped_mm")
# "auto" pads groups of experts to their largest segment while that costs at most this factor of
# the real rows.
MAX_PADDING_WASTE = 2.0
# Without a backward, "auto" computes one expert at a time up to this many rows per expert on
# average (measured on CPU: 0.5-0.9x the time of padded groups there, level beyond).
MEMORY_BOUND_ROWS = 8
# Without a backward, batches of at most this many tokens (generation) are grouped by expert in
# Python (``Experts.forward_few``): measured on CPU at one token, the layer then takes 0.83x the
# time of the sort, gather and combine; from 4 tokens on, the experts with several rows make it
# level or slower.
FEW_TOKENS = 2
# Without a backward, banks without biases compute from this many routed rows on with torch's CPU
# grouped GEMM where the loop would run (one matmul per expert that has rows): measured 1.12-1.42x
# faster at 16-128 rows (T = 8-64, E = 8-64, D=512, F=1024, 2 threads), with the same products
# (it runs a matmul per segment; only an activation over a width that is not a multiple of the
# vector width may round its last bit differently). Below it, or with biases (added after the
# product, which would change the rounding), the loop stays.
CPU_GROUPED_MIN_ROWS = 16
# With a backward, banks without biases compute up to MEMORY_BOUND_ROWS rows per expert with the
# grouped GEMM in these dtypes (``grouped_mm_linear``, weight gradients in reused storage) where
# they would pad: measured against the padded groups at D=512, F=1024, 2 threads, SwiGLU,
# forward+backward: 1.07-1.12x faster at 0.5-8 rows per expert (T = 16-256, E = 8-64; GELU
# 1.04-1.19x), but 0.82x at 16 rows (one 16-32-row matmul on two threads) and 0.92x at 32. In
# bfloat16 it was 0.92-1.05x.
TRAIN_GROUPED_DTYPES = (torch.float32,)
# On the padded layout, groups of experts whose blocks hold this many rows on average take the
# fused kernels (``mlp_groups`` without autograd, ``grouped_swiglu_mlp`` with it): each group's
# [F]-wide activations stay in cache between its projections. Measured at D=512, F=1024, 2
# threads, T=4096 (about 2100 rows per block at E=8, 280 at E=64), against the layer by layer
# kernels: the forward in 0.91-0.93x the time, forward+backward 0.95x at E=8 and level at E=64.
# Without autograd it was level at T=256 (E=8); with it 1.05x slower at 24 rows per block (T=256,
# E=64), where each group's elementwise operations are too small to use every thread.
FUSED_MIN_BLOCK_ROWS = 256


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """torch's grouped GEMM: CUDA, bfloat16, compute capability >= 9.0 (Hopper)."""
    return (hasattr(F, "grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


@functools.cache
def cpu_grouped_mm_available(dtype: torch.dtype) -> bool:
    """Whether this torch runs ``F.grouped_mm`` on the CPU in ``dtype`` (tried once on a tiny case)."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        F.grouped_mm(torch.ones(2, 8, dtype=dtype), torch.ones(2, 8, 8, dtype=dtype),
                     offs=torch.tensor([1, 2], dtype=torch.int32))
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def choose_compute(backend: str, x_ND: torch.Tensor, counts: list[int],
                   grad: bool = True, cpu_grouped: bool = False) -> tuple[str, GroupPlan | None]:
    """The backend to use for segments of sizes ``counts``, and for "bmm" its padded layout.

    "auto" stands for grouped_mm where supported; else, on the CPU:

    - without a backward (``grad`` False) and at most ``MEMORY_BOUND_ROWS`` rows per expert on
      average, the loop: reading the weights dominates there, and one matmul per expert that has
      rows reads only those experts, where padded groups read every expert of a group. A bank that
      can (``cpu_grouped``: no biases, rows of a multiple of 16 bytes, ``Experts.cpu_grouped``)
      takes torch's CPU grouped GEMM instead from ``CPU_GROUPED_MIN_ROWS`` rows on, the same
      products in one call;
    - with a backward and at most ``MEMORY_BOUND_ROWS`` rows per expert on average, a bank that
      can takes torch's CPU grouped GEMM in float32 (``TRAIN_GROUPED_DTYPES``;
      ``grouped_mm_linear``, its weight gradients in the bank's reused storage): no padding;
    - otherwise with a backward, bmm over padded groups of experts (``moekit.experts.grouped``)
      however few the rows: the loop's per-expert weight gradients are stacked into whole
      [E, ...] tensors every step, which costs more than any padding;
    - otherwise bmm unless it computes more than ``MAX_PADDING_WASTE`` times the real rows.

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
    few = n <= MEMORY_BOUND_ROWS * len(counts)
    grouped = cpu_grouped and x_ND.device.type == "cpu" and cpu_grouped_mm_available(x_ND.dtype)
    if n > 0 and few and grad and grouped and x_ND.dtype in TRAIN_GROUPED_DTYPES:
        return "grouped_mm", None
    if n == 0 or (not grad and few):
        if n >= CPU_GROUPED_MIN_ROWS and not grad and grouped:
            return "grouped_mm", None
        return "loop", None
    plan = _plan(x_ND, counts)
    if grad or plan.rows <= MAX_PADDING_WASTE * n:
        return "bmm", plan
    return "loop", None


def _plan(x_ND: torch.Tensor, counts: list[int]) -> GroupPlan:
    return plan_groups(counts) if x_ND.device.type == "cpu" else one_group(counts)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's gated unit: ``(up + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)`` and
    ``up`` clamped to ``[-limit, limit]``.

    The clamps bound the activations of a model trained in low precision (the gate only from above:
    a very negative gate already gives ~0); the ``+ 1`` lets the up projection start as an identity
    factor.
    """
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


def activate(h: torch.Tensor, up: torch.Tensor | None, activation: str, settings: dict[str, float]) -> torch.Tensor:
    """The activation between an FFN's projections: ``h`` = x @ w1 + b1, ``up`` = x @ w3 (+ b3) when gated."""
    if activation not in GATED:
        return ACTIVATIONS[activation](h)
    if up is None:
        raise ValueError(f"activation={activation!r} is gated: it needs the up projection x @ w3")
    if activation == "clamped_swiglu":
        return clamped_swiglu(h, up, settings["alpha"], settings["limit"])
    return F.silu(h) * up


def check_activation(activation: str, activation_kwargs: dict | None) -> dict[str, float]:
    """The activation's settings (``alpha``, ``limit`` of "clamped_swiglu"; none for the others), checked."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
    given = dict(activation_kwargs or {})
    allowed = CLAMPED_SWIGLU_DEFAULTS if activation == "clamped_swiglu" else {}
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"activation_kwargs {unknown} do not apply to activation={activation!r} "
                         f"(it takes {sorted(allowed) or 'none'})")
    settings = {**allowed, **given}
    for name, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name}={value!r} must be a finite number")
    if "limit" in settings and settings["limit"] <= 0:
        raise ValueError(f"limit={settings['limit']!r} must be > 0")
    return {name: float(value) for name, value in settings.items()}


def linear(x_ND: torch.Tensor, w_DF: torch.Tensor, b_F: torch.Tensor | None) -> torch.Tensor:
    """``x @ w + b`` on [N, D] rows (``b`` None: no bias), one fused call when there is a bias."""
    return x_ND @ w_DF if b_F is None else torch.addmm(b_F, x_ND, w_DF)


def affine(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x @ w + b`` written out (``b`` None: no bias): the readable definitions use it."""
    return x @ w if b is None else x @ w + b


class ExpertWeights(NamedTuple):
    """A bank's stacked weights in one dtype (None: the bank has no such tensor)."""

    w1: torch.Tensor  # [E, D, F]
    b1: torch.Tensor | None  # [E, F]
    w2: torch.Tensor  # [E, F, D]
    b2: torch.Tensor | None  # [E, D]
    w3: torch.Tensor | None  # [E, D, F], gated activations
    b3: torch.Tensor | None  # [E, F], clamped_swiglu with biases


class Experts(nn.Module):
    """E independent FFNs D -> F -> D.

    Args:
        num_experts: E.
        dim: D.
        hidden_dim: F.
        activation: "relu", "gelu", "silu", "swiglu" (``silu(x @ w1 + b1) * (x @ w3)``, adds ``w3``
            [E, D, F]) or "clamped_swiglu" (GPT-OSS: ``clamped_swiglu(x @ w1 + b1, x @ w3 + b3)``,
            adds ``w3`` and, with ``bias``, the up projection's own bias ``b3`` [E, F]).
        backend: how the segments are computed: "loop" (one matmul pair per expert), "bmm" (pad
            segments to the largest and use one batched matmul), "grouped_mm" (torch's grouped
            GEMM), or "auto" (see ``choose_compute``). Settable after construction.
        bias: False builds no bias at all (``b1``, ``b2``, ``b3`` are None), as in Mixtral, Qwen,
            DeepSeek and Llama 4 experts; True (the default) keeps ``b1`` [E, F] and ``b2`` [E, D].
        activation_kwargs: "clamped_swiglu" takes ``alpha`` (default 1.702) and ``limit`` (default 7).
    """

    w1: nn.Parameter
    w2: nn.Parameter
    w3: nn.Parameter | None
    b1: nn.Parameter | None
    b2: nn.Parameter | None
    b3: nn.Parameter | None

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "relu",
                 backend: str = "auto", bias: bool = True, activation_kwargs: dict | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.settings = check_activation(activation, activation_kwargs)
        for name, value in (("num_experts", num_experts), ("dim", dim), ("hidden_dim", hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {bias!r}")
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.activation, self.bias = activation, bias
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
        self.backend = backend
        kw = {"device": device, "dtype": dtype}
        gated = activation in GATED
        # Registered in this order whatever exists, so state-dict keys keep today's order.
        shapes = {"w1": (num_experts, dim, hidden_dim), "b1": (num_experts, hidden_dim) if bias else None,
                  "w2": (num_experts, hidden_dim, dim), "b2": (num_experts, dim) if bias else None,
                  "w3": (num_experts, dim, hidden_dim) if gated else None,
                  "b3": (num_experts, hidden_dim) if bias and activation == "clamped_swiglu" else None}
        for name, shape in shapes.items():
            self.register_parameter(name, None if shape is None else nn.Parameter(torch.empty(shape, **kw)))
        self._grad_buffers = GradientBuffers()  # the weight gradients' storage, reused (see forward_rows)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised like an ``nn.Linear`` pair: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        if self.w1.is_meta:
            return
        with torch.no_grad():
            for w, fan_in in ((self.w1, self.dim), (self.w2, self.hidden_dim), (self.w3, self.dim),
                              (self.b1, self.dim), (self.b2, self.hidden_dim), (self.b3, self.dim)):
                if w is not None:
                    bound = 1.0 / math.sqrt(fan_in)
                    w.uniform_(-bound, bound)

    def hidden(self, h: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
        """The activation between the projections (``activate`` with this bank's settings)."""
        return activate(h, up, self.activation, self.settings)

    def _hidden_in_place(self, h: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
        """``hidden(h, up)``, overwriting ``h`` where the activation has an in-place form (the same
        kernels, so the same values); for a forward without autograd."""
        if self.activation == "swiglu":
            return swiglu_in_place(h, up)
        if self.activation == "silu":
            return F.silu(h, inplace=True)
        if self.activation == "relu":
            return h.relu_()
        return self.hidden(h, up)

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on [N, D] tokens (the readable definition)."""
        ws = self._weights(x_ND.dtype)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[e]

        up = None if ws.w3 is None else affine(x_ND, ws.w3[e], pick(ws.b3))
        return affine(self.hidden(affine(x_ND, ws.w1[e], pick(ws.b1)), up), ws.w2[e], pick(ws.b2))

    def forward(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Apply expert e to the e-th contiguous segment of ``x_ND`` (sizes ``counts``). Returns [N, D].

        What the all-to-all dispatcher calls: the rows arrive grouped by expert.
        """
        self._check_counts(counts)
        backend, plan = choose_compute(self.backend, x_ND, counts, self._needs_grad(x_ND), self.cpu_grouped(x_ND))
        if plan is not None:  # "bmm": padded groups of experts
            return self._forward_padded(x_ND, counts, plan)
        return self._compute(backend, x_ND, counts)

    def forward_tokens(self, x_TD: torch.Tensor, perm: Permutation, weights_TK: torch.Tensor) -> torch.Tensor:
        """``y[t] = sum_j weights[t, j] * expert_(t, j)(x[t])`` for the slots of ``perm`` (tokens of
        ``x_TD`` [T, D] grouped by expert, ``moekit.dispatch.sort_by_expert``). Returns [T, D].

        What the local dispatcher calls: the same computation as ``forward`` on the gathered rows,
        then the weighted scatter back, but on the padded layout the rows are gathered straight
        into the padded buffer and combined straight from it (no [N, D] copy either way).
        """
        self._check_counts(perm.counts)
        backend, plan = choose_compute(self.backend, x_TD, perm.counts, self._needs_grad(x_TD),
                                       self.cpu_grouped(x_TD))
        if plan is None:
            h_ND = self._compute(backend, x_TD.index_select(0, perm.token_ids_N), perm.counts)
            return combine(h_ND, perm, weights_TK, x_TD.shape[0])
        num_tokens, dim = x_TD.shape
        rows_N = plan.padded_rows(perm.counts_E.to(x_TD.device))
        # Padding rows read token 0 and are combined with weight 0: their contribution to the output
        # and to every gradient is exactly zero.
        src_R = torch.zeros(plan.rows, dtype=torch.long, device=x_TD.device).index_put_((rows_N,), perm.token_ids_N)
        w_R = x_TD.new_zeros(plan.rows).index_put((rows_N,), weights_TK.reshape(-1)[perm.slot_ids_N].to(x_TD.dtype))
        # index_select, not x_TD[src]: its backward is an index_add, much faster than index_put(accumulate).
        y_RD = self.forward_rows(x_TD.index_select(0, src_R), plan)
        weighted_RD = y_RD * w_R[:, None] if needs_graph(y_RD) else y_RD.mul_(w_R[:, None])
        return x_TD.new_zeros(num_tokens, dim).index_add(0, src_R, weighted_RD)

    def takes_few(self, x_TD: torch.Tensor, indices_TK: torch.Tensor) -> bool:
        """Whether ``forward_few`` computes these slots: no backward follows, at most ``FEW_TOKENS``
        tokens, and the backend would compute one expert at a time anyway (``choose_compute``)."""
        if indices_TK.shape[0] > FEW_TOKENS or self._needs_grad(x_TD) or self.backend not in ("auto", "loop"):
            return False
        return self.backend == "loop" or not grouped_mm_supported(x_TD)

    def forward_few(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """``forward_tokens`` for a few tokens without a backward (see ``takes_few``). Returns [T, D].

        The slots are grouped by expert in Python, and a token that is an expert's only row is
        read and written as a view of its row: no sort, gather or scatter. The values are those of
        ``forward_tokens`` bit for bit: every expert sees the same rows in the same order, and each
        token's outputs are added in expert order, as the sorted combine adds them.
        """
        num_tokens, k = indices_TK.shape
        slots: dict[int, list[int]] = {}
        for slot, e in enumerate(indices_TK.reshape(-1).tolist()):
            if e >= 0:
                slots.setdefault(e, []).append(slot)
        if any(e >= self.num_experts for e in slots):
            raise ValueError(f"expert index {max(slots)} is out of range for {self.num_experts} experts")
        ws = self._weights(x_TD.dtype)
        w_TK = weights_TK.to(x_TD.dtype)
        # index_add sums a reduced-precision row's contributions in float32 and rounds once: so does this.
        reduced = x_TD.dtype in (torch.bfloat16, torch.float16)
        y_TD = x_TD.new_zeros(x_TD.shape, dtype=torch.float32 if reduced else x_TD.dtype)
        for e in sorted(slots):
            rows = slots[e]
            if len(rows) == 1:
                t, j = divmod(rows[0], k)
                h = self._expert_rows(ws, e, x_TD[t:t + 1])
                y_TD[t:t + 1].add_(h * w_TK[t:t + 1, j:j + 1])
                continue
            slot_N = torch.tensor(rows, device=x_TD.device)
            token_N = slot_N // k
            h = self._expert_rows(ws, e, x_TD.index_select(0, token_N))
            y_TD.index_add_(0, token_N, (h * w_TK.reshape(-1)[slot_N, None]).to(y_TD.dtype))
        return y_TD.to(x_TD.dtype)

    def _expert_rows(self, ws: tuple[Any, ...], e: int, x_e: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its rows ``x_e``, from weights ``ws`` (stacked, or unbound per expert)."""
        w1, b1, w2, b2, w3, b3 = ws
        up = None if w3 is None else linear(x_e, w3[e], None if b3 is None else b3[e])
        h = self.hidden(linear(x_e, w1[e], None if b1 is None else b1[e]), up)
        return linear(h, w2[e], None if b2 is None else b2[e])

    def cpu_grouped(self, x: torch.Tensor) -> bool:
        """Whether torch's CPU grouped GEMM may compute this bank (``choose_compute``): no biases
        (it adds them after the product), and rows of D and F elements a multiple of 16 bytes."""
        size = x.element_size()
        return self.b1 is None and self.dim * size % 16 == 0 and self.hidden_dim * size % 16 == 0

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.w1.requires_grad)

    def _check_counts(self, counts: list[int]) -> None:
        if len(counts) != self.num_experts:
            raise ValueError(f"counts has {len(counts)} entries for {self.num_experts} experts")

    def _compute(self, backend: str, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return self._forward_grouped(x_ND, counts) if backend == "grouped_mm" else self._forward_loop(x_ND, counts)

    def _weights(self, dtype: torch.dtype) -> ExpertWeights:
        ws = (self.w1, self.b1, self.w2, self.b2, self.w3, self.b3)
        w1, b1, w2, b2, w3, b3 = (w if w is None or w.dtype == dtype else w.to(dtype) for w in ws)
        assert w1 is not None and w2 is not None  # every bank has both projections
        return ExpertWeights(w1, b1, w2, b2, w3, b3)

    def _forward_loop(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ws: tuple[Any, ...] = self._weights(x_ND.dtype)  # stacked [E, ...] tensors, or per-expert tuples
        if self._needs_grad(x_ND):
            # unbind, not w1[e]: indexing a stacked parameter inside autograd makes each expert's
            # backward allocate a full [E, D, F] gradient; unbind's backward stacks them once.
            # Without autograd w1[e] is a view of the touched expert alone, which costs nothing per
            # untouched expert (at one token and E = 64 the views were a fifth of the layer's time).
            ws = tuple(None if w is None else w.unbind(0) for w in ws)
        # With no rows at all, expert 0 still runs on the empty input: the [0, D] output then
        # belongs to the autograd graph of the input and the weights, as with rows. Under expert
        # parallelism a rank whose experts receive no token must still take part in the backward
        # all-to-alls, which run only for outputs in the graph.
        live = [e for e, n in enumerate(counts) if n > 0] or [0]
        starts = list(itertools.accumulate(counts, initial=0))
        outs = [self._expert_rows(ws, e, x_ND[starts[e]:starts[e + 1]]) for e in live]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def forward_rows(self, x_RD: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
        """All experts on the padded [R, D] row layout of ``plan`` (``moekit.experts.grouped``): one
        batched matmul per group of experts and weight. Returns [R, D]; padding rows hold
        ``act(b1) @ w2 + b2`` and are meant to be ignored."""
        w1, b1, w2, b2, w3, b3 = self._weights(x_RD.dtype)
        # On CPU the weight gradients reuse their storage from step to step (GradientBuffers); CUDA's
        # caching allocator already does.
        bank = self._grad_buffers if x_RD.device.type == "cpu" else None

        def buffers(prefix: str) -> tuple[GradientBuffers, str] | None:
            return None if bank is None else (bank, prefix)

        if self.activation == "relu" and b1 is not None and b2 is not None:  # the fused kernel takes both biases
            return grouped_relu_mlp(x_RD, w1, b1, w2, b2, plan, buffers(""))
        if plan.block_rows() >= FUSED_MIN_BLOCK_ROWS:  # a group's projections back to back, in cache
            if not needs_graph(x_RD, w1, b1, w2, b2, w3, b3):
                return mlp_groups(x_RD, w1, b1, w3, b3, w2, b2, plan, self._hidden_in_place)
            if self.activation == "swiglu" and w3 is not None and b3 is None:
                return grouped_swiglu_mlp(x_RD, w1, b1, w3, w2, b2, plan, buffers(""))
        up = None if w3 is None else grouped_linear(x_RD, w3, b3, plan, buffers("w3"))
        return grouped_linear(self.hidden(grouped_linear(x_RD, w1, b1, plan, buffers("w1")), up), w2, b2, plan,
                              buffers("w2"))

    def _forward_padded(self, x_ND: torch.Tensor, counts: list[int], plan: GroupPlan) -> torch.Tensor:
        # On CPU a batched matmul over a few experts' [C, D] blocks runs at the speed of one big
        # matmul, while one small matmul per expert loses ~1.4x to threading overhead. Padding
        # rows are zero and never read back, so they get no gradient.
        rows_N = plan.padded_rows(torch.tensor(counts, device=x_ND.device))
        x_RD = x_ND.new_zeros(plan.rows, self.dim).index_put((rows_N,), x_ND)
        return self.forward_rows(x_RD, plan).index_select(0, rows_N)

    def _forward_grouped(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # torch's grouped GEMM takes the segments as offsets: no padding, one kernel per matmul.
        w1, b1, w2, b2, w3, b3 = self._weights(x_ND.dtype)
        project: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, str], torch.Tensor]
        if x_ND.device.type == "cpu" and not self.bias:
            # The weight gradients in reused storage, as the padded kernels' (see forward_rows).
            def project(x, w, b, name):
                return grouped_mm_linear(x, w, counts, (self._grad_buffers, name))
        else:
            counts_E = torch.tensor(counts, device=x_ND.device)
            offs = counts_E.cumsum(0).to(torch.int32)
            expert_N = None if b1 is None else torch.repeat_interleave(
                torch.arange(self.num_experts, device=x_ND.device), counts_E)

            def project(x, w, b, name):
                y = F.grouped_mm(x, w, offs=offs)
                return y if b is None or expert_N is None else y + b[expert_N]

        up = None if w3 is None else project(x_ND, w3, b3, "w3")
        return project(self.hidden(project(x_ND, w1, b1, "w1"), up), w2, b2, "w2")

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v:g}" for k, v in self.settings.items())
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"activation={self.activation}{extra}" + ("" if self.bias else ", bias=False"))
