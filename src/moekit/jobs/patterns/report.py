"""report.md and the quality-vs-diversity plot of a ``moekit patterns`` run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from moekit.train.plots import save_figure

PLOT_FILE = "quality_vs_diversity.png"
OUTPUT_NAMES = {"spmoe": "pattern", "hmoe": "expert", "beam": "beam", "sampling": "sample"}
LABELS = {"spmoe": "SPMoE", "hmoe": "hMoEup", "beam": "top-K beam", "sampling": "K samples"}


def plot_quality_vs_diversity(path: str | Path, metrics: dict[str, dict[str, Any]], title: str) -> Path:
    """Per model: oracle (best-of-K) BLEU (filled) and mean BLEU of an output (hollow) against the
    pairwise BLEU among its K outputs. Down-left is diverse and poor, up-left diverse and good."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for i, (model, m) in enumerate(metrics.items()):
        color = f"C{i}"
        x = m["pairwise_bleu"]
        ax.plot([x, x], [m["bleu"], m["oracle_bleu"]], color=color, linewidth=1, alpha=0.6)
        ax.scatter([x], [m["oracle_bleu"]], color=color, s=60, label=f"{LABELS.get(model, model)}")
        ax.scatter([x], [m["bleu"]], facecolors="none", edgecolors=color, s=60)
    ax.set_xlabel("pairwise BLEU among the K outputs (lower = more diverse)")
    ax.set_ylabel("BLEU: oracle best-of-K (filled), mean output (hollow)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return save_figure(fig, path)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _metrics_table(metrics: dict[str, dict[str, Any]]) -> str:
    rows = ["| model | BLEU (mean of K) | oracle BLEU | pairwise BLEU | distinct-1 | distinct-2 | refs covered "
            "| refs matched exactly | usage (closest output per reference) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for model, m in metrics.items():
        rows.append(f"| {LABELS.get(model, model)} | {m['bleu']:.2f} | {m['oracle_bleu']:.2f} | "
                    f"{m['pairwise_bleu']:.2f} | {m['distinct_1']:.3f} | {m['distinct_2']:.3f} | "
                    f"{m['refs_covered']:.3f} | {m['refs_covered_exact']:.3f} | {_fmt(m['pattern_usage'])} |")
    return "\n".join(rows)


def _training_table(metrics: dict[str, dict[str, Any]]) -> str:
    rows = ["| model | network | steps | train time (s) | final train NLL/token | training assignment share "
            "| purity (known patterns) |", "|---|---|---:|---:|---:|---|---|"]
    for model, m in metrics.items():
        t = m["train"]
        share = _fmt(t["assignment_share"]) if t.get("assignment_share") else "-"
        pur = "-"
        if t.get("purity"):
            pur = f"{t['purity']['purity']:.3f} (per pattern {_fmt(t['purity']['per_pattern'])})"
        rows.append(f"| {LABELS.get(model, model)} | {t['network']} | {t['steps']} | {t['time_s']:.0f} | "
                    f"{t['final_nll']:.3f} | {share} | {pur} |")
    return "\n".join(rows)


def _examples(examples: list[dict[str, Any]], outputs: dict[str, list[list[str]]], n: int) -> str:
    parts = []
    for i, ex in enumerate(examples[:n]):
        lines = [f"**Input {i + 1}.** {ex['source']}", ""]
        for r, ref in enumerate(ex["references"]):
            lines.append(f"- reference {r + 1}: {ref}")
        for model, outs in outputs.items():
            for k, o in enumerate(outs[i]):
                lines.append(f"- {LABELS.get(model, model)}, {OUTPUT_NAMES.get(model, 'output')} {k}: {o or '(empty)'}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _pretraining(info: dict[str, Any]) -> str:
    p = info.get("pretrain")
    if not p:
        return ""
    return (f"\nEvery network's backbone starts from one pre-trained for {p['steps']} steps to reconstruct the "
            f"{p['texts']:,} training texts (sources and targets) from BART's text infilling (final NLL/token "
            f"{p['final_nll']:.3f}, {p['time_s']:.0f} s).")


def render_report(info: dict[str, Any], metrics: dict[str, dict[str, Any]], examples: list[dict[str, Any]],
                  outputs: dict[str, list[list[str]]], n_examples: int = 5) -> str:
    """The Markdown report: setup, metrics, training, plot and example outputs per pattern."""
    cfg = info["config"]
    return f"""# moekit patterns: K = {cfg['patterns']} outputs per input

Data: {info['data']} ({info['train_pairs']:,} training pairs, {info['test_inputs']} test inputs scored,
vocabulary {info['vocab_size']:,} words). Preset `{cfg['preset']}`: transformer encoder-decoder of width
{cfg['sizes']['dim']}, {cfg['sizes']['layers']}+{cfg['sizes']['layers']} layers; every network trained
{cfg['sizes']['steps']} steps of {cfg['sizes']['batch_size']} pairs on {info['device']}
(torch threads: {info['threads']}). Beam {cfg['beam']}; SPMoE heads `{cfg['spmoe']['head']}`, capacity factor
{cfg['spmoe']['capacity_factor']}, gate weight {cfg['spmoe']['gate_weight']}.{_pretraining(info)}

Each model gives K outputs per input: SPMoE one per pattern head, hMoEup one per `<expert_i>` start
token (each with its own beam search), the single model its top-K beam hypotheses or K ancestral
samples. BLEU is sacrebleu corpus BLEU on lower-cased word tokens: "mean of K" averages the BLEU
of output 1, ..., output K; "oracle" takes the best output of each input (by sentence BLEU).
Pairwise BLEU compares the K outputs of an input with each other (lower = more diverse).
"Refs covered" is the share of references that are the closest reference of some output
(Shen et al. 2019); "matched exactly" asks for an identical output.

## Results

{_metrics_table(metrics)}

![quality vs diversity]({PLOT_FILE})

## Training

{_training_table(metrics)}

The assignment share is over the training pairs of the last 100 steps; purity maps each pattern to
the known pattern most of its training pairs follow (synthetic data only).

## Examples

{_examples(examples, outputs, n_examples)}

## Files

`config.json`, `metrics.json` (all numbers above), `outputs_<model>.jsonl` (per test input: the
source, the K outputs and the references, from which every metric can be recomputed),
`{PLOT_FILE}`, `checkpoints/` (the trained networks).
"""
