"""How a training job runs: in one process, or on the ranks of a torchrun launch (``--expert-parallel``).

The training loop (``moekit.train.loop``) and the session (``moekit.train.session``) call it.

Legend: B rows of a global batch (sequences, images), b = B/W rows per rank, W ranks.

The jobs call one interface, whichever of the two they hold:

- ``SingleProcess``: everything is local; every method is the identity or torch's own function.
- ``ExpertParallel``: one process per rank (gloo on CPU, NCCL on CUDA). Every rank builds the
  same model from the same seed; ``prepare`` shards its experts (dense models stay data-parallel).
  Each rank trains on its contiguous b rows of every global batch, so the union over ranks is the
  batch one process would train on, and each rank's loss is the mean over its own rows: with equal
  rows per rank, ``sync_gradients`` then leaves every gradient equal to the single-process
  gradient of the mean over the global batch (see ``moekit.parallel.expert_parallel``). Router
  noise is drawn for the whole batch (``moekit.shards.randn_rows``) and the ranks' generators stay
  in step, so a run reproduces the single-process run of the same command up to rounding.

Only rank 0 touches the out directory (``main_only``). Checkpoints hold full single-process state
dicts, gathered from the ranks and written by rank 0 in the single-process format: a run resumes
on any number of ranks, one process included, and checkpoints stay loadable with
``weights_only=True``. Every rank reads the checkpoint it resumes from, so ``--out`` must be
readable by all ranks (always true on one machine).

A collective that waits longer than ``--timeout`` seconds ends the run with an error; a wait
longer than ``--watchdog`` seconds is reported on the console first, naming the ranks that have
not arrived and where each one last was (``moekit.train.watchdog``). The training loop and every
method below that meets the other ranks mark the point (``progress``) for it.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from moekit.parallel.groups import DEFAULT_TIMEOUT_S, TORCHRUN_VARS
from moekit.train.checkpoint import capture_rng_state, restore_rng_state
from moekit.train.outdir import ConfigError
from moekit.train.runtime import resolve_device
from moekit.train.watchdog import JoinWatch, Watchdog, group_store

DEFAULT_WATCHDOG_S = 60.0  # a wait this long at one point is worth a line on the console

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)


def add_parallel_arg(parser: argparse.ArgumentParser, job: str, limits: str) -> None:
    """The ``--expert-parallel`` option of a training job; ``limits`` states what W must divide."""
    parser.add_argument(
        "--expert-parallel", action="store_true",
        help=f"train on every rank of a torchrun launch: `torchrun --nproc_per_node=N -m moekit {job} ... "
             "--expert-parallel`; experts sharded over the N ranks, everything else data-parallel; gloo on "
             "cpu, NCCL on cuda (one GPU per rank); the batch size is the global batch, split over the ranks, "
             f"and the results match a single-process run up to rounding. {limits}")
    parser.add_argument(
        "--ep-size", type=_ep_size, default=None, metavar="P",
        help="with --expert-parallel: shard each MoE layer's experts over groups of P consecutive ranks (P must "
             "divide N and the number of experts) and replicate them across the N/P groups: a 2-D mesh "
             "('dp', 'ep') of N/P x P ranks, e.g. P = the GPUs of one node (default: all N ranks, one group)")
    parser.add_argument(
        "--fsdp", action="store_true",
        help="with --expert-parallel: shard the dense parameters, gradients and optimizer state over all ranks "
             "and each expert block over its replicas with torch's FSDP2 (fully_shard); gradients are "
             "reduced during the backward pass (default: dense parameters replicated)")
    parser.add_argument(
        "--timeout", type=_positive_seconds, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help=f"with --expert-parallel: a collective (or the start-up) that waits this long for another rank ends "
             f"the run with an error (default: {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument(
        "--watchdog", type=_seconds, default=DEFAULT_WATCHDOG_S, metavar="SECONDS",
        help=f"with --expert-parallel: when the ranks have waited this long for one of them, say which one and "
             f"where it last was, and again every SECONDS until it arrives (default: {DEFAULT_WATCHDOG_S:g}; 0: never)")


def _seconds(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


_seconds.__name__ = _positive_seconds.__name__ = "float"  # argparse's word for text that is no number


def _ep_size(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


_ep_size.__name__ = "int"


def from_args(args: argparse.Namespace) -> tuple[SingleProcess | ExpertParallel, torch.device]:
    """The job's way of running and its device: ``ExpertParallel`` when ``--expert-parallel`` was given.

    Raises ``ConfigError`` for ``--expert-parallel`` outside torchrun, and for a launch of several
    processes without it (they would each run the whole job into the same ``--out``).
    """
    mesh_options = [name for name, given in (("--ep-size", getattr(args, "ep_size", None) is not None),
                                             ("--fsdp", getattr(args, "fsdp", False))) if given]
    if mesh_options and not args.expert_parallel:
        raise ConfigError(f"{' and '.join(mesh_options)} lay out the ranks of a torchrun launch: add --expert-parallel")
    if not args.expert_parallel:
        world = os.environ.get("WORLD_SIZE")
        if world is not None and world.isdigit() and int(world) > 1:
            raise ConfigError(f"launched as {world} processes (WORLD_SIZE={world}) without --expert-parallel: "
                              f"add --expert-parallel, or run `moekit {args.job} ...` without torchrun")
        return SINGLE_PROCESS, resolve_device(args.device)
    missing = [name for name in TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise ConfigError(f"--expert-parallel needs the environment torchrun sets up (missing {', '.join(missing)}): "
                          f"launch with `torchrun --nproc_per_node=N -m moekit {args.job} ... --expert-parallel`")
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available in this torch build or machine")
    par = ExpertParallel.start(device, vars(args), timeout_s=getattr(args, "timeout", DEFAULT_TIMEOUT_S),
                               watchdog_s=getattr(args, "watchdog", DEFAULT_WATCHDOG_S),
                               ep_size=getattr(args, "ep_size", None), fsdp=getattr(args, "fsdp", False))
    return par, par.device


class SingleProcess:
    """The whole job in this process."""

    distributed = False
    rank = 0
    world_size = 1
    is_main = True

    def check_divisible(self, what: str, value: int) -> None:
        """``ConfigError`` naming ``what`` unless ``value`` (a global batch) splits evenly over the ranks."""

    def check_experts(self, what: str, value: int) -> None:
        """``ConfigError`` naming ``what`` unless ``value`` experts split evenly over an expert-parallel group."""

    def progress(self, label: str) -> None:
        """This process reaches ``label`` (e.g. "training step 3 of demo"): for the watchdog of a
        launch of several ranks; nothing in one process."""

    def prepare(self, model: M, config: dict[str, Any]) -> M:
        """``model`` ready to train on this process: expert-parallel under ``ExpertParallel``."""
        return model

    def shard(self, x_B: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch whose rows divide evenly."""
        return x_B

    def split(self, x_B: torch.Tensor) -> torch.Tensor:
        """This rank's rows of an evaluation batch (any number of rows; some ranks may get none)."""
        return x_B

    def gather(self, x_b: torch.Tensor) -> torch.Tensor:
        """Every rank's rows (``shard`` or ``split``), concatenated in rank order: the global batch."""
        return x_b

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a per-rank value (a loss over equal shards: the global loss)."""
        return x

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on some rank: the ranks stop on the same step."""
        return flag

    def clip_and_step(self, model: nn.Module, opt: torch.optim.Optimizer, max_norm: float | None) -> None:
        """After ``backward``: clip the gradient norm to ``max_norm`` (None: no clipping) and step."""
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()

    def state_dicts(self, model: nn.Module, opt: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
        """Single-process ``(model.state_dict(), opt.state_dict())``; every rank calls this."""
        return model.state_dict(), None if opt is None else opt.state_dict()

    def load_state_dicts(self, model: nn.Module, opt: torch.optim.Optimizer | None, model_state: dict,
                         opt_state: dict | None) -> None:
        """Load what ``state_dicts`` returned (on any number of ranks) into this rank's model."""
        model.load_state_dict(model_state)
        if opt is not None and opt_state is not None:
            opt.load_state_dict(opt_state)

    def capture_rng(self) -> dict[str, Any]:
        return capture_rng_state()

    def restore_rng(self, state: dict[str, Any]) -> None:
        restore_rng_state(state)

    def main_only(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, its result (or its exception) on every rank."""
        return fn()

    def describe(self, device: torch.device) -> str:
        """Where the job ran, for reports."""
        return str(device)

    def close(self) -> None:
        pass


SINGLE_PROCESS = SingleProcess()


class ExpertParallel(SingleProcess):
    """This process is one rank of a torchrun launch; see the module docstring."""

    distributed = True

    def __init__(self, rank: int, world_size: int, device: torch.device, options: dict[str, Any] | None = None,
                 ep_size: int | None = None, fsdp: bool = False):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.is_main = rank == 0
        # The layout (moekit.parallel.parallelize): experts over groups of ep_size ranks (None: all of
        # them), dense parameters sharded (fsdp) or replicated.
        if ep_size is not None and (ep_size < 1 or world_size % ep_size):
            raise ConfigError(f"--ep-size {ep_size} does not divide the {world_size} ranks of the launch")
        self.ep_size, self.fsdp = ep_size, fsdp
        self.options = dict(options or {})
        self.watchdog: Watchdog | None = None
        self._where = "start-up"

    @classmethod
    def start(cls, device: torch.device, options: dict[str, Any], timeout_s: float = DEFAULT_TIMEOUT_S,
              watchdog_s: float = DEFAULT_WATCHDOG_S, ep_size: int | None = None, fsdp: bool = False,
              ) -> ExpertParallel:
        """Join torchrun's process group and check that every rank got the same ``options`` (the
        parsed command line): ranks given different ``--out`` or ``--steps`` would otherwise
        fail much later, or not at all.

        Collectives time out after ``timeout_s``; a wait longer than ``watchdog_s`` (0: never) is
        reported, at start-up and at every point the ranks meet (``moekit.train.watchdog``).
        """
        from moekit.parallel import check_same_config, init_distributed

        # init_distributed checks torchrun's environment; these two only label the start-up's report.
        rank, world_size = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
        with JoinWatch(rank, world_size, watchdog_s, timeout_s):
            info = init_distributed(device, timeout_s=timeout_s)
        try:
            par = cls(info.rank, info.world_size, info.device, options, ep_size=ep_size, fsdp=fsdp)
        except ConfigError:
            dist.destroy_process_group()
            raise
        store = group_store() if watchdog_s > 0 else None
        if store is not None:
            par.watchdog = Watchdog(store, info.rank, info.world_size, watchdog_s, timeout_s).start()
        try:
            par._enter("the check that every rank got the same options")
            check_same_config(nn.Module(), extra=par.options)
        except ValueError as e:
            par.close()
            raise ConfigError(str(e)) from e
        return par

    def progress(self, label: str) -> None:
        self._where = label
        self._enter("")

    def _enter(self, collective: str) -> None:
        # Every rank passes the same points in the same order: the watchdog compares their counts.
        if self.watchdog is not None:
            self.watchdog.enter(f"{collective} during {self._where}" if collective else self._where)

    def check_divisible(self, what: str, value: int) -> None:
        """``ConfigError`` naming ``what`` unless ``value`` splits evenly over the ranks."""
        if value % self.world_size:
            raise ConfigError(f"{what}={value} is not divisible by the {self.world_size} ranks of --expert-parallel")

    def check_experts(self, what: str, value: int) -> None:
        group = self.world_size if self.ep_size is None else self.ep_size
        if value % group:
            where = f"--ep-size {group}" if self.ep_size is not None else f"the {group} ranks of --expert-parallel"
            raise ConfigError(f"{what}={value} is not divisible by {where}")

    def prepare(self, model: M, config: dict[str, Any]) -> M:
        # Fails on every rank, naming the first difference, when the ranks built different models
        # or were given different options (``config``).
        from moekit.parallel import parallelize

        self._enter("the start-up checks of the model (parallelize)")
        try:
            return cast(M, parallelize(model, self.ep_size, self.fsdp, extra_config={**self.options, **config}))
        except ValueError as e:  # a difference between the ranks, or experts that do not split
            raise ConfigError(str(e)) from e

    def shard(self, x_B: torch.Tensor) -> torch.Tensor:
        rows = x_B.shape[0] // self.world_size
        if rows * self.world_size != x_B.shape[0]:
            raise ValueError(f"a batch of {x_B.shape[0]} rows does not split over {self.world_size} ranks")
        return x_B[self.rank * rows:(self.rank + 1) * rows]

    def split(self, x_B: torch.Tensor) -> torch.Tensor:
        return torch.tensor_split(x_B, self.world_size)[self.rank]

    def gather(self, x_b: torch.Tensor) -> torch.Tensor:
        from moekit.parallel import ProcessGroupShards

        self._enter("an all_gather of outputs")
        return ProcessGroupShards().gather(x_b.to(self.device))[0]

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(self.device, copy=True)
        self._enter("the all_reduce of a mean over the ranks")
        dist.all_reduce(x)
        return x / self.world_size

    def any(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], device=self.device)
        self._enter("the all_reduce of the stop flag")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)

    def clip_and_step(self, model: nn.Module, opt: torch.optim.Optimizer, max_norm: float | None) -> None:
        from moekit.parallel import clip_grad_norm_, sync_gradients

        self._enter("the all_reduce of the gradients")
        sync_gradients(model)
        if max_norm is not None:
            clip_grad_norm_(model, max_norm)
        opt.step()

    def state_dicts(self, model: nn.Module, opt: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
        from moekit.parallel import full_optimizer_state_dict, full_state_dict

        self._enter("the gather of the model and optimizer state")
        return full_state_dict(model), None if opt is None else full_optimizer_state_dict(model, opt)

    def load_state_dicts(self, model: nn.Module, opt: torch.optim.Optimizer | None, model_state: dict,
                         opt_state: dict | None) -> None:
        from moekit.parallel import load_full_optimizer_state_dict, load_full_state_dict

        self._enter("loading the checkpoint's state")
        load_full_state_dict(model, model_state)
        if opt is not None and opt_state is not None:
            load_full_optimizer_state_dict(model, opt, opt_state)

    def capture_rng(self) -> dict[str, Any]:
        # The generators of all ranks are in step; on CUDA only this rank's device is kept, as
        # the state of "the" device, so any rank (or one process) can restore it into its own.
        state = capture_rng_state()
        if self.device.type == "cuda":
            state["cuda"] = [torch.cuda.get_rng_state(self.device)]
        return state

    def restore_rng(self, state: dict[str, Any]) -> None:
        restore_rng_state({k: v for k, v in state.items() if k != "cuda"})
        if self.device.type == "cuda" and state.get("cuda"):
            torch.cuda.set_rng_state(state["cuda"][0].cpu(), self.device)

    def main_only(self, fn: Callable[[], T]) -> T:
        # Marked before rank 0's work: the ranks waiting for it are then at the same point, not ahead.
        self._enter("rank 0's work on --out and its broadcast")
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # noqa: BLE001 - every rank re-raises it below
                box[0] = ("error", e)
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise value
        return value

    def describe(self, device: torch.device) -> str:
        layout = "" if self.ep_size is None and not self.fsdp else \
            f", {self.world_size // (self.ep_size or self.world_size)}x{self.ep_size or self.world_size} " \
            f"{'fsdp' if self.fsdp else 'replicate'}"
        return f"{self.world_size} ranks x {device.type} (--expert-parallel{layout}, {dist.get_backend()})"

    def close(self) -> None:
        if self.watchdog is not None:  # before the store goes away with the group
            self.watchdog.stop()
            self.watchdog = None
        if dist.is_initialized():
            dist.destroy_process_group()
