"""A job's progress in its out directory: the results of its finished runs and the run in progress.

Every job trains one or more *runs* (a model, for a number of steps) one after the other. A
``Session`` holds what a checkpoint must hold to continue such a job where it stopped:

- ``finished``: run name -> that run's result (plain data: numbers, lists, tensors, state dicts);
- the run in progress: its name, its ``TrainState``, its model and optimizer state (gathered into
  the single-process layout under expert parallelism, so a run resumes on any number of ranks);
- the RNG state (router noise and dropout continue the interrupted stream);
- ``config``: the job's configuration (as ``config.json`` holds it); resuming under another
  configuration is refused, naming the keys that differ;
- ``fingerprint``: plain data describing the data the job loaded (its vocabulary, and
  ``moekit.data.fingerprint``'s path, size and content hash of what was read); resuming on
  different data is refused, naming what differs.

Checkpoints are ``checkpoints/step_XXXXXXXX.pt`` numbered by the steps done over all runs, written
atomically by rank 0 and read with ``weights_only=True`` (``moekit.train.checkpoint``). The last
``KEEP`` are kept: when the newest cannot be read (truncated by a full disk, damaged, not a
checkpoint), ``restore`` says so, moves it aside to ``*.unreadable`` and continues from the
newest one that can be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from moekit.train.loop import TrainState
from moekit.train.outdir import (
    OutDirError,
    checkpoint_path,
    config_differences,
    config_digest,
    list_checkpoints,
    normalise_config,
    prune_checkpoints,
)
from moekit.train.runtime import warn
from moekit.train.strategy import SINGLE_PROCESS, SingleProcess

FORMAT = 2  # the layout of a session checkpoint; a file of another layout is refused
KEEP = 2  # checkpoints kept: the newest, and the one to fall back to when the newest is unreadable
UNREADABLE_SUFFIX = ".unreadable"
# What a session checkpoint holds, and the types a usable one has.
_LAYOUT: dict[str, tuple[type, ...]] = {"finished": (dict,), "steps_done": (int,), "current": (dict, type(None)),
                                        "rng": (dict,), "config": (dict, type(None))}
_CURRENT_LAYOUT: dict[str, tuple[type, ...]] = {"name": (str,), "state": (dict,), "model": (dict,),
                                                "optimizer": (dict, type(None))}


class Session:
    """The checkpointed state of a job in ``out`` (see the module docstring)."""

    def __init__(self, out: str | Path, fingerprint: Any = None, strategy: SingleProcess = SINGLE_PROCESS,
                 config: dict[str, Any] | None = None):
        self.out, self.fingerprint, self.strategy = Path(out), fingerprint, strategy
        self.config = None if config is None else normalise_config(config)
        self.finished: dict[str, Any] = {}
        self.steps_done = 0  # the steps of the finished runs
        self._pending: dict[str, Any] | None = None  # the run in progress read from a checkpoint

    def restore(self, path: str | Path) -> Path:
        """Continue from the checkpoint at ``path`` (read on every rank); returns the one used.

        When ``path`` cannot be read (``CheckpointError``), the earlier checkpoints of the same
        directory are tried, newest first; each one passed over is reported and moved aside (by
        rank 0). Raises ``OutDirError`` naming the file and the reason when none can be read, or
        when the one read was made by another configuration, from other data, or by another
        version of moekit (those are refusals: an older checkpoint of the same run would differ
        in the same way).
        """
        path = Path(path)
        step = _step_of(path)
        older = [p for p in reversed(list_checkpoints(path.parent.parent)) if step is not None and
                 (s := _step_of(p)) is not None and s < step]
        passed_over: list[tuple[Path, CheckpointError]] = []
        for candidate in [path, *older]:
            try:
                ckpt = _read(candidate)
            except CheckpointError as e:
                passed_over.append((candidate, e))
                continue
            self._check_matches(candidate, ckpt)
            if passed_over:
                self._pass_over(passed_over, candidate)
            self.finished, self.steps_done, self._pending = ckpt["finished"], ckpt["steps_done"], ckpt["current"]
            if self._pending is not None:
                self._pending["rng"] = ckpt["rng"]
            return candidate
        reasons = "; ".join(str(e) for _, e in passed_over)
        raise OutDirError(f"cannot resume: no readable checkpoint ({reasons}); rerun with --force (without --resume) "
                          "to start over")

    def _check_matches(self, path: Path, ckpt: dict[str, Any]) -> None:
        """``OutDirError`` unless ``ckpt`` was made by this configuration from this data."""
        if self.config is not None and ckpt["config"] != self.config:
            old = ckpt["config"] or {}
            raise OutDirError(f"checkpoint {str(path)!r} was made by a different configuration "
                              f"({config_differences(old, self.config) or 'recorded none'}); it belongs to another "
                              "run: rerun with --force to start over, or choose another --out")
        if ckpt["fingerprint"] != self.fingerprint:
            what = describe_differences(ckpt["fingerprint"], self.fingerprint)
            data = self.fingerprint.get("data") if isinstance(self.fingerprint, dict) else None
            if isinstance(data, dict) and data.get("path"):
                what = f"{data['path']!r}: {what}"
            raise OutDirError(f"checkpoint {str(path)!r} was made from different data ({what}); resume it on the "
                              "data it started from, or rerun with --force to start over")

    def _pass_over(self, passed_over: list[tuple[Path, CheckpointError]], used: Path) -> None:
        for path, error in passed_over:
            warn(f"warning: {error}; resuming from the previous checkpoint {used.name} instead "
                 f"(the unreadable file is moved to {path.name}{UNREADABLE_SUFFIX})")

        def move_aside() -> None:
            # Out of the way of later resumes and of the pruning of the two newest checkpoints.
            for path, _ in passed_over:
                try:
                    if path.exists():
                        path.replace(path.with_name(path.name + UNREADABLE_SUFFIX))
                except OSError as e:  # the resume can go on; the next one will pass over it again
                    warn(f"warning: cannot move {str(path)!r} aside: {e.strerror or e}")

        self.strategy.main_only(move_aside)

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
        # The whole configuration, to name what differs on a refused resume, and its digest for tools.
        digest = None if self.config is None else config_digest(self.config)
        ckpt = {"format": FORMAT, "config": self.config, "config_sha256": digest, "fingerprint": self.fingerprint,
                "finished": self.finished, "steps_done": self.steps_done, "current": current,
                "rng": self.strategy.capture_rng()}

        def write() -> None:
            save_checkpoint(checkpoint_path(self.out, total), ckpt)
            prune_checkpoints(self.out, keep=KEEP)

        self.strategy.main_only(write)

    def finish(self, name: str, state: TrainState, result: Any) -> None:
        """Record run ``name``'s result and checkpoint (the run's weights go only where ``result`` holds them)."""
        self.finished[name] = result
        self.steps_done += state.step
        self.save()


def _step_of(path: Path) -> int | None:
    name = path.name
    if name.startswith("step_") and name.endswith(".pt") and name[5:-3].isdigit():
        return int(name[5:-3])
    return None


def _read(path: Path) -> dict[str, Any]:
    """A session checkpoint whose layout is usable; ``CheckpointError`` otherwise, ``OutDirError``
    for a session checkpoint of another format (moekit version)."""
    ckpt = load_checkpoint(path)
    fmt = ckpt.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a moekit session checkpoint (it has no format number)")
    if fmt != FORMAT:
        raise OutDirError(f"checkpoint {str(path)!r} has format {fmt}, and this moekit reads format {FORMAT}: it was "
                          "written by another version; rerun with --force to start over")
    _check_layout(path, ckpt, _LAYOUT, "")
    if "fingerprint" not in ckpt:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a complete session checkpoint (no 'fingerprint')")
    if ckpt["current"] is not None:
        _check_layout(path, ckpt["current"], _CURRENT_LAYOUT, "current.")
    return ckpt


def _check_layout(path: Path, d: dict[str, Any], layout: dict[str, tuple[type, ...]], prefix: str) -> None:
    for key, types in layout.items():
        if key not in d:
            raise CheckpointError(f"checkpoint {str(path)!r} is not a complete session checkpoint (no '{prefix}{key}')")
        if not isinstance(d[key], types):
            raise CheckpointError(f"checkpoint {str(path)!r} is damaged ('{prefix}{key}' is a "
                                  f"{type(d[key]).__name__})")


def describe_differences(old: Any, new: Any, prefix: str = "") -> str:
    """What differs between two fingerprints (plain data), briefly: ``key: old -> new; ...``."""
    if isinstance(old, dict) and isinstance(new, dict):
        parts = [describe_differences(old.get(k), new.get(k), f"{prefix}{k}.")
                 for k in sorted(set(old) | set(new), key=str) if old.get(k) != new.get(k)]
        return "; ".join(p for p in parts if p)
    name = prefix[:-1] or "fingerprint"
    if isinstance(old, list | tuple) and isinstance(new, list | tuple):
        return f"{name}: {len(old)} entries -> {len(new)} entries" + ("" if len(old) != len(new) else ", some differ")
    return f"{name}: {_short(old)} -> {_short(new)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
