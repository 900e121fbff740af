"""Atomic checkpoints that never execute code on load, and RNG state capture.

A checkpoint is a dict of tensors, numbers, strings, None and nested dicts/lists/tuples, so that
``torch.load(..., weights_only=True)`` can read it: loading a checkpoint cannot run code from it.
"""

from __future__ import annotations

import os
import pickle
import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import torch


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Create or replace ``path`` atomically with what ``write(file)`` writes.

    The data goes to a temporary file in the same directory (so the rename cannot cross file
    systems), is flushed to disk, and then replaces ``path`` in one step: a reader sees either
    the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # open(..., "xb") rather than mkstemp: the file gets the usual umask permissions, not 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: an interrupted write must not leave a stray temporary file.
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda f: torch.save(state, f))


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory for this.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` with ``weights_only=True``.

    A file holding anything but plain data (e.g. a pickled arbitrary object) is refused with a
    ``ValueError`` naming the file; nothing in it is executed.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing to load checkpoint {str(path)!r}: it holds more than plain data") from e
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a dict")
    return state


def capture_rng_state() -> dict[str, Any]:
    """The state of the torch (CPU and CUDA), numpy and Python generators, as plain data."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = cast(tuple[str, np.ndarray, int, int, float],
                                                            np.random.get_state(legacy=True))
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": py_version,
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``capture_rng_state`` captured."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["internal"].tolist()), py_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
