"""Outputs of ``moekit facts``: metrics.json, report.md (recall table, capacities), recall_vs_facts.png."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

from matplotlib.figure import Figure

from moekit.jobs.facts.config import FactsJobConfig
from moekit.train import plots
from moekit.train.outdir import METRICS_FILE, REPORT_FILE, write_json, write_text
from moekit.train.runtime import environment

THRESHOLD = 0.9  # the recall at which a model is said to store a number of facts


class Capacity(NamedTuple):
    """Facts stored at ``THRESHOLD`` recall; ``bound`` is "" (measured), ">=" or "<" (outside the sweep)."""

    facts: float
    bound: str

    def __str__(self) -> str:
        return f"{self.bound}{self.facts:,.0f}"


def capacity(facts: Sequence[int], recall: Sequence[float], threshold: float = THRESHOLD) -> Capacity:
    """Where recall(facts) falls through ``threshold``, interpolated linearly in log(facts).

    The crossing after the largest number of facts still recalled at ``threshold`` or better is
    taken. Recalled at every size: a lower bound, the largest size; at none: an upper bound, the
    smallest. E.g. facts (1000, 2000), recall (0.95, 0.85): 0.9 is halfway, at sqrt(1000 * 2000)
    = 1414 facts.
    """
    order = sorted(range(len(facts)), key=lambda i: facts[i])
    n = [facts[i] for i in order]
    r = [recall[i] for i in order]
    above = [i for i, v in enumerate(r) if v >= threshold]
    if not above:
        return Capacity(n[0], "<")
    i = above[-1]
    if i == len(n) - 1:
        return Capacity(n[-1], ">=")
    t = (r[i] - threshold) / (r[i] - r[i + 1])
    return Capacity(math.exp(math.log(n[i]) + t * (math.log(n[i + 1]) - math.log(n[i]))), "")


def last_rise(run: dict[str, Any]) -> float:
    """How much a run's recall rose between its last two measurements (0 with fewer than two)."""
    recall = run["history"].get("recall") or []
    return recall[-1] - recall[-2] if len(recall) >= 2 else 0.0


def summarise(cfg: FactsJobConfig, results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model: parameters, ops, recall per number of facts (per seed), capacity per seed and their mean."""
    rows = []
    bits = math.log2(cfg.num_values)
    for model in cfg.models:
        runs = [r for r in results if r["model"] == model]
        seeds = sorted({r["seed"] for r in runs})
        by_seed = {s: sorted((r["facts"], r["recall"]) for r in runs if r["seed"] == s) for s in seeds}
        caps = {s: capacity([f for f, _ in v], [x for _, x in v]) for s, v in by_seed.items()}
        mean_cap = sum(c.facts for c in caps.values()) / len(caps)
        bound = ">=" if any(c.bound == ">=" for c in caps.values()) else ("<" if all(c.bound == "<" for c in
                                                                                    caps.values()) else "")
        params = runs[0]["params"]
        rows.append({
            "model": model, "params": params, "all_params": runs[0]["all_params"],
            "ops_per_timestep": runs[0]["ops_per_timestep"],
            "recall": {str(n): [r["recall"] for r in runs if r["facts"] == n] for n in cfg.facts},
            "capacity_per_seed": {str(s): {"facts": c.facts, "bound": c.bound} for s, c in caps.items()},
            "capacity": mean_cap, "capacity_bound": bound,
            "bits_per_param": mean_cap * bits / params,
            "unused_experts_max": None if runs[0]["unused_experts"] is None else max(r["unused_experts"] for r in runs),
            "last_rise_max": max(last_rise(r) for r in runs),
            # Past its capacity a model still recalls some facts: recall x N at the largest N is
            # the number it holds when asked for more than it can hold.
            "recalled_max": max(n * sum(v) / len(v) for n, v in
                                ((n, [r["recall"] for r in runs if r["facts"] == n]) for n in cfg.facts)),
        })
    return rows


def capacity_table(metrics: dict[str, Any]) -> str:
    """Model, parameters, ops, capacity (each seed and mean), ratios to the first model, bits per parameter."""
    rows = metrics["summary"]
    base = rows[0]
    lines = [f"| model | params (body) | ops/timestep | capacity at {THRESHOLD:.0%} recall, per seed | mean "
             f"| x {base['model']} (capacity) | x {base['model']} (params) | bits / param | most facts recalled "
             "| last rise of recall |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        per_seed = ", ".join(f"{c['bound']}{c['facts']:,.0f}" for c in r["capacity_per_seed"].values())
        lines.append(f"| {r['model']} | {r['params']:,} | {r['ops_per_timestep']:,} | {per_seed} "
                     f"| {r['capacity_bound']}{r['capacity']:,.0f} "
                     f"| {r['capacity_bound']}{r['capacity'] / base['capacity']:.2f} "
                     f"| {r['params'] / base['params']:.2f} | {r['bits_per_param']:.2f} "
                     f"| {r['recalled_max']:,.0f} | {r['last_rise_max']:+.3f} |")
    return "\n".join(lines)


def recall_table(metrics: dict[str, Any]) -> str:
    """Recall (mean over seeds) of each model at each number of facts."""
    facts = metrics["config"]["facts"]
    lines = ["| model | " + " | ".join(f"{n:,}" for n in facts) + " |", "|---|" + "---:|" * len(facts)]
    for r in metrics["summary"]:
        cells = [sum(v) / len(v) for v in (r["recall"][str(n)] for n in facts)]
        lines.append(f"| {r['model']} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def plot_recall(path: Path, cfg: FactsJobConfig, results: Sequence[dict[str, Any]]) -> None:
    """Recall, and facts recalled (recall x N), against the number of facts (log x).

    One line per model (mean of seeds), seeds as faint points.
    """
    fig = Figure(figsize=(11.0, 4.2))
    axes = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, model in enumerate(cfg.models):
        runs = [r for r in results if r["model"] == model]
        mean = [sum(r["recall"] for r in runs if r["facts"] == n) / max(1, sum(r["facts"] == n for r in runs))
                for n in cfg.facts]
        style = "-o" if model.startswith("moe-") and model[4:].isdigit() else "--s"
        for ax, scale in zip(axes, (False, True), strict=True):
            ax.plot([r["facts"] for r in runs], [r["recall"] * (r["facts"] if scale else 1) for r in runs], ".",
                    color=f"C{i}", alpha=0.4)
            ax.plot(cfg.facts, [m * (n if scale else 1) for m, n in zip(mean, cfg.facts, strict=True)], style,
                    markersize=3, color=f"C{i}", label=f"{model} ({runs[0]['params']:,} params)")
    axes[0].axhline(THRESHOLD, color="black", linestyle=":", linewidth=0.8)
    axes[0].set_ylim(0, 1.02)
    axes[0].set_ylabel("recall (fraction of facts whose value is predicted)")
    axes[1].plot(cfg.facts, cfg.facts, ":", color="black", linewidth=0.8, label="all of them")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("facts recalled (recall x facts)")
    for ax, title in zip(axes, ("recall", "facts held"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("facts to store")
        ax.set_title(f"{title} at equal ops per token")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    plots.save_figure(fig, path)


def findings(metrics: dict[str, Any]) -> list[str]:
    rows = metrics["summary"]
    base = rows[0]
    lines = []
    for r in rows[1:]:
        lines.append(f"{r['model']} stores {r['capacity_bound']}{r['capacity']:,.0f} facts at {THRESHOLD:.0%} recall, "
                     f"{r['capacity_bound']}{r['capacity'] / base['capacity']:.1f}x {base['model']}'s "
                     f"{base['capacity_bound']}{base['capacity']:,.0f}, and recalls up to {r['recalled_max']:,.0f} "
                     f"when asked for more ({r['recalled_max'] / base['recalled_max']:.1f}x), with "
                     f"{r['params'] / base['params']:.1f}x its parameters and "
                     f"{100 * (r['ops_per_timestep'] / base['ops_per_timestep'] - 1):+.0f}% ops per timestep.")
    return lines


def compact(run: dict[str, Any], windows: int = 50) -> dict[str, Any]:
    """``run`` with its per-step training loss averaged over ``windows`` equal spans of steps.

    metrics.json keeps every recall measurement but not a loss per step (megabytes over a sweep).
    """
    history = dict(run["history"])
    loss = history.pop("train_loss", [])
    history.pop("train_step", None)
    spans = [loss[len(loss) * i // windows:len(loss) * (i + 1) // windows] for i in range(windows)]
    history["train_loss_windows"] = [sum(s) / len(s) for s in spans if s]
    return {**run, "history": history}


def write_outputs(out: Path, cfg: FactsJobConfig, results: list[dict[str, Any]], device: str,
                  command: str) -> dict[str, Any]:
    """Write the plot, report.md and metrics.json (last: its presence marks a finished run)."""
    metrics: dict[str, Any] = {"command": command, "config": asdict(cfg), "threshold": THRESHOLD,
                               "summary": summarise(cfg, results), "runs": [compact(r) for r in results],
                               "environment": environment(device)}
    plot_recall(out / "recall_vs_facts.png", cfg, results)
    total = sum(r["train_time_s"] for r in results)
    lines = [
        "# moekit facts: stored facts at equal ops per token", "",
        f"- Command: `{command}`",
        f"- Facts: keys of {cfg.key_len} symbols out of {cfg.num_symbols} ({cfg.num_symbols ** cfg.key_len:,} "
        f"possible keys), values one of {cfg.num_values} symbols ({math.log2(cfg.num_values):.0f} bits a fact), "
        f"drawn at random; {', '.join(f'{n:,}' for n in cfg.facts)} facts, {cfg.seeds} seed(s) each (a seed draws "
        "the facts and the initialisation).",
        f"- Models: `moekit lm`'s, width D = {cfg.dim}, expert hidden {2 * cfg.dim}, k = {cfg.k}, no dropout; "
        f"balancing losses w_importance = {cfg.w_importance:g}, w_load = {cfg.w_load:g}. Params are the body's "
        "(without embedding and softmax), as in the paper's Table 7.",
        f"- Training: each fact shown {cfg.epochs} times, batches of {cfg.batch_size}, Adam, peak lr {cfg.lr:g}, "
        f"warm-up {cfg.warmup} steps (at most a tenth of a run), cosine decay to 0; loss on the value token only.",
        f"- Recall: the fraction of the facts whose value is the argmax over the value symbols, in eval mode, "
        f"after training. Capacity: the number of facts at {THRESHOLD:.0%} recall, interpolated in log(facts) "
        "(>= : still above at the largest number tried). Bits / param: capacity x log2(values) / body "
        "parameters. Most facts recalled: the largest recall x facts over the sweep (mean of seeds). Last "
        "rise: the largest rise of recall between a run's last two measurements, over the model's runs (the "
        "learning rate decays to 0, so this shows the recall levelled off, not that a longer run would not "
        "store more).",
        f"- Ran on {device} ({metrics['environment']['torch_threads']} torch thread(s)): {total / 60:.1f} min of "
        f"training in all.", "",
        capacity_table(metrics), "", "Recall, mean over seeds:", "", recall_table(metrics), "",
        "## Findings", "", *[f"- {line}" for line in findings(metrics)], "",
        "## Plots", "", "![recall vs facts](recall_vs_facts.png)", ""]
    write_text(out / REPORT_FILE, "\n".join(lines))
    write_json(out / METRICS_FILE, metrics)
    return metrics
