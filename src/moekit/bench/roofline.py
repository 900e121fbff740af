"""The hardware limits a small batch is judged against, measured in the same run as the layer.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k.

A forward pass over a few tokens reads the weights of every expert the batch touches and does
little arithmetic with them, so its limit is ``max(bytes of the touched experts / read bandwidth,
FLOPs / dense matmul rate)``: the memory roofline. Both rates are measured here, on the machine
and thread count of the run.
"""

from __future__ import annotations

import statistics
import time

import torch


def _median_time(fn, repeats: int = 7) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(dtype: torch.dtype = torch.float32, megabytes: int = 512) -> float:
    """Bytes per second a sum over a tensor of ``megabytes`` (far beyond the caches) reads."""
    x = torch.ones(megabytes * 2**20 // torch.finfo(dtype).bits * 8, dtype=dtype)
    return x.numel() * x.element_size() / _median_time(lambda: x.sum())


def matmul_rate(dtype: torch.dtype = torch.float32, rows: int = 4096, dim: int = 512, hidden: int = 1024) -> float:
    """FLOP per second of a dense [rows, dim] @ [dim, hidden] matmul, an FFN's first layer."""
    a, b = torch.randn(rows, dim, dtype=dtype), torch.randn(dim, hidden, dtype=dtype)
    return 2.0 * rows * dim * hidden / _median_time(lambda: a @ b)


def expert_bytes(experts) -> int:
    """Bytes of one expert's weights (every projection and bias) in a ``moekit.experts.Experts``."""
    return sum(p[0].numel() * p.element_size() for p in experts.parameters())


def touched_experts(moe, x_TD: torch.Tensor) -> int:
    """How many distinct experts ``moe``'s router sends the tokens of ``x_TD`` to (eval mode)."""
    was = moe.training
    moe.eval()
    with torch.no_grad():
        indices = moe.route(x_TD, None).indices
    moe.train(was)
    return int(indices[indices >= 0].unique().numel())


def roofline_seconds(moe, x_TD: torch.Tensor, bandwidth: float, rate: float) -> float:
    """The memory roofline of ``moe``'s forward pass on ``x_TD`` [T, D]."""
    e = moe.experts
    projections = 3 if e.activation in ("swiglu", "clamped_swiglu") else 2
    flops = 2.0 * x_TD.shape[0] * moe.k * projections * e.dim * e.hidden_dim
    return max(touched_experts(moe, x_TD) * expert_bytes(e) / bandwidth, flops / rate)
