"""``moekit demo``: a small word-level MoE language model trained on the King James Bible.

Legend: B batch, S sequence length, V vocabulary, N tokens.

The model (``moekit.models.demo_lm``) is embedding -> MoE (with a residual) -> softmax over the
vocabulary: a run of about a minute on a laptop CPU that shows routing, the balancing losses and
the expert load. The demo ends with a short run of ``moekit lm``'s comparison (lstm-4x vs moe-32 at
the same ops per token) in ``OUT/compare``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from moekit.data import Vocab, eval_batches, kjv_corpus, lm_batch, lm_batches, text_file_corpus
from moekit.data.fingerprint import data_fingerprint
from moekit.jobs.demo import report
from moekit.jobs.demo.config import DemoConfig, add_args, comparison_config, config_from_args
from moekit.jobs.lm import report as lm_report
from moekit.jobs.lm.job import execute as execute_lm
from moekit.models.demo_lm import DemoLM
from moekit.train.loop import LoopConfig, StepOutput, train
from moekit.train.outdir import ConfigError, prepare_out_dir
from moekit.train.runtime import log, resolve_device, seed_everything
from moekit.train.session import Session

__all__ = ["DemoConfig", "add_args", "run"]

RUN = "demo"  # the one run of this job


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
    expert_weights: torch.Tensor  # [N, K], its combine weights (0 in empty slots)


def _sum(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value.cpu() if total is None else total + value.cpu()


def _cat_slots(parts: list[torch.Tensor], empty: float) -> torch.Tensor:
    """[N, K] from [N_i, K_i] parts, each padded on the right with ``empty`` slots to the widest K_i.

    A router may give a batch as many slots as its busiest token needs (batchwise gating: 0..E
    experts per token), so the batches of one evaluation can differ in width.
    """
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, width - p.shape[1]), value=empty) for p in parts])


@torch.no_grad()
def evaluate(model: DemoLM, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> EvalResult:
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
    if importance is None or load is None or counts is None:
        raise ValueError("no batch to evaluate: the token stream is too short")
    nll_N = torch.cat(nll)
    loss = nll_N.mean().item()
    return EvalResult(loss, math.exp(loss), torch.cat(targets), nll_N, importance.tolist(), load.tolist(),
                      counts.tolist(), dropped, _cat_slots(indices, -1), _cat_slots(weights, 0.0))


def load_data(cfg: DemoConfig) -> tuple[Vocab, torch.Tensor, torch.Tensor, str, dict]:
    """Vocabulary (from the training split only), the encoded train/valid streams, a description of
    the source and the data's fingerprint (``moekit.data.fingerprint``)."""
    corpus = kjv_corpus() if cfg.data is None else text_file_corpus(cfg.data)
    if len(corpus.train) <= cfg.seq_len:
        raise ConfigError(f"seq_len={cfg.seq_len} needs more than the {len(corpus.train)} training tokens")
    vocab = Vocab.build(corpus.train, cfg.vocab_size)
    fingerprint = data_fingerprint(cfg.data, corpus.train, corpus.valid, corpus.test)
    return vocab, vocab.encode(corpus.train), vocab.encode(corpus.valid), corpus.source, fingerprint


def run(args: argparse.Namespace) -> int:
    """The demo job: train (or resume), evaluate, write the out directory, print a summary."""
    cfg = config_from_args(args)
    device = resolve_device(args.device)
    vocab, train_ids, valid_ids, source, fingerprint = load_data(cfg)
    seed_everything(cfg.seed)
    try:
        model = DemoLM(len(vocab), cfg.dim, cfg.num_experts, cfg.k, cfg.hidden_dim, cfg.router, device=device)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # Only now, with the data and the model known to work, is the out directory touched.
    out = Path(args.out)
    resume_from = prepare_out_dir(out, dataclasses.asdict(cfg), resume=args.resume, force=args.force)
    session = Session(out, fingerprint={"vocab": vocab.to_list(), "data": fingerprint},
                      config=dataclasses.asdict(cfg))
    if resume_from is not None:
        resume_from = session.restore(resume_from)
    state = session.start(RUN, model, opt)
    if state.step:
        log(args.quiet, f"resuming from {resume_from} (step {state.step} of {cfg.steps})")

    def step(i: int) -> StepOutput:
        x_BS, y_BS = lm_batch(train_ids, cfg.batch_size, cfg.seq_len, cfg.seed, i)
        logits_BSV, aux_loss, _ = model(x_BS.to(device))
        ce = F.cross_entropy(logits_BSV.flatten(0, 1).float(), y_BS.to(device).flatten())
        return StepOutput(ce + aux_loss, {"train_loss": ce.item()})

    def validate() -> dict[str, float]:
        batches = eval_batches(valid_ids, cfg.batch_size, cfg.seq_len, cfg.eval_tokens)
        return {"valid_loss": evaluate(model, batches, device).loss}

    loop = LoopConfig(cfg.steps, cfg.checkpoint_every, cfg.eval_every, tokens_per_step=cfg.batch_size * cfg.seq_len)
    train(model, opt, state, loop, step, lambda s: session.save(RUN, s, model, opt), desc="demo", quiet=args.quiet,
          evaluate=validate)
    n_batches = max(1, math.ceil(cfg.eval_tokens / (cfg.batch_size * cfg.seq_len)))
    sample = lm_batches(train_ids, cfg.batch_size, cfg.seq_len, seed=cfg.seed + 1)
    train_ev = evaluate(model, (next(sample) for _ in range(n_batches)), device)
    valid_ev = evaluate(model, eval_batches(valid_ids, cfg.batch_size, cfg.seq_len, cfg.eval_tokens), device)
    metrics = report.write_outputs(out, cfg, state, vocab, source, train_ev, valid_ev, device)
    print(f"train perplexity {train_ev.ppl:.2f}  validation perplexity {valid_ev.ppl:.2f}  "
          f"({metrics['steps']} steps, {metrics['train_time_s']:.1f} s training)")
    print(report.expert_table(valid_ev))
    compare = comparison_config(cfg)
    log(args.quiet, f"comparison: lstm-4x vs moe-32 at width {compare.dim}, {compare.steps} steps each")
    # The demo's own out-directory check has passed, so its comparison may start over (force).
    lm_metrics = execute_lm(compare, out / "compare", device, resume=args.resume, force=True, quiet=args.quiet)
    print(lm_report.short_table(lm_metrics["models"]))
    for line in lm_report.findings(lm_metrics["models"], ablation=False):
        print(line)
    print(f"results in {out}")
    return 0
