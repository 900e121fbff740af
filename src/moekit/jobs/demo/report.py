"""The demo's outputs: metrics.json, report.md, plots and the per-token raw results."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moekit.data import Vocab
from moekit.jobs.demo.config import DemoConfig
from moekit.train import plots
from moekit.train.checkpoint import atomic_write
from moekit.train.loop import TrainState
from moekit.train.outdir import METRICS_FILE, REPORT_FILE, write_json, write_text
from moekit.train.runtime import environment

if TYPE_CHECKING:
    from moekit.jobs.demo.job import EvalResult


def _cv(values: list[float]) -> float:
    # Coefficient of variation with the population std, as in the Shazeer et al. balancing losses.
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return math.sqrt(var) / mean if mean > 0 else float("nan")


def expert_table(ev: EvalResult) -> str:
    imp_total, load_total = sum(ev.importance) or 1.0, sum(ev.load) or 1.0
    rows = [
        "| expert | importance | importance share | load | load share | counts |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for e, (imp, ld, cnt) in enumerate(zip(ev.importance, ev.load, ev.counts, strict=True)):
        rows.append(f"| {e} | {imp:.1f} | {imp / imp_total:.3f} | {ld:.1f} | {ld / load_total:.3f} | {cnt} |")
    return "\n".join(rows)


def _expert_summary(ev: EvalResult) -> dict[str, Any]:
    mean_load = sum(ev.load) / len(ev.load)
    return {
        "importance": ev.importance,
        "load": ev.load,
        "counts": ev.counts,
        "dropped": ev.dropped,
        "cv_importance": _cv(ev.importance),
        "cv_load": _cv(ev.load),
        "max_over_mean_load": max(ev.load) / mean_load if mean_load > 0 else float("nan"),
    }


def _save_npz(path: Path, **arrays: Any) -> None:
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def _report(cfg: DemoConfig, metrics: dict[str, Any], train_ev: EvalResult, valid_ev: EvalResult) -> str:
    ex = metrics["experts"]
    config_rows = "\n".join(f"| {k} | {v} |" for k, v in dataclasses.asdict(cfg).items())
    return f"""# moekit demo

Word-level language model: embedding ({cfg.dim}) -> MoE ({cfg.num_experts} experts, k={cfg.k},
hidden {cfg.hidden_dim}, router `{cfg.router}`) with a residual -> softmax over {metrics["vocab_size"]}
words. Data: {metrics["data"]}. Loss: cross-entropy + the MoE balancing loss.

## Results after {metrics["steps"]} steps ({metrics["train_tokens_seen"]:,} training tokens)

| set | tokens | cross-entropy (nats) | perplexity |
|---|---:|---:|---:|
| train (fixed random sample) | {metrics["train"]["tokens"]:,} | {train_ev.loss:.4f} | {train_ev.ppl:.2f} |
| validation | {metrics["valid"]["tokens"]:,} | {valid_ev.loss:.4f} | {valid_ev.ppl:.2f} |

Training time: {metrics["train_time_s"]:.1f} s on {metrics["environment"]["device"]}
({metrics["environment"]["torch_threads"]} threads).

## Experts on the validation pass

{expert_table(valid_ev)}

CV(importance) = {ex["cv_importance"]:.3f}, CV(load) = {ex["cv_load"]:.3f},
max/mean load = {ex["max_over_mean_load"]:.3f}, dropped token-slots = {ex["dropped"]}.

![loss curves](loss.png)

![expert load](expert_load.png)

## Files

`config.json` (this configuration), `metrics.json` (all numbers above, loss history),
`eval_tokens.npz` (per-token targets and cross-entropy of both evaluations, and each
validation token's experts and gate weights: the perplexities and expert table can be recomputed
from it), `vocab.json`, `checkpoints/` (the last training state).

## Configuration

| key | value |
|---|---|
{config_rows}
"""


def write_outputs(
    out: Path,
    cfg: DemoConfig,
    state: TrainState,
    vocab: Vocab,
    source: str,
    train_ev: EvalResult,
    valid_ev: EvalResult,
    device: torch.device,
) -> dict[str, Any]:
    """Write metrics.json (last, as the mark of a finished run), report.md, plots and raw outputs."""
    hist = state.history
    metrics = {
        "steps": state.step,
        "train_tokens_seen": state.step * cfg.batch_size * cfg.seq_len,
        "train_time_s": state.elapsed_s,
        "vocab_size": len(vocab),
        "data": source,
        "train": {"loss": train_ev.loss, "ppl": train_ev.ppl, "tokens": int(train_ev.targets.numel())},
        "valid": {"loss": valid_ev.loss, "ppl": valid_ev.ppl, "tokens": int(valid_ev.targets.numel())},
        "experts": _expert_summary(valid_ev),
        "history": hist,
        "environment": environment(device),
    }
    write_json(out / "vocab.json", vocab.to_list())
    _save_npz(
        out / "eval_tokens.npz",
        train_targets=train_ev.targets.numpy().astype(np.int32),
        train_nll=train_ev.nll.numpy(),
        valid_targets=valid_ev.targets.numpy().astype(np.int32),
        valid_nll=valid_ev.nll.numpy(),
        valid_expert_indices=valid_ev.expert_indices.numpy().astype(np.int16),
        valid_expert_weights=valid_ev.expert_weights.numpy(),
    )
    plots.plot_loss_curves(
        out / "loss.png",
        hist["train_step"],
        hist["train_loss"],
        hist["valid_step"],
        hist["valid_loss"],
        title="demo: cross-entropy",
    )
    plots.plot_expert_load(
        out / "expert_load.png",
        valid_ev.importance,
        valid_ev.load,
        title="demo: expert share on the validation pass",
    )
    write_text(out / REPORT_FILE, _report(cfg, metrics, train_ev, valid_ev))
    write_json(out / METRICS_FILE, metrics)
    return metrics


