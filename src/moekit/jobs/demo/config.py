"""The demo job's configuration: one option per field, and the comparison it ends with."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

from moekit.data.vocab import LM_SPECIALS
from moekit.jobs import options
from moekit.jobs.lm.config import LMJobConfig
from moekit.train.outdir import ConfigError

# The routers a language model can use. Each token must be routed from itself alone, as it is at
# generation time: the expert-choice router ranks every token of the batch for each expert (future
# tokens included), and E^3's router expects each input repeated once per ensemble member
# (moekit.ensemble), so neither is offered. Batchwise gating takes each expert's top tokens of the
# batch in training (Shazeer et al., appendix F) but routes each token by learned thresholds in
# evaluation, so its validation perplexity is that of a causal model.
LM_ROUTERS = ("noisy_topk", "topk", "switch", "vmoe", "batchwise")
NOT_FOR_LM = {"expert_choice": "not causal: each expert picks its tokens from the whole batch",
              "e3": "an ensemble router: it needs its input tiled per member (moekit.ensemble)"}


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
                option, choices=LM_ROUTERS, default=default, help=f"{_HELP[name]} (default: {default})"
            )
        else:
            parser.add_argument(
                option,
                type=options.positive_float if isinstance(default, float) else options.positive_int,
                default=default,
                help=f"{_HELP[name]} (default: {default})",
            )


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})
    check_config(cfg)
    return cfg


def check_config(cfg: DemoConfig) -> None:
    """``ConfigError`` naming the first value the demo cannot run with."""
    for f in dataclasses.fields(DemoConfig):
        value = getattr(cfg, f.name)
        if f.name in ("router", "data", "seed"):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{f.name}={value!r} must be a finite number > 0")
    if cfg.router not in LM_ROUTERS:
        why = NOT_FOR_LM.get(cfg.router, "not a router for language models")
        raise ConfigError(f"router={cfg.router!r} cannot route a language model ({why}); choose from "
                          f"{', '.join(LM_ROUTERS)}")
    if cfg.vocab_size <= len(LM_SPECIALS):
        raise ConfigError(f"vocab_size={cfg.vocab_size} leaves no room for a word: the vocabulary holds "
                          f"{len(LM_SPECIALS)} special tokens ({', '.join(LM_SPECIALS)}) first")
    if cfg.k > cfg.num_experts:
        raise ConfigError(f"k={cfg.k} exceeds num_experts={cfg.num_experts}")


def comparison_config(cfg: DemoConfig) -> LMJobConfig:
    """The short ``moekit lm`` comparison the demo ends with: lstm-4x vs moe-32 at half the demo's
    width, on the demo's data, vocabulary, batches, steps and schedule."""
    return LMJobConfig(models=("lstm-4x", "moe-32"), ablation=False, preset="demo", dim=max(4, cfg.dim // 2), k=4,
                       dropout=0.0, vocab_size=cfg.vocab_size, steps=cfg.steps, batch_size=cfg.batch_size,
                       seq_len=cfg.seq_len, lr=cfg.lr, warmup=max(1, cfg.steps // 20), clip=1.0, w_importance=0.1,
                       w_load=0.1, eval_every=cfg.eval_every, eval_tokens=cfg.eval_tokens,
                       checkpoint_every=cfg.checkpoint_every, seed=cfg.seed, data=cfg.data)
