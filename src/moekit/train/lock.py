"""An exclusive lock on a run's out directory, held for the life of the run.

Two processes writing into one ``--out`` would leave a directory whose ``config.json`` describes
one run while its metrics and checkpoints hold the other's. ``lock_out_dir`` takes an advisory
``flock`` on ``OUT/.lock`` that a second process cannot take, whatever its options (``--force``
included): it is refused with the holder's pid, host, command and start time.

The kernel drops an ``flock`` when its process ends, however it ends (SIGKILL included), so a lock
left by a killed run is stale by construction: the next run takes it over and says so. The file
itself stays behind only in that case; a run that ends normally removes it.

Within one process a lock is taken once per directory and released by ``release_out_dirs`` (the
command line calls it on every exit) or when the process ends.

``flock`` works on local file systems and on NFS (where Linux maps it to a POSIX lock); on a file
system without locks a warning says that the directory is not protected.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not a POSIX system: no advisory locks
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
_HELD: dict[Path, OutDirLock] = {}


class OutDirBusy(RuntimeError):
    """Another live process holds the out directory's lock; the message names it."""


class OutDirLock:
    """The lock on one out directory (see the module docstring). Use ``lock_out_dir``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None
        self.took_over: dict[str, Any] | None = None  # the stale holder's record, when taken over

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutDirLock:
        """Take the lock, or raise ``OutDirBusy``. The directory must exist."""
        if fcntl is None:
            _warn(f"warning: cannot lock {str(self.directory)!r} on this platform; another run could write into it")
            return self
        for _ in range(10):  # retried only while a releasing holder removes the file under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_record(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutDirBusy(f"{str(self.directory)!r} is in use by another run ({describe_holder(holder)}); "
                                     "wait for it to end or choose another --out (--force does not override a "
                                     "running job)") from None
                _warn(f"warning: cannot lock {str(self.directory)!r} ({e.strerror}); another run could write into it")
                return self
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder released and removed the file between our open and flock
        else:
            raise OutDirBusy(f"could not lock {str(self.directory)!r}: its lock file keeps changing")
        previous = _read_record(fd)
        if previous and previous.get("pid") != os.getpid():
            self.took_over = previous  # its process is gone: the kernel dropped its lock
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (removal first, while still held: see ``acquire``)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # e.g. the directory went read-only; the lock still drops below
        os.close(self._fd)
        self._fd = None


def lock_out_dir(directory: str | Path) -> OutDirLock:
    """Hold the lock on ``directory`` (which must exist) until ``release_out_dirs`` or process exit.

    Taking it again in the same process returns the lock already held. Raises ``OutDirBusy``
    naming the holder when another live process has it.
    """
    key = Path(directory).resolve()
    lock = _HELD.get(key)
    if lock is not None and lock.held:
        return lock
    lock = OutDirLock(directory).acquire()
    if lock.held:
        _HELD[key] = lock
    return lock


def is_locked_here(directory: str | Path) -> bool:
    """Whether this process holds the lock on ``directory``."""
    lock = _HELD.get(Path(directory).resolve())
    return lock is not None and lock.held


def release_lock(directory: str | Path) -> None:
    """Release this process's lock on ``directory`` (a no-op when it holds none)."""
    lock = _HELD.pop(Path(directory).resolve(), None)
    if lock is not None:
        lock.release()


def release_out_dirs() -> None:
    """Release every out-directory lock this process holds."""
    while _HELD:
        _, lock = _HELD.popitem()
        lock.release()


atexit.register(release_out_dirs)  # a clean interpreter exit removes the lock files too


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _read_record(fd: int) -> dict[str, Any] | None:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        record = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe_holder(record: dict[str, Any] | None) -> str:
    """The holder recorded in a lock file, in words."""
    if not record:
        return "a process that has not written its name yet"
    return (f"pid {record.get('pid')} on {record.get('host')}, `{record.get('command')}`, "
            f"started {record.get('started')}")


def _command() -> str:
    # "moekit demo" for the console script; the program and its first argument otherwise.
    return " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:2]])


def _warn(message: str) -> None:
    print(message, file=sys.stderr)
