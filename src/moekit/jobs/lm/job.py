"""``moekit lm``: the LSTM-MoE language model of Shazeer et al. 2017 vs compute-matched dense models.

Legend: N tokens in a stream, B batch, S sequence length, E experts.

Every model of a run (``--models``) is trained on the same batches with the same schedule, one
after the other, and evaluated on the whole validation and test streams. ``--ablation`` trains the
model(s) instead once per (w_importance, w_load) pair of the paper's Table 6. Each model is a run
of the job's session (``moekit.train.session``): one ``--resume`` continues the job where it
stopped, whichever model that was in.

Under torchrun with ``--expert-parallel`` every model of the run is trained on all ranks: the MoE
models with their experts sharded, the dense baselines data-parallel (``moekit.train.strategy``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moekit.balance import update_expert_bias
from moekit.data import KJV_BOOKS, KJV_SPLIT, Vocab, eval_batches, kjv_corpus, lm_batch, text_file_corpus
from moekit.data.english import BLOCK_TOKENS, SOURCES, SPLIT_PERIOD, english_corpus
from moekit.data.fingerprint import data_fingerprint
from moekit.jobs.lm import report
from moekit.jobs.lm.config import (
    BALANCING,
    PRESETS,
    LMJobConfig,
    add_args,
    check_config,
    command_line,
    config_from_args,
)
from moekit.metrics.load import LoadWindow, load_metrics
from moekit.models.lstm_lm import LSTMLM, body_params, ops_per_timestep, parse_model
from moekit.routing.losses import cv_squared
from moekit.train.loop import LoopConfig, StepOutput, train
from moekit.train.outdir import ConfigError, prepare_out_dir
from moekit.train.runtime import log, seed_everything
from moekit.train.schedules import inverse_sqrt
from moekit.train.session import Session
from moekit.train.strategy import SINGLE_PROCESS, SingleProcess, from_args

__all__ = ["PRESETS", "LMJobConfig", "add_args", "command_line", "config_from_args", "execute", "run"]


DEAD_WINDOW = 100  # an expert is dead if it computed no token-slot in this many training steps


class LMData(NamedTuple):
    vocab: Vocab
    train: torch.Tensor  # [N] token ids
    valid: torch.Tensor
    test: torch.Tensor
    source: str
    split: str  # how the corpus was split, in words
    fingerprint: dict[str, Any] | None = None  # of the loaded corpus (moekit.data.fingerprint)


def check_parallel(cfg: LMJobConfig, par: SingleProcess) -> None:
    """``ConfigError`` unless the global batch and every MoE model's experts split over the ranks."""
    par.check_divisible("batch_size", cfg.batch_size)
    for model in cfg.models:
        spec = parse_model(model)
        if spec.kind in ("moe", "hmoe"):
            par.check_experts(f"the number of experts of {model}", spec.experts)


class RowShardDropout(nn.Module):
    """Dropout on rank r's rows of a global batch, with the mask one process draws for the whole batch.

    ``nn.Dropout`` on each rank would give row i of every rank the same mask (the ranks' generators
    are in step); drawing the whole batch's mask and keeping this rank's rows gives every row its
    own, and the single-process run's exactly.
    """

    def __init__(self, p: float, rank: int, world_size: int):
        super().__init__()
        self.p, self.rank, self.world_size = p, rank, world_size

    def forward(self, x_bSD: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x_bSD
        b = x_bSD.shape[0]
        shape = (b * self.world_size, *x_bSD.shape[1:])
        # Dropout draws its mask in the memory order of its input (the LSTM's batch-first output is
        # [S, B, D] in memory), so the whole batch's mask is laid out as this rank's input is.
        # Outermost dimension first; a dimension of size 1 (b = 1) goes inside its equal-stride peers.
        order = sorted(range(x_bSD.dim()), key=lambda d: (x_bSD.stride(d), x_bSD.shape[d] != 1), reverse=True)
        ones = x_bSD.new_ones([shape[d] for d in order]).permute(*[order.index(d) for d in range(x_bSD.dim())])
        scale_BSD = torch.nn.functional.dropout(ones, self.p)
        return x_bSD * scale_BSD[self.rank * b:(self.rank + 1) * b]

    def extra_repr(self) -> str:
        return f"p={self.p}, world_size={self.world_size}"  # the same on every rank, as parallelize checks


def load_data(cfg: LMJobConfig) -> LMData:
    """Vocabulary (from the training split only) and the encoded train/valid/test streams."""
    if cfg.data is None and cfg.corpus == "english":
        corpus = english_corpus()
        split = (f"{len(SOURCES)} sources ({', '.join(s.name for s in SOURCES)}), each cut into blocks of "
                 f"{BLOCK_TOKENS:,} tokens; of every {SPLIT_PERIOD} blocks one is validation and one test")
    elif cfg.data is None:
        corpus = kjv_corpus()
        split = (f"King James Bible split by book: test = {', '.join(KJV_SPLIT['test'])}; "
                 f"validation = {', '.join(KJV_SPLIT['valid'])}; train = the other "
                 f"{len(KJV_BOOKS) - len(KJV_SPLIT['test']) - len(KJV_SPLIT['valid'])} books")
    else:
        corpus = text_file_corpus(cfg.data)
        split = f"{cfg.data} cut into contiguous blocks: the first 90% train, then 5% validation, 5% test"
    if len(corpus.train) <= cfg.seq_len:
        raise ConfigError(f"seq_len={cfg.seq_len} needs more than the {len(corpus.train)} training tokens")
    vocab = Vocab.build(corpus.train, cfg.vocab_size)
    return LMData(vocab, vocab.encode(corpus.train), vocab.encode(corpus.valid), vocab.encode(corpus.test),
                  corpus.source, split, data_fingerprint(cfg.data, corpus.train, corpus.valid, corpus.test))


def padded_batches(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], batch_size: int, seq_len: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Pad each ``(inputs, targets)`` batch on the right to [B, S] and add its mask (True = real).

    Every evaluation batch then has one shape (one set of kernels on a GPU); the mask keeps the
    padding out of the loss and, through ``MoE(mask=...)``, out of the routing statistics.
    """
    for x_bs, y_bs in batches:
        b, s = x_bs.shape
        x_BS = x_bs.new_zeros(batch_size, seq_len)
        y_BS = y_bs.new_zeros(batch_size, seq_len)
        mask_BS = torch.zeros(batch_size, seq_len, dtype=torch.bool)
        x_BS[:b, :s], y_BS[:b, :s], mask_BS[:b, :s] = x_bs, y_bs, True
        yield x_BS, y_BS, mask_BS


class EvalResult(NamedTuple):
    """Per-token losses and summed routing statistics of one pass over a token stream (eval mode)."""

    nll_N: torch.Tensor  # [N] float32 on the CPU, nats
    importance_E: torch.Tensor | None
    load_E: torch.Tensor | None  # in eval mode the hard count of tokens whose top-k holds the expert

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_N.double().mean().item())


@torch.no_grad()
def evaluate(
    model: LSTMLM, ids_N: torch.Tensor, batch_size: int, seq_len: int, device: torch.device,
    max_tokens: int | None = None, par: SingleProcess = SINGLE_PROCESS,
) -> EvalResult:
    """Every target of ``ids_N`` (or its first ``max_tokens``) once, in windows of ``seq_len``.

    Each window starts from a zero LSTM state, as the training windows do. Under expert
    parallelism each rank computes its rows of every batch and every rank gets the whole result.
    """
    was_training = model.training
    model.eval()
    nll, importance_E, load_E = [], None, None
    for x_BS, y_BS, mask_BS in padded_batches(eval_batches(ids_N, batch_size, seq_len, max_tokens),
                                              batch_size, seq_len):
        mask_bS = par.shard(mask_BS).to(device)
        out = model(par.shard(x_BS).to(device), mask_bS)
        nll_bS = F.cross_entropy(out.logits.flatten(0, 1).float(), par.shard(y_BS).to(device).flatten(),
                                 reduction="none").view(mask_bS.shape)
        nll.append(par.gather(nll_bS).flatten().cpu()[mask_BS.flatten()])
        if out.stats is not None:
            imp, ld = out.stats.importance.float(), out.stats.load.float()
            importance_E = imp if importance_E is None else importance_E + imp
            load_E = ld if load_E is None else load_E + ld
    model.train(was_training)
    to_cpu = (lambda t: None if t is None else t.cpu())  # noqa: E731
    return EvalResult(torch.cat(nll), to_cpu(importance_E), to_cpu(load_E))


def balance_metrics(ev: EvalResult) -> dict[str, Any]:
    """CV of importance and load (population std / mean, as in the losses), max/mean load, and the
    experts no token of the pass reached (in eval mode the load is the hard count)."""
    if ev.importance_E is None or ev.load_E is None:
        return {"cv_importance": None, "cv_load": None, "max_mean_load": None, "dead_experts": None,
                "importance": None, "load": None}
    load_E = ev.load_E
    return {
        "cv_importance": math.sqrt(cv_squared(ev.importance_E).item()),
        "cv_load": math.sqrt(cv_squared(load_E).item()),
        "max_mean_load": (load_E.max() / load_E.mean()).item() if load_E.sum() > 0 else None,
        "dead_experts": int((load_E == 0).sum()),
        "importance": ev.importance_E.tolist(),
        "load": load_E.tolist(),
    }


def batch_balance(stats) -> list[float]:
    """[CV(importance), CV(load), max/mean load] of one training batch, as its balancing losses see it.

    In training the load is the smooth estimate of eq. 10 (the paper's Table 6 reports these
    batch-level quantities).
    """
    load_E = stats.load.detach().float()
    max_mean = (load_E.max() / load_E.mean()).item() if load_E.sum() > 0 else math.nan
    return [math.sqrt(stats.losses["importance"].item()), math.sqrt(stats.losses["load"].item()), max_mean]


def batch_counts_balance(stats) -> list[float]:
    """[CV, max/ideal] of the token-slots each expert computed in one training batch (the hard
    counts, comparable across routers whatever their notion of load)."""
    m = load_metrics(stats.counts)
    return [math.sqrt(cv_squared(stats.counts.detach().double()).item()), m.max_over_ideal]


def train_balance(history: dict[str, Any], last_fraction: float = 0.1) -> dict[str, float | None]:
    """``batch_balance`` and ``batch_counts_balance`` averaged over the last ``last_fraction`` of the
    training steps, and with per-step counts recorded (``--balancing``) the experts that computed no
    token in the last ``DEAD_WINDOW`` steps."""
    out: dict[str, float | None] = {}
    for key, names in (("train_balance", ("train_cv_importance", "train_cv_load", "train_max_mean_load")),
                       ("train_counts_balance", ("train_cv_counts", "train_max_over_ideal"))):
        rows = history.get(key)
        if not rows:
            out.update(dict.fromkeys(names))
            continue
        tail = rows[-max(1, int(len(rows) * last_fraction)):]
        means = [sum(col) / len(col) for col in zip(*tail, strict=True)]
        out.update(zip(names, means, strict=True))
    counts = history.get("train_counts")
    out["train_dead_experts"] = None if not counts else dead_experts(counts[-DEAD_WINDOW:])
    return out


def dead_experts(counts_per_step: list[list[int]]) -> int:
    """The experts that computed no token-slot in any of the given steps."""
    window = LoadWindow(len(counts_per_step[0]), len(counts_per_step))
    for counts in counts_per_step:
        window.update(torch.tensor(counts))
    return window.metrics().dead


def train_trial(cfg: LMJobConfig, index: int, data: LMData, session: Session, device: torch.device, quiet: bool,
                par: SingleProcess) -> dict[str, Any]:
    """Build (or restore), train and evaluate model ``index`` of the run; return its result."""
    trials = cfg.trials()
    trial = trials[index]
    seed_everything(cfg.seed)  # each model starts from the same seed, whatever ran before it
    mcfg = cfg.model_config(trial, len(data.vocab))
    model = LSTMLM(mcfg, device=device)
    params = body_params(model)  # counted before the experts are sharded
    if par.world_size > 1:
        model.drop = RowShardDropout(mcfg.dropout, par.rank, par.world_size)
    model = par.prepare(model, {"job": dataclasses.asdict(cfg), "trial": index})
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = session.start(trial.label, model, opt)
    scheme = None if trial.scheme is None else BALANCING[trial.scheme]

    def step(i: int) -> StepOutput:
        x_BS, y_BS = lm_batch(data.train, cfg.batch_size, cfg.seq_len, cfg.seed, i)
        out = model(par.shard(x_BS).to(device))
        # The mean over this rank's rows; equal rows per rank make the mean over ranks the mean
        # over the global batch, which is what the synchronised gradients descend.
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), par.shard(y_BS).to(device).flatten())
        values: dict[str, Any] = {"train_loss": par.mean(ce.detach()).item()}
        if out.stats is not None:
            values.update(train_balance=batch_balance(out.stats), train_counts_balance=batch_counts_balance(out.stats))
            if scheme is not None:  # the balancing study keeps every step's counts (dead experts over a window)
                values["train_counts"] = out.stats.counts.tolist()
        return StepOutput(ce + out.aux_loss, values)

    def after_step() -> None:
        if scheme is not None and scheme.bias_rate is not None:
            update_expert_bias(model, rate=scheme.bias_rate)

    def validate() -> dict[str, float]:
        return {"valid_ppl": evaluate(model, data.valid, cfg.batch_size, cfg.seq_len, device, cfg.eval_tokens, par).ppl}

    loop = LoopConfig(cfg.steps, cfg.checkpoint_every, cfg.eval_every, cfg.clip, cfg.batch_size * cfg.seq_len)
    train(model, opt, state, loop, step, lambda s: session.save(trial.label, s, model, opt),
          desc=f"{trial.label} [{index + 1}/{len(trials)}]", quiet=quiet, lr=inverse_sqrt(cfg.lr, cfg.warmup),
          evaluate=validate, after_step=after_step, strategy=par)
    t0 = time.perf_counter()
    valid = evaluate(model, data.valid, cfg.batch_size, cfg.seq_len, device, par=par)
    test = evaluate(model, data.test, cfg.batch_size, cfg.seq_len, device, par=par)
    eval_time_s = time.perf_counter() - t0
    spec = parse_model(trial.model)
    result = {
        "name": trial.label, "model": trial.model,
        "experts": spec.experts or None, "k": None if spec.kind == "lstm" else (1 if spec.experts == 1 else cfg.k),
        "ops_per_timestep": ops_per_timestep(mcfg), "params": params,
        "test_ppl": test.ppl, "valid_ppl": valid.ppl, **balance_metrics(test),
        **train_balance(state.history),
        "w_importance": trial.w_importance, "w_load": trial.w_load, "scheme": trial.scheme,
        "steps": state.step, "train_time_s": state.elapsed_s,
        "eval_time_s": eval_time_s, "history": state.history,
    }
    log(quiet, f"{trial.label}: validation perplexity {valid.ppl:.2f}, test perplexity {test.ppl:.2f}")
    # The finished model's checkpoint is replaced by one with its result and per-token NLL, no weights.
    session.finish(trial.label, state, {"result": result, "raw": {"test_nll": test.nll_N, "valid_nll": valid.nll_N}})
    return result


def execute(cfg: LMJobConfig, out: Path, device: torch.device, *, resume: bool, force: bool,
            quiet: bool, par: SingleProcess = SINGLE_PROCESS) -> dict[str, Any]:
    """Train and evaluate every model of ``cfg`` into ``out``; return the metrics written there.

    Under expert parallelism every rank calls this; rank 0 alone writes to ``out``.
    """
    check_config(cfg)
    check_parallel(cfg, par)
    data = load_data(cfg)
    # Only now, with the data and every model's config known to work, is the out directory touched.
    resume_from = par.main_only(lambda: prepare_out_dir(out, dataclasses.asdict(cfg), resume=resume, force=force))
    quiet = quiet or not par.is_main
    session = Session(out, fingerprint={"vocab": data.vocab.to_list(), "data": data.fingerprint}, strategy=par,
                      config=dataclasses.asdict(cfg))
    trials = cfg.trials()
    if resume_from is not None:
        resume_from = session.restore(resume_from)
        at = f", {session.pending_run} in progress" if session.pending_run else ""
        log(quiet, f"resuming from {resume_from} ({len(session.finished)} of {len(trials)} models finished{at})")
    for index, trial in enumerate(trials):
        if trial.label not in session.finished:
            train_trial(cfg, index, data, session, device, quiet, par)
    finished = [session.finished[t.label] for t in trials]
    results = [f["result"] for f in finished]
    raw = {t.label: f["raw"] for t, f in zip(trials, finished, strict=True)}
    return par.main_only(lambda: report.write_outputs(out, cfg, data, results, raw, par.describe(device),
                                                      command_line(cfg)))


def run(args: argparse.Namespace) -> int:
    """The lm job: train (or resume) every model, evaluate, write the out directory, print the table."""
    cfg = config_from_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    par, device = from_args(args)
    try:
        metrics = execute(cfg, Path(args.out), device, resume=args.resume, force=args.force, quiet=args.quiet,
                          par=par)
    finally:
        par.close()
    if par.is_main:
        print(report.balancing_table(metrics["models"]) if cfg.balancing
              else report.summary_table(metrics["models"], cfg.ablation))
        print(f"results in {args.out}")
    return 0
