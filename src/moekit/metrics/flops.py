"""FLOPs counted by PyTorch's ``FlopCounterMode`` on a real forward pass (never by hand).

The counter sees the operators that actually run, so a sparse MoE is charged for the experts
each token was routed to (after capacity drops), and an E^3 for the M copies after tiling.
FlopCounterMode counts a multiply-add as 2 FLOPs. Operators it has no formula for (element-wise
ops, softmax, layer norm, and fused attention kernels) count 0: models meant to be measured should
spell attention as matmuls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[..., object], *args, **kwargs) -> int:
    """Total FLOPs of ``fn(*args, **kwargs)``, run once under no_grad."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def flops_per_example(model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """FLOPs of one forward of ``model`` per example of the batch ``inputs`` (in the model's current mode)."""
    if inputs.shape[0] == 0:
        raise ValueError("inputs must hold at least one example")
    return count_flops(model, inputs) / inputs.shape[0]
