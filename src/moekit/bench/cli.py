"""``moekit bench``: the layer benchmark (``moekit.bench.layer``) as a job writing into ``--out``."""

from __future__ import annotations

import argparse
from pathlib import Path

from moekit.bench import layer


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="also write the raw results to this file")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the benchmark runs, measures nothing")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per configuration (default: 5)")
    parser.add_argument("--only", metavar="TEXT", help="run only configurations whose name contains TEXT")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    argv = ["--threads", str(args.threads), "--repeats", str(args.repeats),
            "--json", str(args.json or out / "bench.json"), "--markdown", str(out / "bench.md")]
    if args.quick:
        argv.append("--quick")
    if args.only:
        argv += ["--only", args.only]
    argv += ["--malloc", args.malloc]
    if args.device != "auto":
        argv += ["--device", args.device]
    return layer.main(argv)
