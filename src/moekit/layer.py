"""The sparsely-gated MoE layer: router -> dispatcher -> experts -> combine.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K slots per token.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.dispatch import Dispatcher, LocalDispatcher, capacity_keep, expert_capacity
from moekit.experts import Experts, SharedExperts
from moekit.routing import build_router
from moekit.routing.hierarchical import HierarchicalRouter
from moekit.routing.losses import hard_counts
from moekit.shards import LOCAL_SHARDS, BatchShards
from moekit.types import MoEOutput, Routing, RoutingStats


def check_layer_input(x: torch.Tensor, mask: torch.Tensor | None, dim: int) -> None:
    """Raise ``TypeError``/``ValueError`` naming what is wrong with an MoE input."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"MoE input must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type == "meta":
        raise ValueError("MoE input is on the meta device, which holds shapes but no values: a layer built there "
                         "(device='meta') must be materialised (to_empty, then initialised) and given real input")
    if not x.is_floating_point():
        raise TypeError(f"MoE input must be floating point, got dtype={x.dtype}")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"MoE input last dimension must be dim={dim}, got shape {tuple(x.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != x.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal input shape without its last "
                             f"dimension {tuple(x.shape[:-1])}")


def dispatch(layer: MoE, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """The routed output [T, D]: ``sum_j w_j E_j(x)``, or with ``gate_input`` ``sum_j E_j(w_j x)``.

    Gating the input (Llama 4) gives every slot of a token its own input row; those rows are sent
    as tokens of one slot each with weight 1, so any dispatcher (local or all-to-all) serves both.
    """
    if not layer.gate_input:
        return layer.dispatcher(x_TD, indices_TK, weights_TK, layer.experts)
    num_tokens, k = indices_TK.shape
    x_SD = (x_TD[:, None, :] * weights_TK[..., None].to(x_TD.dtype)).reshape(num_tokens * k, -1)
    y_SD = layer.dispatcher(x_SD, indices_TK.reshape(-1, 1), weights_TK.new_ones(num_tokens * k, 1), layer.experts)
    return y_SD.view(num_tokens, k, -1).sum(1)


@torch.compiler.disable
def _dispatch_and_count(layer: MoE, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                        counts_E: torch.Tensor | None, mask_T: torch.Tensor | None,
                        seq_len: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Capacity, dispatch and counts: (y [T, D], counts [E] and dropped slots over the whole batch).

    ``counts_E`` are the router's counts (already over the whole batch), or None when no statistics
    are kept: then no counts are made (None, 0). Without a capacity every routed slot is computed:
    the router's counts are the experts' counts, and no collective is needed for them.

    Left to eager under torch.compile: capacities, segment sizes and the dropped count are data (a
    trace per batch otherwise), and the dispatch is a few large matmuls and gathers that compiling
    cannot speed up; the router before it compiles.
    """
    if layer.capacity_factor is None and layer.sequence_capacity is None:
        return dispatch(layer, x_TD, indices_TK, weights_TK), counts_E, 0
    if layer.sequence_capacity is not None:
        keep_TK = layer.keep_within_sequence_capacity(indices_TK, weights_TK, seq_len)
    else:
        keep_TK = layer.keep_within_capacity(indices_TK, weights_TK, mask_T)
    dropped = ((indices_TK >= 0) & ~keep_TK).sum()
    indices_TK = torch.where(keep_TK, indices_TK, -1)
    weights_TK = weights_TK * keep_TK
    y_TD = dispatch(layer, x_TD, indices_TK, weights_TK)
    if counts_E is None:
        return y_TD, None, 0
    # Counts and dropped in one tensor: a single reduction when the batch is sharded.
    totals = layer.shards.sum(torch.cat([hard_counts(indices_TK, layer.num_experts), dropped.reshape(1)]))
    return y_TD, totals[:-1], int(totals[-1])


def _check_options(capacity_factor, capacity_multiple, shared_experts, shared_hidden_dim, shared_gate,
                   sequence_capacity, gate_input, batch_prioritized=False, activation_kwargs=None) -> None:
    """``ValueError``/``TypeError`` naming the first bad layer option."""
    if capacity_factor is not None:
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, int | float):
            raise TypeError(f"capacity_factor must be a number (or None for dropless), got {capacity_factor!r}")
        # NaN passes "<= 0" and inf would make every expert's buffer infinite: both are refused here.
        if not math.isfinite(capacity_factor) or capacity_factor <= 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be a finite number > 0 (or None for dropless)")
    if activation_kwargs is not None and not isinstance(activation_kwargs, dict):
        raise TypeError(f"activation_kwargs must be a dict (or None), got {activation_kwargs!r}")
    if isinstance(capacity_multiple, bool) or not isinstance(capacity_multiple, int) or capacity_multiple < 1:
        raise ValueError(f"capacity_multiple={capacity_multiple!r} must be an int >= 1")
    if isinstance(shared_experts, bool) or not isinstance(shared_experts, int) or shared_experts < 0:
        raise ValueError(f"shared_experts={shared_experts!r} must be an int >= 0")
    if shared_hidden_dim is not None and (isinstance(shared_hidden_dim, bool) or not isinstance(shared_hidden_dim, int)
                                          or shared_hidden_dim < 1):
        raise ValueError(f"shared_hidden_dim={shared_hidden_dim!r} must be a positive int (or None)")
    if not shared_experts and (shared_gate or shared_hidden_dim is not None):
        raise ValueError(f"shared_gate={shared_gate!r} and shared_hidden_dim={shared_hidden_dim!r} need "
                         "shared_experts >= 1")
    if sequence_capacity is not None:
        if isinstance(sequence_capacity, bool) or not isinstance(sequence_capacity, int) or sequence_capacity < 1:
            raise ValueError(f"sequence_capacity={sequence_capacity!r} must be an int >= 1 (or None)")
        if capacity_factor is not None:
            raise ValueError(f"sequence_capacity={sequence_capacity} and capacity_factor={capacity_factor} "
                             "cannot both be set: choose one capacity")
    for name, value in (("shared_gate", shared_gate), ("gate_input", gate_input),
                        ("batch_prioritized", batch_prioritized)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")


class MoE(nn.Module):
    """A sparsely-gated mixture of E FFN experts, each token computed by its k routed experts.

    ``y = sum_i G(x)_i E_i(x)`` (Shazeer et al. 2017 eq. 1); experts with gate 0 are not computed.

    Args:
        dim: D, input and output width.
        num_experts: E.
        k: experts per token.
        hidden_dim: F, the hidden width of each expert (default 4*dim).
        router: a registered router name (see ``moekit.routers()``) or a router module, called as
            ``router(x_TD, mask_T) -> Routing``; its ``stats.counts`` (the hard count of its routed
            slots, as ``moekit.routing.base.finish_routing`` computes them) are the layer's counts
            when there is no capacity.
        capacity_factor: None for dropless dispatch; otherwise each expert computes at most
            ``ceil(T*k*capacity_factor/E)`` slots and drops the rest (their output is 0).
        batch_prioritized: with a capacity, let the tokens with the highest gate claim places first.
        capacity_multiple: round the capacity up to a multiple of this (V-MoE uses 4, which keeps
            expert buffers aligned; 1 leaves the capacity as computed).
        w_importance, w_load: balancing-loss coefficients, passed to a router built by name.
        activation: "relu", "gelu", "silu", "swiglu" or "clamped_swiglu" (see ``moekit.experts.Experts``).
        router_kwargs: extra arguments for a router built by name (e.g. ``noise_epsilon``; the
            variants of "topk": ``score``, ``normalize``, ``scale``, ``num_groups``, ``topk_groups``,
            ``expert_bias``, ``logit_bias``).
        expert_backend: "auto", "loop", "bmm" or "grouped_mm" (see ``moekit.experts.Experts``).
        shared_experts: n always-on experts whose output is added to the routed one (DeepSeek-V3,
            Qwen2-MoE, Llama 4), one dense FFN of width ``n*shared_hidden_dim`` (``self.shared``, a
            ``moekit.experts.SharedExperts``) with the experts' activation and biases.
        shared_hidden_dim: the width of one shared expert (default ``hidden_dim``).
        shared_gate: scale the shared output by ``sigmoid(x . w)`` per token (Qwen2-MoE).
        bias: False builds experts without any bias (``b1``/``b2`` are None); True keeps them.
        gate_input: multiply each expert's *input* by the combine weight instead of its output,
            ``y = sum_j E_j(w_j x)`` (Llama 4). It equals output gating only for experts that are
            positively homogeneous (a ReLU without biases), not in general.
        sequence_capacity: C, an absolute capacity per sequence (HF SwitchTransformers'
            ``expert_capacity``): within each sequence of an input [..., S, D], each expert computes
            at most C slots, claimed first come first served: all first choices of the sequence in
            token order, then all second choices... (with ``batch_prioritized``: by top gate). The
            rest are dropped. Needs an input of at least 3 dimensions; excludes ``capacity_factor``.
            Padding tokens claim no place (HF's block has no mask and counts every position).
        activation_kwargs: the activation's settings ("clamped_swiglu": ``alpha``, ``limit``).
        routing_stats: False makes an eval-mode forward skip the routing statistics and the
            balancing losses, as serving wants: ``stats`` is then None and ``aux_loss`` 0, and the
            output is unchanged. Training mode always keeps them. Settable after construction.

    Shapes: ``x`` [..., D], ``mask`` [...] bool (True = real token) -> ``MoEOutput(y [..., D], aux_loss [],
    stats)``. Padding tokens are ignored by routing, losses and stats, and their output is 0 (the
    shared experts' too).
    """

    def __init__(self, dim: int, num_experts: int, k: int = 2, hidden_dim: int | None = None,
                 router: str | nn.Module = "noisy_topk", capacity_factor: float | None = None,
                 w_importance: float = 0.1, w_load: float = 0.1, activation: str = "relu",
                 batch_prioritized: bool = False, router_kwargs: dict | None = None,
                 expert_backend: str = "auto", capacity_multiple: int = 1, shared_experts: int = 0,
                 shared_hidden_dim: int | None = None, shared_gate: bool = False, bias: bool = True,
                 gate_input: bool = False, sequence_capacity: int | None = None,
                 activation_kwargs: dict | None = None, routing_stats: bool = True, device=None, dtype=None):
        super().__init__()
        hidden_dim = 4 * dim if hidden_dim is None else hidden_dim
        if not isinstance(routing_stats, bool):
            raise TypeError(f"routing_stats must be a bool, got {routing_stats!r}")
        _check_options(capacity_factor, capacity_multiple, shared_experts, shared_hidden_dim, shared_gate,
                       sequence_capacity, gate_input, batch_prioritized, activation_kwargs)
        if isinstance(router, str):
            router = build_router(router, dim, num_experts, k, w_importance=w_importance, w_load=w_load,
                                  device=device, dtype=dtype, **(router_kwargs or {}))
        elif not isinstance(router, nn.Module):
            raise TypeError(f"router must be a registered name or an nn.Module, got {type(router).__name__}")
        elif getattr(router, "num_experts", num_experts) != num_experts:
            raise ValueError(f"router has num_experts={router.num_experts}, layer has {num_experts}")
        self.dim, self.num_experts, self.k = dim, num_experts, k
        self.capacity_factor, self.batch_prioritized = capacity_factor, batch_prioritized
        self.capacity_multiple, self.sequence_capacity = capacity_multiple, sequence_capacity
        self.gate_input, self.routing_stats = gate_input, routing_stats
        self.router = router
        expert_kw = {"bias": bias, "activation_kwargs": activation_kwargs, "device": device, "dtype": dtype}
        self.experts = Experts(num_experts, dim, hidden_dim, activation, expert_backend, **expert_kw)
        self.shared: SharedExperts | None = None
        if shared_experts:
            width = shared_experts * (hidden_dim if shared_hidden_dim is None else shared_hidden_dim)
            self.shared = SharedExperts(dim, width, activation, gate=shared_gate, **expert_kw)
        # Swapped for an all-to-all dispatcher by moekit.parallel; the layer itself stays single-device.
        self.dispatcher: Dispatcher = LocalDispatcher()
        # The whole batch that capacity and stats cover (the router holds the same); see moekit.shards.
        self.shards: BatchShards = LOCAL_SHARDS

    def route(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None) -> Routing:
        """Run the router in float32 (outside autocast: top-k and CV^2 are precision-sensitive)."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return self.router(x_TD, mask_T)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MoEOutput:
        check_layer_input(x, mask, self.dim)
        if self.experts.w1.device.type == "meta":
            raise ValueError(f"this MoE's weights are on the meta device (built with device='meta'): materialise "
                             f"them first (to_empty(device=...), then initialise) to run it on {x.device}")
        if self.sequence_capacity is not None and x.dim() < 3:
            raise ValueError(f"sequence_capacity={self.sequence_capacity} needs an input [..., S, D] of at least "
                             f"3 dimensions, got shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, self.dim)
        mask_T = None if mask is None else mask.reshape(-1)
        seq_len = x.shape[-2] if x.dim() >= 3 else x_TD.shape[0]
        stats: RoutingStats | None = None
        if self.training or self.routing_stats:
            routing = self.route(x_TD, mask_T)
            y_TD, counts_E, num_dropped = _dispatch_and_count(self, x_TD, routing.indices, routing.weights,
                                                              routing.stats.counts, mask_T, seq_len)
            stats, aux_loss = routing.stats._replace(counts=counts_E, dropped=num_dropped), routing.aux_loss
        else:
            indices_TK, weights_TK = self.decide(x_TD, mask_T)
            y_TD = _dispatch_and_count(self, x_TD, indices_TK, weights_TK, None, mask_T, seq_len)[0]
            aux_loss = torch.zeros((), device=x.device)
        if self.shared is not None:
            y_TD = y_TD + self.shared_output(x_TD, mask_T)
        return MoEOutput(y_TD.reshape(x.shape).to(x.dtype), aux_loss, stats)

    def decide(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's decision without statistics (``Router.decide``), in float32 like ``route``;
        a router module of the caller's own without ``decide`` routes in full."""
        decide = getattr(self.router, "decide", None)
        if decide is None:
            routing = self.route(x_TD, mask_T)
            return routing.indices, routing.weights
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return decide(x_TD, mask_T)

    def shared_output(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None) -> torch.Tensor:
        """[T, D] the shared experts on the real tokens, 0 on padding (computed on real rows only)."""
        if self.shared is None:
            raise RuntimeError("this layer has no shared experts")
        if mask_T is None:
            return self.shared(x_TD)
        rows = mask_T.nonzero().squeeze(1)
        return x_TD.new_zeros(x_TD.shape).index_copy(0, rows, self.shared(x_TD.index_select(0, rows)).to(x_TD.dtype))

    def keep_within_sequence_capacity(self, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                                      seq_len: int) -> torch.Tensor:
        """[T, K] bool: the routed slots within ``sequence_capacity`` of their (sequence, expert).

        Each (sequence, expert) pair is a buffer of its own; the batch-wide claim order (choice rank
        by choice rank, tokens in order or by top gate) then runs once over all of them. Sequences
        never straddle processes, so this needs no collective.
        """
        num_tokens = indices_TK.shape[0]
        seq_len = max(seq_len, 1)
        seq_T1 = torch.arange(num_tokens, device=indices_TK.device)[:, None] // seq_len
        pair_TK = torch.where(indices_TK >= 0, seq_T1 * self.num_experts + indices_TK, -1)
        num_pairs = max(1, -(-num_tokens // seq_len)) * self.num_experts
        if self.sequence_capacity is None:
            raise RuntimeError("this layer has no sequence_capacity")
        return capacity_keep(pair_TK, weights_TK, num_pairs, self.sequence_capacity, self.batch_prioritized)

    def keep_within_capacity(self, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                             mask_T: torch.Tensor | None) -> torch.Tensor:
        """[T, K] bool: the routed slots that fit in their expert's buffer.

        Capacity and claim order are those of the whole batch: when it is sharded over processes
        (``self.shards``), shard r's tokens come after those of shards 0..r-1.
        """
        # Only batch-prioritised routing reads the gates (it orders tokens by their top gate); it
        # gathers them with the indices, in one collective (float64 holds every index exactly).
        if self.batch_prioritized and self.shards.count > 1:
            both_T2K, start = self.shards.gather(torch.cat([indices_TK.double(), weights_TK.detach().double()], 1))
            all_indices_TK, all_weights_TK = both_T2K.split(indices_TK.shape[1], dim=1)
            all_indices_TK, all_weights_TK = all_indices_TK.long(), all_weights_TK.to(weights_TK.dtype)
        else:
            all_indices_TK, start = self.shards.gather(indices_TK)
            all_weights_TK = (weights_TK.detach() if self.batch_prioritized
                              else weights_TK.new_zeros(all_indices_TK.shape))
        if mask_T is None:  # the gathered rows are the whole batch's tokens
            num_real = all_indices_TK.shape[0]
        else:
            num_real = int(self.shards.sum(mask_T.sum()))
        if self.capacity_factor is None:
            raise RuntimeError("this layer is dropless: it has no capacity_factor")
        cap = expert_capacity(num_real, indices_TK.shape[1], self.capacity_factor, self.num_experts,
                              self.capacity_multiple)
        keep_TK = capacity_keep(all_indices_TK, all_weights_TK, self.num_experts, cap, self.batch_prioritized)
        return keep_TK[start : start + indices_TK.shape[0]]

    def extra_repr(self) -> str:
        extra = "".join(f", {name}={getattr(self, name)}" for name in ("sequence_capacity", "gate_input")
                        if getattr(self, name) not in (None, False))
        return (f"dim={self.dim}, num_experts={self.num_experts}, k={self.k}, "
                f"capacity_factor={self.capacity_factor}{extra}")


class HierarchicalMoE(MoE):
    """Hierarchical MoE (appendix B): G groups of B experts, k_primary groups x k_secondary experts.

    The output, aux loss and stats are those of one layer over all ``G*B`` experts, expert (i, j)
    at flat index ``i*B + j``. The router is a ``HierarchicalRouter`` (``self.router``).
    """

    def __init__(self, dim: int, num_groups: int, experts_per_group: int, k_primary: int = 2,
                 k_secondary: int = 2, hidden_dim: int | None = None, capacity_factor: float | None = None,
                 w_importance: float = 0.1, w_load: float = 0.1, noise_epsilon: float = 1e-2,
                 activation: str = "relu", batch_prioritized: bool = False, expert_backend: str = "auto",
                 device=None, dtype=None):
        router = HierarchicalRouter(dim, num_groups, experts_per_group, k_primary, k_secondary,
                                    noise_epsilon, w_importance, w_load, device=device, dtype=dtype)
        super().__init__(dim, num_groups * experts_per_group, k_primary * k_secondary, hidden_dim,
                         router=router, capacity_factor=capacity_factor, activation=activation,
                         batch_prioritized=batch_prioritized, expert_backend=expert_backend,
                         device=device, dtype=dtype)
        self.num_groups, self.experts_per_group = num_groups, experts_per_group
