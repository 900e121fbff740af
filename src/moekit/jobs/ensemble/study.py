"""E^3's performance-versus-FLOPs sweep: ``python -m moekit.jobs.ensemble.study --out DIR``.

Legend: N test examples, O OOD examples, M members, C classes, D pre-logit features.

Allingham et al.'s central figure varies the ensemble size M and the sparsity K and places E^3
between the single V-MoE and the deep ensemble on the cost axis. This study runs ``moekit
ensemble`` (preset ``sweep``) at every point of
M in {1, 2, 4} x K in {1, 2} x MoE in {the last 2 odd blocks, every odd block},
each point an out directory of its own under ``DIR`` (so the study resumes point by point), then
gathers the results into ``study.json``, ``study.md`` and the plots:

- per (layout, K): one job with ``--ensemble-size 4 --models vmoe,deep-ensemble,e3`` trains
  V-MoEs of seeds 0-3 and the E^3 of 4 members; its saved member predictions and features also
  give the deep ensemble of the first 2 V-MoEs and each V-MoE alone (the single model's seed
  spread); a second job trains the E^3 of 2 members; ``--e3-seeds S`` repeats both E^3s with
  seeds 1 .. S-1;
- once: the dense ViT, the Soft MoE ViT and the expert-choice V-MoE (K = 1, last 2 odd blocks).

Everything is recomputed from the points' saved arrays with the job's own metric functions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moekit.jobs import options
from moekit.jobs.ensemble.config import PRESETS
from moekit.jobs.ensemble.report import diversity_metrics, fewshot_metrics, model_metrics
from moekit.jobs.ensemble.study_report import plot_study, study_markdown
from moekit.jobs.study import add_study_args, run_jobs

CONFIGS = {"last_n-k1": ("last_n", 1), "last_n-k2": ("last_n", 2), "every_2-k1": ("every_2", 1),
           "every_2-k2": ("every_2", 2)}
EXTRAS = "extras"
METRICS = ("accuracy", "nll", "ece", "brier")


@dataclass(frozen=True)
class Point:
    """One ``moekit ensemble`` run of the study: its out sub-directory, options and relative cost."""

    name: str
    args: tuple[str, ...]
    cost: float


def plan(configs: list[str], e3_seeds: int, extras: bool) -> list[Point]:
    """The study's job runs, the most expensive first (so two workers finish together)."""
    points = []
    for name in configs:
        layout, k = CONFIGS[name]
        common = ("--layout", layout, "--k", str(k))
        # Costs in V-MoE runs, measured per training step on one thread: E^3 pays for the M copies
        # of every block from the first MoE block on.
        heavy = (1.0 if layout == "last_n" else 2.6) * (1.0 if k == 1 else 1.2)
        points.append(Point(f"{name}-m4", (*common, "--models", "vmoe,deep-ensemble,e3", "--ensemble-size", "4"),
                            4 + 1.5 * heavy))
        for seed in range(e3_seeds):
            suffix = "" if seed == 0 else f"-seed{seed}"
            if seed:
                points.append(Point(f"{name}-e3m4{suffix}", (*common, "--models", "e3", "--ensemble-size", "4",
                                                             "--seed", str(seed)), 1.5 * heavy))
            points.append(Point(f"{name}-e3m2{suffix}", (*common, "--models", "e3", "--ensemble-size", "2",
                                                         "--seed", str(seed)), 1.2 * heavy))
    if extras:
        points.append(Point(EXTRAS, ("--models", "dense,soft-moe,vmoe-ec", "--k", "1"), 3))
    return sorted(points, key=lambda p: -p.cost)


def job_argv(point: Point, out: Path, args: argparse.Namespace) -> list[str]:
    argv = ["ensemble", "--preset", args.preset, *point.args, "--out", str(out / point.name), "--quiet",
            "--resume", "--threads", str(args.threads)]
    for name in ("data", "steps", "train_examples"):
        if getattr(args, name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


# --- gathering -----------------------------------------------------------------------------------


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _row(config: str, family: str, m: int, seed: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"config": config, "family": family, "M": m, "seed": seed,
            "gflops": metrics["gflops_per_example"], **{k: metrics.get(k) for k in METRICS},
            "disagreement": metrics.get("member_disagreement"), "kl": metrics.get("member_kl"),
            "fewshot": metrics.get("fewshot", {})}


def _sub_ensemble(point_dir: Path, members: list[int], model: dict[str, Any], fewshot_cfg: dict[str, Any],
                  classes: dict[str, int | None]) -> dict[str, Any]:
    """Metrics of the deep ensemble made of some of the saved V-MoE members ([N, M, C] -> [N, m, C])."""
    pred = _load(point_dir / "predictions_deep-ensemble.npz")
    probs_NmC = pred["member_probs"][:, members]
    probs = probs_NmC.mean(axis=1, dtype=np.float64).astype(np.float32)
    out: dict[str, Any] = {**model_metrics(probs, pred["labels"], None), **diversity_metrics(probs_NmC, pred["labels"])}
    feats_path = point_dir / "features_deep-ensemble.npz"
    features = _load(feats_path) if feats_path.exists() else {}
    for key in ("test", "ood"):
        if key in features:
            features[key] = features[key][:, members]
    out["fewshot"] = fewshot_metrics(features, tuple(fewshot_cfg["fewshot_shots"]), fewshot_cfg["fewshot_draws"],
                                     classes)
    # A deep ensemble costs the sum of its members, which cost the same up to routing differences.
    out["gflops_per_example"] = model["gflops_per_example"] * len(members) / len(model["runs"])
    return out


def gather(out: Path, points: list[Point]) -> list[dict[str, Any]]:
    """One row per model of the study: its config, family, M, seed, cost and metrics."""
    rows: list[dict[str, Any]] = []
    names = {p.name for p in points}
    for config in CONFIGS:
        if f"{config}-m4" not in names:
            continue
        point_dir = out / f"{config}-m4"
        metrics = json.loads((point_dir / "metrics.json").read_text())
        cfg = json.loads((point_dir / "config.json").read_text())
        deep = metrics["models"]["deep-ensemble"]
        # The OOD set's class count is read from its labels (the digits': 10).
        classes: dict[str, int | None] = {"test": metrics["data"]["num_classes"], "ood": None}
        rows.append(_row(config, "V-MoE", 1, 0, metrics["models"]["vmoe"]))
        for seed in range(1, len(deep["runs"])):  # each further V-MoE alone: the single model's seed spread
            rows.append(_row(config, "V-MoE", 1, seed, _sub_ensemble(point_dir, [seed], deep, cfg, classes)))
        rows.append(_row(config, "deep ensemble", 2, 0, _sub_ensemble(point_dir, [0, 1], deep, cfg, classes)))
        rows.append(_row(config, "deep ensemble", len(deep["runs"]), 0, deep))
        rows.append(_row(config, "E^3", 4, 0, metrics["models"]["e3"]))
        for name in sorted(names):
            if name.startswith(f"{config}-e3m"):
                e3 = json.loads((out / name / "metrics.json").read_text())
                e3_cfg = json.loads((out / name / "config.json").read_text())
                rows.append(_row(config, "E^3", e3_cfg["ensemble_size"], e3_cfg["seed"], e3["models"]["e3"]))
    if EXTRAS in names:
        metrics = json.loads((out / EXTRAS / "metrics.json").read_text())
        for model, family in (("dense", "dense ViT"), ("soft-moe", "Soft MoE"), ("vmoe-ec", "V-MoE (expert choice)")):
            if model in metrics["models"]:
                rows.append(_row("last_n-k1", family, 1, 0, metrics["models"][model]))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moekit.jobs.ensemble.study", description=__doc__.split("\n\n")[0])
    add_study_args(parser)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="sweep", help="the job's preset (default: sweep)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated (layout, K) configurations, from {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--e3-seeds", type=options.positive_int, default=2,
                        help="seeds of every E^3 point (default: 2)")
    parser.add_argument("--no-extras", action="store_true", help="leave out the dense, Soft MoE and expert-choice runs")
    parser.add_argument("--data", help="the job's --data (default: Fashion-MNIST)")
    parser.add_argument("--steps", type=options.positive_int, help="the job's --steps (default: the preset's)")
    parser.add_argument("--train-examples", type=options.positive_int, help="the job's --train-examples")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        print(f"--configs: unknown {bad}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    points = plan(configs, args.e3_seeds, not args.no_extras)
    start = time.monotonic()
    if not args.gather_only:
        run_jobs([(p.name, job_argv(p, out, args)) for p in points], args.jobs, out / "logs", args.quiet)
    rows = gather(out, points)
    given = argv if argv is not None else sys.argv[1:]
    summary = {"command": "python -m moekit.jobs.ensemble.study " + " ".join(given),
               "points": [{"name": p.name, "args": list(p.args)} for p in points], "rows": rows,
               "wall_seconds": None if args.gather_only else time.monotonic() - start}
    (out / "study.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "study.md").write_text(study_markdown(summary))
    plot_study(out, rows)
    _say(args, f"study results in {out / 'study.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
