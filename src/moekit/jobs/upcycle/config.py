"""``moekit upcycle``'s configuration: presets, options, validation, and the command that reproduces a run."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from moekit.jobs import options
from moekit.train.outdir import ConfigError

# Settings a preset fills in; an option given on the command line wins. tiny is for tests;
# cpu-small is sized to finish in about 20 minutes on 2 CPU cores (docs/results/upcycle/).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"dim": 16, "layers": 2, "heads": 2, "hidden_dim": 32, "vocab_size": 120, "seq_len": 8, "batch_size": 4,
             "dense_steps": 6, "continue_steps": 4, "num_experts": 4, "k": 2, "lr": 0.01, "warmup": 2, "rewarmup": 1,
             "eval_every": 2, "eval_tokens": 200, "checkpoint_every": 3},
    "cpu-small": {"dim": 128, "layers": 4, "heads": 4, "hidden_dim": 352, "vocab_size": 4000, "seq_len": 64,
                  "batch_size": 16, "dense_steps": 2000, "continue_steps": 1000, "num_experts": 8, "k": 2, "lr": 2e-3,
                  "warmup": 100, "rewarmup": 50, "eval_every": 100, "eval_tokens": 10000, "checkpoint_every": 250},
}
# Not set by a preset.
FIXED_DEFAULTS: dict[str, Any] = {"clip": 1.0, "w_importance": 0.01, "w_load": 0.0, "noise": 0.0}


@dataclass(frozen=True)
class UpcycleConfig:
    """Everything that determines the result of a run (saved as config.json).

    The dense model is a Llama (``transformers.LlamaConfig``: RMSNorm, rotary attention, SwiGLU MLP
    of width ``hidden_dim``, tied embeddings) trained ``dense_steps``; it is then continued two
    ways for ``continue_steps`` each, from the same weights with a fresh optimizer: as it is, and
    upcycled (every MLP an MoE of ``num_experts`` copies of it, ``k`` per token).
    """

    preset: str
    dim: int
    layers: int
    heads: int
    hidden_dim: int
    vocab_size: int
    seq_len: int
    batch_size: int
    dense_steps: int
    continue_steps: int
    num_experts: int
    k: int
    lr: float
    warmup: int
    rewarmup: int
    clip: float
    w_importance: float
    w_load: float
    noise: float
    eval_every: int
    eval_tokens: int
    checkpoint_every: int
    seed: int
    data: str | None


_OPTIONS: dict[str, tuple[Any, str]] = {
    "dim": (options.positive_int, "model width"),
    "layers": (options.positive_int, "decoder layers"),
    "heads": (options.positive_int, "attention heads (dim must be a multiple)"),
    "hidden_dim": (options.positive_int, "hidden width of the dense MLP, and so of every expert"),
    "vocab_size": (options.positive_int, "vocabulary cap, <unk> and <eos> included"),
    "seq_len": (options.positive_int, "tokens per sequence"),
    "batch_size": (options.positive_int, "sequences per batch"),
    "dense_steps": (options.positive_int, "training steps of the dense model before the two continuations"),
    "continue_steps": (options.positive_int, "training steps of each continuation (dense, and upcycled)"),
    "num_experts": (options.positive_int, "experts per upcycled MLP"),
    "k": (options.positive_int, "experts per token"),
    "lr": (options.positive_float, "AdamW's peak learning rate"),
    "warmup": (options.positive_int, "linear warm-up steps of the dense training, then 1/sqrt(step) decay"),
    "rewarmup": (options.positive_int, "linear warm-up steps of each continuation's fresh optimizer"),
    "clip": (options.positive_float, "gradient-norm clipping threshold"),
    "w_importance": (options.non_negative_float, "coefficient of the upcycled routers' importance loss"),
    "w_load": (options.non_negative_float, "coefficient of the upcycled routers' load loss"),
    "noise": (options.non_negative_float, "relative noise added to each expert's copy of the MLP weights"),
    "eval_every": (options.positive_int, "validate every this many steps"),
    "eval_tokens": (options.positive_int, "validation tokens per evaluation during training (the final one uses all)"),
    "checkpoint_every": (options.positive_int, "checkpoint every this many steps"),
}
_SIZED = options.PresetOptions(_OPTIONS, FIXED_DEFAULTS)


def add_args(parser: argparse.ArgumentParser) -> None:
    """The job's own options (``--out --seed --quiet --resume --force --device`` are common ones)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small",
                        help="sizes and schedule (default: cpu-small, about 20 minutes on 2 CPU cores; tiny: "
                             "seconds, for tests); options given here win")
    parser.add_argument("--data", metavar="FILE", help="UTF-8 text file to use instead of the King James Bible")
    parser.add_argument("--threads", type=options.threads, metavar="N",
                        help="torch CPU threads (default: torch's choice); not part of the run's configuration")
    _SIZED.add_to(parser)


def config_from_args(args: argparse.Namespace) -> UpcycleConfig:
    """Preset values, overridden by the options given; ``ConfigError`` names a bad value."""
    values = _SIZED.values(args, PRESETS[args.preset])
    cfg = UpcycleConfig(preset=args.preset, seed=args.seed, data=args.data, **values)
    check_config(cfg)
    return cfg


def check_config(cfg: UpcycleConfig) -> None:
    for name in ("dim", "layers", "heads", "hidden_dim", "vocab_size", "seq_len", "batch_size", "dense_steps",
                 "continue_steps", "num_experts", "k", "warmup", "rewarmup", "eval_every", "eval_tokens",
                 "checkpoint_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 1")
    for name in ("lr", "clip"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be > 0")
    for name in ("w_importance", "w_load", "noise"):
        if not getattr(cfg, name) >= 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 0")
    if cfg.dim % cfg.heads:
        raise ConfigError(f"dim={cfg.dim} is not a multiple of heads={cfg.heads}")
    if (cfg.dim // cfg.heads) % 2:
        raise ConfigError(f"the head width dim/heads={cfg.dim // cfg.heads} must be even (rotary embeddings)")
    if cfg.k > cfg.num_experts:
        raise ConfigError(f"k={cfg.k} exceeds num_experts={cfg.num_experts}")


def command_line(cfg: UpcycleConfig) -> str:
    """The ``moekit upcycle`` command that reproduces ``cfg``."""
    words = ["moekit", "upcycle", "--preset", cfg.preset]
    words += ["--seed", str(cfg.seed)] if cfg.seed else []
    words += ["--data", cfg.data] if cfg.data else []
    words += _SIZED.words(cfg, PRESETS[cfg.preset])
    return " ".join(words)
