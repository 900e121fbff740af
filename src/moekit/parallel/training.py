"""What a training loop needs on the ranks of a launch, whatever the layout: one small object.

Legend: B rows of a global batch, W ranks, b = B/W rows per rank, P = ep_size.

The sequence (under ``torchrun --nproc_per_node=N``; every rank runs the same code)::

    from moekit.parallel import ParallelTraining, init_distributed

    info = init_distributed("cuda")                   # or "cpu" (gloo)
    par = ParallelTraining(ep_size=8, fsdp=True)      # the layout; ep_size=None, fsdp=False: today's
    model = par.parallelize(build_model().to(info.device))   # every rank builds the same model first
    opt = torch.optim.AdamW(model.parameters())       # after parallelize: parameters are now shards
    if resuming:                                      # a single-process checkpoint, on any layout
        par.load_full_state(model, opt, ckpt["model"], ckpt["optim"])
    for x_B, y_B in global_batches:                   # the same global batch on every rank
        x_b, y_b = par.shard(x_B), par.shard(y_B)     # this rank's rows (B/W, whatever the layout)
        out = model(x_b)
        loss = task_loss(out, y_b) + out.aux_loss     # each rank's loss: the mean over its own rows
        opt.zero_grad()
        loss.backward()                               # FSDP2 / replicate reduce gradients here
        par.clip_and_step(model, opt, max_norm=1.0)   # reduce (today's layout), clip, step
        log(par.mean(loss))                           # the loss of the global batch
    model_sd, opt_sd = par.full_state(model, opt)     # single-process state dicts on rank 0, None elsewhere
    if par.is_main:
        torch.save({"model": model_sd, "optim": opt_sd}, "ckpt.pt")

With W ranks each rank trains on W-th of every global batch: rank r takes rows [r*b, (r+1)*b). The
router statistics, noise and capacity cover the whole global batch, so with equal rows per rank
the run reproduces the single-process run on the global batch up to rounding, on any layout.
``moekit.parallel.save_distributed`` / ``load_distributed`` write and read sharded (DCP)
checkpoints instead, for models too large to gather on one rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moekit.parallel.expert_parallel import (
    _require_initialized,
    clip_grad_norm_,
    grad_norm,
    parallelize,
    sync_gradients,
)
from moekit.parallel.groups import ProcessGroupShards
from moekit.parallel.mesh import check_ep_size


class ParallelTraining:
    """The layout of a run on every rank of the default process group, and the steps of its loop.

    Args:
        ep_size: ranks per expert-parallel group (a divisor of the world size W); None: today's
            layout (experts over all W ranks, dense parameters replicated, ``sync_gradients``).
        fsdp: shard the dense parameters over all W ranks and each expert block over its replicas.

    Attributes: ``rank``, ``world_size``, ``is_main`` (rank 0), ``ep_size``, ``dp_size``, ``fsdp``.
    """

    def __init__(self, ep_size: int | None = None, fsdp: bool = False):
        _require_initialized()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self._ep_arg = ep_size
        self.ep_size = check_ep_size(ep_size, self.world_size)
        self.dp_size = self.world_size // self.ep_size
        if not isinstance(fsdp, bool):
            raise TypeError(f"fsdp={fsdp!r} must be a bool")
        self.fsdp = fsdp

    def parallelize(self, model: nn.Module, extra_config: dict | None = None, units=None) -> nn.Module:
        """``moekit.parallel.parallelize`` with this layout (``extra_config``: settings that must agree)."""
        return parallelize(model, self._ep_arg, self.fsdp, extra_config=extra_config, units=units)

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size`` rows; ``ValueError`` unless W divides it."""
        per_rank, rest = divmod(batch_size, self.world_size)
        if rest:
            raise ValueError(f"a batch of {batch_size} rows does not split over {self.world_size} ranks")
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def shard(self, x_B: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a training batch (rows ``self.rows(B)``)."""
        return x_B[self.rows(x_B.shape[0])]

    def split(self, x_B: torch.Tensor) -> torch.Tensor:
        """This rank's rows of an evaluation batch of any size (``torch.tensor_split``; some may be empty)."""
        return torch.tensor_split(x_B, self.world_size)[self.rank]

    def gather(self, x_b: torch.Tensor) -> torch.Tensor:
        """Every rank's rows (``shard`` or ``split``) concatenated in rank order: the global batch."""
        return ProcessGroupShards().gather(x_b)[0]

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a per-rank value (a loss over equal shards: the global batch's loss)."""
        x = x.detach().clone()
        dist.all_reduce(x)
        return x / self.world_size

    def clip_and_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                      max_norm: float | None = None) -> torch.Tensor:
        """After ``backward``: reduce the gradients (today's layout only; the others did it during
        ``backward``), clip their global norm to ``max_norm`` (None: no clipping) and step.
        Returns the gradient norm before clipping."""
        sync_gradients(model)
        norm = grad_norm(model) if max_norm is None else clip_grad_norm_(model, max_norm)
        optimizer.step()
        return norm

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
                   ) -> tuple[dict | None, dict | None]:
        """Single-process ``(model.state_dict(), optimizer.state_dict())`` on rank 0, ``(None, None)``
        on the others (which never hold more than one whole tensor at a time). Every rank calls this."""
        from moekit.parallel.checkpoint import full_optimizer_state_dict, full_state_dict

        model_state = full_state_dict(model, to_rank0=True)
        opt_state = None if optimizer is None else full_optimizer_state_dict(model, optimizer, to_rank0=True)
        return model_state, opt_state

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                        opt_state: dict | None = None) -> None:
        """Load single-process state dicts (every rank holds them, e.g. read from one file) into this
        rank's pieces of ``model`` and ``optimizer``, on any layout."""
        from moekit.parallel.checkpoint import load_full_optimizer_state_dict, load_full_state_dict

        load_full_state_dict(model, model_state)
        if optimizer is not None and opt_state is not None:
            load_full_optimizer_state_dict(model, optimizer, opt_state)

    def __repr__(self) -> str:
        return (f"ParallelTraining(world_size={self.world_size}, dp_size={self.dp_size}, ep_size={self.ep_size}, "
                f"fsdp={self.fsdp})")
