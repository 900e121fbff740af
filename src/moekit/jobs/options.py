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


class PresetOptions:
    """A job's options that a preset sizes: ``--name VALUE`` for each entry of ``table``
    ({name: (type, help)}), defaulting to ``fixed[name]`` or else the preset's value; an option
    given on the command line wins over both."""

    def __init__(self, table: dict[str, tuple[Callable[[str], Any], str]], fixed: dict[str, Any]):
        self.table, self.fixed = table, fixed

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        for name, (kind, text) in self.table.items():
            default = self.fixed.get(name)
            shown = f"default: {default}" if default is not None else "default: from --preset"
            parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"{text} ({shown})")

    def defaults(self, preset: dict[str, Any]) -> dict[str, Any]:
        """What a run of ``preset`` takes when no option is given."""
        return {**self.fixed, **preset}

    def values(self, args: argparse.Namespace, preset: dict[str, Any]) -> dict[str, Any]:
        """The defaults of ``preset`` with the options given on the command line."""
        given = {name: getattr(args, name) for name in self.table if getattr(args, name) is not None}
        return {**self.defaults(preset), **given}

    def words(self, cfg: Any, preset: dict[str, Any]) -> list[str]:
        """The options that bring ``preset``'s defaults to ``cfg``'s values, as command-line words."""
        defaults = self.defaults(preset)
        words: list[str] = []
        for name in self.table:
            if getattr(cfg, name) != defaults[name]:
                words += [f"--{name.replace('_', '-')}", f"{getattr(cfg, name):g}"]
        return words
