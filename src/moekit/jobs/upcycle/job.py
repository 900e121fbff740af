"""``moekit upcycle``: sparse upcycling (Komatsuzaki et al. 2022) of a small dense Llama, against continuing it dense.

Legend: N tokens in a stream, B batch, S sequence length, L layers, E experts.

Three runs of one session (``moekit.train.session``), each resumable where it stopped:

1. ``dense``: a Llama-architecture causal LM (transformers' ``LlamaForCausalLM`` built from a small
   config, never from the hub) trained from scratch for ``dense_steps``;
2. ``dense-continued``: the dense model continued for ``continue_steps``;
3. ``upcycled``: the dense model with every MLP made an MoE of ``num_experts`` copies of it
   (``moekit.hf.upcycle_model``), continued for the same steps.

Both continuations start from the dense weights with a fresh AdamW, re-warmed over ``rewarmup``
steps to the rate the dense schedule has reached, and see the same batches (those the dense run
would have seen next): the only difference between them is the upcycling.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moekit.data import Vocab, eval_batches, kjv_corpus, lm_batch, text_file_corpus
from moekit.data.fingerprint import data_fingerprint
from moekit.jobs.upcycle import report
from moekit.jobs.upcycle.config import PRESETS, UpcycleConfig, add_args, command_line, config_from_args
from moekit.train.loop import LoopConfig, StepOutput, train
from moekit.train.outdir import ConfigError, prepare_out_dir
from moekit.train.runtime import log, resolve_device, seed_everything
from moekit.train.schedules import Schedule, inverse_sqrt
from moekit.train.session import Session

__all__ = ["PRESETS", "RUNS", "UpcycleConfig", "add_args", "execute", "run"]

RUNS = ("dense", "dense-continued", "upcycled")


class Data(NamedTuple):
    vocab: Vocab
    train: torch.Tensor  # [N] token ids
    valid: torch.Tensor
    test: torch.Tensor
    source: str
    fingerprint: dict[str, Any]  # of the loaded corpus (moekit.data.fingerprint)


def require_hf():
    """moekit.hf, or a one-line ``ConfigError`` saying what to install."""
    try:
        import moekit.hf
    except ImportError as e:
        raise ConfigError(f"moekit upcycle trains a transformers model: {e}") from e
    return moekit.hf


def load_data(cfg: UpcycleConfig) -> Data:
    """Vocabulary (from the training split only) and the encoded train/valid/test streams."""
    corpus = kjv_corpus() if cfg.data is None else text_file_corpus(cfg.data)
    if len(corpus.train) <= cfg.seq_len + 1:
        raise ConfigError(f"seq_len={cfg.seq_len} needs more than the {len(corpus.train)} training tokens")
    vocab = Vocab.build(corpus.train, cfg.vocab_size)
    return Data(vocab, vocab.encode(corpus.train), vocab.encode(corpus.valid), vocab.encode(corpus.test),
                corpus.source, data_fingerprint(cfg.data, corpus.train, corpus.valid, corpus.test))


def dense_model(cfg: UpcycleConfig, vocab: Vocab, device: torch.device) -> nn.Module:
    """The dense Llama of the run, freshly initialised (transformers' own initialisation)."""
    require_hf()
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=True, bos_token_id=None, pad_token_id=None, eos_token_id=vocab.eos_id)
    model: nn.Module = transformers.LlamaForCausalLM(config)
    return model.to(device)


def upcycled_layers(model: nn.Module) -> list[Any]:
    """The model's upcycled MLPs (``moekit.hf.UpcycledMLP``), in layer order."""
    return [m for m in model.modules() if isinstance(m, require_hf().UpcycledMLP)]


class EvalResult(NamedTuple):
    nll_N: torch.Tensor  # [N] float32 on the CPU, nats
    counts_LE: torch.Tensor | None  # [L, E] token-slots of each upcycled layer's experts

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_N.double().mean().item())


@torch.no_grad()
def evaluate(model: nn.Module, ids_N: torch.Tensor, cfg: UpcycleConfig, device: torch.device,
             max_tokens: int | None = None) -> EvalResult:
    """Every target of ``ids_N`` (or its first ``max_tokens``) once, in windows of ``seq_len``."""
    was_training = model.training
    model.eval()
    nll, counts = [], None
    moes = upcycled_layers(model)
    for x_BS, y_BS in eval_batches(ids_N, cfg.batch_size, cfg.seq_len, max_tokens):
        logits = model(input_ids=x_BS.to(device), use_cache=False).logits
        nll.append(F.cross_entropy(logits.flatten(0, 1).float(), y_BS.to(device).flatten(), reduction="none").cpu())
        if moes:
            layer_counts = torch.stack([m.last_stats.counts.cpu() for m in moes])
            counts = layer_counts if counts is None else counts + layer_counts
    model.train(was_training)
    return EvalResult(torch.cat(nll), counts)


def continuation_schedule(cfg: UpcycleConfig) -> Schedule:
    """The dense schedule from where it stopped, re-warmed over ``rewarmup`` steps (a fresh optimizer)."""
    dense = inverse_sqrt(cfg.lr, cfg.warmup)
    return lambda i: dense(cfg.dense_steps + i) * min(1.0, (i + 1) / cfg.rewarmup)


def count_params(model: nn.Module, cfg: UpcycleConfig) -> dict[str, int]:
    """Parameters in all, and those a token uses (``k`` of the ``E`` experts of each upcycled MLP)."""
    total = sum(p.numel() for p in model.parameters())
    moes = upcycled_layers(model)
    inactive = sum(m.moe.experts.w1.numel() + m.moe.experts.w2.numel() + m.moe.experts.w3.numel() for m in moes)
    inactive = inactive * (cfg.num_experts - cfg.k) // cfg.num_experts
    return {"params": total, "active_params": total - inactive}


def train_run(name: str, cfg: UpcycleConfig, data: Data, session: Session, device: torch.device,
              quiet: bool) -> None:
    """Build (or restore), train, evaluate run ``name`` and record its result (with its weights)."""
    index = RUNS.index(name)
    hf = require_hf()
    seed_everything(cfg.seed)  # the same initial weights and new routers whatever ran before
    model = dense_model(cfg, data.vocab, device)
    if name != "dense":  # both continuations start from the trained dense weights
        model.load_state_dict(session.finished["dense"]["weights"])
    if name == "upcycled":  # every MLP becomes E copies of itself and a new router
        hf.upcycle_model(model, cfg.num_experts, cfg.k, router="topk", noise=cfg.noise,
                         generator=torch.Generator().manual_seed(cfg.seed + 1), w_importance=cfg.w_importance,
                         w_load=cfg.w_load)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    state = session.start(name, model, opt)
    steps = cfg.dense_steps if name == "dense" else cfg.continue_steps
    offset = 0 if name == "dense" else cfg.dense_steps  # the continuations see the batches that come next

    def step(i: int) -> StepOutput:
        x_BS, y_BS = lm_batch(data.train, cfg.batch_size, cfg.seq_len, cfg.seed, offset + i)
        logits = model(input_ids=x_BS.to(device), use_cache=False).logits
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y_BS.to(device).flatten())
        aux = hf.moe_aux_loss(model).to(ce.device)
        return StepOutput(ce + aux, {"train_loss": ce.item(), "train_aux": aux.item()})

    def validate() -> dict[str, float]:
        return {"valid_ppl": evaluate(model, data.valid, cfg, device, cfg.eval_tokens).ppl}

    schedule = inverse_sqrt(cfg.lr, cfg.warmup) if name == "dense" else continuation_schedule(cfg)
    loop = LoopConfig(steps, cfg.checkpoint_every, cfg.eval_every, cfg.clip, cfg.batch_size * cfg.seq_len)
    train(model, opt, state, loop, step, lambda s: session.save(name, s, model, opt),
          desc=f"{name} [{index + 1}/{len(RUNS)}]", quiet=quiet, lr=schedule, evaluate=validate)
    valid, test = evaluate(model, data.valid, cfg, device), evaluate(model, data.test, cfg, device)
    result = {"name": name, "first_step": offset, "steps": state.step, "valid_ppl": valid.ppl, "test_ppl": test.ppl,
              **count_params(model, cfg), "train_time_s": state.elapsed_s, "history": state.history,
              "expert_counts": None if valid.counts_LE is None else valid.counts_LE.tolist()}
    log(quiet, f"{name}: validation perplexity {valid.ppl:.2f}, test perplexity {test.ppl:.2f}")
    session.finish(name, state, {"result": result, "weights": model.state_dict(),
                                 "raw": {"valid_nll": valid.nll_N, "test_nll": test.nll_N}})


def execute(cfg: UpcycleConfig, out: Path, device: torch.device, *, resume: bool, force: bool,
            quiet: bool) -> dict[str, Any]:
    """Train and evaluate the three runs of ``cfg`` into ``out``; return the metrics written there."""
    require_hf()
    data = load_data(cfg)
    resume_from = prepare_out_dir(out, dataclasses.asdict(cfg), resume=resume, force=force)
    session = Session(out, fingerprint={"vocab": data.vocab.to_list(), "data": data.fingerprint},
                      config=dataclasses.asdict(cfg))
    if resume_from is not None:
        session.restore(resume_from)
        at = f", {session.pending_run} in progress" if session.pending_run else ""
        log(quiet, f"resuming from {resume_from} ({len(session.finished)} of {len(RUNS)} runs finished{at})")
    for name in RUNS:
        if name not in session.finished:
            train_run(name, cfg, data, session, device, quiet)
    return report.write_outputs(out, cfg, data.source, len(data.vocab), session.finished, device, command_line(cfg))


def run(args: argparse.Namespace) -> int:
    """The upcycle job: train (or resume) the three runs, evaluate, write the out directory, print the table."""
    cfg = config_from_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    metrics = execute(cfg, Path(args.out), resolve_device(args.device), resume=args.resume, force=args.force,
                      quiet=args.quiet)
    print(report.summary_table(metrics))
    print(f"results in {args.out}")
    return 0
