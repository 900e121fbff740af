"""``moekit lm``'s configuration: presets, options, validation, and the command that reproduces a run."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from moekit.data.vocab import LM_SPECIALS
from moekit.jobs import options
from moekit.models.lstm_lm import MODEL_NAMES, LSTMLMConfig, parse_model
from moekit.train.outdir import ConfigError
from moekit.train.strategy import add_parallel_arg

# The (w_importance, w_load) grid of the paper's Table 6.
ABLATION_GRID: tuple[tuple[float, float], ...] = ((0.0, 0.0), (0.2, 0.0), (0.0, 0.2), (0.1, 0.1), (0.01, 0.01),
                                                   (1.0, 1.0))

# Named corpora for --corpus (kjv: moekit.data.corpus; english: moekit.data.english).
CORPORA = ("kjv", "english")

class Scheme(NamedTuple):
    """A way to balance the experts' load, for ``--balancing``: the flat MoE's router and its losses."""

    router: str
    router_kwargs: tuple[tuple[str, Any], ...]
    w_importance: float
    w_load: float  # the switch router's switch-loss coefficient
    bias_rate: float | None  # aux-loss-free balancing: update_expert_bias after every step at this rate
    description: str


# The balancing schemes of --balancing, at equal ops per timestep (k experts per token, the same
# experts): the paper's, the Switch Transformer's loss, none, and the aux-loss-free bias of
# DeepSeek-V3 (Wang et al. 2024) on softmax scores and on DeepSeek's sigmoid, group-limited scores.
BALANCING: dict[str, Scheme] = {
    "shazeer": Scheme("noisy_topk", (), 0.1, 0.1, None,
                      "noisy top-k, CV^2 of importance and of the smooth load, 0.1 each (the paper's)"),
    "switch": Scheme("switch", (), 0.0, 0.01, None,
                     "softmax over all experts, top-k of it, the Switch Transformer's loss (0.01) and z-loss"),
    "no-loss": Scheme("topk", (), 0.0, 0.0, None, "softmax top-k, no balancing at all"),
    "aux-free": Scheme("topk", (("expert_bias", True),), 0.0, 0.0, 1e-3,
                       "softmax top-k with a selection bias moved by 1e-3 x sign(mean load - load) each step"),
    "deepseek": Scheme("topk", (("score", "sigmoid"), ("num_groups", 4), ("topk_groups", 2), ("expert_bias", True)),
                       0.0, 0.0, 1e-3, "sigmoid scores, 4 groups of which the best 2 are eligible, the same bias"),
}


# Settings a preset fills in; an option given on the command line wins. cpu-small runs all seven
# models in about 10 minutes on one thread of a shared 2-core machine (5.5 min of CPU time); it was
# chosen among the settings compared in docs/results/lm/README.md. paper is the paper's width with a
# schedule meant for one GPU (not measured here).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-small": {"dim": 64, "vocab_size": 4000, "steps": 1000, "batch_size": 32, "seq_len": 32, "lr": 3e-3,
                  "warmup": 50, "dropout": 0.0, "eval_every": 100, "eval_tokens": 5000, "checkpoint_every": 200},
    # The data-scaling study (docs/results/lm-scaling): cpu-small's model and schedule, validated
    # often enough to draw each run's curve; run with --corpus english and a --dim and --steps.
    "scaling": {"dim": 64, "vocab_size": 4000, "steps": 2000, "batch_size": 32, "seq_len": 32, "lr": 3e-3,
                "warmup": 50, "dropout": 0.0, "eval_every": 250, "eval_tokens": 50000, "checkpoint_every": 1000},
    "paper": {"dim": 512, "vocab_size": 16000, "steps": 10000, "batch_size": 128, "seq_len": 32, "lr": 1e-3,
              "warmup": 1000, "dropout": 0.1, "eval_every": 500, "eval_tokens": 20000, "checkpoint_every": 1000},
}


@dataclass(frozen=True)
class LMJobConfig:
    """Everything that determines the result of a run (saved as config.json)."""

    models: tuple[str, ...]
    ablation: bool
    preset: str
    dim: int
    k: int
    dropout: float
    vocab_size: int
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    clip: float
    w_importance: float
    w_load: float
    eval_every: int
    eval_tokens: int
    checkpoint_every: int
    seed: int
    data: str | None
    corpus: str = "kjv"  # a name of CORPORA; unused when data is given
    balancing: bool = False  # train each model once per scheme of BALANCING

    def model_config(self, trial: Trial, vocab_size: int) -> LSTMLMConfig:
        mcfg = LSTMLMConfig(trial.model, vocab_size, dim=self.dim, k=self.k, dropout=self.dropout,
                            w_importance=trial.w_importance, w_load=trial.w_load)
        if trial.scheme is None:
            return mcfg
        scheme = BALANCING[trial.scheme]
        return dataclasses.replace(mcfg, router=scheme.router, router_kwargs=scheme.router_kwargs)

    def trials(self) -> list[Trial]:
        if self.balancing:
            return [Trial(f"{m}_{name}", m, s.w_importance, s.w_load, name) for m in self.models
                    for name, s in BALANCING.items()]
        if not self.ablation:
            return [Trial(m, m, self.w_importance, self.w_load) for m in self.models]
        return [Trial(f"{m}_wimp{wi:g}_wload{wl:g}", m, wi, wl) for m in self.models for wi, wl in ABLATION_GRID]


class Trial(NamedTuple):
    """One model to train: ``label`` names it in the outputs."""

    label: str
    model: str
    w_importance: float
    w_load: float
    scheme: str | None = None  # a name of BALANCING (--balancing)


_OPTIONS: dict[str, tuple[Any, str]] = {
    "dim": (options.positive_int, "model width D (expert hidden 2*D)"),
    "k": (options.positive_int, "experts per token of the flat MoEs (hierarchical: sqrt(k) per level)"),
    "dropout": (options.dropout_rate, "dropout on every layer's output"),
    "vocab_size": (options.positive_int, "vocabulary cap, <unk> and <eos> included"),
    "steps": (options.positive_int, "training steps per model"),
    "batch_size": (options.positive_int, "sequences per batch"),
    "seq_len": (options.positive_int, "tokens per sequence"),
    "lr": (options.positive_float, "Adam's peak learning rate"),
    "warmup": (options.positive_int, "linear warm-up steps, then 1/sqrt(step) decay"),
    "clip": (options.positive_float, "gradient-norm clipping threshold"),
    "w_importance": (options.non_negative_float, "coefficient of the importance loss (--ablation varies it)"),
    "w_load": (options.non_negative_float, "coefficient of the load loss (--ablation varies it)"),
    "eval_every": (options.positive_int, "validate every this many steps"),
    "eval_tokens": (options.positive_int, "validation tokens per evaluation during training (the final one uses all)"),
    "checkpoint_every": (options.positive_int, "checkpoint every this many steps"),
}
_FIXED_DEFAULTS = {"k": 4, "clip": 1.0, "w_importance": 0.1, "w_load": 0.1}
_SIZED = options.PresetOptions(_OPTIONS, _FIXED_DEFAULTS)


def add_args(parser: argparse.ArgumentParser) -> None:
    """The job's own options (``--out --seed --quiet --resume --force --device`` are common ones)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small",
                        help="default sizes and schedule (default: cpu-small); options given here win")
    parser.add_argument("--models", metavar="M1,M2,...",
                        help=f"comma-separated models (default: {','.join(MODEL_NAMES)}; with --ablation: moe-32)")
    parser.add_argument("--ablation", action="store_true",
                        help="train the models once per (w_importance, w_load) of the paper's Table 6")
    parser.add_argument("--balancing", action="store_true",
                        help="train the flat MoE models once per balancing scheme: " + ", ".join(BALANCING)
                             + " (default models: moe-32)")
    parser.add_argument("--corpus", choices=CORPORA, default="kjv",
                        help="named corpus, read offline from Debian packages (default: kjv; english: six English "
                             "texts, about 6.5M tokens, see moekit.data.english)")
    parser.add_argument("--data", metavar="FILE", help="UTF-8 text file to use instead of a named corpus")
    parser.add_argument("--threads", type=options.threads, metavar="N",
                        help="torch CPU threads (default: torch's choice); not part of the run's configuration")
    add_parallel_arg(parser, "lm", "N must divide --batch-size and the experts of every MoE model of --models; "
                                   "every model of the run is trained this way (dense ones data-parallel).")
    _SIZED.add_to(parser)


def config_from_args(args: argparse.Namespace) -> LMJobConfig:
    """Preset values, overridden by the options given; ``ConfigError`` names a bad value."""
    values = _SIZED.values(args, PRESETS[args.preset])
    if args.models:
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    else:
        models = ("moe-32",) if args.ablation or args.balancing else MODEL_NAMES
    if args.ablation and args.balancing:
        raise ConfigError("--ablation and --balancing exclude each other")
    if args.data is not None and args.corpus != "kjv":
        raise ConfigError(f"--data {args.data} and --corpus {args.corpus} exclude each other")
    cfg = LMJobConfig(models=models, ablation=args.ablation, preset=args.preset, seed=args.seed,
                      data=args.data, corpus=args.corpus, balancing=args.balancing, **values)
    check_config(cfg)
    return cfg


def check_config(cfg: LMJobConfig) -> None:
    if not cfg.models:
        raise ConfigError("--models is empty")
    if cfg.corpus not in CORPORA:
        raise ConfigError(f"corpus={cfg.corpus!r} is not one of {', '.join(CORPORA)}")
    if len(set(cfg.models)) != len(cfg.models):
        raise ConfigError(f"--models lists a model twice: {','.join(cfg.models)}")
    for name in ("dim", "k", "vocab_size", "steps", "batch_size", "seq_len", "warmup", "eval_every",
                 "eval_tokens", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 1")
    for name in ("lr", "clip"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
            raise ConfigError(f"{name}={getattr(cfg, name)} must be a finite number > 0")
    for name in ("w_importance", "w_load"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0):
            raise ConfigError(f"{name}={getattr(cfg, name)} must be a finite number >= 0")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"dropout={cfg.dropout} must be in [0, 1)")
    if cfg.vocab_size <= len(LM_SPECIALS):
        raise ConfigError(f"vocab_size={cfg.vocab_size} leaves no room for a word: the vocabulary holds "
                          f"{len(LM_SPECIALS)} special tokens ({', '.join(LM_SPECIALS)}) first")
    if cfg.balancing:
        dense = [m for m in cfg.models if parse_model(m).kind != "moe"]
        if dense:
            raise ConfigError(f"--balancing compares the routers of flat MoE models; not {','.join(dense)}")
    for trial in cfg.trials():
        try:
            cfg.model_config(trial, cfg.vocab_size).check()
        except ValueError as e:
            raise ConfigError(str(e)) from e


def command_line(cfg: LMJobConfig) -> str | None:
    """The ``moekit lm`` command that reproduces ``cfg`` (None for a configuration no preset starts from)."""
    if cfg.preset not in PRESETS:
        return None
    words = ["moekit", "lm", "--preset", cfg.preset, "--models", ",".join(cfg.models)]
    words += ["--ablation"] if cfg.ablation else []
    words += ["--balancing"] if cfg.balancing else []
    words += ["--seed", str(cfg.seed)] if cfg.seed else []
    words += ["--data", cfg.data] if cfg.data else []
    words += ["--corpus", cfg.corpus] if cfg.corpus != "kjv" and not cfg.data else []
    words += _SIZED.words(cfg, PRESETS[cfg.preset])
    return " ".join(words)


