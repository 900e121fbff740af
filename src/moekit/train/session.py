"""A job's progress in its out directory: the results of its finished runs and the run in progress.

Every job trains one or more *runs* (a model, for a number of steps) one after the other. A
``Session`` holds what a checkpoint must hold to continue such a job where it stopped:

- ``finished``: run name -> that run's result (plain data: numbers, lists, tensors, state dicts);
- the run in progress: its name, its ``TrainState``, its model and optimizer state (gathered into
  the single-process layout under expert parallelism, so a run resumes on any number of ranks);
- the RNG state (router noise and dropout continue the interrupted stream);
- ``fingerprint``: plain data describing the data the job loaded (e.g. its vocabulary); resuming
  on different data is refused.

Checkpoints are ``checkpoints/step_XXXXXXXX.pt`` numbered by the steps done over all runs, written
atomically by rank 0 and read with ``weights_only=True`` (``moekit.train.checkpoint``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.train.checkpoint import load_checkpoint, save_checkpoint
from moekit.train.loop import TrainState
from moekit.train.outdir import OutDirError, checkpoint_path, prune_checkpoints
from moekit.train.strategy import SINGLE_PROCESS, SingleProcess

FORMAT = 1  # the layout of a session checkpoint; a file of another layout is refused


class Session:
    """The checkpointed state of a job in ``out`` (see the module docstring)."""

    def __init__(self, out: str | Path, fingerprint: Any = None, strategy: SingleProcess = SINGLE_PROCESS):
        self.out, self.fingerprint, self.strategy = Path(out), fingerprint, strategy
        self.finished: dict[str, Any] = {}
        self.steps_done = 0  # the steps of the finished runs
        self._pending: dict[str, Any] | None = None  # the run in progress read from a checkpoint

    def restore(self, path: str | Path) -> None:
        """Continue from the checkpoint at ``path`` (read on every rank)."""
        ckpt = load_checkpoint(path)
        if ckpt.get("format") != FORMAT:
            raise OutDirError(f"checkpoint {str(path)!r} is not a moekit session checkpoint of this version")
        if ckpt["fingerprint"] != self.fingerprint:
            raise OutDirError(f"checkpoint {str(path)!r} was made from different data (the data changed?)")
        self.finished, self.steps_done, self._pending = ckpt["finished"], ckpt["steps_done"], ckpt["current"]
        if self._pending is not None:
            self._pending["rng"] = ckpt["rng"]

    @property
    def pending_run(self) -> str | None:
        """The name of the run in progress in the restored checkpoint, if any."""
        return None if self._pending is None else self._pending["name"]

    def start(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> TrainState:
        """The state to train run ``name`` from.

        When the restored checkpoint holds this run in progress, its model and optimizer state are
        loaded into ``model`` and ``optimizer`` (both already built, and prepared by the strategy),
        the RNG state is restored, and its ``TrainState`` is returned; otherwise a fresh one.
        """
        if self._pending is None or self._pending["name"] != name:
            return TrainState()
        pending, self._pending = self._pending, None
        self.strategy.load_state_dicts(model, optimizer, pending["model"], pending["optimizer"])
        # After the seeded initialisation: router noise and dropout continue where they stopped.
        self.strategy.restore_rng(pending["rng"])
        return TrainState.from_dict(pending["state"])

    def save(self, name: str | None = None, state: TrainState | None = None, model: nn.Module | None = None,
             optimizer: torch.optim.Optimizer | None = None) -> None:
        """Checkpoint the finished runs and, given ``name``, the run in progress at ``state``.

        Every rank calls this (the model and optimizer state are gathered over the ranks); rank 0 writes.
        """
        current, total = None, self.steps_done
        if name is not None and state is not None and model is not None:
            model_state, opt_state = self.strategy.state_dicts(model, optimizer)
            current = {"name": name, "state": state.to_dict(), "model": model_state, "optimizer": opt_state}
            total += state.step
        ckpt = {"format": FORMAT, "fingerprint": self.fingerprint, "finished": self.finished,
                "steps_done": self.steps_done, "current": current, "rng": self.strategy.capture_rng()}

        def write() -> None:
            save_checkpoint(checkpoint_path(self.out, total), ckpt)
            prune_checkpoints(self.out, keep=1)

        self.strategy.main_only(write)

    def finish(self, name: str, state: TrainState, result: Any) -> None:
        """Record run ``name``'s result and checkpoint (the run's weights go only where ``result`` holds them)."""
        self.finished[name] = result
        self.steps_done += state.step
        self.save()
