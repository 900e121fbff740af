"""Sparse upcycling of a dense transformers causal LM: chosen MLPs become ``moekit.upcycle`` MoEs.

Legend: B batch, S sequence length, D model dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moekit.hf.block import MoEBlock, detached
from moekit.layer import MoE
from moekit.types import RoutingStats
from moekit.upcycle import upcycle

# Model types whose decoder layers hold a gated gate/up/down ``mlp`` that upcycling is tested on.
SUPPORTED_MODEL_TYPES = ("llama", "qwen3")


class UpcycledMLP(nn.Module):
    """A dense MLP upcycled into a ``moekit.MoE``, called like the MLP: [B, S, D] -> [B, S, D].

    Attributes:
        moe: the MoE.
        last_stats: the ``RoutingStats`` of the last forward (detached), None before the first.
        last_aux_loss: the MoE's balancing loss of the last forward, with its graph: add it to the
            training loss (``moe_aux_loss(model)`` sums them over a model).
    """

    last_stats: RoutingStats | None
    last_aux_loss: torch.Tensor | None

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe
        self.last_stats, self.last_aux_loss = None, None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.moe(hidden_states)
        self.last_stats, self.last_aux_loss = detached(out.stats), out.aux_loss
        return out.y


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of the last forward's balancing losses of the model's ``UpcycledMLP`` and ``MoEBlock`` modules."""
    losses = [m.last_aux_loss for m in model.modules()
              if isinstance(m, UpcycledMLP | MoEBlock) and m.last_aux_loss is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.float() for loss in losses]).sum()


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    base_name = "model" if isinstance(getattr(model, "model", None), nn.Module) else ""
    base = model.get_submodule(base_name) if base_name else model
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layers at .model.layers or .layers")
    return (f"{base_name}.layers" if base_name else "layers"), layers


def upcycle_model(model: nn.Module, num_experts: int, k: int, layers: Sequence[int] | None = None,
                  **kwargs: Any) -> list[str]:
    """Replace, in place, the ``mlp`` of the chosen decoder layers of a dense Llama or Qwen3 model by
    an ``UpcycledMLP`` of ``num_experts`` copies of it, ``k`` per token (``moekit.upcycle``).

    Args:
        model: a ``LlamaForCausalLM`` / ``LlamaModel`` / ``Qwen3ForCausalLM`` / ``Qwen3Model``.
        layers: the decoder layers to upcycle (indices; None: every layer).
        kwargs: ``moekit.upcycle``'s other arguments (``router``, ``noise``, ``w_importance``, ...).
    Returns the names of the replaced modules. The model's forward and ``generate`` keep working;
    the balancing losses are ``moe_aux_loss(model)`` after a forward.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"upcycle_model supports model types {SUPPORTED_MODEL_TYPES}; "
                         f"{type(model).__name__} is {model_type!r}")
    prefix, decoder = _decoder_layers(model)
    chosen = list(range(len(decoder))) if layers is None else list(layers)
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(decoder):
            raise ValueError(f"layer {i!r} is not one of the {len(decoder)} decoder layers")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers={chosen} lists a layer twice")
    names = []
    for i in chosen:
        layer: Any = decoder[i]
        if isinstance(layer.mlp, UpcycledMLP):
            raise ValueError(f"{prefix}.{i}.mlp is already upcycled")
        layer.mlp = UpcycledMLP(upcycle(layer.mlp, num_experts, k, **kwargs))
        names.append(f"{prefix}.{i}.mlp")
    return names
