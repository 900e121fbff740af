"""``moekit patterns``: SPMoE against top-K beam search, K samples and hMoEup, K outputs per input.

Legend: B pairs in a batch, K outputs per input (patterns / mixture components / beams / samples).

Three networks are trained at most, as the runs of one session (``moekit.train.session``):
``single`` (serves both the ``beam`` and the ``sampling`` baseline), ``spmoe`` and ``hmoe``. Each is
trained for the same number of steps on the same batches; batch ``i`` depends only on
``(seed, i)``, so a resumed run ends where an uninterrupted one would.

With ``--pretrain-steps`` a first run, ``pretrain``, trains one backbone to reconstruct the
training texts (sources and targets alike, as plain English) from BART's text infilling, and every
network starts from its weights, as SPMoE starts from a pre-trained BART.

Writes into ``--out``: config.json, checkpoints/, outputs_<model>.jsonl, metrics.json (one entry
per model), report.md and quality_vs_diversity.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moekit.data import DataFileError
from moekit.data.bible import kjv_web_examples
from moekit.data.fingerprint import data_fingerprint
from moekit.data.pairs import (
    EncodedPairs,
    Example,
    PairBatch,
    decode_text,
    encode_pairs,
    encode_text,
    make_batch,
    normalize,
    pad,
    pair_vocab,
    read_jsonl,
    split_examples,
    synthetic_examples,
)
from moekit.data.sampling import random_batch
from moekit.data.vocab import Vocab
from moekit.jobs.patterns import report
from moekit.jobs.patterns.config import (
    MASK_TOKEN,
    MODELS,
    NETWORK_OF,
    PRETRAIN,
    SYNTHETIC,
    PatternsConfig,
    add_args,
    config_from_args,
    expert_token,
    special_tokens,
)
from moekit.metrics.generation import generation_metrics, pattern_usage, refs_covered
from moekit.metrics.purity import purity
from moekit.models.hard_mixture import HardMixture, SingleModel
from moekit.models.seq2seq import Seq2Seq, Seq2SeqConfig, text_infilling
from moekit.models.spmoe import SPMoE
from moekit.train.loop import LoopConfig, StepOutput, TrainState, train
from moekit.train.outdir import METRICS_FILE, REPORT_FILE, ConfigError, prepare_out_dir, write_json, write_text
from moekit.train.runtime import environment, log, resolve_device
from moekit.train.schedules import warmup_cosine_floor
from moekit.train.session import Session

__all__ = ["MODELS", "PatternsConfig", "add_args", "config_from_args", "run"]

CLIP = 1.0  # gradient-norm clipping: keeps the occasional long-verse batch from throwing a small model off course
LR_FLOOR = 0.1  # the cosine decays to a tenth of the peak rate
BETAS = (0.9, 0.98)


def load_examples(cfg: PatternsConfig) -> tuple[list[Example], list[Example], str]:
    """Training examples, the scored test inputs, and a description of the data."""
    s = cfg.sizes
    if cfg.data is None:
        parts = kjv_web_examples(max_words=s.max_words)
        train, test = parts["train"], parts["test"]
        what = f"KJV -> World English Bible verses of at most {s.max_words} words, split by book"
    elif cfg.data == SYNTHETIC:
        train, test = split_examples(synthetic_examples(s.synthetic_examples, cfg.patterns, seed=cfg.seed))
        what = f"synthetic, {cfg.patterns} known rewrite patterns (targets[k] follows pattern k)"
    else:
        examples = read_jsonl(cfg.data)
        if len(examples) < 2:
            raise DataFileError(f"{cfg.data}: needs at least 2 examples (train and test), found {len(examples)}")
        train, test = split_examples(examples)
        what = f"{cfg.data} (last 10% of the lines are the test set)"
    stride = max(1, len(test) // s.eval_sources)
    return train, test[::stride][: s.eval_sources], what


Network = SingleModel | SPMoE | HardMixture


def build_network(name: str, cfg: PatternsConfig, vocab: Vocab, device=None,
                  backbone_state: dict[str, torch.Tensor] | None = None) -> Network:
    """A freshly initialised ``single`` (or ``pretrain``), ``spmoe`` or ``hmoe`` network (seeded by the
    caller), its backbone loaded from ``backbone_state`` when given (before the pattern heads are
    built: SPMoE's heads start from the backbone's output projection)."""
    s = cfg.sizes
    backbone = Seq2Seq(Seq2SeqConfig(len(vocab), dim=s.dim, heads=s.heads, encoder_layers=s.layers,
                                     decoder_layers=s.layers, ffn_dim=s.ffn_dim, dropout=s.dropout,
                                     pad_id=vocab.pad_id), device=device)
    if backbone_state is not None:
        backbone.load_state_dict(backbone_state)
    if name in ("single", PRETRAIN):
        return SingleModel(backbone)
    if name == "spmoe":
        return SPMoE(backbone, cfg.spmoe, device=device)
    if name == "hmoe":
        return HardMixture(backbone, [vocab.id(expert_token(i)) for i in range(cfg.patterns)])
    raise ValueError(f"unknown network {name!r}")


def denoising_batch(texts: list[list[int]], step: int, cfg: PatternsConfig, vocab: Vocab) -> PairBatch:
    """Batch ``step`` of the pre-training: texts noised by BART's text infilling (source) and the
    texts themselves (target). It depends only on ``(seed, step)``, so a resumed run sees the same."""
    index = random_batch(step, cfg.sizes.batch_size, len(texts), cfg.seed + 1)
    src, tgt = [], []
    for slot, i in enumerate(index):
        rng = random.Random((cfg.seed * 1_000_003 + step) * 1_009 + slot)
        src.append(text_infilling(texts[i], vocab.id(MASK_TOKEN), rng) + [vocab.eos_id])
        tgt.append(texts[i])
    return PairBatch(pad(src, vocab.pad_id), pad([[vocab.bos_id, *t] for t in tgt], vocab.pad_id),
                     pad([[*t, vocab.eos_id] for t in tgt], vocab.pad_id), torch.full((len(tgt),), -1))


def pretraining_texts(examples: list[Example], vocab: Vocab, max_len: int) -> list[list[int]]:
    """Every training source and target once, as token ids (the test inputs are never among them)."""
    texts = {t for ex in examples for t in (ex.source, *ex.targets)}
    return [ids for ids in (encode_text(vocab, t, max_len - 1) for t in sorted(texts)) if ids]


def pretrained_backbone(session: Session) -> dict[str, torch.Tensor] | None:
    """The pre-trained backbone's weights, when the session holds a finished pre-training run."""
    if PRETRAIN not in session.finished:
        return None
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in session.finished[PRETRAIN]["weights"].items() if k.startswith(prefix)}


def train_network(name: str, cfg: PatternsConfig, session: Session, pairs: EncodedPairs, vocab: Vocab,
                  device: torch.device, quiet: bool, texts: list[list[int]] | None = None
                  ) -> tuple[Network, TrainState]:
    """Train (or finish training, or load the trained) network ``name``; ``pretrain`` trains on ``texts``."""
    trained = [n for n in cfg.networks() if n != PRETRAIN]
    # Each network's initialisation is its own, and the same with or without pre-training.
    torch.manual_seed(cfg.seed * 1000 + (trained.index(name) if name in trained else 999))
    net = build_network(name, cfg, vocab, device=device,
                        backbone_state=None if name == PRETRAIN else pretrained_backbone(session))
    if name in session.finished:
        net.load_state_dict(session.finished[name]["weights"])
        return net, TrainState.from_dict(session.finished[name]["state"])
    s = cfg.sizes
    opt = torch.optim.Adam(net.parameters(), lr=s.lr, betas=BETAS)
    state = session.start(name, net, opt)
    steps = cfg.pretrain_steps if name == PRETRAIN else s.steps

    def step(i: int) -> StepOutput:
        if name == PRETRAIN:
            if texts is None:
                raise RuntimeError("the pre-training run needs its texts")
            batch = denoising_batch(texts, i, cfg, vocab)
        else:
            batch = make_batch(pairs, random_batch(i, s.batch_size, len(pairs), cfg.seed), vocab)
        out = net.loss(type(batch)(*(t.to(device) for t in batch)))
        usage = None if out.assignment is None else pattern_usage(out.assignment.tolist(), cfg.patterns)
        return StepOutput(out.loss, {"nll": float(out.nll), "assign": usage})

    train(net, opt, state, LoopConfig(steps, s.checkpoint_every, clip=CLIP), step,
          lambda st: session.save(name, st, net, opt), desc=name, quiet=quiet,
          lr=warmup_cosine_floor(s.lr, steps, s.warmup if name != PRETRAIN else min(s.warmup, max(1, steps // 10)),
                                 LR_FLOOR))
    session.finish(name, state, {"weights": net.state_dict(), "state": state.to_dict()})
    return net, state


def _train_summary(name: str, cfg: PatternsConfig, state: TrainState, net: Network, pairs: EncodedPairs,
                   vocab: Vocab, device: torch.device) -> dict[str, Any]:
    hist = state.history
    tail = hist["nll"][-100:]
    summary: dict[str, Any] = {"network": name, "steps": len(hist["nll"]), "time_s": state.elapsed_s,
                               "final_nll": sum(tail) / len(tail), "nll_history": hist["nll"]}
    if hist.get("assign"):
        recent = hist["assign"][-100:]
        summary["assignment_share"] = [sum(a[k] for a in recent) / len(recent) for k in range(cfg.patterns)]
        if cfg.data == SYNTHETIC and isinstance(net, SPMoE | HardMixture):
            assigned = assignments(net, pairs, vocab, device)
            summary["purity"] = purity(assigned, pairs.labels[: len(assigned)], cfg.patterns)
    return summary


@torch.no_grad()
def decode(model_name: str, net: Network, sources: Sequence[str], vocab: Vocab, cfg: PatternsConfig,
           device, chunk: int = 64) -> tuple[list[list[str]], list[list[float]] | None]:
    """K output strings per source, and (SPMoE with a learned prior) p(pattern | source)."""
    K, s = cfg.patterns, cfg.sizes
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    outputs: list[list[str]] = []
    priors: list[list[float]] | None = [] if model_name == "spmoe" and cfg.spmoe.learned_prior else None
    for start in range(0, len(sources), chunk):
        src = pad([encode_text(vocab, x, s.max_len - 1) + [vocab.eos_id] for x in sources[start : start + chunk]],
                  vocab.pad_id).to(device)
        if isinstance(net, SPMoE):
            ids = net.generate(src, vocab.bos_id, vocab.eos_id, s.max_len, beam=cfg.beam)
            if priors is not None:
                priors.extend(net.prior_log_probs(src).exp().tolist())
        elif isinstance(net, HardMixture):
            ids = net.generate(src, vocab.eos_id, s.max_len, beam=cfg.beam)
        else:
            ids = net.generate(src, K, vocab.bos_id, vocab.eos_id, s.max_len, mode=model_name, beam=cfg.beam,
                               generator=gen)
        outputs.extend([[decode_text(vocab, o) for o in outs] for outs in ids])
    return outputs, priors


@torch.no_grad()
def assignments(net: SPMoE | HardMixture, pairs: EncodedPairs, vocab: Vocab, device, limit: int = 2000,
                chunk: int = 128) -> list[int]:
    """Winning pattern (lowest loss, dropout off) of the first ``limit`` training pairs."""
    out: list[int] = []
    n = min(limit, len(pairs))
    for start in range(0, n, chunk):
        batch = make_batch(pairs, range(start, min(n, start + chunk)), vocab)
        batch = type(batch)(*(t.to(device) for t in batch))
        nll_BK = net.responsibilities(batch)
        nll_BK = nll_BK[0] if isinstance(nll_BK, tuple) else nll_BK
        out.extend(nll_BK.argmin(1).tolist())
    return out


def _write_outputs(path: Path, test: list[Example], outputs: list[list[str]], priors) -> None:
    lines = []
    for i, (ex, outs) in enumerate(zip(test, outputs, strict=True)):
        row = {"source": ex.source, "outputs": outs, "references": [normalize(t) for t in ex.targets]}
        if priors is not None:
            row["prior"] = priors[i]
        lines.append(json.dumps(row, ensure_ascii=False))
    write_text(path, "\n".join(lines) + "\n")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads} must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    train_examples, test, what = load_examples(cfg)
    vocab = pair_vocab(train_examples, cfg.sizes.vocab_size, extra=special_tokens(cfg))
    pairs = encode_pairs(train_examples, vocab, cfg.sizes.max_len, cfg.sizes.max_len)
    fingerprint = data_fingerprint(None if cfg.data in (None, SYNTHETIC) else cfg.data, train_examples, test)
    out = Path(args.out)
    resume_from = prepare_out_dir(out, dataclasses.asdict(cfg), resume=args.resume, force=args.force)
    session = Session(out, fingerprint={"vocab": vocab.to_list(), "data": fingerprint}, config=dataclasses.asdict(cfg))
    if resume_from is not None:
        resume_from = session.restore(resume_from)
        log(args.quiet, f"resuming from {resume_from}")
    nets, summaries = {}, {}
    texts = pretraining_texts(train_examples, vocab, cfg.sizes.max_len) if cfg.pretrain_steps else None
    for name in cfg.networks():
        nets[name], state = train_network(name, cfg, session, pairs, vocab, device, args.quiet, texts)
        summaries[name] = _train_summary(name, cfg, state, nets[name], pairs, vocab, device)
    sources = [e.source for e in test]
    refs = [[normalize(t) for t in e.targets] for e in test]
    metrics: dict[str, dict[str, Any]] = {}
    outputs: dict[str, list[list[str]]] = {}
    for model in cfg.models:
        outs, priors = decode(model, nets[NETWORK_OF[model]], sources, vocab, cfg, device)
        _write_outputs(out / f"outputs_{model}.jsonl", test, outs, priors)
        # Outputs and references are already word tokens joined by spaces: no further tokenization.
        m = generation_metrics(outs, refs, tokenize="none")
        m["refs_covered_exact"] = refs_covered(outs, refs, tokenize="none", min_bleu=100.0)
        m["train"] = summaries[NETWORK_OF[model]]
        metrics[model], outputs[model] = m, outs
    info: dict[str, Any] = {"config": dataclasses.asdict(cfg), "data": what, "train_pairs": len(pairs),
                            "test_inputs": len(test), "vocab_size": len(vocab), "device": str(device),
                            "threads": torch.get_num_threads(), "environment": environment(device)}
    if cfg.pretrain_steps:
        info["pretrain"] = {**{k: v for k, v in summaries[PRETRAIN].items() if k != "nll_history"},
                            "texts": len(texts or [])}
    report.plot_quality_vs_diversity(out / report.PLOT_FILE, metrics, f"K = {cfg.patterns}: {what.split(',')[0]}")
    examples = [{"source": e.source, "references": r} for e, r in zip(test, refs, strict=True)]
    write_text(out / REPORT_FILE, report.render_report(info, metrics, examples, outputs))
    write_json(out / METRICS_FILE, {**metrics, "run": info})
    for model, m in metrics.items():
        print(f"{model:9s} BLEU {m['bleu']:6.2f}  oracle {m['oracle_bleu']:6.2f}  pairwise {m['pairwise_bleu']:6.2f}"
              f"  refs covered {m['refs_covered']:.3f}")
    print(f"results in {out}")
    return 0
