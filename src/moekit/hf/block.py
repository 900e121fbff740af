"""``MoEBlock``: a transformers sparse-MoE block computed by ``moekit.MoE``, with the block's call and return.

Legend: B batch, S sequence length, T tokens (B*S), D model dim, E experts, K experts per token.

The block is called as ``block(hidden_states [B, S, D])`` and returns what its family's block
returns (``moekit.hf.families.Family.returns``), so it drops into the model in the block's place.
Its router logits pass through ``router_logits_tap``, an identity module on which the module
installs transformers' output-capturing hook: with ``output_router_logits=True`` the model
collects them, in layer order, exactly as it collects its own router's, and computes its
balancing loss from them.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch
from torch import nn

from moekit.hf.families import BY_NAME, Family
from moekit.layer import MoE
from moekit.types import RoutingStats


class RouterLogitsTap(nn.Module):
    """Identity on the router logits: the place where transformers' capturing hook sees them."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


@functools.cache
def _router_logits_collector() -> Any:
    """transformers' context variable holding the outputs being collected, or None where it has none."""
    try:
        module = importlib.import_module("transformers.utils.output_capturing")
    except ImportError:
        return None
    return getattr(module, "_active_collector", None)


def logits_collected() -> bool:
    """Whether transformers collects router logits in the forward under way (``output_router_logits``).

    Reads the collector that transformers' output-capturing hooks append to; True whenever that
    cannot be told (a transformers without it, or tracing for torch.compile).
    """
    collector = _router_logits_collector()
    if collector is None or torch.compiler.is_compiling():
        return True
    active = collector.get()
    return active is not None and "router_logits" in active


def detached(stats: RoutingStats | None) -> RoutingStats | None:
    """The stats without their autograd graph (kept between forwards, they must not hold it alive);
    None (a layer keeping no statistics, ``moekit.MoE(routing_stats=False)``) stays None."""
    if stats is None:
        return None
    return stats._replace(importance=stats.importance.detach(), load=stats.load.detach(),
                          losses={k: v.detach() for k, v in stats.losses.items()})


class MoEBlock(nn.Module):
    """A transformers sparse-MoE block as a ``moekit.MoE`` (built by ``moekit.hf.from_hf``).

    Attributes:
        moe: the ``moekit.MoE`` that computes the block.
        family: the block family's name (``moekit.hf.families``).
        block_class: the qualified name of the transformers class it replaces.
        options: the ``moekit.MoE`` arguments it was built with (``to_hf`` checks a block against them).
        jitter_noise: the block's multiplicative input jitter in training (Mixtral, SwitchTransformers).
        last_stats: the ``RoutingStats`` of the last forward (detached); None before the first, and
            in eval mode when ``moe.routing_stats`` is False.
        last_aux_loss: moekit's balancing loss of the last forward, with its graph (0 unless the
            router's loss weights are set: the model computes its own from the router logits).
    """

    last_stats: RoutingStats | None
    last_aux_loss: torch.Tensor | None

    def __init__(self, family: Family, moe: MoE, options: dict[str, Any], block_class: str, jitter_noise: float = 0.0):
        super().__init__()
        self.moe = moe
        self.family, self.block_class, self.options = family.name, block_class, options
        self.jitter_noise = jitter_noise
        self.router_logits_tap = RouterLogitsTap()
        self.last_stats, self.last_aux_loss = None, None

    @property
    def spec(self) -> Family:
        return BY_NAME[self.family]

    def router_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, E] float32: the logits the layer's router routes on."""
        router: Any = self.moe.router
        if hasattr(router, "logits"):
            return router.logits(x_TD)
        return x_TD.float() @ router.w_gate.float()  # the switch router

    def logits_wanted(self) -> bool:
        """Whether this forward's router logits have a reader: transformers collecting them, or a
        hook of anyone else's on ``router_logits_tap`` (beyond the capturing hook)."""
        tap = self.router_logits_tap
        return logits_collected() or len(tap._forward_hooks) > 1 or bool(tap._forward_pre_hooks)

    def forward(self, hidden_states: torch.Tensor):
        """``hidden_states`` [B, S, D] -> what the replaced block returns (see ``Family.returns``)."""
        spec, x = self.spec, hidden_states
        if self.training and self.jitter_noise > 0:
            # The block's own draw (same call, same generator): a seeded run is reproduced exactly.
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        out = self.moe(x)
        self.last_stats, self.last_aux_loss = detached(out.stats), out.aux_loss
        if spec.returns == "tensor" and not self.logits_wanted():
            return out.y  # nobody reads the logits: not computed (a tenth of the block at one token)
        logits_TE = self.router_logits(x.reshape(-1, x.shape[-1]))
        emitted = logits_TE if spec.logits_float32 else logits_TE.to(x.dtype)
        if spec.logits_per_sequence:
            emitted = emitted.view(*x.shape[:-1], -1)
        emitted = self.router_logits_tap(emitted)
        if spec.returns == "tensor":
            return out.y
        if spec.returns == "tensor_and_scores":  # GPT-OSS: softmax over the k largest logits
            scores_TK = torch.softmax(logits_TE.topk(self.moe.k, dim=-1).values, dim=-1)
            return out.y, scores_TK.to(x.dtype)
        return out.y.reshape(-1, x.shape[-1]), emitted  # Llama 4: [T, D] and the [T, E] logits

    def extra_repr(self) -> str:
        return f"family={self.family}, replaces={self.block_class.rsplit('.', 1)[-1]}"
