"""FLOPs counted by PyTorch's ``FlopCounterMode`` on a real forward pass (never by hand).

The counter sees the operators that actually run, so a sparse MoE is charged for the experts
each token was routed to (after capacity drops), and an E^3 for the M copies after tiling.
FlopCounterMode counts a multiply-add as 2 FLOPs. Operators it has no formula for (element-wise
ops, softmax, layer norm, and fused attention kernels) count 0: models meant to be measured should
spell attention as matmuls. An expert bank's "bmm" backend pads every expert's segment to the
largest one, and the padded rows would be counted too: ``routed_flops_per_example`` counts with the
"loop" backend, i.e. only the token-slots routed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

from moekit.experts import Experts


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


@contextmanager
def loop_experts(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily compute every expert bank in ``model`` one expert at a time (no padding)."""
    banks = [m for m in model.modules() if isinstance(m, Experts)]
    saved = [bank.backend for bank in banks]
    try:
        for bank in banks:
            bank.backend = "loop"
        yield
    finally:
        for bank, backend in zip(banks, saved, strict=True):
            bank.backend = backend


def routed_flops_per_example(model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """``flops_per_example`` with the experts charged only for the token-slots routed to them."""
    with loop_experts(model):
        return flops_per_example(model, inputs)
