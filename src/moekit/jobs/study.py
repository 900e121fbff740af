"""Running a study: many ``moekit`` job runs, each in an out directory of its own.

The studies (``moekit.jobs.lm.scaling``, ``moekit.jobs.ensemble.study``,
``moekit.jobs.patterns.study``) plan their runs as ``(name, argv)`` pairs whose argv passes
``--resume``, so a study interrupted anywhere resumes run by run; ``run_jobs`` runs them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from moekit.jobs import options


def run_jobs(runs: Sequence[tuple[str, list[str]]], jobs: int, logs: Path | None = None,
             quiet: bool = False) -> None:
    """Run every ``moekit <argv>`` of ``runs`` [(name, argv)]; ``SystemExit`` naming the failed ones.

    ``jobs == 1``: one after the other in this process. Otherwise up to ``jobs`` at once, each as
    ``python -m moekit`` in a subprocess whose output goes to ``logs/<name>.log`` (or to this
    process's console when ``logs`` is None); a line per finished run says how long it took.
    """
    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    if jobs == 1:
        from moekit import cli

        for name, argv in runs:
            say(f"{name}: moekit {' '.join(argv)}")
            if cli.main(argv) != 0:
                raise SystemExit(f"study run {name} failed")
        return
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)

    def one(run: tuple[str, list[str]]) -> tuple[str, int, float]:
        name, argv = run
        start = time.monotonic()
        command = [sys.executable, "-m", "moekit", *argv]
        if logs is None:
            rc = subprocess.run(command, check=False).returncode
        else:
            with open(logs / f"{name}.log", "w") as log:
                rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        return name, rc, time.monotonic() - start

    failed = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for name, rc, seconds in pool.map(one, runs):
            say(f"{name}: {'done' if rc == 0 else f'FAILED ({rc})'} in {seconds:.0f} s")
            if rc:
                failed.append(name)
    if failed:
        where = f" (see {logs})" if logs is not None else ""
        raise SystemExit(f"study runs failed: {', '.join(failed)}{where}")


def add_study_args(parser: argparse.ArgumentParser) -> None:
    """The options every study shares: ``--out --jobs --threads --gather-only --quiet``."""
    parser.add_argument("--out", required=True, help="study directory: one sub-directory per point, the summary")
    parser.add_argument("--jobs", type=options.positive_int, default=2,
                        help="points run at once, as subprocesses (1: one after the other in this process)")
    parser.add_argument("--threads", type=options.threads, default=1, help="torch threads per point (default: 1)")
    parser.add_argument("--gather-only", action="store_true", help="only gather the finished points' results")
    parser.add_argument("--quiet", action="store_true")
