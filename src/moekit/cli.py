"""The ``moekit`` command line: one subcommand per job, each writing into ``--out DIR``.

A job is registered in ``JOBS`` with a help line, its default out directory and the module
that provides ``add_args(parser)`` (its own options) and ``run(args) -> int``. The options every
job shares (``--out --seed --quiet --resume --force --device``) are added here.

One error path for every job: a user error (a bad option value, unreadable or inconsistent data,
a busy or unwritable ``--out``, an unusable checkpoint) ends the command with one line on stderr,
``moekit JOB: error: ...`` naming the value or file, and exit status 2; Ctrl-C ends it with
status 130. A traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence
from typing import NamedTuple, NoReturn

import torch

import moekit
from moekit.data import DataFileError, MissingDataError
from moekit.jobs import options
from moekit.memory import keep_freed_memory
from moekit.train.checkpoint import CheckpointError, WriteError
from moekit.train.lock import release_out_dirs
from moekit.train.outdir import ConfigError, OutDirError
from moekit.train.runtime import is_main_process

# Errors that are the user's to fix: printed as one line, no traceback.
USER_ERRORS = (ConfigError, OutDirError, MissingDataError, DataFileError, CheckpointError, WriteError)
DEVICE_TYPES = ("cpu", "cuda", "mps")


class Job(NamedTuple):
    help: str
    module: str  # a moekit.jobs package (or moekit.bench.cli) with add_args(parser) and run(args) -> int
    default_out: str


JOBS: dict[str, Job] = {
    "demo": Job(
        "train a small MoE language model on the King James Bible, then compare lstm-4x with moe-32"
        " (about two minutes on 2 CPU cores)",
        "moekit.jobs.demo",
        "runs/demo",
    ),
    "bench": Job(
        "benchmark the MoE layer against the dense-FLOPs limit and baseline dispatchers",
        "moekit.bench.cli",
        "runs/bench",
    ),
    "ensemble": Job(
        "dense ViT vs V-MoE vs E^3 vs deep ensemble: accuracy, calibration, OOD detection, FLOPs",
        "moekit.jobs.ensemble",
        "runs/ensemble",
    ),
    "facts": Job(
        "capacity probe: how many random key -> value facts dense and MoE models store at equal ops per token",
        "moekit.jobs.facts",
        "runs/facts",
    ),
    "lm": Job(
        "the LSTM-MoE language model of Shazeer et al. 2017 vs compute-matched dense models",
        "moekit.jobs.lm",
        "runs/lm",
    ),
    "patterns": Job(
        "SPMoE: K distinct outputs per input, against top-K beam search, K samples and hMoEup",
        "moekit.jobs.patterns",
        "runs/patterns",
    ),
    "upcycle": Job(
        "sparse upcycling: a small dense Llama trained, then continued dense or upcycled into an MoE"
        " (needs moekit[hf])",
        "moekit.jobs.upcycle",
        "runs/upcycle",
    ),
}


class UsageError(ConfigError):
    """A command line argparse cannot read (unknown option, bad value); ``prog`` is the (sub)command."""

    def __init__(self, prog: str, message: str):
        super().__init__(f"{message} (see {prog} --help)")
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse whose errors take the one error path of the jobs (argparse would print its usage
    and exit from inside ``parse_args``)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def _device(name: str) -> str:
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"unknown device {name!r}") from e
    if device.type not in DEVICE_TYPES:
        raise argparse.ArgumentTypeError(f"device {name!r}: the jobs train on {', '.join(DEVICE_TYPES)} (or auto)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"device {name!r}: CUDA is not available in this torch build or machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"device {name!r}: MPS is not available in this torch build or machine")
    return name


def _add_common(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--out", default=default_out, metavar="DIR", help=f"output directory (default: {default_out})")
    parser.add_argument("--seed", type=options.seed, default=0,
                        help=f"random seed, 0 to {options.MAX_SEED} (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or status messages")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--force", action="store_true", help="overwrite an --out that holds a different run")
    parser.add_argument(
        "--device",
        type=_device,
        default="auto",
        help="torch device, e.g. cpu or cuda:0 (default: auto = cuda if available)",
    )
    parser.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="keep (default): glibc keeps freed memory for reuse, as jemalloc and tcmalloc do, instead of "
        "page-faulting every large tensor in again each step (the process keeps its peak footprint); "
        "default: the C library as configured",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moekit", description="Sparse mixture-of-experts layers, models and experiments.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {moekit.__version__}")
    sub = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    for name, job in JOBS.items():
        p = sub.add_parser(name, help=job.help, description=job.help)
        _add_common(p, job.default_out)
        importlib.import_module(job.module).add_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moekit`` console script; returns the exit status (2: a user error,
    printed as one line; 130: interrupted)."""
    name = "moekit"
    try:
        args, unknown = build_parser().parse_known_args(argv)
        name = f"moekit {args.job}"
        if unknown:  # named by the job's parser, whose --help lists the options it takes
            raise UsageError(name, f"unrecognized arguments: {' '.join(unknown)}")
        if args.malloc == "keep":
            keep_freed_memory()
        job = importlib.import_module(JOBS[args.job].module)
        return job.run(args)
    except USER_ERRORS as e:
        if _first_rank():
            print(f"{getattr(e, 'prog', name)}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        if _first_rank():
            print(f"{name}: error: out of memory ({_allocation(e)}): lower --batch-size, --seq-len or the model's "
                  "size (a new configuration: --force starts over), or free memory and continue with --resume",
                  file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        detail = f" ({e})" if str(e) else ""
        if _first_rank():
            print(f"{name}: interrupted{detail}; rerun with --resume to continue", file=sys.stderr)
        return 130
    finally:
        release_out_dirs()


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocator's refusal (CPU or CUDA), not a bug."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(error)


def _allocation(error: BaseException) -> str:
    """The size the allocator refused, as it said it, or its first line."""
    match = re.search(r"tried to allocate (\d+) bytes", str(error))
    if match:
        return f"an allocation of {int(match.group(1)) / 2**30:.1f} GiB was refused"
    return one_line(error).split(". ")[0][:200]


def one_line(error: BaseException) -> str:
    """The error's message on one line (a message from a library may hold several)."""
    return " ".join(str(error).split()) or type(error).__name__


def _first_rank() -> bool:
    # Under torchrun every rank meets the same error; one message is enough.
    return is_main_process()
