"""``moekit demo``: a small word-level MoE language model trained on the King James Bible.

Legend: B batch, S sequence length, D model dim, V vocabulary, E experts, N tokens.

The model is embedding -> MoE (with a residual) -> softmax over the vocabulary. It sees one
token at a time (no recurrence or attention), so it is a bigram-style model: the point is to
watch routing, the balancing losses and the expert load in a real training run that takes about
a minute on a laptop CPU. ``moekit lm`` is the job for language-model quality; the demo ends
with a short run of its comparison (lstm-4x vs moe-32 at the same ops per token) in ``OUT/compare``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import moekit
from moekit.data import Vocab, eval_batches, kjv_corpus, lm_batches, text_file_corpus
from moekit.train import plots
from moekit.train.checkpoint import (
    atomic_write,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from moekit.train.outdir import (
    METRICS_FILE,
    REPORT_FILE,
    ConfigError,
    OutDirError,
    checkpoint_path,
    prepare_out_dir,
    prune_checkpoints,
    write_json,
    write_text,
)
from moekit.train.stop import StopRequest


@dataclass(frozen=True)
class DemoConfig:
    """Everything that determines the result of a demo run (saved as config.json)."""

    steps: int = 400
    batch_size: int = 32
    seq_len: int = 32
    dim: int = 128
    hidden_dim: int = 256
    num_experts: int = 8
    k: int = 2
    router: str = "noisy_topk"
    vocab_size: int = 8000
    lr: float = 3e-3
    eval_every: int = 50
    eval_tokens: int = 25_000
    checkpoint_every: int = 100
    seed: int = 0
    data: str | None = None


_HELP = {
    "steps": "training steps",
    "batch_size": "sequences per batch",
    "seq_len": "tokens per sequence",
    "dim": "embedding / model width",
    "hidden_dim": "hidden width of each expert",
    "num_experts": "experts in the MoE layer",
    "k": "experts per token",
    "router": "router of the MoE layer",
    "vocab_size": "vocabulary cap, <unk> and <eos> included",
    "lr": "Adam learning rate",
    "eval_every": "validate every this many steps",
    "eval_tokens": "tokens per evaluation (validation prefix, and a fixed random train sample)",
    "checkpoint_every": "checkpoint every this many steps (and at the end)",
    "data": "UTF-8 text file to train on instead of the King James Bible",
}


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid value" message
    return parse


def add_args(parser: argparse.ArgumentParser) -> None:
    """One option per ``DemoConfig`` field (``--seed`` is a common option of every job)."""
    for field in dataclasses.fields(DemoConfig):
        name, default = field.name, field.default
        if name == "seed":
            continue
        option = f"--{name.replace('_', '-')}"
        if name == "data":
            parser.add_argument(option, metavar="FILE", help=f"{_HELP[name]} (default: the KJV)")
        elif name == "router":
            parser.add_argument(
                option, choices=moekit.routers(), default=default, help=f"{_HELP[name]} (default: {default})"
            )
        else:
            parser.add_argument(
                option,
                type=_positive(type(default)),
                default=default,
                help=f"{_HELP[name]} (default: {default})",
            )


class DemoLM(nn.Module):
    """Embedding -> MoE with a residual -> linear softmax over the vocabulary."""

    def __init__(self, vocab_size: int, cfg: DemoConfig, device: torch.device | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.dim, device=device)
        self.moe = moekit.MoE(
            cfg.dim,
            num_experts=cfg.num_experts,
            k=cfg.k,
            hidden_dim=cfg.hidden_dim,
            router=cfg.router,
            device=device,
        )
        self.head = nn.Linear(cfg.dim, vocab_size, device=device)

    def forward(self, ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        h_BSD = self.embed(ids_BS)
        out = self.moe(h_BSD)
        return self.head(h_BSD + out.y), out.aux_loss, out.stats


class EvalResult(NamedTuple):
    loss: float
    ppl: float
    targets: torch.Tensor  # [N]
    nll: torch.Tensor  # [N], nats
    importance: list[float]
    load: list[float]
    counts: list[int]
    dropped: int
    expert_indices: torch.Tensor  # [N, K], the routing of each token (-1 = empty slot)
    expert_weights: torch.Tensor  # [N, K], its combine weights


def _sum(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value.cpu() if total is None else total + value.cpu()


@torch.no_grad()
def evaluate(model: DemoLM, batches, device: torch.device) -> EvalResult:
    """Per-token cross-entropy and routing, with the MoE's statistics summed over ``batches``.

    Runs in eval mode, where routing is deterministic, so the routing recorded per token (by a
    second call of the router on the same inputs) is the one the statistics were computed from.
    """
    was_training = model.training
    model.eval()
    nll, targets, indices, weights = [], [], [], []
    importance = load = counts = None
    dropped = 0
    for x_BS, y_BS in batches:
        x_BS, y_BS = x_BS.to(device), y_BS.to(device)
        logits_BSV, _, stats = model(x_BS)
        nll.append(F.cross_entropy(logits_BSV.flatten(0, 1).float(), y_BS.flatten(), reduction="none").cpu())
        targets.append(y_BS.flatten().cpu())
        routing = model.moe.router(model.embed(x_BS).flatten(0, 1))
        indices.append(routing.indices.cpu())
        weights.append(routing.weights.float().cpu())
        importance = _sum(importance, stats.importance.float())
        load = _sum(load, stats.load.float())
        counts = _sum(counts, stats.counts)
        dropped += int(stats.dropped)
    model.train(was_training)
    nll_N = torch.cat(nll)
    loss = nll_N.mean().item()
    return EvalResult(
        loss,
        math.exp(loss),
        torch.cat(targets),
        nll_N,
        importance.tolist(),
        load.tolist(),
        counts.tolist(),
        dropped,
        torch.cat(indices),
        torch.cat(weights),
    )


def _checkpoint(out: Path, model: DemoLM, opt: torch.optim.Optimizer, state: dict, vocab: Vocab) -> None:
    save_checkpoint(
        checkpoint_path(out, state["step"]),
        {
            "step": state["step"],
            "elapsed_s": state["elapsed_s"],
            "history": state["history"],
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "rng": capture_rng_state(),
            "vocab": vocab.to_list(),
        },
    )
    prune_checkpoints(out, keep=1)


def _restore(path: Path, model: DemoLM, opt: torch.optim.Optimizer, vocab: Vocab) -> dict:
    ckpt = load_checkpoint(path)
    if ckpt["vocab"] != vocab.to_list():
        raise OutDirError(f"checkpoint {str(path)!r} was trained on a different vocabulary (data changed?)")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    restore_rng_state(ckpt["rng"])
    return {"step": ckpt["step"], "elapsed_s": ckpt["elapsed_s"], "history": ckpt["history"]}


def _train_step(
    model: DemoLM, opt: torch.optim.Optimizer, x_BS: torch.Tensor, y_BS: torch.Tensor, device: torch.device
) -> float:
    """One Adam step on cross-entropy + the MoE balancing loss; returns the cross-entropy."""
    logits_BSV, aux_loss, _ = model(x_BS.to(device))
    ce = F.cross_entropy(logits_BSV.flatten(0, 1).float(), y_BS.to(device).flatten())
    opt.zero_grad(set_to_none=True)
    (ce + aux_loss).backward()
    opt.step()
    return ce.item()


def train(
    model: DemoLM,
    opt: torch.optim.Optimizer,
    state: dict,
    cfg: DemoConfig,
    out: Path,
    train_ids: torch.Tensor,
    valid_ids: torch.Tensor,
    vocab: Vocab,
    device: torch.device,
    quiet: bool,
) -> None:
    """Train from ``state["step"]`` to ``cfg.steps``, checkpointing and validating on schedule."""
    hist = state["history"]
    batches = lm_batches(train_ids, cfg.batch_size, cfg.seq_len, cfg.seed, start_step=state["step"])
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(
        total=cfg.steps,
        initial=state["step"],
        desc="demo",
        unit="step",
        disable=quiet,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    session_start, session_steps = time.perf_counter(), 0
    with StopRequest() as stop, bar:
        while state["step"] < cfg.steps:
            t0 = time.perf_counter()
            ce = _train_step(model, opt, *next(batches), device)
            state["step"] += 1
            state["elapsed_s"] += time.perf_counter() - t0
            step, session_steps = state["step"], session_steps + 1
            hist["train_step"].append(step)
            hist["train_loss"].append(ce)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                batches_v = eval_batches(valid_ids, cfg.batch_size, cfg.seq_len, cfg.eval_tokens)
                hist["valid_step"].append(step)
                hist["valid_loss"].append(evaluate(model, batches_v, device).loss)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop.requested:
                _checkpoint(out, model, opt, state, vocab)
            rate = session_steps * tokens_per_step / (time.perf_counter() - session_start)
            bar.set_postfix(loss=f"{ce:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)
            if stop.requested:
                raise KeyboardInterrupt(f"stopped after step {step}; checkpoint saved")


def _cv(values: list[float]) -> float:
    # Coefficient of variation with the population std, as in the Shazeer et al. balancing losses.
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return math.sqrt(var) / mean if mean > 0 else float("nan")


def _expert_table(ev: EvalResult) -> str:
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


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
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

{_expert_table(valid_ev)}

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
    state: dict,
    vocab: Vocab,
    source: str,
    train_ev: EvalResult,
    valid_ev: EvalResult,
    device: torch.device,
) -> dict[str, Any]:
    """Write metrics.json (last, as the mark of a finished run), report.md, plots and raw outputs."""
    hist = state["history"]
    metrics = {
        "steps": state["step"],
        "train_tokens_seen": state["step"] * cfg.batch_size * cfg.seq_len,
        "train_time_s": state["elapsed_s"],
        "vocab_size": len(vocab),
        "data": source,
        "train": {"loss": train_ev.loss, "ppl": train_ev.ppl, "tokens": int(train_ev.targets.numel())},
        "valid": {"loss": valid_ev.loss, "ppl": valid_ev.ppl, "tokens": int(valid_ev.targets.numel())},
        "experts": _expert_summary(valid_ev),
        "history": hist,
        "environment": {
            "moekit": moekit.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
        },
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


def load_data(cfg: DemoConfig) -> tuple[Vocab, torch.Tensor, torch.Tensor, str]:
    """Vocabulary (from the training split only) and the encoded train/valid streams."""
    corpus = kjv_corpus() if cfg.data is None else text_file_corpus(cfg.data)
    if len(corpus.train) <= cfg.seq_len:
        raise ConfigError(f"seq_len={cfg.seq_len} needs more than the {len(corpus.train)} training tokens")
    vocab = Vocab.build(corpus.train, cfg.vocab_size)
    return vocab, vocab.encode(corpus.train), vocab.encode(corpus.valid), corpus.source


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """The demo job: train (or resume), evaluate, write the out directory, print a summary."""
    cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})
    device = resolve_device(args.device)
    vocab, train_ids, valid_ids, source = load_data(cfg)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    try:
        model = DemoLM(len(vocab), cfg, device=device)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = {
        "step": 0,
        "elapsed_s": 0.0,
        "history": {"train_step": [], "train_loss": [], "valid_step": [], "valid_loss": []},
    }
    # Only now, with the data and the model known to work, is the out directory touched.
    out = Path(args.out)
    resume_from = prepare_out_dir(out, dataclasses.asdict(cfg), resume=args.resume, force=args.force)
    if resume_from is not None:
        state = _restore(resume_from, model, opt, vocab)
        _log(args.quiet, f"resuming from {resume_from} (step {state['step']} of {cfg.steps})")
    model.train()
    train(model, opt, state, cfg, out, train_ids, valid_ids, vocab, device, args.quiet)
    n_batches = max(1, math.ceil(cfg.eval_tokens / (cfg.batch_size * cfg.seq_len)))
    sample = lm_batches(train_ids, cfg.batch_size, cfg.seq_len, seed=cfg.seed + 1)
    train_ev = evaluate(model, (next(sample) for _ in range(n_batches)), device)
    valid_ev = evaluate(model, eval_batches(valid_ids, cfg.batch_size, cfg.seq_len, cfg.eval_tokens), device)
    metrics = write_outputs(out, cfg, state, vocab, source, train_ev, valid_ev, device)
    print(
        f"train perplexity {train_ev.ppl:.2f}  validation perplexity {valid_ev.ppl:.2f}  "
        f"({metrics['steps']} steps, {metrics['train_time_s']:.1f} s training)"
    )
    print(_expert_table(valid_ev))
    from moekit.jobs.lm import demo_comparison  # imported here: moekit.jobs.lm builds on this module

    demo_comparison(cfg, out / "compare", device, resume=args.resume, quiet=args.quiet)
    print(f"results in {out}")
    return 0
