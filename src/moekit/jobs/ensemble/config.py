"""``moekit ensemble``'s configuration: presets, options, and the runs each model needs.

The job trains a list of *runs* one after the other, each for its own step budget; the *models* of
the report are made of runs:

- ``dense``: a ViT; ``vmoe``: the same ViT with MoE MLPs in its last 2 odd blocks;
- ``e3``: the V-MoE as an Efficient Ensemble of Experts, M members on the same E experts;
- ``deep-ensemble``: M independently trained V-MoEs (the ``vmoe`` run is member 0, the others use
  seeds ``seed+1 ...``), their probabilities averaged;
- ``e3-init``: an E^3 initialised from the trained ``vmoe`` run, then fine-tuned;
- ``soft-moe``: the same ViT with Soft MoE blocks (Puigcerver et al. 2023) where the V-MoE has MoEs;
- ``vmoe-ec``: the V-MoE with expert-choice routing (each expert takes its best tokens of the batch).

The last two (``EXTRA_MODELS``) are offered beside the five of the default run (``MODELS``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.jobs import options
from moekit.train.outdir import ConfigError
from moekit.train.strategy import add_parallel_arg

MODELS = ("dense", "vmoe", "e3", "deep-ensemble", "e3-init")
EXTRA_MODELS = ("soft-moe", "vmoe-ec")
ALL_MODELS = MODELS + EXTRA_MODELS
LAYOUTS = ("last_n", "every_2")
# The architecture each single-run model trains (deep-ensemble's runs are V-MoEs, e3-init's an E^3).
RUN_KIND = {"dense": "dense", "vmoe": "vmoe", "e3": "e3", "soft-moe": "soft", "vmoe-ec": "vmoe-ec"}


@dataclass(frozen=True)
class EnsembleConfig:
    """Everything that determines the result of a run (saved as config.json)."""

    models: tuple[str, ...] = MODELS
    preset: str = "cpu-small"
    data: str | None = None
    seed: int = 0
    steps: int = 1000
    finetune_steps: int = 200
    """Fine-tuning steps of ``e3-init`` after it is initialised from the trained ``vmoe``."""
    batch_size: int = 64
    lr: float = 1e-3
    finetune_lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    train_examples: int | None = 15000
    """A fixed random subset of the training set (drawn with seed 0, the same for every run); None: all."""
    test_examples: int | None = None
    patch_size: int = 7
    dim: int = 64
    depth: int = 8
    heads: int = 4
    mlp_dim: int = 128
    num_experts: int = 8
    k: int = 1
    ensemble_size: int = 2
    """M: E^3's members (E/M experts each) and the deep ensemble's V-MoEs."""
    layout: str = "last_n"
    """Which MLPs are MoE: "last_n", the last ``last_n`` odd blocks; "every_2", every odd block."""
    last_n: int = 2
    capacity_factor: float = 1.5
    eval_batch_size: int = 500
    checkpoint_every: int = 200
    fewshot_shots: tuple[int, ...] = (1, 5, 10)
    """Labelled examples per class of the few-shot ridge probes (``moekit.metrics.fewshot``)."""
    fewshot_draws: int = 5
    """Independent draws of the shots per shot count; the report gives their mean and spread."""


PRESETS: dict[str, dict[str, Any]] = {
    # All five models in 5-15 minutes on one CPU thread (5 measured on a shared 2-core machine).
    "cpu-small": {},
    # The sweep of ``python -m moekit.jobs.ensemble.study``: the cpu-small ViT on a third of its
    # training images for 800 steps (about 10 epochs), where single models start to overfit and
    # ensembling has something to fix; about a minute per V-MoE run on one CPU thread.
    "sweep": {"train_examples": 5000, "steps": 800, "finetune_steps": 200, "warmup_steps": 80},
    # The whole training set and a wider ViT (about ViT-Ti width), for a GPU.
    "gpu": {"steps": 6000, "finetune_steps": 1500, "batch_size": 256, "train_examples": None, "patch_size": 4,
            "dim": 192, "depth": 8, "heads": 3, "mlp_dim": 768, "lr": 1e-3, "finetune_lr": 3e-4,
            "warmup_steps": 500, "checkpoint_every": 1000, "eval_batch_size": 1000},
}


def add_args(parser: argparse.ArgumentParser) -> None:
    """The job's options (``--out --seed --quiet --resume --force --device`` are common to every job)."""
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated models to train and compare, from {', '.join(ALL_MODELS)} "
                             f"(default: {','.join(MODELS)})")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small",
                        help="cpu-small: all models in 5-15 minutes on one CPU thread; sweep: 5,000 training "
                             "images and 800 steps, the E^3 study's points; gpu: full data, wider ViT "
                             "(default: cpu-small)")
    parser.add_argument("--data", metavar="FILE.npz",
                        help="image set with arrays x_train, y_train, x_test, y_test (optional x_ood, and "
                             "num_classes when the training labels do not show the largest class) instead of "
                             "Fashion-MNIST")
    parser.add_argument("--steps", type=options.positive_int,
                        help="training steps of every run (default: the preset's)")
    parser.add_argument("--finetune-steps", type=options.positive_int,
                        help="fine-tuning steps of e3-init (default: the preset's)")
    parser.add_argument("--k", type=int, choices=(1, 2), default=1, help="experts per token (default: 1)")
    parser.add_argument("--ensemble-size", type=options.positive_int, metavar="M",
                        help="E^3 members and deep-ensemble V-MoEs, at least 2; M must divide the 8 experts "
                             "and leave each member K of them (default: 2)")
    parser.add_argument("--layout", choices=LAYOUTS,
                        help="MoE MLPs in the last --last-n odd blocks (last_n) or in every odd block (every_2) "
                             "(default: last_n)")
    parser.add_argument("--last-n", type=options.positive_int,
                        help="with --layout last_n: how many odd blocks, from the top, are MoE (default: 2)")
    parser.add_argument("--checkpoint-every", type=options.positive_int,
                        help="checkpoint every this many steps (default: preset's)")
    parser.add_argument("--train-examples", type=options.positive_int,
                        help="train on a fixed random subset of this many images (default: the preset's)")
    parser.add_argument("--threads", type=options.threads, help="torch CPU threads (default: torch's choice)")
    add_parallel_arg(parser, "ensemble", "N must divide the batch size (64 in cpu-small, 256 in gpu) and the "
                                         "8 experts; every model is trained this way (dense: data-parallel).")


def config_from_args(args: argparse.Namespace) -> EnsembleConfig:
    """The preset's values, overridden by the options given; ``ConfigError`` names a bad value."""
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in models if m not in ALL_MODELS]
    if unknown or not models:
        raise ConfigError(f"--models {args.models!r}: unknown model(s) {unknown}; choose from {', '.join(ALL_MODELS)}")
    values = {**PRESETS[args.preset], "models": tuple(m for m in ALL_MODELS if m in models), "preset": args.preset,
              "data": None if args.data is None else str(Path(args.data).resolve()), "seed": args.seed, "k": args.k}
    if getattr(args, "ensemble_size", None) is not None and args.ensemble_size < 2:
        raise ConfigError(f"--ensemble-size {args.ensemble_size}: an ensemble needs M >= 2 members "
                          "(M = 1 is the single V-MoE)")
    for name in ("ensemble_size", "layout", "last_n"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    for name in ("steps", "finetune_steps", "checkpoint_every", "train_examples"):
        if getattr(args, name) is not None:
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
            values[name] = getattr(args, name)
    return EnsembleConfig(**values)


@dataclass(frozen=True)
class RunSpec:
    """One training run: which architecture, its seed, its steps, and what it starts from."""

    name: str
    kind: str  # "dense", "vmoe", "e3", "soft" or "vmoe-ec"
    seed: int
    steps: int
    lr: float
    init_from: str | None = None


def plan_runs(cfg: EnsembleConfig) -> list[RunSpec]:
    """The runs the requested models need, in training order (a run needed twice is trained once)."""
    runs: dict[str, RunSpec] = {}
    for model in cfg.models:
        for spec in model_runs(cfg, model):
            if spec.init_from is not None:  # e3-init needs the trained vmoe first
                runs.setdefault(spec.init_from, RunSpec(spec.init_from, "vmoe", cfg.seed, cfg.steps, cfg.lr))
            runs.setdefault(spec.name, spec)
    return sorted(runs.values(), key=lambda r: (r.init_from is not None, ALL_MODELS.index(model_of_run(r.name))))


def model_runs(cfg: EnsembleConfig, model: str) -> list[RunSpec]:
    """The runs whose predictions make up ``model`` (``e3-init``'s also needs the ``vmoe`` run to start from)."""
    vmoe = RunSpec("vmoe", "vmoe", cfg.seed, cfg.steps, cfg.lr)
    if model in ("dense", "e3", "soft-moe", "vmoe-ec"):
        return [RunSpec(model, RUN_KIND[model], cfg.seed, cfg.steps, cfg.lr)]
    if model == "vmoe":
        return [vmoe]
    if model == "deep-ensemble":
        return [vmoe] + [RunSpec(f"vmoe-seed{cfg.seed + i}", "vmoe", cfg.seed + i, cfg.steps, cfg.lr)
                         for i in range(1, cfg.ensemble_size)]
    return [RunSpec("e3-init", "e3", cfg.seed, cfg.finetune_steps, cfg.finetune_lr, init_from="vmoe")]


def model_of_run(run: str) -> str:
    return "deep-ensemble" if run.startswith("vmoe-seed") else run
