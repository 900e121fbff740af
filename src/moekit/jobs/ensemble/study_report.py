"""study.md and the plots of the E^3 sweep (``moekit.jobs.ensemble.study``), from its rows.

A row is one model of the study: ``config`` ("last_n-k1", ...), ``family`` ("V-MoE", "E^3",
"deep ensemble", and the extras), ``M``, ``seed``, ``gflops`` per example, accuracy, NLL, ECE,
Brier, the members' top-1 disagreement and mean pairwise KL, and the few-shot accuracies
(``fewshot[set][shots]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from moekit.train.plots import save_figure

CONFIG_WORDS = {"last_n-k1": "last 2 odd blocks, K=1", "last_n-k2": "last 2 odd blocks, K=2",
                "every_2-k1": "every odd block, K=1", "every_2-k2": "every odd block, K=2"}
MARKERS = {"V-MoE": "o", "E^3": "^", "deep ensemble": "s", "dense ViT": "x", "Soft MoE": "D",
           "V-MoE (expert choice)": "v"}


def _fewshot(row: dict[str, Any], name: str, shots: int) -> float | None:
    r = row["fewshot"].get(name, {}).get(str(shots))
    return None if r is None else r["accuracy"]


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def _std(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _select(rows, config=None, family=None, m=None):
    return [r for r in rows if (config is None or r["config"] == config) and (family is None or r["family"] == family)
            and (m is None or r["M"] == m)]


def fewshot_set(rows: list[dict[str, Any]]) -> str:
    """The transfer set ("ood", the digits) when the rows have it, else the test set's classes."""
    return "ood" if any("ood" in r["fewshot"] for r in rows) else "test"


def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _row_line(r: dict[str, Any], label: str) -> str:
    fs = [_fmt(_fewshot(r, name, s), 3) for name in ("test", "ood") for s in (1, 5, 10)]
    return (f"| {label} | {r['M']} | {r['gflops'] * 1e3:.2f} | {_fmt(r['accuracy'])} | {_fmt(r['nll'])} | "
            f"{_fmt(r['ece'])} | {_fmt(r['disagreement'])} | {_fmt(r['kl'])} | " + " | ".join(fs) + " |")


TABLE_HEAD = ("| model (seed) | M | MFLOPs | accuracy | NLL | ECE | disagreement | pairwise KL | test 1-shot | "
              "test 5-shot | test 10-shot | digits 1-shot | digits 5-shot | digits 10-shot |\n|---|" + "---:|" * 13)
STUDIED = ("V-MoE", "E^3", "deep ensemble")


def results_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for config in CONFIG_WORDS:
        chosen = [r for r in _select(rows, config) if r["family"] in STUDIED]
        if not chosen:
            continue
        lines += [f"**{CONFIG_WORDS[config]}**", "", TABLE_HEAD]
        order = {"V-MoE": 0, "E^3": 1, "deep ensemble": 2}
        for r in sorted(chosen, key=lambda r: (order.get(r["family"], 3), r["M"], r["seed"])):
            lines.append(_row_line(r, f"{r['family']} ({r['seed']})"))
        lines.append("")
    extras = [r for r in rows if r["family"] not in STUDIED]
    if extras:
        lines += ["**Other models (K = 1, last 2 odd blocks)**", "", TABLE_HEAD]
        lines += [_row_line(r, f"{r['family']} ({r['seed']})") for r in extras]
    return "\n".join(lines)


def _diff(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> float | None:
    """Mean of ``key`` over rows ``a`` minus its mean over rows ``b`` (None when either has none)."""
    mean_a, mean_b = _mean(a, key), _mean(b, key)
    return None if mean_a is None or mean_b is None else mean_a - mean_b


def _signed(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.4f}"


def against_vmoe(rows: list[dict[str, Any]]) -> str:
    """E^3 and the deep ensemble at each M against the single V-MoE's mean and seed spread."""
    fs = fewshot_set(rows)
    head = ("| configuration | M | V-MoE NLL, mean ± sd (seeds) | E^3 NLL - V-MoE | deep ens. NLL - V-MoE | "
            "E^3's share of the deep ensemble's NLL gain | E^3 ECE - V-MoE | E^3 acc. - V-MoE | "
            f"E^3 5-shot - V-MoE ({'digits' if fs == 'ood' else 'test'}) | disagreement E^3 / deep ens. |")
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    key_5shot = "fewshot_5"
    for config in CONFIG_WORDS:
        single = [{**r, key_5shot: _fewshot(r, fs, 5)} for r in _select(rows, config, "V-MoE", 1)]
        if not single:
            continue
        for m in (2, 4):
            e3 = [{**r, key_5shot: _fewshot(r, fs, 5)} for r in _select(rows, config, "E^3", m)]
            deep = _select(rows, config, "deep ensemble", m)
            d_e3, d_deep = _diff(e3, single, "nll"), _diff(deep, single, "nll")
            if d_e3 is None:
                continue
            share = None if not d_deep else d_e3 / d_deep
            lines.append(
                f"| {CONFIG_WORDS[config]} | {m} | {_fmt(_mean(single, 'nll'))} ± {_fmt(_std(single, 'nll'))} "
                f"({len(single)}) | {d_e3:+.4f} ({len(e3)} seed{'s' if len(e3) > 1 else ''}) | {_signed(d_deep)} | "
                f"{_fmt(share, 2)} | {_signed(_diff(e3, single, 'ece'))} | {_signed(_diff(e3, single, 'accuracy'))} | "
                f"{_signed(_diff(e3, single, key_5shot))} | {_fmt(_mean(e3, 'disagreement'))} / "
                f"{_fmt(_mean(deep, 'disagreement'))} |")
    return "\n".join(lines)


def study_markdown(summary: dict[str, Any]) -> str:
    rows = summary["rows"]
    wall = summary.get("wall_seconds")
    return f"""# E^3 sweep: performance against FLOPs

Command: `{summary["command"]}`{"" if wall is None else f" ({wall / 60:.0f} minutes of wall time)"}.

FLOPs are per test image, counted by FlopCounterMode on the evaluation forward pass (a deep
ensemble: the sum of its members). "disagreement" is the members' mean pairwise top-1
disagreement, "pairwise KL" their mean KL divergence (nats). Few-shot: accuracy of closed-form
ridge probes on the frozen pre-logits (an ensemble's members side by side), mean of 5 draws;
"digits" is the transfer set (scikit-learn's digits), "test" the training classes.

## E^3 against the single V-MoE

{against_vmoe(rows)}

The V-MoE's spread is the sample standard deviation over its seeds. "Share of the deep ensemble's
NLL gain": the E^3's NLL improvement over the mean single V-MoE divided by the deep ensemble's of
the same M (1 = as good as the deep ensemble, 0 = no better than one V-MoE).

## Every model

{results_table(rows)}

![trade-off](tradeoff.png)

![few-shot](fewshot.png)

![diversity](diversity.png)
"""


def _config_color(config: str) -> str:
    return {c: f"C{i}" for i, c in enumerate(CONFIG_WORDS)}.get(config, "k")


def _curve(rows, config, family, key):
    """(MFLOPs, metric mean, metric values per seed) per M of one family in one configuration, with
    the single V-MoE (M = 1) in front."""
    points = []
    for m in (1, 2, 4):
        chosen = _select(rows, config, "V-MoE" if m == 1 else family, m)
        values = [r[key] for r in chosen if r.get(key) is not None]
        if values:
            points.append((np.mean([r["gflops"] for r in chosen]) * 1e3, float(np.mean(values)), values))
    return points


def plot_study(out: Path, rows: list[dict[str, Any]]) -> None:
    """tradeoff.png (NLL, ECE, accuracy against MFLOPs), fewshot.png and diversity.png."""
    fs = fewshot_set(rows)
    for name, panels in (("tradeoff.png", [("nll", "test NLL (nats)"), ("ece", "ECE (15 bins)"),
                                           ("accuracy", "test accuracy")]),
                         ("fewshot.png", [(f"{fs}:{s}", f"{s}-shot accuracy ({'digits' if fs == 'ood' else 'test'})")
                                          for s in (1, 5, 10)])):
        rows_k = rows if ":" not in panels[0][0] else [
            {**r, **{f"{fs}:{s}": _fewshot(r, fs, s) for s in (1, 5, 10)}} for r in rows]
        fig = Figure(figsize=(5.0 * len(panels), 4.4))
        for i, (key, label) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            _draw_tradeoff(ax, rows_k, key)
            ax.set(xlabel="MFLOPs per image", ylabel=label)
            ax.grid(alpha=0.3)
        if fig.axes[0].get_legend_handles_labels()[0]:
            fig.axes[0].legend(fontsize="x-small", loc="best")
        fig.tight_layout()
        save_figure(fig, out / name, dpi=100)
    fig = Figure(figsize=(5.4, 4.2))
    ax = fig.add_subplot()
    for config in CONFIG_WORDS:
        for family, style in (("E^3", "-"), ("deep ensemble", "--")):
            pts = [(m, _mean(_select(rows, config, family, m), "disagreement")) for m in (2, 4)]
            pts = [(m, v) for m, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, marker=MARKERS[family], color=_config_color(config),
                        label=f"{family}, {CONFIG_WORDS[config]}")
    ax.set(xlabel="members M", ylabel="members' top-1 disagreement", xticks=[2, 4], yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    save_figure(fig, out / "diversity.png", dpi=100)


def _draw_tradeoff(ax, rows: list[dict[str, Any]], key: str) -> None:
    for config in CONFIG_WORDS:
        color = _config_color(config)
        for family, style in (("E^3", "-"), ("deep ensemble", "--")):
            pts = _curve(rows, config, family, key)
            if len(pts) < 2:
                continue
            xs, means, _ = zip(*pts, strict=True)
            ax.plot(xs, means, style, color=color, linewidth=1, alpha=0.8)
            for x, _, values in pts[1:]:
                ax.scatter([x] * len(values), values, marker=MARKERS[family], color=color, s=28,
                           label=f"{family}, {CONFIG_WORDS[config]}" if x == pts[1][0] else None)
        single = [r[key] for r in _select(rows, config, "V-MoE", 1) if r.get(key) is not None]
        if single:
            x = np.mean([r["gflops"] for r in _select(rows, config, "V-MoE", 1)]) * 1e3
            ax.errorbar([x], [np.mean(single)], yerr=[np.std(single, ddof=1)] if len(single) > 1 else None,
                        marker="o", color=color, capsize=3, label=f"V-MoE (mean ± sd of seeds), {CONFIG_WORDS[config]}")
    for r in rows:
        if r["family"] in ("dense ViT", "Soft MoE", "V-MoE (expert choice)") and r.get(key) is not None:
            ax.scatter([r["gflops"] * 1e3], [r[key]], marker=MARKERS[r["family"]], color="k", s=36, label=r["family"])
