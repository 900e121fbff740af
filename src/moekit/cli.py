"""The ``moekit`` command line: one subcommand per job, each writing into ``--out DIR``.

A job is registered in ``JOBS`` with a help line, its default out directory and the module
that provides ``add_args(parser)`` (its own options) and ``run(args) -> int``. The options every
job shares (``--out --seed --quiet --resume --force --device``) are added here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

import torch

import moekit
from moekit.data import DataFileError, MissingDataError
from moekit.memory import keep_freed_memory
from moekit.train.outdir import ConfigError, OutDirError
from moekit.train.runtime import is_main_process

# Errors that are the user's to fix: printed as one line, no traceback.
USER_ERRORS = (ConfigError, OutDirError, MissingDataError, DataFileError)


class Job(NamedTuple):
    help: str
    module: str  # a package of moekit.jobs (or moekit.bench) providing add_args(parser) and run(args) -> int
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
        "moekit.bench",
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
}


def _device(name: str) -> str:
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"unknown device {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {name!r}: CUDA is not available in this torch build or machine")
    return name


def _add_common(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--out", default=default_out, metavar="DIR", help=f"output directory (default: {default_out})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
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
    parser = argparse.ArgumentParser(
        prog="moekit", description="Sparse mixture-of-experts layers, models and experiments."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {moekit.__version__}")
    sub = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    for name, job in JOBS.items():
        p = sub.add_parser(name, help=job.help, description=job.help)
        _add_common(p, job.default_out)
        importlib.import_module(job.module).add_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moekit`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.malloc == "keep":
        keep_freed_memory()
    job = importlib.import_module(JOBS[args.job].module)
    try:
        return job.run(args)
    except USER_ERRORS as e:
        if _first_rank():
            print(f"moekit {args.job}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        detail = f" ({e})" if str(e) else ""
        if _first_rank():
            print(f"moekit {args.job}: interrupted{detail}; rerun with --resume to continue", file=sys.stderr)
        return 130


def _first_rank() -> bool:
    # Under torchrun every rank meets the same error; one message is enough.
    return is_main_process()
