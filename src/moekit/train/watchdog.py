"""Say which rank the others are waiting for, long before a collective times out.

A rank that is stopped (SIGSTOP, a debugger), hung, or slow to arrive leaves every other rank
blocked in the next collective, silently, until the collective's timeout (``--timeout``, 300 s by
default) ends the run. ``Watchdog`` makes the wait visible after ``after_s`` seconds:

- the main thread marks each point where the ranks meet (``enter(label)``: a training step, the
  stop flag's all-reduce, a checkpoint's gather, ...); every rank marks the same points in the
  same order, so the number of marks passed is comparable between ranks;
- a daemon thread on each rank publishes its count, its label and a heartbeat in the process
  group's key-value store every ``interval_s``, and when its own count has not moved for
  ``after_s`` it reads the others' and reports the ranks that are *behind* (a smaller count: they
  have not reached this point) or *silent* (a heartbeat that stopped: the process is stopped or
  hung), naming each one's last point seen. The main thread never touches the store (no cost per
  step), so a rank stopped between two publications is seen at its last published point.

Ranks that are all at the same point and alive are working (e.g. rank 0 writing a report while the
others wait in its broadcast); that is not reported.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

PREFIX = "moekit/watchdog/"


class Watchdog:
    """See the module docstring.

    Args:
        store: a ``torch.distributed`` store shared by the ranks (the process group's).
        rank, world_size: this process and the group.
        after_s: report a wait at this point after this many seconds, and again every ``after_s``.
        timeout_s: the collectives' timeout, quoted in the report.
        interval_s: how often the thread publishes and looks (default ``min(1, after_s / 4)``).
        report: where a report goes (default: a line on stderr).
        clock: the time source (seconds; tests drive it by hand).
    """

    def __init__(self, store: Any, rank: int, world_size: int, after_s: float, timeout_s: float | None = None,
                 interval_s: float | None = None, report: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if not after_s > 0:
            raise ValueError(f"after_s={after_s} must be > 0")
        self.store, self.rank, self.world_size = store, rank, world_size
        self.after_s, self.timeout_s = after_s, timeout_s
        self.interval_s = interval_s if interval_s is not None else min(1.0, after_s / 4)
        self.report = report or _to_stderr
        self.clock = clock
        # Written by the main thread in one assignment (atomic under the GIL), read by the thread.
        self._mark: tuple[int, str, float] = (0, "start-up", clock())
        self._beat = 0
        self._others: dict[int, tuple[Any, float]] = {}  # rank -> (its last record, when it last changed)
        self._reported_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the main thread ---------------------------------------------------------------------------

    def enter(self, label: str) -> None:
        """This rank reaches the next point where the ranks meet (``label`` says which, in words)."""
        count = self._mark[0] + 1
        self._mark = (count, label, self.clock())

    def start(self) -> Watchdog:
        self.publish()
        self._thread = threading.Thread(target=self._run, name=f"moekit-watchdog-rank{self.rank}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (before the process group, and with it the store, goes away)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval_s + 1)
            self._thread = None

    # --- the thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                message = self.check()
            except Exception:  # noqa: BLE001 - the store went away with the group: nothing left to watch
                return
            if message:
                self.report(message)

    def publish(self) -> None:
        count, label, _ = self._mark
        self._beat += 1
        self.store.set(f"{PREFIX}{self.rank}", json.dumps({"count": count, "label": label, "beat": self._beat}))

    def check(self) -> str | None:
        """Publish this rank's record, read the others'; the report to make now, if any."""
        self.publish()
        now = self.clock()
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            key = f"{PREFIX}{rank}"
            record = json.loads(self.store.get(key)) if self.store.check([key]) else None
            last = self._others.get(rank)
            if last is None or last[0] != record:
                self._others[rank] = (record, now)
        count, label, since = self._mark
        waited = now - since
        if waited < self.after_s:
            self._reported_at = None
            return None
        if self._reported_at is not None and now - self._reported_at < self.after_s:
            return None
        stale_s = 3 * self.interval_s
        late = []
        for rank, (record, changed_at) in sorted(self._others.items()):
            silent_s = now - changed_at
            if record is None:
                late.append(f"rank {rank} (no word from it{_for(silent_s, stale_s)})")
            elif record["count"] < count or silent_s >= stale_s:
                where = "behind: last seen at" if record["count"] < count else "last seen at"
                late.append(f"rank {rank} ({where} {record['label']}{_for(silent_s, stale_s, '; silent')})")
        if not late:
            return None  # everyone is here and alive: a rank is still working (e.g. rank 0 writing)
        self._reported_at = now
        timeout = f"; the collective times out after {self.timeout_s:g} s (--timeout)" if self.timeout_s else ""
        return (f"moekit: rank {self.rank} has waited {waited:.0f} s in {label} for "
                f"{', '.join(late)}{timeout}")


def _for(seconds: float, stale_s: float, prefix: str = "") -> str:
    if seconds < stale_s:
        return ""
    return f"{prefix} for {seconds:.0f} s: stopped or hung?" if prefix else f" for {seconds:.0f} s"


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def group_store() -> Any:
    """The default process group's store, under this module's prefix (None when torch has none to offer)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    get = getattr(distributed_c10d, "_get_default_store", None)  # private, but stable since torch 1.x
    if get is None or not dist.is_initialized():
        return None
    try:
        return get()
    except RuntimeError:
        return None


class JoinWatch:
    """Before the ranks have a store: report a start-up that waits ``after_s`` for the others to join
    (a rank that never starts keeps them in ``init_process_group`` until its timeout)."""

    def __init__(self, rank: int | str, world_size: int | str, after_s: float, timeout_s: float,
                 report: Callable[[str], None] | None = None):
        self.rank, self.world_size, self.after_s, self.timeout_s = rank, world_size, after_s, timeout_s
        self.report = report or _to_stderr
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moekit-join-watch", daemon=True)

    def __enter__(self) -> JoinWatch:
        if self.after_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=1)

    def _run(self) -> None:
        waited = 0.0
        while not self._done.wait(self.after_s):
            waited += self.after_s
            self.report(f"moekit: rank {self.rank} has waited {waited:.0f} s for the other ranks of {self.world_size} "
                        f"to join the process group (a rank that did not start?); it gives up after "
                        f"{self.timeout_s:g} s (--timeout)")
