"""Process groups: start-up from torchrun's environment, the sharded-batch collectives, config checks.

Legend: T tokens (this rank), W ranks.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, NamedTuple, cast

import torch
import torch.distributed as dist
from torch import nn

# A collective that waits longer than this ends the program with an error instead of hanging
# (torch's own defaults are 10 min for gloo and 30 min for NCCL, too long to notice a dead rank).
DEFAULT_TIMEOUT_S = 300.0
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistInfo(NamedTuple):
    """Where this process stands: its rank of ``world_size`` and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(device: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group that ``torchrun`` set up: gloo for a CPU device, NCCL for CUDA.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. On CUDA each process takes the
    GPU ``cuda:LOCAL_RANK``. Every collective gets ``timeout_s``: a dead or stuck rank makes the
    others fail with a timeout error rather than wait forever.
    """
    missing = [name for name in TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise RuntimeError(f"init_distributed needs the environment torchrun sets; missing {missing}. "
                           "Launch with `torchrun --nproc_per_node=N -m moekit ...`")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be > 0")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device} is not supported for distributed runs (cpu or cuda)")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if dist.is_initialized():
        raise RuntimeError("init_distributed was called twice: the default process group already exists")
    kwargs: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kwargs)
    return DistInfo(rank, world_size, local_rank, device)


# The last two are what FSDP2 calls in torch 2.13; a torch without them skips them.
COLLECTIVES = tuple(name for name in ("all_reduce", "all_gather", "all_to_all_single", "broadcast", "reduce_scatter",
                                      "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_single",
                                      "reduce_scatter_single") if hasattr(dist, name))


@contextlib.contextmanager
def counting_collectives() -> Iterator[collections.Counter]:
    """Count the calls of ``torch.distributed``'s collectives made inside the block, by name.

    A diagnostic: at small batches each collective costs about one network round trip whatever its
    size, so their number is an expert-parallel step's fixed latency. Counts calls made through the
    ``torch.distributed`` module (as moekit and FSDP2 make them), on this rank.
    """
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name: str):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return call

    try:
        for name in COLLECTIVES:
            setattr(dist, name, counting(name))
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks. Every rank's loss reads the same sum, so the gradient of each rank's share
    is the sum of all ranks' gradients of it: the backward is an all-reduce too."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ProcessGroupShards:
    """A batch whose shard r lives on rank r of ``group`` (see ``moekit.shards.BatchShards``).

    ``sum`` is a differentiable all-reduce: its backward all-reduces the gradients, so the
    gradient of a loss that every rank computes from the same global sum reaches every shard.
    """

    def __init__(self, group=None):
        self.group = group
        self.count = dist.get_world_size(group)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            return _AllReduceSum.apply(x, self.group)
        x = x.clone()
        dist.all_reduce(x, group=self.group)
        return x

    def sum_many(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # One all-reduce of every tensor as one float64 vector (exact for integer counts below
        # 2^53); each part goes back to its own dtype. Differentiable like ``sum``.
        flat = self.sum(torch.cat([x.reshape(-1).to(torch.float64) for x in xs]))
        parts = flat.split([x.numel() for x in xs])
        return tuple(part.view(x.shape).to(x.dtype) for part, x in zip(parts, xs, strict=True))

    def _sizes(self, n: int, device: torch.device) -> list[int]:
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.count)]
        dist.all_gather(sizes, torch.tensor([n], device=device), group=self.group)
        return [int(s) for s in sizes]

    def rows(self, n: int, device: torch.device) -> tuple[int, int]:
        sizes = self._sizes(n, device)
        return sum(sizes), sum(sizes[: dist.get_rank(self.group)])

    def gather(self, x_T: torch.Tensor) -> tuple[torch.Tensor, int]:
        x_T = x_T.detach().contiguous()
        sizes = self._sizes(x_T.shape[0], x_T.device)
        # all_gather needs equal shapes: pad every shard to the longest, then cut.
        padded = x_T.new_zeros((max(sizes), *x_T.shape[1:]))
        padded[: x_T.shape[0]] = x_T
        parts = [torch.empty_like(padded) for _ in range(self.count)]
        dist.all_gather(parts, padded, group=self.group)
        rank = dist.get_rank(self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]), sum(sizes[:rank])

    def __repr__(self) -> str:
        return f"ProcessGroupShards(count={self.count})"


def describe_model(model: nn.Module) -> list[str]:
    """One line per parameter and buffer (name, shape, dtype) and per module's settings (its repr line)."""
    lines = [f"param {n} {tuple(p.shape)} {p.dtype}" for n, p in model.named_parameters()]
    lines += [f"buffer {n} {tuple(b.shape)} {b.dtype}" for n, b in model.named_buffers()]
    lines += [f"module {n or '.'} {type(m).__name__}({m.extra_repr()})" for n, m in model.named_modules()]
    return lines


def check_same_config(model: nn.Module, group=None, extra: dict | None = None) -> None:
    """Raise ``ValueError`` unless every rank of ``group`` built the same model (and the same ``extra``).

    ``extra`` holds anything else that must agree, e.g. a job's parsed command line. Run at
    start-up: ranks with different shapes would otherwise fail later inside a collective, or
    worse, not fail at all.
    """
    extra = extra or {}
    lines = describe_model(model) + [f"extra {k}={extra[k]!r}" for k in sorted(extra)]
    everyone: list[list[str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, lines, group=group)
    gathered = cast(list[list[str]], everyone)  # every rank filled its entry
    reference = gathered[0]
    for rank, other in enumerate(gathered):
        if other == reference:
            continue
        for i in range(max(len(reference), len(other))):
            a = reference[i] if i < len(reference) else "<nothing>"
            b = other[i] if i < len(other) else "<nothing>"
            if a != b:
                raise ValueError(f"configuration differs between ranks 0 and {rank} of the process group: "
                                 f"rank 0 has {a!r}, rank {rank} has {b!r}")
