"""The data-scaling study of ``moekit lm``: the MoE vs dense gap as training tokens per parameter grow.

    python -m moekit.jobs.lm.scaling --out runs/lm-scaling [--jobs 2]

Shazeer et al. trained about 1200 tokens per dense parameter; cpu-small trains 8. This study
trains lstm-4x, moe-32 and moe-256 at three widths (dense sizes 133k, 34k and 8.7k) on the ``english``
corpus, two seeds each, every run a ``moekit lm --preset scaling`` command of its own (listed in
the report, resumable). The schedule (warm-up, then 1/sqrt(step), no cool-down) does not depend on
the number of steps, so the model after step s of a run is the model a run of s steps would
have given: each run's validation curve is a series of points at growing tokens per parameter.
Every run sees less than half an epoch of the training split (random windows), so few tokens twice.

The study then reads the runs' ``metrics.json`` and writes ``metrics.json`` (the curves, the
gaps), ``report.md`` and ``gap_vs_tokens_per_param.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from matplotlib.figure import Figure

from moekit.jobs.study import run_jobs
from moekit.train import plots
from moekit.train.outdir import write_json, write_text

MODELS = ("lstm-4x", "moe-32", "moe-256")
# Shazeer et al. 2017, Table 7: test perplexity vs LSTM-4x (46.0) at about 1200 training tokens per
# dense parameter (10 epochs of the 1B-word benchmark, 8.4M parameters).
PAPER_GAPS = {"moe-32": 39.7 / 46.0 - 1, "moe-256": 35.7 / 46.0 - 1}
PAPER_TOKENS_PER_PARAM = 1200
DENSE = "lstm-4x"
SEEDS = (0, 1)
BATCH_TOKENS = 32 * 32  # the scaling preset's batch


class Point(NamedTuple):
    """One width of the study, how many steps its runs train and how often they validate."""

    dim: int
    steps: int
    eval_every: int


# Three widths, dense parameters 133k, 34k and 8.7k, validated so that their curves overlap in
# tokens per dense parameter (D = 64: 1.9-15 over its 2000 steps; D = 32: 7.6-61; D = 16: 15-235):
# where they overlap, a gap that follows tokens per parameter agrees between the widths, and one
# that follows the number of steps or the width does not. 6 to 10 CPU-minutes per run on an idle core.
POINTS = (Point(64, 2000, 250), Point(32, 2000, 250), Point(16, 2000, 125))
# Tiny runs for the tests: any text file, seconds each.
TINY_ARGS = ["--vocab-size", "60", "--batch-size", "4", "--seq-len", "8", "--eval-tokens", "64",
             "--checkpoint-every", "3", "--warmup", "2"]
TINY_POINTS = (Point(8, 4, 2), Point(4, 6, 3))


def run_dir(out: Path, point: Point, seed: int) -> Path:
    return out / "runs" / f"d{point.dim}_seed{seed}"


def commands(out: Path, points: Sequence[Point] = POINTS, seeds: Sequence[int] = SEEDS, *, data: str | None = None,
             threads: int = 1, extra: Sequence[str] = ()) -> list[list[str]]:
    """The ``moekit lm`` argument lists of the study, one per (width, seed)."""
    source = ["--data", data] if data else ["--corpus", "english"]
    return [["lm", "--preset", "scaling", *source, "--models", ",".join(MODELS), "--dim", str(p.dim),
             "--steps", str(p.steps), "--eval-every", str(p.eval_every), "--seed", str(seed),
             "--threads", str(threads), "--quiet", "--resume",
             "--out", str(run_dir(out, p, seed)), *extra]
            for p in points for seed in seeds]


def collect(out: Path, points: Sequence[Point], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One row per (width, seed, model): dense parameters, the validation curve, the final perplexities."""
    rows = []
    for p in points:
        for seed in seeds:
            metrics = json.loads((run_dir(out, p, seed) / "metrics.json").read_text())
            by_name = {m["name"]: m for m in metrics["models"]}
            dense_params = by_name[DENSE]["params"]
            for m in metrics["models"]:
                h = m["history"]
                rows.append({"dim": p.dim, "seed": seed, "model": m["name"], "params": m["params"],
                             "dense_params": dense_params, "steps": m["steps"],
                             "tokens_per_param": [s * BATCH_TOKENS / dense_params for s in h["valid_step"]],
                             "valid_step": h["valid_step"], "valid_ppl": h["valid_ppl"],
                             "final_valid_ppl": m["valid_ppl"], "final_test_ppl": m["test_ppl"],
                             "train_tokens": metrics["tokens"]["train"]})
    return rows


def gaps(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each MoE's relative perplexity gap to lstm-4x of the same width and seed, at every validation.

    gap = ppl(MoE) / ppl(lstm-4x) - 1, so negative means the MoE is better. Also the same at the
    end on the whole validation and test splits.
    """
    dense = {(r["dim"], r["seed"]): r for r in rows if r["model"] == DENSE}
    out = []
    for r in rows:
        if r["model"] == DENSE:
            continue
        d = dense[(r["dim"], r["seed"])]
        if r["valid_step"] != d["valid_step"]:
            raise ValueError(f"{r['model']} d{r['dim']} seed {r['seed']}: validation steps differ from {DENSE}")
        out.append({"dim": r["dim"], "seed": r["seed"], "model": r["model"], "step": r["valid_step"],
                    "tokens_per_param": r["tokens_per_param"],
                    "gap": [a / b - 1 for a, b in zip(r["valid_ppl"], d["valid_ppl"], strict=True)],
                    "final_valid_gap": r["final_valid_ppl"] / d["final_valid_ppl"] - 1,
                    "final_test_gap": r["final_test_ppl"] / d["final_test_ppl"] - 1})
    return out


def mean_gap(gap_rows: Sequence[dict[str, Any]], model: str, dim: int) -> tuple[list[float], list[float]]:
    """(tokens per parameter, gap averaged over seeds) of one model and width."""
    runs = [g for g in gap_rows if g["model"] == model and g["dim"] == dim]
    n = min(len(g["gap"]) for g in runs)
    return runs[0]["tokens_per_param"][:n], [sum(g["gap"][i] for g in runs) / len(runs) for i in range(n)]


def plot_gaps(path: Path, gap_rows: Sequence[dict[str, Any]]) -> None:
    """Gap vs tokens per dense parameter (log x): colour = width, line = model; seeds as faint points."""
    fig = Figure(figsize=(8.0, 4.6))
    ax = fig.add_subplot()
    dims = sorted({g["dim"] for g in gap_rows}, reverse=True)
    for model, style in (("moe-32", "-"), ("moe-256", "--")):
        for i, dim in enumerate(dims):
            runs = [g for g in gap_rows if g["model"] == model and g["dim"] == dim]
            if not runs:
                continue
            for g in runs:
                ax.plot(g["tokens_per_param"], [100 * v for v in g["gap"]], "." if style == "-" else "x",
                        color=f"C{i}", alpha=0.35, markersize=4)
            x, y = mean_gap(gap_rows, model, dim)
            ax.plot(x, [100 * v for v in y], style, color=f"C{i}", label=f"{model}, D = {dim}")
    ax.axhline(0.0, color="grey", linewidth=0.8, zorder=0)
    for (model, gap), marker in zip(PAPER_GAPS.items(), ("*", "P"), strict=True):
        ax.plot([PAPER_TOKENS_PER_PARAM], [100 * gap], marker, markersize=10, color="black",
                label=f"{model}, paper (Table 7, D = 512)")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens per dense parameter (lstm-4x body)")
    ax.set_ylabel("validation perplexity vs lstm-4x (%)")
    ax.set_title("MoE vs lstm-4x of the same width, equal ops/timestep (lines: mean of 2 seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    plots.save_figure(fig, path)

GRID = (2, 4, 8, 15, 30, 60, 120)  # tokens per dense parameter at which the trend table reads the curves
FIT_MIN_STEP = 500  # the fits skip the warm-up's transient


def interpolate(x: Sequence[float], y: Sequence[float], at: float) -> float | None:
    """y at ``at``, linear in log(x) between the measured points; None outside them."""
    for (x0, y0), (x1, y1) in zip(zip(x, y, strict=True), list(zip(x, y, strict=True))[1:], strict=False):
        if x0 <= at <= x1:
            t = 0.0 if x1 == x0 else (math.log(at) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return None


def fit_log(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least squares ``y = a + b * log10(x)``: (a, b), b the change per tenfold x."""
    lx = [math.log10(v) for v in x]
    mx, my = sum(lx) / len(lx), sum(y) / len(y)
    sxx = sum((v - mx) ** 2 for v in lx)
    b = sum((u - mx) * (v - my) for u, v in zip(lx, y, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def fits(gap_rows: Sequence[dict[str, Any]], min_step: int = FIT_MIN_STEP) -> list[dict[str, Any]]:
    """Per model: a log-linear fit of the gap per width (mean of seeds) and over all widths and seeds pooled."""
    out = []
    for model in dict.fromkeys(g["model"] for g in gap_rows):
        runs = [g for g in gap_rows if g["model"] == model]
        entry: dict[str, Any] = {"model": model, "per_width": {}}
        for dim in sorted({g["dim"] for g in runs}):
            x, y = mean_gap(gap_rows, model, dim)
            steps = next(g for g in runs if g["dim"] == dim)["step"]
            keep = [i for i in range(len(x)) if steps[i] >= min_step]
            if len(keep) >= 2:
                a, b = fit_log([x[i] for i in keep], [y[i] for i in keep])
                entry["per_width"][str(dim)] = {"a": a, "per_decade": b, "at_1200": a + b * math.log10(1200)}
        px = [t for g in runs for t, s in zip(g["tokens_per_param"], g["step"], strict=True) if s >= min_step]
        py = [v for g in runs for v, s in zip(g["gap"], g["step"], strict=True) if s >= min_step]
        if len(px) >= 2:
            a, b = fit_log(px, py)
            entry["pooled"] = {"a": a, "per_decade": b, "at_1200": a + b * math.log10(1200)}
        out.append(entry)
    return out


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:+.1f}%"


def trend_table(gap_rows: Sequence[dict[str, Any]]) -> str:
    """Mean gap (over seeds) of each model and width at the ``GRID`` tokens per parameter it spans."""
    lines = ["| model | D | " + " | ".join(str(g) for g in GRID) + " | last (tokens / param) |",
             "|---|---:|" + "---:|" * (len(GRID) + 1)]
    for model in dict.fromkeys(g["model"] for g in gap_rows):
        for dim in sorted({g["dim"] for g in gap_rows}, reverse=True):
            x, y = mean_gap(gap_rows, model, dim)
            lines.append(f"| {model} | {dim} | " + " | ".join(_pct(interpolate(x, y, t)) for t in GRID)
                         + f" | {_pct(y[-1])} ({x[-1]:.0f}) |")
    return "\n".join(lines)


def final_table(rows: Sequence[dict[str, Any]], gap_rows: Sequence[dict[str, Any]]) -> str:
    """Each width's last step: tokens per parameter, perplexities and gaps on the whole validation and test sets."""
    lines = ["| D | dense params | steps | tokens / dense param | seed | lstm-4x test PPL | model | params "
             "| test PPL | test gap | valid gap |", "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    dense = {(r["dim"], r["seed"]): r for r in rows if r["model"] == DENSE}
    by = {(r["dim"], r["seed"], r["model"]): r for r in rows}
    for g in gap_rows:
        d, r = dense[(g["dim"], g["seed"])], by[(g["dim"], g["seed"], g["model"])]
        lines.append(f"| {g['dim']} | {d['params']:,} | {d['steps']} | {d['steps'] * BATCH_TOKENS / d['params']:.0f} "
                     f"| {g['seed']} | {d['final_test_ppl']:.2f} | {g['model']} | {r['params']:,} "
                     f"| {r['final_test_ppl']:.2f} | {_pct(g['final_test_gap'])} | {_pct(g['final_valid_gap'])} |")
    return "\n".join(lines)


def write_study(out: Path, points: Sequence[Point], seeds: Sequence[int], argvs: Sequence[list[str]]) -> dict:
    """Collect the finished runs; write metrics.json, report.md and the gap plot into ``out``."""
    rows = collect(out, points, seeds)
    gap_rows = gaps(rows)
    fit = fits(gap_rows)
    metrics = {"commands": ["moekit " + " ".join(a) for a in argvs], "runs": rows, "gaps": gap_rows, "fits": fit,
               "train_tokens": rows[0]["train_tokens"]}
    plot_gaps(out / "gap_vs_tokens_per_param.png", gap_rows)
    fit_lines = []
    for f in fit:
        per = ", ".join(f"D = {d}: {100 * v['per_decade']:+.1f} points per decade, {_pct(v['at_1200'])} at 1200"
                        for d, v in f["per_width"].items())
        pooled = f.get("pooled")
        pooled_text = "" if pooled is None else (f"pooled: {100 * pooled['per_decade']:+.1f} points per decade, "
                                                 f"{_pct(pooled['at_1200'])} at 1200; ")
        fit_lines.append(f"- {f['model']}: {pooled_text}{per}.")
    lines = ["# moekit lm: the MoE vs lstm-4x gap as training tokens per parameter grow", "",
             "Commands (one `moekit lm` run per width and seed; each run's own report is in its directory):", "",
             "```sh", *metrics["commands"], "```", "",
             f"Training split: {metrics['train_tokens']:,} tokens; every run sees less than half an epoch. Gap = "
             "perplexity of the MoE / perplexity of lstm-4x of the same width and seed - 1 (negative: the MoE "
             "is better), on the first 50,000 validation tokens during training.", "",
             "## Gap at growing tokens per dense parameter (mean of the seeds)", "", trend_table(gap_rows), "",
             f"## Log-linear fits (steps >= {FIT_MIN_STEP}), extrapolated to the paper's ~1200", "", *fit_lines, "",
             "## At the end of each run (whole validation and test splits)", "", final_table(rows, gap_rows), "",
             "![gap vs tokens per parameter](gap_vs_tokens_per_param.png)", ""]
    write_text(out / "report.md", "\n".join(lines))
    write_json(out / "metrics.json", metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moekit.jobs.lm.scaling", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/lm-scaling", help="study directory (default: runs/lm-scaling)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default: 1)")
    parser.add_argument("--data", metavar="FILE", help="a text file instead of the english corpus")
    parser.add_argument("--tiny", action="store_true", help="tiny widths and runs (for the tests)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error(f"--jobs {args.jobs} and --threads {args.threads} must be >= 1")
    out = Path(args.out)
    points = TINY_POINTS if args.tiny else POINTS
    argvs = commands(out, points, SEEDS, data=args.data, threads=args.threads, extra=TINY_ARGS if args.tiny else ())
    if not args.report_only:
        run_jobs([(Path(argv[argv.index("--out") + 1]).name, argv) for argv in argvs], args.jobs)
    write_study(out, points, SEEDS, argvs)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
