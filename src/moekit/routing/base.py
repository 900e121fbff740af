"""What every router shares: the ``Router`` base, argument checks, the registry and the gating core.

Legend: T tokens, D model dim, E experts, K slots per token (top-k).

A router's statistics and losses are defined on the whole batch, which may be sharded over
processes (``moekit.shards``). Every router therefore works in two halves:

1. ``local_routing(x_TD, mask_T)``: the decision for this shard's tokens, and this shard's
   per-expert sums (counts, importance, and whatever else its losses need), by name;
2. ``finish(local, sums)``: the ``Routing`` from the same sums taken over the whole batch.

``Router.forward`` joins them with one ``shards.sum_many`` (one collective when sharded, the
identity on one process), so a router never mentions process groups and costs one all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from moekit.routing.losses import cv_squared, hard_counts, prob_in_top_k, scatter_to_experts
from moekit.shards import LOCAL_SHARDS, BatchShards, randn_rows
from moekit.types import Routing, RoutingStats

_REGISTRY: dict[str, type[nn.Module]] = {}


def register_router(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a router constructible by name in ``moekit.MoE(router=name)``."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"router name {name!r} is already registered to {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        return cls

    return deco


def routers() -> list[str]:
    """Names of the registered routers."""
    return sorted(_REGISTRY)


def build_router(name: str, dim: int, num_experts: int, k: int, **kwargs) -> nn.Module:
    """Construct a registered router by name."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown router {name!r}; known routers: {routers()}")
    return _REGISTRY[name](dim, num_experts, k, **kwargs)


def check_router_args(dim: int, num_experts: int, k: int) -> None:
    """Validate the sizes every router shares; raise ``ValueError`` naming the bad value."""
    for name, value in (("dim", dim), ("num_experts", num_experts), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if k > num_experts:
        raise ValueError(f"k={k} exceeds num_experts={num_experts}")


def check_coefficient(name: str, value: float) -> float:
    """A loss coefficient or noise level: a finite number >= 0; ``ValueError`` naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    return value


def check_router_input(x_TD: torch.Tensor, mask_T: torch.Tensor | None, dim: int) -> None:
    """Validate a router's input; raise ``TypeError``/``ValueError`` naming the bad value."""
    if not isinstance(x_TD, torch.Tensor):
        raise TypeError(f"router input must be a torch.Tensor, got {type(x_TD).__name__}")
    if not x_TD.is_floating_point():
        raise TypeError(f"router input must be floating point, got dtype={x_TD.dtype}")
    if x_TD.dim() != 2 or x_TD.shape[-1] != dim:
        raise ValueError(f"router input must have shape [T, {dim}], got {tuple(x_TD.shape)}")
    if mask_T is not None:
        if not isinstance(mask_T, torch.Tensor) or mask_T.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask_T, 'dtype', type(mask_T))}")
        if mask_T.shape != x_TD.shape[:1]:
            raise ValueError(f"mask shape {tuple(mask_T.shape)} does not match tokens {tuple(x_TD.shape[:1])}")


def check_input_values(x_TD: torch.Tensor) -> None:
    """``ValueError`` naming the first NaN or Inf of a router's input.

    A NaN logit makes top-k order undefined and silently poisons every expert's gradient: the
    router fails loudly instead (``check_routing_values`` runs this only when its one sum is not
    finite).
    """
    if not bool(torch.isfinite(x_TD).all()):
        bad = (~torch.isfinite(x_TD)).nonzero()[0].tolist()
        raise ValueError(f"router input holds NaN or Inf (first at index {bad}, value {x_TD[tuple(bad)].item()})")


def check_routing_finite(router: nn.Module, routing: Routing, x_TD: torch.Tensor) -> None:
    """``ValueError`` when finite input gave a non-finite balancing loss or gate.

    Input large enough for the gate logits to overflow (e.g. 1e38 in float32) turns softmaxes and
    the z-loss into Inf/NaN, which would train silently on a broken loss.
    """
    total = routing.aux_loss.detach().float() + routing.stats.importance.detach().float().sum()
    if bool(torch.isfinite(total)):
        return
    largest = x_TD.detach().abs().max().item() if x_TD.numel() else 0.0
    raise ValueError(f"{type(router).__name__}: finite input (largest |x| = {largest:.3g}) gave a non-finite "
                     f"routing (aux_loss={routing.aux_loss.item()}): its gate logits overflow "
                     f"{routing.weights.dtype}; scale the router input down (e.g. normalise it)")


def check_routing_values(router: nn.Module, routing: Routing, x_TD: torch.Tensor) -> None:
    """``check_input_values``, then ``check_routing_finite``, for the price of one sum and one sync.

    A NaN or Inf in the input, the balancing loss or the importance makes one float32 sum of the
    three non-finite (float32: a sum in a narrower type can overflow by itself), so a finite sum
    clears the usual case; only a non-finite one runs the two checks, which name the culprit (a
    finite input whose sum alone overflows passes both).
    """
    total = (x_TD.detach().sum(dtype=torch.float32) + routing.aux_loss.detach().float()
             + routing.stats.importance.detach().float().sum())
    if bool(torch.isfinite(total)):
        return
    check_input_values(x_TD)
    check_routing_finite(router, routing, x_TD)


def check_decision_values(router: nn.Module, weights_TK: torch.Tensor, x_TD: torch.Tensor) -> None:
    """``check_routing_values`` for a decision without statistics: the input and the combine weights."""
    total = x_TD.detach().sum(dtype=torch.float32) + weights_TK.detach().float().sum()
    if bool(torch.isfinite(total)):
        return
    check_input_values(x_TD)
    if not bool(torch.isfinite(weights_TK.detach().float().sum())):
        largest = x_TD.detach().abs().max().item() if x_TD.numel() else 0.0
        raise ValueError(f"{type(router).__name__}: finite input (largest |x| = {largest:.3g}) gave non-finite "
                         f"combine weights: its gate logits overflow {weights_TK.dtype}; scale the router "
                         "input down (e.g. normalise it)")


def token_weights(mask_T: torch.Tensor | None) -> torch.Tensor | None:
    """[T] float32 0/1 weights from a bool mask (None when every token is real)."""
    return None if mask_T is None else mask_T.to(torch.float32)


def masked_sum(v_T: torch.Tensor, weight_T: torch.Tensor | None) -> torch.Tensor:
    """``v`` summed over the real tokens (dimension 0), padding weighted 0."""
    if weight_T is None:
        return v_T.sum(0)
    return (v_T * weight_T.reshape(-1, *([1] * (v_T.dim() - 1)))).sum(0)


class LocalRouting(NamedTuple):
    """A router's decision for this shard's tokens, and the sums still to be taken over the whole batch."""

    indices: torch.Tensor  # [T, K], empty slots -1
    weights: torch.Tensor  # [T, K], empty slots 0
    sums: dict[str, torch.Tensor]  # this shard's sums by name: "counts" [E], "importance" [E], ...


class Router(nn.Module):
    """The base of every router: its sizes, its loss coefficients and the batch its statistics cover.

    Subclasses implement ``local_routing`` (and override ``finish`` when they have losses beyond
    CV^2 of importance and load). ``loss_weights`` maps a loss name to its coefficient in
    ``aux_loss``; a loss without a coefficient is reported in ``stats.losses`` only, and a
    coefficient whose loss is absent (a training-only loss in eval) adds nothing.

    Attributes:
        dim, num_experts, k: D, E and the slots per token.
        shards: the whole batch the statistics cover (``moekit.shards``); ``moekit.parallel``
            swaps it when the batch is sharded over processes.
    """

    def __init__(self, dim: int, num_experts: int, k: int, loss_weights: dict[str, float]):
        super().__init__()
        check_router_args(dim, num_experts, k)
        self.dim, self.num_experts, self.k = dim, num_experts, k
        self.loss_weights = {name: check_coefficient(f"w_{name}", w) for name, w in loss_weights.items()}
        self.shards: BatchShards = LOCAL_SHARDS

    @property
    def w_importance(self) -> float:
        return self.loss_weights.get("importance", 0.0)

    @property
    def w_load(self) -> float:
        return self.loss_weights.get("load", 0.0)

    def forward(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None = None) -> Routing:
        """Route [T, D] tokens (``mask_T`` [T] bool, True = real token). Returns ``Routing``."""
        check_router_input(x_TD, mask_T, self.dim)
        local = self.local_routing(x_TD, mask_T)
        summed = self.shards.sum_many(*local.sums.values())
        routing = self.finish(local, dict(zip(local.sums, summed, strict=True)))
        # The values are checked once the routing is made: the input and the routing for one sum
        # and one sync. Skipped while tracing for torch.compile (data-dependent branch).
        if not torch.compiler.is_compiling():
            check_routing_values(self, routing, x_TD)
        return routing

    def decide(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing decision alone, (indices [T, K], weights [T, K]), as ``forward`` makes it in eval
        mode but without the statistics and balancing losses (and their collective): what serving needs."""
        check_router_input(x_TD, mask_T, self.dim)
        indices_TK, weights_TK = self.local_decision(x_TD, mask_T)
        if not torch.compiler.is_compiling():
            check_decision_values(self, weights_TK, x_TD)
        return indices_TK, weights_TK

    def local_decision(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, weights) of ``local_routing``, padding slots masked; routers override it to skip the sums."""
        local = self.local_routing(x_TD, mask_T)
        return local.indices, local.weights

    def local_routing(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None,
                      rows: tuple[int, int] | None = None) -> LocalRouting:
        """The routing of this shard's tokens and its sums.

        ``rows``: ``self.shards.rows(T, device)`` when the caller knows it already (a noisy router
        draws its noise for the whole batch and keeps its own rows; see ``moekit.shards.randn_rows``).
        """
        raise NotImplementedError

    def finish(self, local: LocalRouting, sums: dict[str, torch.Tensor]) -> Routing:
        """The ``Routing`` of ``local`` from its sums over the whole batch.

        This default reads "counts", "importance" and, if present, the smooth "load".
        """
        return routing_from_sums(local.indices, local.weights, sums["counts"], sums["importance"], sums.get("load"),
                                 {}, self.loss_weights)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, k={self.k}"


class TopK(NamedTuple):
    indices: torch.Tensor  # [..., K] long
    gates: torch.Tensor  # [..., K] combine weights (softmax over the K kept logits)
    load_prob: torch.Tensor | None  # [..., E] P(x, i) when noise was drawn and K < E, else None


def noisy_top_k(clean: torch.Tensor, noise_std: torch.Tensor | None, k: int,
                shards: BatchShards = LOCAL_SHARDS, rows: tuple[int, int] | None = None) -> TopK:
    """Shazeer eq. 3-5 on the last dimension: keep the k largest (noisy) logits, softmax over them.

    Args:
        clean: [T, ..., E] clean logits ``x @ W_g``.
        noise_std: [T, ..., E] noise std (``softplus(x @ W_noise) + eps``), or None for no noise.
        k: experts kept per token.
        shards: the batch the T tokens are a shard of; the noise is this shard's rows of one draw
            for the whole batch (``moekit.shards.randn_rows``; ``rows``: its shard sizes, if known).
    """
    num_experts = clean.shape[-1]
    if noise_std is None:
        top_values, top_idx = clean.topk(k, dim=-1)
        return TopK(top_idx, torch.softmax(top_values, dim=-1), None)
    noisy = clean + randn_rows(clean, shards, rows) * noise_std
    # k+1 values: the (k+1)-th is the threshold of eq. 9 for experts already in the top k.
    top_values, top_idx = noisy.topk(min(k + 1, num_experts), dim=-1)
    gates = torch.softmax(top_values[..., :k], dim=-1)
    load_prob = None
    if k < num_experts:
        load_prob = prob_in_top_k(clean, noisy, noise_std, top_values, k)
    return TopK(top_idx[..., :k], gates, load_prob)


def mask_slots(indices_TK: torch.Tensor, weights_TK: torch.Tensor,
               weight_T: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots of padding tokens (``weight_T`` 0) emptied: index -1, weight 0."""
    if weight_T is None:
        return indices_TK, weights_TK
    real_T1 = weight_T[:, None] > 0
    indices_TK = torch.where(real_T1, indices_TK, torch.full_like(indices_TK, -1))
    return indices_TK, weights_TK * weight_T[:, None].to(weights_TK.dtype)


def routing_sums(indices_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, weight_T: torch.Tensor | None,
                 importance_E: torch.Tensor | None = None) -> LocalRouting:
    """Mask padding slots (index -1, weight 0), then this shard's per-expert "counts" and
    "importance" (the sum of the combine weights, unless given)."""
    indices_TK, weights_TK = mask_slots(indices_TK, weights_TK, weight_T)
    if importance_E is None:
        importance_E = scatter_to_experts(indices_TK, weights_TK, num_experts)
    return LocalRouting(indices_TK, weights_TK, {"counts": hard_counts(indices_TK, num_experts),
                                                 "importance": importance_E})


def routing_from_sums(indices_TK: torch.Tensor, weights_TK: torch.Tensor, counts_E: torch.Tensor,
                      importance_E: torch.Tensor, load_E: torch.Tensor | None, extra_losses: dict[str, torch.Tensor],
                      loss_weights: dict[str, float]) -> Routing:
    """CV^2 losses and the weighted aux loss from the whole batch's counts, importance and load
    (None: the counts)."""
    if load_E is None:
        load_E = counts_E.to(importance_E.dtype)
    losses = {"importance": cv_squared(importance_E), "load": cv_squared(load_E), **extra_losses}
    aux = importance_E.new_zeros(())
    for name, coef in loss_weights.items():
        if coef and name in losses:
            aux = aux + coef * losses[name]
    stats = RoutingStats(importance_E, load_E, counts_E, 0, losses)
    return Routing(indices_TK, weights_TK, aux, stats)
