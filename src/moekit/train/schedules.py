"""Learning-rate schedules, as functions of the step index.

Every schedule here maps ``i``, the number of optimizer steps taken before the current one
(0 for the first step), to the learning rate of that step. The training loop sets it on every
parameter group before the step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

Schedule = Callable[[int], float]


def constant(lr: float) -> Schedule:
    """``lr`` at every step."""
    return lambda i: lr


def inverse_sqrt(lr: float, warmup: int) -> Schedule:
    """Linear warm-up to ``lr`` at step ``warmup``, then ``lr * sqrt(warmup / step)`` (Shazeer et al.
    2017, appendix C; steps counted from 1)."""

    def rate(i: int) -> float:
        step = i + 1
        return lr * min(step / warmup, math.sqrt(warmup / step))

    return rate


def warmup_cosine(lr: float, steps: int, warmup: int) -> Schedule:
    """Linear warm-up over ``warmup`` steps, then a cosine decay from ``lr`` to 0 at ``steps``."""

    def rate(i: int) -> float:
        if i < warmup:
            return lr * (i + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

    return rate


def warmup_cosine_floor(lr: float, steps: int, warmup: int, floor: float) -> Schedule:
    """``lr`` times a factor: a linear warm-up over ``warmup`` steps, then a cosine decay to ``floor``
    at ``steps`` (and ``floor`` after it)."""

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = min(1.0, (i - warmup) / max(1, steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return lambda i: lr * factor(i)
