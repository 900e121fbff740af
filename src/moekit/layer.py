"""The sparsely-gated MoE layer: router -> dispatcher -> experts -> combine.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K slots per token.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.dispatch import LocalDispatcher, capacity_keep, expert_capacity
from moekit.experts import Experts
from moekit.routing import build_router
from moekit.routing.hierarchical import HierarchicalRouter
from moekit.routing.losses import hard_counts
from moekit.shards import LOCAL_SHARDS
from moekit.types import MoEOutput, Routing


def check_layer_input(x: torch.Tensor, mask: torch.Tensor | None, dim: int) -> None:
    """Raise ``TypeError``/``ValueError`` naming what is wrong with an MoE input."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"MoE input must be a torch.Tensor, got {type(x).__name__}")
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


@torch.compiler.disable
def _dispatch_and_count(layer: MoE, x_TD: torch.Tensor, routing: Routing,
                        mask_T: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Capacity, dispatch and counts: (y [T, D], counts [E] and dropped slots over the whole batch).

    Without a capacity every routed slot is computed: the router's counts (already over the whole
    batch) are the experts' counts, and no collective is needed for them.

    Left to eager under torch.compile: capacities, segment sizes and the dropped count are data (a
    trace per batch otherwise), and the dispatch is a few large matmuls and gathers that compiling
    cannot speed up; the router before it compiles.
    """
    indices_TK, weights_TK = routing.indices, routing.weights
    if layer.capacity_factor is None:
        return layer.dispatcher(x_TD, indices_TK, weights_TK, layer.experts), routing.stats.counts, 0
    keep_TK = layer.keep_within_capacity(indices_TK, weights_TK, mask_T)
    dropped = ((indices_TK >= 0) & ~keep_TK).sum()
    indices_TK = torch.where(keep_TK, indices_TK, -1)
    weights_TK = weights_TK * keep_TK
    y_TD = layer.dispatcher(x_TD, indices_TK, weights_TK, layer.experts)
    # Counts and dropped in one tensor: a single reduction when the batch is sharded.
    totals = layer.shards.sum(torch.cat([hard_counts(indices_TK, layer.num_experts), dropped.reshape(1)]))
    return y_TD, totals[:-1], int(totals[-1])


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
        activation: "relu", "gelu", "silu" or "swiglu".
        router_kwargs: extra arguments for a router built by name (e.g. ``noise_epsilon``).
        expert_backend: "auto", "loop", "bmm" or "grouped_mm" (see ``moekit.experts.Experts``).

    Shapes: ``x`` [..., D], ``mask`` [...] bool (True = real token) -> ``MoEOutput(y [..., D], aux_loss [],
    stats)``. Padding tokens are ignored by routing, losses and stats, and their output is 0.
    """

    def __init__(self, dim: int, num_experts: int, k: int = 2, hidden_dim: int | None = None,
                 router: str | nn.Module = "noisy_topk", capacity_factor: float | None = None,
                 w_importance: float = 0.1, w_load: float = 0.1, activation: str = "relu",
                 batch_prioritized: bool = False, router_kwargs: dict | None = None,
                 expert_backend: str = "auto", capacity_multiple: int = 1, device=None, dtype=None):
        super().__init__()
        hidden_dim = 4 * dim if hidden_dim is None else hidden_dim
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be > 0 (or None for dropless)")
        if isinstance(capacity_multiple, bool) or not isinstance(capacity_multiple, int) or capacity_multiple < 1:
            raise ValueError(f"capacity_multiple={capacity_multiple!r} must be an int >= 1")
        if isinstance(router, str):
            router = build_router(router, dim, num_experts, k, w_importance=w_importance, w_load=w_load,
                                  device=device, dtype=dtype, **(router_kwargs or {}))
        elif not isinstance(router, nn.Module):
            raise TypeError(f"router must be a registered name or an nn.Module, got {type(router).__name__}")
        elif getattr(router, "num_experts", num_experts) != num_experts:
            raise ValueError(f"router has num_experts={router.num_experts}, layer has {num_experts}")
        self.dim, self.num_experts, self.k = dim, num_experts, k
        self.capacity_factor, self.batch_prioritized = capacity_factor, batch_prioritized
        self.capacity_multiple = capacity_multiple
        self.router = router
        self.experts = Experts(num_experts, dim, hidden_dim, activation, expert_backend, device=device, dtype=dtype)
        # Swapped for an all-to-all dispatcher by moekit.parallel; the layer itself stays single-device.
        self.dispatcher = LocalDispatcher()
        # The whole batch that capacity and stats cover (the router holds the same); see moekit.shards.
        self.shards = LOCAL_SHARDS

    def route(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None) -> Routing:
        """Run the router in float32 (outside autocast: top-k and CV^2 are precision-sensitive)."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return self.router(x_TD, mask_T)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MoEOutput:
        check_layer_input(x, mask, self.dim)
        x_TD = x.reshape(-1, self.dim)
        mask_T = None if mask is None else mask.reshape(-1)
        routing = self.route(x_TD, mask_T)
        y_TD, counts_E, num_dropped = _dispatch_and_count(self, x_TD, routing, mask_T)
        stats = routing.stats._replace(counts=counts_E, dropped=num_dropped)
        return MoEOutput(y_TD.reshape(x.shape).to(x.dtype), routing.aux_loss, stats)

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
        cap = expert_capacity(num_real, indices_TK.shape[1], self.capacity_factor, self.num_experts,
                              self.capacity_multiple)
        keep_TK = capacity_keep(all_indices_TK, all_weights_TK, self.num_experts, cap, self.batch_prioritized)
        return keep_TK[start : start + indices_TK.shape[0]]

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, k={self.k}, "
                f"capacity_factor={self.capacity_factor}")


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
