"""``moekit patterns``: SPMoE against top-K beam search, K samples and hMoEup, K outputs per input.

Writes into ``--out``: config.json, checkpoints/, outputs_<model>.jsonl, metrics.json (one entry
per model), report.md and quality_vs_diversity.png. Training resumes (``--resume``) from the last
checkpoint; each network's batches and random draws replay exactly, so a resumed run ends where an
uninterrupted one would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import moekit
from moekit.data import DataFileError
from moekit.metrics.generation import generation_metrics, pattern_usage, refs_covered
from moekit.patterns import report
from moekit.patterns.bible import kjv_web_examples
from moekit.patterns.data import (
    EncodedPairs,
    Example,
    Vocab,
    encode_pairs,
    normalize,
    read_jsonl,
    split_examples,
    synthetic_examples,
)
from moekit.patterns.train import (
    MODELS,
    NETWORK_OF,
    PRESETS,
    PatternsConfig,
    assignments,
    build_network,
    decode,
    expert_token,
    make_config,
    make_optimizer,
    purity,
    train_step,
)
from moekit.train.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
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

SYNTHETIC = "synthetic"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated models to compare, from {', '.join(MODELS)} (default: all)")
    parser.add_argument("--patterns", type=int, default=3, metavar="K", help="outputs per input (default: 3)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per network (default: the preset's)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="sizes and schedule (default: cpu-small, or synthetic with --data synthetic)")
    parser.add_argument("--beam", type=int, default=4,
                        help="beam width of the beam baseline (at least K) and of each pattern's search (default: 4)")
    parser.add_argument("--head", choices=("adapter", "full"), default="adapter",
                        help="SPMoE pattern head: a D x D adapter before the shared projection, or a full "
                             "output layer per pattern (default: adapter)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (default: 0 = torch's own choice)")
    parser.add_argument("--data", metavar="FILE.jsonl", default=None,
                        help='JSON lines {"source": str, "targets": [str, ...]}, or "synthetic" for the set '
                             "with K known patterns (default: KJV -> World English Bible verse pairs)")


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


def _checkpoint(out: Path, cfg: PatternsConfig, state: dict[str, Any]) -> None:
    index = cfg.networks().index(state["network"])
    path = checkpoint_path(out, index * cfg.sizes.steps + state["step"])
    save_checkpoint(path, {**state, "rng": capture_rng_state()})
    prune_checkpoints(out, keep=1)


def train_network(name: str, cfg: PatternsConfig, state: dict[str, Any], pairs: EncodedPairs, vocab: Vocab,
                  out: Path, device, quiet: bool) -> torch.nn.Module:
    """Train (or finish training) one network; ``state`` is the run's checkpointable state."""
    index = cfg.networks().index(name)
    torch.manual_seed(cfg.seed * 1000 + index)  # each network's initialisation is its own
    net = build_network(name, cfg, vocab, device=device)
    opt, sched = make_optimizer(net, cfg.sizes)
    if name in state["done"]:
        net.load_state_dict(state["weights"][name])
        return net
    if state.get("network") == name and state["step"] > 0:
        net.load_state_dict(state["weights"][name])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        # After the seeded initialisation above: dropout and gate noise continue where they stopped.
        restore_rng_state(state["rng"])
    else:
        state.update(network=name, step=0)
        state["history"][name] = {"nll": [], "assign": []}
        state["elapsed_s"][name] = 0.0
    hist, steps = state["history"][name], cfg.sizes.steps
    bar = tqdm(total=steps, initial=state["step"], desc=name, unit="step", disable=quiet, dynamic_ncols=True,
               file=sys.stderr)
    with StopRequest() as stop, bar:
        while state["step"] < steps:
            t0 = time.perf_counter()
            nll, assign = train_step(net, opt, sched, pairs, vocab, cfg.sizes, cfg.seed, state["step"], device)
            state["step"] += 1
            state["elapsed_s"][name] += time.perf_counter() - t0
            hist["nll"].append(nll)
            if assign is not None:
                hist["assign"].append(pattern_usage(assign, cfg.patterns))
            done = state["step"] == steps
            if done:
                state["done"].append(name)
            if done or stop.requested or state["step"] % cfg.sizes.checkpoint_every == 0:
                state["weights"][name] = net.state_dict()
                state["optimizer"], state["scheduler"] = opt.state_dict(), sched.state_dict()
                _checkpoint(out, cfg, state)
            bar.set_postfix(nll=f"{nll:.3f}", refresh=False)
            bar.update(1)
            if stop.requested and not done:
                raise KeyboardInterrupt(f"stopped {name} after step {state['step']}; checkpoint saved")
    return net


def _restore(path: Path, vocab: Vocab) -> dict[str, Any]:
    state = load_checkpoint(path)
    if state.get("vocab") != vocab.itos:
        raise OutDirError(f"checkpoint {str(path)!r} was trained on a different vocabulary (data changed?)")
    return state


def _train_summary(name: str, cfg: PatternsConfig, state: dict[str, Any], net, pairs: EncodedPairs,
                   vocab: Vocab, device) -> dict[str, Any]:
    hist = state["history"][name]
    tail = hist["nll"][-100:]
    summary: dict[str, Any] = {"network": name, "steps": len(hist["nll"]), "time_s": state["elapsed_s"][name],
                               "final_nll": sum(tail) / len(tail), "nll_history": hist["nll"]}
    if hist["assign"]:
        recent = hist["assign"][-100:]
        summary["assignment_share"] = [sum(a[k] for a in recent) / len(recent) for k in range(cfg.patterns)]
        if cfg.data == SYNTHETIC:
            assigned = assignments(net, pairs, vocab, device)
            summary["purity"] = purity(assigned, pairs.labels[: len(assigned)], cfg.patterns)
    return summary


def _write_outputs(path: Path, test: list[Example], outputs: list[list[str]], priors) -> None:
    lines = []
    for i, (ex, outs) in enumerate(zip(test, outputs, strict=True)):
        row = {"source": ex.source, "outputs": outs, "references": [normalize(t) for t in ex.targets]}
        if priors is not None:
            row["prior"] = priors[i]
        lines.append(json.dumps(row, ensure_ascii=False))
    write_text(path, "\n".join(lines) + "\n")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _config_from_args(args: argparse.Namespace) -> PatternsConfig:
    preset = args.preset or (SYNTHETIC if args.data == SYNTHETIC else "cpu-small")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    data = args.data if args.data in (None, SYNTHETIC) else str(Path(args.data))
    try:
        return make_config(models, args.patterns, preset, data, args.seed, args.beam, args.steps, args.head)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def run(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args)
    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads} must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    train, test, what = load_examples(cfg)
    vocab = Vocab.build([e.source for e in train] + [t for e in train for t in e.targets], cfg.sizes.vocab_size,
                        extra=[expert_token(i) for i in range(cfg.patterns)])
    pairs = encode_pairs(train, vocab, cfg.sizes.max_len, cfg.sizes.max_len)
    out = Path(args.out)
    resume_from = prepare_out_dir(out, dataclasses.asdict(cfg), resume=args.resume, force=args.force)
    state: dict[str, Any] = {"vocab": vocab.itos, "network": None, "step": 0, "done": [], "weights": {},
                             "history": {}, "elapsed_s": {}}
    if resume_from is not None:
        state = _restore(resume_from, vocab)
        if not args.quiet:
            print(f"resuming from {resume_from}", file=sys.stderr)
    nets, summaries = {}, {}
    for name in cfg.networks():
        nets[name] = train_network(name, cfg, state, pairs, vocab, out, device, args.quiet)
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
    info = {"config": dataclasses.asdict(cfg), "data": what, "train_pairs": len(pairs), "test_inputs": len(test),
            "vocab_size": len(vocab), "device": str(device), "threads": torch.get_num_threads(),
            "environment": {"moekit": moekit.__version__, "torch": torch.__version__,
                            "python": platform.python_version()}}
    report.plot_quality_vs_diversity(out / report.PLOT_FILE, metrics, f"K = {cfg.patterns}: {what.split(',')[0]}")
    examples = [{"source": e.source, "references": r} for e, r in zip(test, refs, strict=True)]
    write_text(out / REPORT_FILE, report.render_report(info, metrics, examples, outputs))
    write_json(out / METRICS_FILE, {**metrics, "run": info})
    for model, m in metrics.items():
        print(f"{model:9s} BLEU {m['bleu']:6.2f}  oracle {m['oracle_bleu']:6.2f}  pairwise {m['pairwise_bleu']:6.2f}"
              f"  refs covered {m['refs_covered']:.3f}")
    print(f"results in {out}")
    return 0
