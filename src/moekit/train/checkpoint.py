"""Atomic checkpoints that never execute code on load, and RNG state capture.

A checkpoint is a dict of tensors, numbers, strings, None and nested dicts/lists/tuples, so that
``torch.load(..., weights_only=True)`` can read it: loading a checkpoint cannot run code from it.

Two errors are the user's to fix, each naming its file: ``WriteError`` (a write into the out
directory failed: no space, read-only, no permission) and ``CheckpointError`` (a file cannot be
read as a checkpoint: truncated, empty, garbage, or more than plain data).
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import torch


class WriteError(OSError):
    """Writing a file failed for a reason of the file system (full, read-only, no permission, ...);
    the message names the file. An ``OSError``, with the original ``errno``."""

    def __init__(self, path: str | Path, cause: OSError):
        reason = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(cause.errno, f"cannot write {str(path)!r}: {reason}")
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.strerror)  # the message alone, without OSError's "[Errno N]"


class CheckpointError(ValueError):
    """A file cannot be used as a checkpoint (truncated, empty, garbage, not plain data, not a
    checkpoint of this kind); the message names the file and why."""


# The name atomic_write gives its temporary file: ".NAME.PID.HEX8.tmp" beside the target.
_TEMPORARY_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Create or replace ``path`` atomically with what ``write(file)`` writes.

    The data goes to a temporary file in the same directory (so the rename cannot cross file
    systems), is flushed to disk, and then replaces ``path`` in one step: a reader sees either
    the old file or the complete new one, never a partial write. A failure of the file system
    (e.g. no space left) raises ``WriteError`` naming ``path``; the old file is kept. Only a
    process killed during the write (SIGKILL) leaves its temporary file behind, which
    ``remove_temporaries`` clears.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    recorder = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # open(..., "xb") rather than mkstemp: the file gets the usual umask permissions, not 0600.
        with open(tmp, "xb") as f:
            recorder = _Recorder(f)
            write(cast(BinaryIO, recorder))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # Also on KeyboardInterrupt: an interrupted write must not leave a stray temporary file.
        _unlink_quietly(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, e) from e
        if recorder is not None and recorder.error is not None and not isinstance(e, KeyboardInterrupt):
            # The writer turned the file system's error into its own (torch.save: a RuntimeError).
            raise WriteError(path, recorder.error) from e
        raise
    _fsync_dir(path.parent)
    return path


class _Recorder:
    """The file a writer callback gets: keeps the ``OSError`` a write or flush raises, since a
    writer may report it as an error of its own (torch.save raises a RuntimeError that names
    neither the file nor the cause)."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:  # seek, tell, fileno, ...: the file's own
        return getattr(self._f, name)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # e.g. the directory was never created; the original error is the one to report
        pass


def remove_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files that ``atomic_write`` left in ``directory`` when its process was
    killed mid-write (they can be as large as a checkpoint); returns them.

    Only call this while no other process writes there (``moekit.train.lock`` ensures it for an
    out directory): a temporary file of a live writer would be deleted under it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        if _TEMPORARY_RE.match(path.name) and path.is_file():
            _unlink_quietly(path)
            removed.append(path)
    return removed


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

    A file holding anything but plain data (e.g. a pickled arbitrary object) is refused; nothing
    in it is executed. That, and every other reason a file cannot be read as a checkpoint
    (missing, empty, truncated, garbage, not a dict), raises ``CheckpointError`` (a
    ``ValueError``) naming the file and the reason.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            archive = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {e.strerror or e}") from e
    if size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every way torch.load meets a bad file means the same to the user
        if isinstance(e, OSError) and e.errno not in (None, errno.EINVAL):  # EINVAL: a short read of a cut file
            raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {e.strerror or e}") from e
        if not archive:
            raise CheckpointError(f"{str(path)!r} is not a checkpoint (not a torch.save archive)") from e
        if isinstance(e, pickle.UnpicklingError):
            raise CheckpointError(f"refusing to load checkpoint {str(path)!r}: it holds more than plain data "
                                  "(weights_only refused it; nothing in it was run)") from e
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged or truncated ({size} bytes; torch.load: "
                              f"{type(e).__name__})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a dict")
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
