"""Auxiliary-loss-free load balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing
Strategy for Mixture-of-Experts"; DeepSeek-V3 §2.1.2).

Legend: E experts.

A router built with ``expert_bias=True`` adds a per-expert bias b to its scores when it *selects*
experts, never when it weighs their outputs. After each training step every bias moves against
its expert's load, ``b_e += rate * sign(mean(load) - load_e)``: an overloaded expert becomes less
attractive, an idle one more, with no loss term and so no gradient that could fight the task loss.
DeepSeek-V3 uses rate 0.001 for most of its training.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def bias_step(load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """[E] the bias update ``rate * sign(mean(load) - load_e)`` (0 for an expert at the mean)."""
    load_E = load_E.double()
    return (rate * torch.sign(load_E.mean() - load_E)).to(torch.float32)


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float = 1e-3) -> int:
    """Move the selection bias of every router of ``model`` that has one; returns how many moved.

    Call after ``optimizer.step()``. Each such router (a module with the buffers ``expert_bias``
    and ``expert_load``, as ``TopKRouter(expert_bias=True)`` has) counts the tokens of its training
    forwards since the last call in ``expert_load``: with one forward per step, the counts of the
    last training forward; with gradient accumulation, the step's whole batch. Under expert
    parallelism those counts are of the whole sharded batch, the same on every rank, so every rank
    makes the same update. The counts are then reset. A router with no training forward since the
    last call does not move. Parameters (and their gradients) are never touched.
    """
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) or rate < 0:
        raise ValueError(f"rate={rate!r} must be a finite number >= 0")
    moved = 0
    for module in model.modules():
        bias_E, load_E = getattr(module, "expert_bias", None), getattr(module, "expert_load", None)
        if not isinstance(bias_E, torch.Tensor) or not isinstance(load_E, torch.Tensor):
            continue
        if bool(load_E.any()):
            bias_E += bias_step(load_E, rate).to(bias_E.dtype)
            moved += 1
        load_E.zero_()
    return moved
