"""``moekit bench``: the command-line front of the layer benchmark in the source tree's benchmarks/.

The benchmark code (timing utility, baselines) lives outside the package, beside the results it
produces, so this front needs a source checkout; it says so when there is none.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

BENCH_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_layer.py"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="also write the raw results to this file")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the benchmark runs, measures nothing")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per configuration (default: 5)")
    parser.add_argument("--only", metavar="TEXT", help="run only configurations whose name contains TEXT")


def load_benchmark():
    if not BENCH_FILE.is_file():
        raise FileNotFoundError(f"moekit bench runs from a source checkout: {BENCH_FILE} not found")
    spec = importlib.util.spec_from_file_location("bench_layer", BENCH_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_layer"] = module
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> int:
    bench = load_benchmark()
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
    return bench.main(argv)
