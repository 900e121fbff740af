"""Outputs of ``moekit upcycle``: metrics.json, report.md, the perplexity plot, raw losses and the weights.

Legend: L upcycled layers, E experts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from moekit.jobs.upcycle.config import UpcycleConfig
from moekit.safetensors_io import save_safetensors
from moekit.train import plots
from moekit.train.checkpoint import atomic_write
from moekit.train.outdir import METRICS_FILE, REPORT_FILE, write_json, write_text
from moekit.train.runtime import environment

COLORS = {"dense": "tab:gray", "dense-continued": "tab:blue", "upcycled": "tab:orange"}


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def load_summary(counts_LE: list[list[int]] | None) -> dict[str, Any] | None:
    """Each upcycled layer's expert load on the validation pass: share of the even split, max/ideal, dead."""
    if counts_LE is None:
        return None
    counts = torch.tensor(counts_LE, dtype=torch.float64)
    ideal_L1 = counts.sum(1, keepdim=True) / counts.shape[1]
    share = counts / ideal_L1.clamp_min(1e-12)
    return {"load_over_ideal": share.tolist(), "max_over_ideal": share.max(1).values.tolist(),
            "dead_experts": (counts == 0).sum(1).tolist()}


def findings(runs: dict[str, dict[str, Any]]) -> list[str]:
    """What the run shows, in words, from its numbers."""
    dense, cont, up = runs["dense"], runs["dense-continued"], runs["upcycled"]
    diff = up["valid_ppl"] - cont["valid_ppl"]
    rel = diff / cont["valid_ppl"]
    better = "lower" if diff < 0 else "higher"
    return [
        f"After {cont['steps']} more steps from the dense model (validation perplexity {dense['valid_ppl']:.2f}), "
        f"the upcycled model reaches {up['valid_ppl']:.2f} and the dense model continued {cont['valid_ppl']:.2f}: "
        f"{abs(rel):.1%} {better} for the upcycled model (test: {up['test_ppl']:.2f} vs {cont['test_ppl']:.2f}).",
        f"It uses {up['active_params'] / cont['active_params']:.2f}x the dense parameters per token and holds "
        f"{up['params'] / cont['params']:.2f}x as many; its continuation took "
        f"{up['train_time_s'] / max(cont['train_time_s'], 1e-9):.2f}x the dense continuation's training time here.",
    ]


def summary_table(metrics: dict[str, Any]) -> str:
    rows = ["| run | steps | params | active params/token | valid PPL | test PPL | train time (s) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in metrics["runs"].items():
        steps = f"{r['first_step']}-{r['first_step'] + r['steps']}"
        rows.append(f"| {name} | {steps} | {_count(r['params'])} | {_count(r['active_params'])} | "
                    f"{r['valid_ppl']:.2f} | {r['test_ppl']:.2f} | {r['train_time_s']:.0f} |")
    return "\n".join(rows)


def plot_valid_ppl(path: Path, runs: dict[str, dict[str, Any]], cfg: UpcycleConfig) -> Path:
    """Validation perplexity against the step: the whole run (left, log scale), and the two
    continuations from the dense model's end, side by side (right)."""
    fig = Figure(figsize=(10.0, 4.2))
    whole, zoom = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    start = (cfg.dense_steps, runs["dense"]["history"]["valid_ppl"][-1])
    for name, r in runs.items():
        h = r["history"]
        steps = [r["first_step"] + s for s in h.get("valid_step", [])]
        ppl = list(h.get("valid_ppl", []))
        if name != "dense":  # every continuation starts where the dense run ended
            steps, ppl = [start[0], *steps], [start[1], *ppl]
            zoom.plot(steps, ppl, "o-", markersize=3, color=COLORS[name], label=name)
        whole.plot(steps, ppl, "o-", markersize=3, color=COLORS[name], label=name)
    whole.axvline(cfg.dense_steps, color="black", linestyle=":", linewidth=0.8)
    whole.set_yscale("log")
    whole.set_xlabel("training step (the continuations start at the dotted line)")
    whole.set_ylabel(f"validation perplexity ({cfg.eval_tokens:,} tokens)")
    zoom.set_xlabel("training step")
    zoom.set_title(f"the continuations: {cfg.continue_steps} steps each")
    whole.set_title(f"sparse upcycling ({cfg.num_experts} experts, k={cfg.k}) vs continuing dense")
    for ax in (whole, zoom):
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    return plots.save_figure(fig, path)


def _report(cfg: UpcycleConfig, metrics: dict[str, Any]) -> str:
    config_rows = "\n".join(f"| {k} | {v} |" for k, v in dataclasses.asdict(cfg).items())
    lines = "\n".join(f"- {line}" for line in metrics["findings"])
    load = metrics["runs"]["upcycled"]["expert_load"]
    load_rows = "\n".join(f"| {layer} | {mx:.2f} | {dead} |" for layer, (mx, dead) in
                          enumerate(zip(load["max_over_ideal"], load["dead_experts"], strict=True))) if load else ""
    return f"""# moekit upcycle

Sparse upcycling (Komatsuzaki et al. 2022) of a small dense Llama-architecture language model
(transformers' `LlamaForCausalLM` built from a `LlamaConfig`: width {cfg.dim}, {cfg.layers} layers,
{cfg.heads} heads, SwiGLU MLP of width {cfg.hidden_dim}, tied embeddings, vocabulary of
{metrics["vocab_size"]} words). Data: {metrics["data"]}.

1. `dense`: trained from scratch for {cfg.dense_steps} steps (AdamW, peak learning rate {cfg.lr:g},
   {cfg.warmup} warm-up steps, then 1/sqrt(step) decay).
2. `dense-continued`: the dense model continued for {cfg.continue_steps} steps.
3. `upcycled`: the dense model with every MLP made an MoE of {cfg.num_experts} copies of it
   (`moekit.hf.upcycle_model`: a new top-{cfg.k} softmax router per layer, importance loss
   weight {cfg.w_importance:g}), continued for the same {cfg.continue_steps} steps.

Both continuations start from the dense weights with a fresh AdamW re-warmed over {cfg.rewarmup}
steps to the dense schedule's rate, and see the same batches. Batches of {cfg.batch_size} x
{cfg.seq_len} tokens.

## Results

{summary_table(metrics)}

{lines}

![validation perplexity](valid_ppl.png)

The table's perplexities are on the whole validation and test splits; the curve's points, taken
during training, on the first {cfg.eval_tokens:,} validation tokens.

Expert load of the upcycled model on the validation pass (max load over the even share, and
experts with no token), per layer:

| layer | max/ideal | dead experts |
|---:|---:|---:|
{load_rows}

Reproduce: `{metrics["command"]}` (this run: {metrics["environment"]["device"]},
{metrics["environment"]["torch_threads"]} torch thread(s)).

## Files

`config.json`, `metrics.json` (all numbers above and every run's history), `eval_nll.npz`
(per-token validation and test cross-entropy of each run: the perplexities can be recomputed
from it), `models/<run>.safetensors` (each run's final weights; load them with
`moekit.load_safetensors`), `checkpoints/` (the session: finished runs and their weights).

## Configuration

| key | value |
|---|---|
{config_rows}
"""


def write_outputs(out: Path, cfg: UpcycleConfig, source: str, vocab_size: int, finished: dict[str, Any],
                  device: torch.device, command: str) -> dict[str, Any]:
    """Write the weights, raw losses, plot, report.md and metrics.json (last, the mark of a finished run)."""
    runs = {}
    for name, run in finished.items():
        result = dict(run["result"])
        result["expert_load"] = load_summary(result.pop("expert_counts"))
        runs[name] = result
        save_safetensors(run["weights"], out / "models" / f"{name}.safetensors", metadata={"run": name})
    raw = {f"{name}__{split}": finished[name]["raw"][split].numpy() for name in finished
           for split in ("valid_nll", "test_nll")}
    atomic_write(out / "eval_nll.npz", lambda f: np.savez_compressed(f, **raw))
    metrics = {"runs": runs, "vocab_size": vocab_size, "data": source, "command": command,
               "environment": environment(device)}
    metrics["findings"] = findings(runs)
    plot_valid_ppl(out / "valid_ppl.png", runs, cfg)
    write_text(out / REPORT_FILE, _report(cfg, metrics))
    write_json(out / METRICS_FILE, metrics)
    return metrics
