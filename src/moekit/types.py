"""Value types passed between the router, the dispatcher and the caller.

Legend: T tokens, D model dim, E experts, K slots per token (top-k).

Empty slots: a router marks a slot that routes nowhere (a padding token, or a token that a
batchwise router gave fewer experts than the widest token) with index ``-1`` and weight 0.
Dispatchers skip such slots; they are never counted as computed or dropped.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RoutingStats(NamedTuple):
    """Balancing statistics of one routing decision.

    Attributes:
        importance: [E] float, sum over (real) tokens of each expert's gate value.
        load: [E] float, the smooth load estimate (Shazeer eq. 10) for noisy routers in training,
            otherwise the hard number of tokens whose top-k holds the expert.
        counts: [E] long, token-slots each expert actually computed (after any capacity drop).
        dropped: token-slots dropped by capacity, a Python int.
        losses: the unweighted balancing losses, e.g. ``{"importance": cv2, "load": cv2}``.
    """

    importance: torch.Tensor
    load: torch.Tensor
    counts: torch.Tensor
    dropped: int
    losses: dict[str, torch.Tensor]


class Routing(NamedTuple):
    """What a router decides for a batch of T tokens.

    Attributes:
        indices: [T, K] long, expert of each slot; -1 marks an empty slot.
        weights: [T, K] float, combine weight of each slot (0 on empty slots).
        aux_loss: scalar, the weighted sum of the router's balancing losses.
        stats: RoutingStats (``counts`` holds the routed slots; the dispatcher refines it).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    aux_loss: torch.Tensor
    stats: RoutingStats


class MoEOutput(NamedTuple):
    """Output of an MoE layer: ``y, aux_loss, stats = moe(x)``.

    Attributes:
        y: same shape and dtype as the input.
        aux_loss: scalar, the weighted sum of the balancing losses (add it to the task loss).
        stats: RoutingStats over all experts of the layer; None for an eval-mode forward of a layer
            built with ``routing_stats=False``.
    """

    y: torch.Tensor
    aux_loss: torch.Tensor
    stats: RoutingStats | None
