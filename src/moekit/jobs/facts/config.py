"""``moekit facts``'s configuration: presets, options, validation, and the command that reproduces a run."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from moekit.jobs import options
from moekit.models.lstm_lm import LSTMLMConfig, parse_model
from moekit.train.outdir import ConfigError

# cpu-small: at width 16 the gate of moe-32 adds 6% to the ops of lstm-4x (moe-256's would add 50%,
# so it is not a default). Each fact is shown 256 times in batches of 1024: in trial runs lstm-4x
# and moe-32 both recalled 2000 facts perfectly after 500 such steps, but only 61% and 52% of them
# after 100 showings in batches of 512, when the run length, not the model, set the result.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-small": {"dim": 16, "facts": "1500,3000,6000,12000", "seeds": 2, "num_symbols": 128, "num_values": 64,
                  "key_len": 2, "epochs": 256, "batch_size": 1024, "lr": 1e-2, "warmup": 100, "eval_every": 250,
                  "checkpoint_every": 500},
}
DEFAULT_MODELS = ("lstm-4x", "moe-1-wide", "moe-32")


@dataclass(frozen=True)
class FactsJobConfig:
    """Everything that determines the result of a run (saved as config.json)."""

    models: tuple[str, ...]
    facts: tuple[int, ...]  # the numbers of facts swept
    seeds: int  # seeds seed, seed+1, ...: each draws its own facts and initialisation
    preset: str
    dim: int
    k: int
    num_symbols: int
    num_values: int
    key_len: int
    epochs: int
    batch_size: int
    lr: float
    warmup: int
    clip: float
    w_importance: float
    w_load: float
    eval_every: int
    checkpoint_every: int
    seed: int

    def model_config(self, model: str) -> LSTMLMConfig:
        return LSTMLMConfig(model, self.num_symbols + self.num_values, dim=self.dim, k=self.k, dropout=0.0,
                            w_importance=self.w_importance, w_load=self.w_load)

    def steps(self, n: int) -> int:
        """Optimizer steps that show each of ``n`` facts ``epochs`` times (the last batch may wrap)."""
        return math.ceil(self.epochs * n / self.batch_size)

    def trials(self) -> list[tuple[str, str, int, int]]:
        """``(label, model, facts, seed)`` of every run, model by model."""
        return [(f"{m}_n{n}_s{s}", m, n, s) for m in self.models for n in self.facts
                for s in range(self.seed, self.seed + self.seeds)]


_OPTIONS: dict[str, tuple[Any, str]] = {
    "dim": (options.positive_int, "model width D (expert hidden 2*D)"),
    "k": (options.positive_int, "experts per token of the flat MoEs"),
    "seeds": (options.positive_int, "seeds per (model, number of facts): --seed, --seed + 1, ..."),
    "num_symbols": (options.positive_int, "key symbols A"),
    "num_values": (options.positive_int, "value symbols V (log2 V bits per fact)"),
    "key_len": (options.positive_int, "symbols per key L (A**L possible keys)"),
    "epochs": (options.positive_int, "times each fact is shown in training"),
    "batch_size": (options.positive_int, "facts per batch"),
    "lr": (options.positive_float, "Adam's peak learning rate"),
    "warmup": (options.positive_int, "linear warm-up steps, then a cosine decay to 0"),
    "clip": (options.positive_float, "gradient-norm clipping threshold"),
    "w_importance": (options.non_negative_float, "coefficient of the importance loss"),
    "w_load": (options.non_negative_float, "coefficient of the load loss"),
    "eval_every": (options.positive_int, "measure the recall every this many steps"),
    "checkpoint_every": (options.positive_int, "checkpoint every this many steps"),
}
_FIXED_DEFAULTS = {"k": 4, "clip": 1.0, "w_importance": 0.1, "w_load": 0.1}
_SIZED = options.PresetOptions(_OPTIONS, _FIXED_DEFAULTS)


def add_args(parser: argparse.ArgumentParser) -> None:
    """The job's own options (``--out --seed --quiet --resume --force --device`` are common ones)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small",
                        help="default sizes and schedule (default: cpu-small); options given here win")
    parser.add_argument("--models", metavar="M1,M2,...",
                        help=f"comma-separated models of moekit lm (default: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--facts", metavar="N1,N2,...", help="numbers of facts to sweep (default: from --preset)")
    parser.add_argument("--threads", type=options.threads, metavar="N",
                        help="torch CPU threads (default: torch's choice); not part of the run's configuration")
    _SIZED.add_to(parser)


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"{what} {text!r} must be comma-separated integers") from e


def config_from_args(args: argparse.Namespace) -> FactsJobConfig:
    """Preset values, overridden by the options given; ``ConfigError`` names a bad value."""
    values = _SIZED.values(args, PRESETS[args.preset])
    facts = _int_list(args.facts if args.facts is not None else values.pop("facts"), "--facts")
    values.pop("facts", None)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else DEFAULT_MODELS
    cfg = FactsJobConfig(models=models, facts=facts, preset=args.preset, seed=args.seed, **values)
    check_config(cfg)
    return cfg


def check_config(cfg: FactsJobConfig) -> None:
    if not cfg.models:
        raise ConfigError("--models is empty")
    if len(set(cfg.models)) != len(cfg.models):
        raise ConfigError(f"--models lists a model twice: {','.join(cfg.models)}")
    if not cfg.facts or len(set(cfg.facts)) != len(cfg.facts):
        raise ConfigError(f"--facts {cfg.facts} must list distinct numbers of facts")
    for name in ("dim", "k", "seeds", "num_symbols", "num_values", "key_len", "epochs", "batch_size", "eval_every",
                 "checkpoint_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 1")
    if cfg.warmup < 0:
        raise ConfigError(f"warmup={cfg.warmup} must be >= 0")
    for name in ("lr", "clip"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be > 0")
    for name in ("w_importance", "w_load"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 0")
    space = cfg.num_symbols ** cfg.key_len
    for n in cfg.facts:
        if not 1 <= n <= min(space, 1 << 24):
            raise ConfigError(f"facts={n} must be in [1, {min(space, 1 << 24)}] "
                              f"(num_symbols={cfg.num_symbols} ** key_len={cfg.key_len} keys)")
    for model in cfg.models:
        try:
            parse_model(model)
            cfg.model_config(model).check()
        except ValueError as e:
            raise ConfigError(str(e)) from e


def command_line(cfg: FactsJobConfig) -> str:
    """The ``moekit facts`` command that reproduces ``cfg``."""
    defaults = _SIZED.defaults(PRESETS[cfg.preset])
    words = ["moekit", "facts", "--preset", cfg.preset, "--models", ",".join(cfg.models)]
    if ",".join(map(str, cfg.facts)) != defaults["facts"]:
        words += ["--facts", ",".join(map(str, cfg.facts))]
    words += ["--seed", str(cfg.seed)] if cfg.seed else []
    words += _SIZED.words(cfg, PRESETS[cfg.preset])
    return " ".join(words)
