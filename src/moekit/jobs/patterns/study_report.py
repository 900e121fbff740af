"""study.md and study.png of the SPMoE-vs-hMoEup study (``moekit.jobs.patterns.study``), from its rows.

A row is one model of one point: ``point``, ``group`` (what the point changes), ``data`` ("kjv" or
"synthetic"), ``model`` ("spmoe" or "hmoe"), ``seed``, the generation metrics of
``moekit.metrics.generation`` and the training time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from moekit.train.plots import save_figure

LABELS = {"spmoe": "SPMoE", "hmoe": "hMoEup"}
KJV_GROUPS = ("baseline", "MLP pattern heads", "capacity-factor 1.0", "capacity-factor 2.0", "gate-weight 0.3",
              "gate-weight 3", "pre-trained backbone", "pre-trained backbone, capacity-factor 2.0")
SYNTHETIC_GROUPS = ("one-to-many data", "one-to-one data")


def _cell(rows: list[dict[str, Any]], key: str, digits: int = 1) -> str:
    """The mean over seeds, with the seeds' values when there are several."""
    values = [r[key] for r in rows]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ({', '.join(f'{v:.{digits}f}' for v in values)})"


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def _pick(rows, group, model):
    return sorted((r for r in rows if r["group"] == group and r["model"] == model), key=lambda r: r["seed"])


def kjv_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| change | model | seeds | BLEU (mean of K) | oracle BLEU | pairwise BLEU | distinct-2 | "
             "oracle - hMoEup | pairwise - hMoEup | train time (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    reference, pretrained = _pick(rows, "baseline", "hmoe"), _pick(rows, "pre-trained backbone", "hmoe")
    for group in KJV_GROUPS:
        # A pre-trained SPMoE is compared with the hMoEup trained from the same pre-trained backbone.
        ref = _pick(rows, group, "hmoe") or (pretrained if group.startswith("pre-trained") else reference)
        for model in ("spmoe", "hmoe"):
            chosen = _pick(rows, group, model)
            if not chosen:
                continue
            gap = "" if model == "hmoe" or not ref else (
                f"{_mean(chosen, 'oracle_bleu') - _mean(ref, 'oracle_bleu'):+.1f} | "
                f"{_mean(chosen, 'pairwise_bleu') - _mean(ref, 'pairwise_bleu'):+.1f}")
            lines.append(f"| {group} | {LABELS[model]} | {len(chosen)} | {_cell(chosen, 'bleu')} | "
                         f"{_cell(chosen, 'oracle_bleu')} | {_cell(chosen, 'pairwise_bleu')} | "
                         f"{_cell(chosen, 'distinct_2', 3)} | {gap or ' | '} | {_cell(chosen, 'train_s', 0)} |")
    return "\n".join(lines)


def synthetic_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| training data | model | seeds | oracle BLEU | pairwise BLEU | refs covered (closest output) | "
             "refs matched exactly |", "|---|---|---:|---:|---:|---:|---:|"]
    for group in SYNTHETIC_GROUPS:
        for model in ("spmoe", "hmoe"):
            chosen = _pick(rows, group, model)
            if chosen:
                lines.append(f"| {group} | {LABELS[model]} | {len(chosen)} | {_cell(chosen, 'oracle_bleu')} | "
                             f"{_cell(chosen, 'pairwise_bleu')} | {_cell(chosen, 'refs_covered', 3)} | "
                             f"{_cell(chosen, 'refs_covered_exact', 3)} |")
    return "\n".join(lines)


def study_markdown(summary: dict[str, Any]) -> str:
    rows, wall = summary["rows"], summary.get("wall_seconds")
    return f"""# SPMoE against hMoEup: what closes the gap

Command: `{summary["command"]}`{"" if wall is None else f" ({wall / 60:.0f} minutes of wall time)"}.

BLEU is sacrebleu corpus BLEU on lower-cased word tokens; "oracle" takes the best of the K outputs of
each input; pairwise BLEU compares the K outputs of an input with each other (lower = more diverse).
Values are means over seeds, the seeds' own values in brackets. The gaps are SPMoE minus hMoEup
(positive oracle = SPMoE better; negative pairwise = SPMoE more diverse), against the hMoEup trained
the same way (from scratch, or from the same pre-trained backbone).

## KJV -> WEB, K = 3

{kjv_table(rows)}

## Synthetic set, K = 4 known rules, 4 references per test source

{synthetic_table(rows)}

![quality against diversity](study.png)
"""


def plot_study(path: Path, rows: list[dict[str, Any]]) -> None:
    """Oracle BLEU against pairwise BLEU for every row: KJV -> WEB and the synthetic sets side by side."""
    fig = Figure(figsize=(12.0, 4.8))
    for i, (data, groups) in enumerate((("kjv", KJV_GROUPS), ("synthetic", SYNTHETIC_GROUPS))):
        ax = fig.add_subplot(1, 2, i + 1)
        for j, group in enumerate(groups):
            for model, marker in (("spmoe", "o"), ("hmoe", "s")):
                chosen = [r for r in rows if r["data"] == data and r["group"] == group and r["model"] == model]
                if chosen:
                    ax.scatter([r["pairwise_bleu"] for r in chosen], [r["oracle_bleu"] for r in chosen],
                               marker=marker, color=f"C{j}", s=45, label=f"{LABELS[model]}, {group}",
                               facecolors="none" if model == "hmoe" else f"C{j}")
        ax.set(xlabel="pairwise BLEU among the K outputs (lower = more diverse)", ylabel="oracle BLEU (best of K)",
               title="KJV -> WEB, K = 3" if data == "kjv" else "synthetic, K = 4 rules")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small", loc="best")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
