"""Graceful stop of a training loop on SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequest:
    """Turns SIGINT/SIGTERM into a request to stop after the current step.

    Stopping between steps (rather than wherever the signal lands, e.g. halfway through an
    optimizer update) is what lets the checkpoint written on the way out hold only whole steps.
    A second signal interrupts at once. Signal handlers can only be set from the main thread;
    elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
