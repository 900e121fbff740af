"""Argument types for the jobs' command-line options: a bad value is refused as the command line is
read, with a message naming the option and the value (argparse adds the option's name).

Each type is a function ``str -> value`` raising ``argparse.ArgumentTypeError``; its ``__name__``
is the word argparse uses for text that is not a number at all ("invalid int value: 'x'").
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

# numpy's legacy generator (seeded by every job) takes seeds from 0 to 2**32 - 1; the jobs derive
# further seeds from it (seed + 1, seed * 1_000_003 + step, ...) that torch's 64-bit generators take.
MAX_SEED = 2**32 - 1
# torch accepts any thread count it can store and starts the threads only when it first needs
# them; far more threads than any machine has cores is a typo, not a setting.
MAX_THREADS = 1024


def _number(kind: type, test: Callable[[Any], bool], wanted: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)  # ValueError: argparse reports "invalid int/float value"
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
non_negative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
dropout_rate = _number(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")
seed = _number(int, lambda v: 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}")
threads = _number(int, lambda v: 1 <= v <= MAX_THREADS, f"an integer from 1 to {MAX_THREADS}")
threads_or_zero = _number(int, lambda v: 0 <= v <= MAX_THREADS, f"an integer from 0 to {MAX_THREADS}")
