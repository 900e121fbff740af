"""Why does hMoEup beat SPMoE on KJV -> WEB? ``python -m moekit.jobs.patterns.study --out DIR``.

Each candidate explanation is one change to SPMoE (or to the data), run as ``moekit patterns``
points of their own under ``DIR`` (so the study resumes point by point), then gathered into
``study.json``, ``study.md`` and ``study.png``:

- the baseline: SPMoE (linear adapter heads) and hMoEup, seeds 0 and 1;
- pattern heads of more capacity: SPMoE with a residual MLP adapter per pattern (``--head mlp``);
- the assignment: capacity factors 1.0 and 2.0 (2.0 at every seed), gate weights 0.3 and 3 (the
  gate weight is the inverse temperature of the likelihood in the assignment);
- a pre-trained backbone: BART-style denoising of the training texts before SPMoE and hMoEup
  are trained from it (``--pretrain-steps``), and SPMoE with capacity factor 2.0 on it;
- the one-to-one nature of the data: no English Bible but the KJV and the WEB is packaged for
  Debian, so the data side is measured on the synthetic set of K = 4 known rewrite rules, written
  twice with the same 100 test sources (all 4 references each): one-to-many (900 training sources
  with all 4 targets) and one-to-one (3,600 training sources with one target each, drawn at
  random among the 4 rules: the same number of pairs, but a source never shows two patterns).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.data.pairs import Example, synthetic_examples, write_jsonl
from moekit.jobs import options
from moekit.jobs.patterns.study_report import plot_study, study_markdown
from moekit.jobs.study import add_study_args, run_jobs

SYNTHETIC_K = 4
LOOSE = ("--capacity-factor", "2.0")


@dataclass(frozen=True)
class Point:
    """One ``moekit patterns`` run of the study: its out sub-directory, what it tests, its options."""

    name: str
    group: str
    args: tuple[str, ...]
    cost: float


def plan(seeds: int, pretrain_steps: int) -> list[Point]:
    """The study's runs, the most expensive first (so two workers finish together). Costs are in
    SPMoE trainings on KJV -> WEB."""
    both = ("--models", "spmoe,hmoe")
    points = []
    for seed in range(seeds):
        s = ("--seed", str(seed))
        points += [Point(f"kjv-base-seed{seed}", "baseline", (*both, *s), 2.2),
                   Point(f"kjv-mlp-head-seed{seed}", "MLP pattern heads", ("--models", "spmoe", "--head", "mlp", *s),
                         1.1),
                   Point(f"synthetic-one-to-many-seed{seed}", "one-to-many data", (*both, *s), 0.7),
                   Point(f"synthetic-one-to-one-seed{seed}", "one-to-one data", (*both, *s), 0.7)]
        # Capacity factor 2.0 at every seed; the other assignment settings at seed 0 only.
        points.append(Point("kjv-capacity-factor-2.0" + (f"-seed{seed}" if seed else ""), "capacity-factor 2.0",
                            ("--models", "spmoe", *LOOSE, *(s if seed else ())), 1.05))
    for flag, value in (("--capacity-factor", "1.0"), ("--gate-weight", "0.3"), ("--gate-weight", "3")):
        points.append(Point(f"kjv-{flag[2:]}-{value}", f"{flag[2:]} {value}", ("--models", "spmoe", flag, value), 1.05))
    if pretrain_steps:
        pretrain = ("--pretrain-steps", str(pretrain_steps))
        points += [Point("kjv-pretrained-seed0", "pre-trained backbone", (*both, *pretrain),
                         2.2 + pretrain_steps / 2000),
                   Point("kjv-pretrained-capacity-factor-2.0-seed0", "pre-trained backbone, capacity-factor 2.0",
                         ("--models", "spmoe", *LOOSE, *pretrain), 1.1 + pretrain_steps / 2000)]
    return sorted(points, key=lambda p: -p.cost)


def write_synthetic_sets(data_dir: Path) -> dict[str, Path]:
    """The one-to-many and one-to-one JSON-lines sets, whose last lines (the job's test split) are the
    same 100 sources with all K references."""
    data_dir.mkdir(parents=True, exist_ok=True)
    examples = synthetic_examples(4000, SYNTHETIC_K, seed=0)
    test = examples[3600::4]  # 100 sources; the one-to-one set's 400 test lines are scored at stride 4
    rng = random.Random(0)
    one_to_one = [Example(e.source, [rng.choice(e.targets)]) for e in examples[:3600]]
    paths = {"one-to-many": data_dir / "one_to_many.jsonl", "one-to-one": data_dir / "one_to_one.jsonl"}
    write_jsonl(paths["one-to-many"], [*examples[:900], *test])
    write_jsonl(paths["one-to-one"], [*one_to_one, *examples[3600:]])
    return paths


def job_argv(point: Point, out: Path, args: argparse.Namespace, data: dict[str, Path]) -> list[str]:
    argv = ["patterns", *point.args, "--out", str(out / point.name), "--quiet", "--resume", "--threads",
            str(args.threads)]
    if point.name.startswith("synthetic-"):
        kind = "one-to-one" if "one-to-one" in point.name else "one-to-many"
        argv += ["--data", str(data[kind]), "--preset", "synthetic", "--patterns", str(SYNTHETIC_K)]
    elif args.data is not None:  # a stand-in for KJV -> WEB (tests)
        argv += ["--data", args.data]
    if args.preset is not None and not point.name.startswith("synthetic-"):
        argv += ["--preset", args.preset]
    if args.steps is not None:
        argv += ["--steps", str(args.steps)]
    return argv


KEYS = ("bleu", "oracle_bleu", "pairwise_bleu", "distinct_2", "refs_covered", "refs_covered_exact")


def gather(out: Path, points: list[Point]) -> list[dict[str, Any]]:
    """One row per (point, model): the point's group and seed, the model's metrics and training time."""
    rows = []
    for point in points:
        metrics = json.loads((out / point.name / "metrics.json").read_text())
        config = metrics["run"]["config"]
        pretrain = metrics["run"].get("pretrain")
        for model in ("spmoe", "hmoe"):
            if model not in metrics:
                continue
            m = metrics[model]
            rows.append({"point": point.name, "group": point.group, "data": "synthetic" if "synthetic" in point.name
                         else "kjv", "model": model, "seed": config["seed"], **{k: m[k] for k in KEYS},
                         "train_s": m["train"]["time_s"] + (pretrain["time_s"] if pretrain else 0.0),
                         "assignment_share": m["train"].get("assignment_share")})
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moekit.jobs.patterns.study", description=__doc__.split("\n\n")[0])
    add_study_args(parser)
    parser.add_argument("--seeds", type=options.positive_int, default=2,
                        help="seeds of the baseline, the MLP heads and the synthetic sets (default: 2)")
    parser.add_argument("--pretrain-steps", type=options.non_negative_int, default=1000,
                        help="denoising steps of the pre-trained point (0: leave it out; default: 1000)")
    parser.add_argument("--data", help="a JSON-lines set in place of KJV -> WEB (for tests)")
    parser.add_argument("--preset", help="the job's preset for the KJV points (default: cpu-small)")
    parser.add_argument("--steps", type=options.positive_int, help="the job's --steps for every point")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    points = plan(args.seeds, args.pretrain_steps)
    data = write_synthetic_sets(out / "data")
    start = time.monotonic()
    if not args.gather_only:
        run_jobs([(p.name, job_argv(p, out, args, data)) for p in points], args.jobs, out / "logs", args.quiet)
    rows = gather(out, points)
    given = argv if argv is not None else sys.argv[1:]
    summary = {"command": "python -m moekit.jobs.patterns.study " + " ".join(given),
               "points": [{"name": p.name, "group": p.group, "args": list(p.args)} for p in points], "rows": rows,
               "wall_seconds": None if args.gather_only else time.monotonic() - start}
    (out / "study.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "study.md").write_text(study_markdown(summary))
    plot_study(out / "study.png", rows)
    if not args.quiet:
        print(f"study results in {out / 'study.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
