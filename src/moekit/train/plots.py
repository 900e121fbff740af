"""Plots of a run, drawn with matplotlib's Agg backend.

Figures are built with ``matplotlib.figure.Figure`` and an Agg canvas rather than through
``pyplot``, so plotting needs no display and never changes the backend of a caller's session.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moekit.train.checkpoint import atomic_write


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Lay out ``fig`` and write it as a PNG, atomically (a reader never sees half an image)."""
    path = Path(path)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    return path


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curves(
    path: str | Path,
    train_steps: Sequence[int],
    train_loss: Sequence[float],
    valid_steps: Sequence[int],
    valid_loss: Sequence[float],
    title: str = "loss",
) -> Path:
    """Training loss per step (raw and a moving average) and validation loss, in nats/token."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    if train_steps:
        window = max(1, len(train_loss) // 20)
        label = "train"
        if window > 1:
            ax.plot(train_steps, train_loss, color="tab:blue", alpha=0.25, linewidth=0.8)
            label = f"train (moving average of {window} steps)"
        ax.plot(train_steps, _moving_average(train_loss, window), color="tab:blue", label=label)
    if valid_steps:
        ax.plot(valid_steps, valid_loss, "o-", color="tab:orange", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_expert_load(
    path: str | Path,
    importance: Sequence[float],
    load: Sequence[float],
    title: str = "per-expert share",
) -> Path:
    """Bar chart of each expert's share of importance and of load; the dashed line is uniform."""
    n = len(importance)
    imp_total, load_total = sum(importance) or 1.0, sum(load) or 1.0
    xs = list(range(n))
    width = 0.4
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    ax.bar([x - width / 2 for x in xs], [v / imp_total for v in importance], width, label="importance")
    ax.bar([x + width / 2 for x in xs], [v / load_total for v in load], width, label="load")
    ax.axhline(1.0 / max(n, 1), color="black", linestyle="--", linewidth=0.8, label="uniform")
    ax.set_xticks(xs)
    ax.set_xlabel("expert")
    ax.set_ylabel("share")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)
