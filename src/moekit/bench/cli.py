"""``moekit bench``: the layer benchmark (``moekit.bench.layer``) as a job writing into ``--out``."""

from __future__ import annotations

import argparse
from pathlib import Path

from moekit.bench import layer
from moekit.jobs import options
from moekit.train.lock import OutDirBusy, lock_out_dir
from moekit.train.outdir import ConfigError, OutDirError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="also write the raw results to this file")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the benchmark runs, measures nothing")
    parser.add_argument("--threads", type=options.threads, default=2, help="torch threads (default: 2)")
    parser.add_argument("--repeats", type=options.positive_int, default=5,
                        help="timed rounds per configuration (default: 5)")
    parser.add_argument("--only", metavar="TEXT", help="run only configurations whose name contains TEXT")
    parser.add_argument("--preset", choices=layer.PRESETS, default="auto",
                        help="cpu: the grid at D=512, F=1024; gpu: bfloat16 at Mixtral-8x7B's size and a "
                             "fine-grained E=64, k=8 one; auto (default): gpu with --device cuda, else cpu")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    device = "cpu" if args.device == "auto" else args.device  # the benchmark runs on the CPU unless told
    names = [case.name for case in layer.default_cases(args.quick, layer.resolve_preset(args.preset, device))]
    if args.only and not any(args.only in name for name in names):
        raise ConfigError(f"--only {args.only!r} matches no configuration; the names are: {'; '.join(names)}")
    # Fail now rather than after the measurements: --out must be usable, and no other run may write there.
    for directory in (out, (args.json or out / "bench.json").parent):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutDirError(f"cannot use {str(directory)!r} for the results: {e.strerror or e}") from None
    try:
        lock_out_dir(out)
    except OutDirBusy as e:
        raise OutDirError(str(e)) from None
    except OSError as e:
        raise OutDirError(f"cannot use --out {str(out)!r}: {e.strerror or e}") from None
    argv = ["--threads", str(args.threads), "--repeats", str(args.repeats),
            "--json", str(args.json or out / "bench.json"), "--markdown", str(out / "bench.md")]
    if args.quick:
        argv.append("--quick")
    if args.only:
        argv += ["--only", args.only]
    argv += ["--malloc", args.malloc, "--preset", args.preset]
    if args.device != "auto":
        argv += ["--device", args.device]
    return layer.main(argv)
