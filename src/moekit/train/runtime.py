"""What every job needs from its surroundings: the device, seeding, console messages, the environment.

One copy of each, for every job: ``resolve_device``, ``seed_everything``, ``log`` and ``environment``.
"""

from __future__ import annotations

import os
import platform
import random
import sys

import numpy as np
import torch

import moekit


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; any other name is taken as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (CUDA's too, through torch)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a torchrun launch (whose messages would repeat rank 0's)."""
    return os.environ.get("RANK", "0") == "0"


def log(quiet: bool, message: str) -> None:
    """A status line on stderr, unless ``quiet`` (results go to stdout and files, never here)."""
    if not quiet:
        print(message, file=sys.stderr)


def warn(message: str) -> None:
    """A line on stderr that ``--quiet`` does not silence (something the user must know), from rank 0 only."""
    if is_main_process():
        print(message, file=sys.stderr)


def environment(device: torch.device | str) -> dict[str, str | int]:
    """Where a run ran, for its metrics.json and report."""
    return {
        "moekit": moekit.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
