"""The out directory of a run: exclusive use, configuration check, fresh start or resume, checkpoint files.

Layout: ``.lock`` (while a run uses the directory: ``moekit.train.lock``), ``config.json`` (written
first), ``checkpoints/step_XXXXXXXX.pt`` (the last two), and at the end of a run ``metrics.json``,
``report.md`` and plots. ``metrics.json`` is written last, so its presence marks a finished run.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from moekit.train.checkpoint import atomic_write, remove_temporaries
from moekit.train.lock import LOCK_FILE, OutDirBusy, describe_holder, is_locked_here, lock_out_dir, release_lock

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_RE = re.compile(r"^step_(\d+)\.pt$")


class OutDirError(ValueError):
    """The out directory cannot be used as asked (different config, unfinished run, ...)."""


class ConfigError(ValueError):
    """A job's configuration is invalid (e.g. k larger than the number of experts)."""


def prepare_out_dir(out: str | Path, config: dict[str, Any], *, resume: bool, force: bool) -> Path | None:
    """Make ``out`` ready for a run of ``config``; return the checkpoint to resume from, if any.

    - ``out`` is created if needed and locked for the rest of the process's run
      (``moekit.train.lock``): a directory another live run holds is refused, ``force`` or not.
      Temporary files of writes killed in an earlier run are removed.
    - A directory holding a run of a different configuration is refused unless ``force``,
      which starts over.
    - With the same configuration, ``resume`` continues from the latest checkpoint. Without it a
      finished run is started over (it would be recomputed identically), while an unfinished
      one is refused, so that its completed steps are not thrown away by accident.
    - A non-empty directory that holds no run is refused unless ``force``.

    Every refusal, and a directory that cannot be created or written, is an ``OutDirError``
    naming the directory.
    """
    out = Path(out)
    config = normalise_config(config)
    already_held = is_locked_here(out)
    _lock(out)
    try:
        return _prepare_locked(out, config, resume=resume, force=force)
    except BaseException:
        if not already_held:  # a refused run must not keep the directory from the next one
            release_lock(out)
        raise


def _lock(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = lock_out_dir(out)
    except OutDirBusy as e:
        raise OutDirError(str(e)) from None
    except OSError as e:  # a file where a parent directory should be, read-only, no permission, full
        raise OutDirError(f"cannot use --out {str(out)!r}: {e.strerror or e}") from None
    if lock.took_over is not None:
        print(f"note: {str(out)!r} was locked by {describe_holder(lock.took_over)}, which has ended without "
              "releasing it; taking it over", file=sys.stderr)
    # Nobody else writes here now: temporary files are what killed writes left behind.
    for directory in (out, out / CHECKPOINT_DIR):
        remove_temporaries(directory)


def _prepare_locked(out: Path, config: dict[str, Any], *, resume: bool, force: bool) -> Path | None:
    old = _read_config(out)
    if old is not None and old != config:
        if not force:
            raise OutDirError(
                f"{str(out)!r} holds a run with a different configuration ({config_differences(old, config)}); "
                "pass --force to overwrite it, or choose another --out"
            )
        _clear_run(out)
        resume = False
    elif old is not None and not resume:
        latest = latest_checkpoint(out)
        if latest is not None and not (out / METRICS_FILE).exists() and not force:
            raise OutDirError(
                f"{str(out)!r} holds an unfinished run (last checkpoint {latest.name}); pass --resume "
                "to continue it, or --force to start over"
            )
        _clear_run(out)
    elif old is None and any(p.name != LOCK_FILE for p in out.iterdir()) and not force:
        raise OutDirError(
            f"{str(out)!r} is not empty and holds no {CONFIG_FILE}; choose an empty or new "
            "directory, or pass --force to write into it"
        )
    write_json(out / CONFIG_FILE, config)
    return latest_checkpoint(out) if resume else None


def config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of ``config`` as ``config.json`` holds it (keys sorted): what a checkpoint records."""
    return hashlib.sha256(json.dumps(normalise_config(config), sort_keys=True).encode()).hexdigest()


def normalise_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as it reads back from ``config.json``: JSON turns tuples into lists and keys into strings."""
    return json.loads(json.dumps(config, sort_keys=True))


def _read_config(out: Path) -> dict[str, Any] | None:
    path = out / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"<unreadable config.json>": True}
    except OSError as e:
        raise OutDirError(f"cannot read {str(path)!r}: {e.strerror or e}") from None


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The keys whose values differ, as ``key: old -> new; ...``."""
    keys = sorted(set(old) | set(new))
    changed = [
        f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
        for k in keys
        if old.get(k, "<unset>") != new.get(k, "<unset>")
    ]
    return "; ".join(changed)


def _clear_run(out: Path) -> None:
    for name in (METRICS_FILE, REPORT_FILE):
        (out / name).unlink(missing_ok=True)
    for path in list_checkpoints(out):
        path.unlink()
    if (out / CHECKPOINT_DIR).is_dir():  # checkpoints a resume found unreadable and moved aside
        for path in (out / CHECKPOINT_DIR).glob("step_*.pt.unreadable"):
            path.unlink()


def checkpoint_path(out: str | Path, step: int) -> Path:
    return Path(out) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Checkpoint files of a run, oldest step first."""
    directory = Path(out) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    found = [(int(m[1]), p) for p in directory.iterdir() if (m := _CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def prune_checkpoints(out: str | Path, keep: int = 2) -> None:
    """Delete all but the ``keep`` most recent checkpoints (by step)."""
    for path in list_checkpoints(out)[:-keep]:
        path.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically, keys sorted."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file atomically: readers never see half a file."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
