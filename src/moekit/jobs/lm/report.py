"""Outputs of ``moekit lm``: metrics.json, report.md beside the paper's tables, plots, raw losses.

Legend: E experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from moekit.jobs.lm.config import BALANCING, LMJobConfig
from moekit.train import plots
from moekit.train.checkpoint import atomic_write
from moekit.train.outdir import METRICS_FILE, REPORT_FILE, write_json, write_text
from moekit.train.runtime import environment

if TYPE_CHECKING:
    from moekit.jobs.lm.job import LMData

# Shazeer et al. 2017, Table 7 (1B-word benchmark, 10 epochs): test PPL, ops/timestep, params
# without embedding and softmax.
PAPER_TABLE7: dict[str, tuple[float, str, str]] = {
    "lstm-4x": (46.0, "8.4M", "8.4M"),
    "moe-1-wide": (46.1, "8.4M", "8.4M"),
    "moe-1-deep": (45.7, "8.4M", "8.4M"),
    "moe-4": (45.0, "8.4M", "8.4M"),
    "moe-32": (39.7, "8.4M", "37.8M"),
    "moe-256": (35.7, "8.6M", "272.9M"),
    "moe-256-h": (36.0, "8.4M", "272.9M"),
    "moe-1024-h": (34.6, "8.5M", "1079M"),
    "moe-4096-h": (34.1, "8.9M", "4303M"),
}
# Table 6 (MoE-256, 10 epochs): (w_importance, w_load) -> PPL, CV(importance), CV(load), max/mean load.
PAPER_TABLE6: dict[tuple[float, float], tuple[float, float, float, float]] = {
    (0.0, 0.0): (39.8, 3.04, 3.01, 17.80),
    (0.2, 0.0): (35.6, 0.06, 0.17, 1.47),
    (0.0, 0.2): (35.7, 0.22, 0.04, 1.15),
    (0.1, 0.1): (35.6, 0.06, 0.05, 1.14),
    (0.01, 0.01): (35.7, 0.48, 0.11, 1.37),
    (1.0, 1.0): (35.7, 0.03, 0.02, 1.07),
}
DENSE_MODELS = ("lstm-4x", "moe-1-wide", "moe-1-deep")


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _count(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def summary_table(models: Sequence[dict[str, Any]], ablation: bool) -> str:
    """The results table, each row beside the paper's figures for the same model or setting."""
    if ablation:
        rows = ["| model | w_importance | w_load | test PPL | CV(imp.) train | CV(load) train | max/mean train "
                "| CV(imp.) test | CV(load) test | max/mean test "
                "| paper PPL | paper CV(imp.) | paper CV(load) | paper max/mean |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in models:
            table6 = PAPER_TABLE6.get((m["w_importance"], m["w_load"]))
            keys = ("train_cv_importance", "train_cv_load", "train_max_mean_load", "cv_importance", "cv_load",
                    "max_mean_load")
            ours = [_fmt(m["test_ppl"])] + [_fmt(m.get(key)) for key in keys]
            theirs = ["–"] * 4 if table6 is None else [f"{v:.2f}" for v in table6]
            rows.append(f"| {m['model']} | {m['w_importance']:g} | {m['w_load']:g} | " + " | ".join(ours + theirs)
                        + " |")
        return "\n".join(rows)
    rows = ["| model | experts | k | ops/timestep | params | valid PPL | test PPL | CV(importance) | CV(load) "
            "| max/mean load | dead experts | paper test PPL | paper ops/timestep | paper params |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        paper: tuple[object, ...] = PAPER_TABLE7.get(m["model"], ("–", "–", "–"))
        rows.append(
            f"| {m['name']} | {m['experts'] or '–'} | {m['k'] or '–'} | {_count(m['ops_per_timestep'])} "
            f"| {_count(m['params'])} | {_fmt(m['valid_ppl'])} | {_fmt(m['test_ppl'])} "
            f"| {_fmt(m['cv_importance'])} | {_fmt(m['cv_load'])} | {_fmt(m['max_mean_load'])} "
            f"| {m.get('dead_experts', '–') if m.get('dead_experts') is not None else '–'} "
            f"| {paper[0]} | {paper[1]} | {paper[2]} |")
    return "\n".join(rows)


def balancing_table(models: Sequence[dict[str, Any]]) -> str:
    """``--balancing``: each scheme's quality and balance, on the test pass and over training."""
    rows = ["| model | scheme | test PPL | CV(load) test | max/mean test | dead experts test | CV(counts) train "
            "| max/ideal train | dead experts, last 100 steps |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        rows.append(f"| {m['model']} | {m['scheme']} | {_fmt(m['test_ppl'])} | {_fmt(m['cv_load'])} "
                    f"| {_fmt(m['max_mean_load'])} | {m['dead_experts']} | {_fmt(m['train_cv_counts'])} "
                    f"| {_fmt(m['train_max_over_ideal'])} | {m['train_dead_experts']} |")
    return "\n".join(rows)


def balancing_findings(models: Sequence[dict[str, Any]]) -> list[str]:
    """Which scheme gives the best perplexity and the most even load, model by model."""
    lines = []
    for name in dict.fromkeys(m["model"] for m in models):
        runs = [m for m in models if m["model"] == name]
        best = min(runs, key=lambda m: m["test_ppl"])
        even = min(runs, key=lambda m: m["train_cv_counts"])
        worst = max(runs, key=lambda m: m["train_cv_counts"])
        lines.append(f"{name}: the best test perplexity is {best['scheme']}'s ({best['test_ppl']:.2f}; the others "
                     + ", ".join(f"{m['scheme']} {m['test_ppl']:.2f}" for m in runs if m is not best) + ").")
        lines.append(f"{name}: the most even training load is {even['scheme']}'s (CV of the counts "
                     f"{even['train_cv_counts']:.2f}, max/ideal {even['train_max_over_ideal']:.2f}); the least even "
                     f"{worst['scheme']}'s ({worst['train_cv_counts']:.2f}, {worst['train_max_over_ideal']:.2f}, "
                     f"{worst['train_dead_experts']} experts idle over the last 100 steps).")
    return lines


def plot_balancing(path: Path, models: Sequence[dict[str, Any]], window: int = 100) -> None:
    """CV of the per-expert counts (moving average over ``window`` steps) and the experts idle over
    the last ``window`` steps, against the training step, one line per scheme."""
    fig = Figure(figsize=(10.0, 4.0))
    ax_cv, ax_dead = fig.subplots(1, 2)
    for m in models:
        steps, rows = m["history"]["train_step"], m["history"]["train_counts_balance"]
        cv = [r[0] for r in rows]
        smooth = [sum(cv[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(cv))]
        label = f"{m['model']} {m['scheme']}"
        ax_cv.plot(steps, smooth, label=label)
        counts = m["history"]["train_counts"]
        dead, total = [], torch.zeros(len(counts[0]), dtype=torch.long)
        for i, c in enumerate(counts):  # a running window of counts
            total += torch.tensor(c)
            if i >= window:
                total -= torch.tensor(counts[i - window])
            dead.append(int((total == 0).sum()))
        ax_dead.plot(steps, dead, label=label)
    ax_cv.set(xlabel="training step", ylabel=f"CV of the tokens per expert ({window}-step mean)",
              title="load imbalance over training")
    ax_dead.set(xlabel="training step", ylabel=f"experts with no token in the last {window} steps",
                title="dead experts")
    for ax in (ax_cv, ax_dead):
        ax.grid(alpha=0.3)
    ax_cv.legend(fontsize="small")
    plots.save_figure(fig, path)


def short_table(models: Sequence[dict[str, Any]]) -> str:
    """Model, ops per timestep, parameters and perplexities, without the paper's columns."""
    rows = ["| model | ops/timestep | params | valid PPL | test PPL |", "|---|---:|---:|---:|---:|"]
    rows += [f"| {m['name']} | {_count(m['ops_per_timestep'])} | {_count(m['params'])} | {m['valid_ppl']:.2f} "
             f"| {m['test_ppl']:.2f} |" for m in models]
    return "\n".join(rows)


def findings(models: Sequence[dict[str, Any]], ablation: bool) -> list[str]:
    """The paper's claims checked against this run, one sentence each."""
    lines = []
    if ablation:
        by_w = {(m["model"], m["w_importance"], m["w_load"]): m for m in models}
        for name in dict.fromkeys(m["model"] for m in models):
            none, both = by_w.get((name, 0.0, 0.0)), by_w.get((name, 0.1, 0.1))
            if not (none and both):
                continue
            for where, prefix in (("training batches", "train_"), ("the test pass", "")):
                a, b = none.get(f"{prefix}cv_load"), both.get(f"{prefix}cv_load")
                if a is None or not b:
                    continue
                lines.append(f"{name}, on {where}: without balancing losses CV(load) = {a:.2f} and max/mean load = "
                             f"{none[f'{prefix}max_mean_load']:.2f}; with w = 0.1 each, {b:.2f} and "
                             f"{both[f'{prefix}max_mean_load']:.2f} ({a / b:.1f}x the CV).")
            lines.append(f"{name}: test perplexity {none['test_ppl']:.2f} without balancing losses, "
                         f"{both['test_ppl']:.2f} with w = 0.1 each.")
        return lines
    dense = [m for m in models if m["model"] in DENSE_MODELS]
    if not dense:
        return lines
    best = min(dense, key=lambda m: m["test_ppl"])
    for m in models:
        if m["model"] in DENSE_MODELS:
            continue
        change = 100 * (m["test_ppl"] / best["test_ppl"] - 1)
        ops = 100 * (m["ops_per_timestep"] / best["ops_per_timestep"] - 1)
        verdict = "below" if change < 0 else "above"
        lines.append(f"{m['name']}: test perplexity {m['test_ppl']:.2f}, {abs(change):.1f}% {verdict} the best dense "
                     f"baseline ({best['name']}, {best['test_ppl']:.2f}), at {ops:+.1f}% ops per timestep.")
    return lines


def plot_valid_curves(path: Path, models: Sequence[dict[str, Any]], eval_tokens: int) -> None:
    """Validation perplexity (on the first ``eval_tokens``) against training step, one line per model."""
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot()
    for m in models:
        h = m["history"]
        dense = m["model"] in DENSE_MODELS
        ax.plot(h["valid_step"], h["valid_ppl"], marker="o" if dense else "s", markersize=3,
                linestyle="--" if dense else "-", label=m["name"])
    ax.set_yscale("log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%g"))  # plain numbers, not 9x10^1, on the log axis
    ax.set_xlabel("training step")
    ax.set_ylabel(f"validation perplexity (first {eval_tokens:,} tokens)")
    ax.set_title("validation perplexity during training (dashed: dense)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    plots.save_figure(fig, path)


def plot_ppl_vs_experts(path: Path, models: Sequence[dict[str, Any]]) -> None:
    """Test perplexity against the number of experts at (nearly) fixed ops per timestep, beside Table 7."""
    fig = Figure(figsize=(10.0, 4.0))
    panels = [("this run", {m["model"]: m["test_ppl"] for m in models}),
              ("Shazeer et al. 2017, Table 7", {k: v[0] for k, v in PAPER_TABLE7.items()})]
    for i, (title, ppl) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        flat = sorted((int(name[4:]), v) for name, v in ppl.items()
                      if name.startswith("moe-") and name[4:].isdigit())
        if flat:
            ax.plot(*zip(*flat, strict=True), "s-", label="flat MoE (k=4)")
        hier = sorted((int(name[4:-2]), v) for name, v in ppl.items() if name.endswith("-h"))
        if hier:
            ax.plot(*zip(*hier, strict=True), "^-", label="hierarchical MoE (2x2)")
        for j, name in enumerate(n for n in DENSE_MODELS if n in ppl):
            ax.axhline(ppl[name], color=f"C{j + 2}", linestyle="--", linewidth=1, label=f"{name} (dense)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts")
        ax.set_ylabel("test perplexity")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    plots.save_figure(fig, path)


def plot_load_distribution(path: Path, models: Sequence[dict[str, Any]]) -> None:
    """Each MoE's per-expert load over the test pass, sorted, relative to the mean (1 = uniform)."""
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot()
    for m in models:
        if not m["load"] or len(m["load"]) < 2:
            continue
        load = np.sort(np.asarray(m["load"], dtype=np.float64))[::-1]
        rel = load / max(load.mean(), 1e-12)
        ranks = (np.arange(len(rel)) + 0.5) / len(rel)
        ax.plot(ranks, np.maximum(rel, 1e-3), label=f"{m['name']} (max/mean {rel.max():.2f})")
    ax.axhline(1.0, color="black", linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("expert rank / number of experts (most loaded first)")
    ax.set_ylabel("load / mean load (0 drawn at 0.001)")
    ax.set_title("per-expert load on the test pass")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    plots.save_figure(fig, path)


def _data_lines(data: LMData, metrics: dict[str, Any]) -> list[str]:
    t = metrics["tokens"]
    return [f"- Data: {data.source}. {data.split}.",
            f"- Tokens: train {t['train']:,}, validation {t['valid']:,}, test {t['test']:,}; word-level "
            f"vocabulary of {metrics['vocab_size']:,} built on the training split (<unk> is "
            f"{100 * metrics['test_unk_rate']:.1f}% of the test tokens)."]


def _setup_lines(cfg: LMJobConfig, metrics: dict[str, Any]) -> list[str]:
    env = metrics["environment"]
    total = sum(m["train_time_s"] + m["eval_time_s"] for m in metrics["models"])
    slowest = max(metrics["models"], key=lambda m: m["train_time_s"])
    losses = ("each scheme's router and balancing below" if cfg.balancing else
              f"balancing losses w_importance = {cfg.w_importance:g}, w_load = {cfg.w_load:g}"
              + (" (varied below)" if cfg.ablation else ""))
    columns = ("- In the \"train\" columns the load is the hard count of token-slots per expert, the CV and "
               "max/ideal averaged over the last 10% of the steps; dead experts computed no token-slot in the "
               "last 100 steps (test: in the whole test pass)." if cfg.balancing else
               "- Perplexities are over every validation/test token, in windows of the training length, each "
               "starting from a zero LSTM state. CV and max/mean load are over the whole test pass in eval mode "
               "(load = the hard count of tokens routed to each expert), except in \"train\" columns: there they "
               "are the batch-level values the balancing losses see (smooth load estimate), averaged over the last "
               "10% of the steps.")
    return [f"- Models: width D = {cfg.dim}, expert hidden F = {2 * cfg.dim}, k = {cfg.k}, dropout {cfg.dropout}; "
            f"{losses}.",
            f"- Training (preset `{cfg.preset}`): {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens "
            f"({cfg.steps * cfg.batch_size * cfg.seq_len:,} tokens, "
            f"{cfg.steps * cfg.batch_size * cfg.seq_len / metrics['tokens']['train']:.2f} epochs) per model; Adam, "
            f"peak lr {cfg.lr:g} after {cfg.warmup} warm-up steps, then 1/sqrt(step); gradient clipping at "
            f"{cfg.clip:g}; seed {cfg.seed}.",
            f"- Ran on {env['device']} ({env['torch_threads']} torch thread(s)), torch {env['torch']}: "
            f"{total / 60:.1f} min in all, training and evaluation (slowest model: {slowest['name']}, "
            f"{slowest['train_time_s'] / 60:.1f} min of training).",
            columns,
            "- Ops per timestep are multiply-adds without embedding and softmax (the paper's convention); the "
            "formula (`moekit.models.lstm_lm.ops_per_timestep`) is checked against torch's FlopCounterMode in "
            "the tests.",
            "- The paper trained on 1B words for 10 epochs; only the shape of its results is comparable here."]


def write_report(out: Path, cfg: LMJobConfig, data: LMData, metrics: dict[str, Any]) -> None:
    models = metrics["models"]
    title = ("Balancing-loss ablation (Table 6)" if cfg.ablation
             else "Balancing schemes side by side" if cfg.balancing
             else "LSTM-MoE vs compute-matched dense models (Table 7)")
    command = [f"- Command: `{metrics['command']}`"] if metrics["command"] else []
    schemes = [f"- `{name}`: {s.description}." for name, s in BALANCING.items()] if cfg.balancing else []
    table = balancing_table(models) if cfg.balancing else summary_table(models, cfg.ablation)
    found = balancing_findings(models) if cfg.balancing else findings(models, cfg.ablation)
    lines = [f"# moekit lm: {title}", "", *command, *_data_lines(data, metrics), *_setup_lines(cfg, metrics),
             *schemes, "", table, "", "## Findings", ""]
    lines += [f"- {line}" for line in found] or ["- (no comparison possible)"]
    lines += ["", "## Plots", "", "![validation perplexity](valid_ppl.png)", ""]
    if cfg.balancing:
        lines += ["![load over training](balancing_load.png)", ""]
    elif not cfg.ablation:
        lines += ["![perplexity vs experts](ppl_vs_experts.png)", ""]
    lines += ["![per-expert load](expert_load.png)", ""]
    write_text(out / REPORT_FILE, "\n".join(lines))


def write_outputs(out: Path, cfg: LMJobConfig, data: LMData, results: list[dict[str, Any]],
                  raw: dict[str, dict[str, torch.Tensor]],
                  device: torch.device | str, command: str | None = None) -> dict[str, Any]:
    """Write raw losses, plots, report.md and metrics.json (last: its presence marks a finished run)."""
    metrics = {
        "models": results,
        "command": command,
        "ablation": cfg.ablation,
        "balancing": cfg.balancing,
        "data": data.source,
        "split": data.split,
        "vocab_size": len(data.vocab),
        "tokens": {"train": data.train.numel(), "valid": data.valid.numel(), "test": data.test.numel()},
        "test_unk_rate": (data.test == data.vocab.unk_id).float().mean().item(),
        "environment": environment(device),
    }
    write_json(out / "vocab.json", data.vocab.to_list())
    arrays: dict[str, Any] = {"valid_targets": data.valid[1:].numpy().astype(np.int32),
              "test_targets": data.test[1:].numpy().astype(np.int32)}
    for label, losses in raw.items():
        arrays.update({f"{label}__{name}": t.numpy() for name, t in losses.items()})
    atomic_write(out / "eval_nll.npz", lambda f: np.savez_compressed(f, **arrays))
    plot_valid_curves(out / "valid_ppl.png", results, cfg.eval_tokens)
    if cfg.balancing:
        plot_balancing(out / "balancing_load.png", results)
    elif not cfg.ablation:
        plot_ppl_vs_experts(out / "ppl_vs_experts.png", results)
    plot_load_distribution(out / "expert_load.png", results)
    for m in results:
        if m["load"] and len(m["load"]) <= 64:  # a bar per expert stays readable up to about 64
            plots.plot_expert_load(out / f"expert_load_{m['name']}.png", m["importance"], m["load"],
                                   title=f"{m['name']}: expert share on the test pass")
    write_report(out, cfg, data, metrics)
    write_json(out / METRICS_FILE, metrics)
    return metrics
