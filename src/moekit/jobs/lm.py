"""``moekit lm``: the LSTM-MoE language model of Shazeer et al. 2017 vs compute-matched dense models.

Legend: N tokens in a stream, B batch, S sequence length.

Every model of a run (``--models``) is trained on the same batches with the same schedule, one
after the other, and evaluated on the whole validation and test streams. ``--ablation`` trains the
model(s) instead once per (w_importance, w_load) pair of the paper's Table 6.

Checkpoints hold the finished models' results and the model in training, named by a step
counter that runs over all models (model i at its step s is ``i * steps + s``), so one
``--resume`` continues the run where it stopped, whichever model that was in.

Under torchrun with ``--expert-parallel`` every model of the run is trained on all ranks: the MoE
models with their experts sharded, the dense baselines data-parallel (``moekit.train.parallel``).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from moekit.data import KJV_BOOKS, KJV_SPLIT, Vocab, kjv_corpus, text_file_corpus
from moekit.jobs import lm_report
from moekit.jobs.lm_train import (
    TrainConfig,
    balance_metrics,
    evaluate,
    new_progress,
    train_balance,
    train_model,
)
from moekit.models.lstm_lm import LSTMLM, MODEL_NAMES, LSTMLMConfig, body_params, ops_per_timestep, parse_model
from moekit.train.checkpoint import load_checkpoint, save_checkpoint
from moekit.train.outdir import ConfigError, OutDirError, checkpoint_path, prepare_out_dir, prune_checkpoints
from moekit.train.parallel import SINGLE_PROCESS, SingleProcess, add_parallel_arg, from_args

# The (w_importance, w_load) grid of the paper's Table 6.
ABLATION_GRID: tuple[tuple[float, float], ...] = ((0.0, 0.0), (0.2, 0.0), (0.0, 0.2), (0.1, 0.1), (0.01, 0.01),
                                                   (1.0, 1.0))

# Settings a preset fills in; an option given on the command line wins. cpu-small runs all seven
# models in about 10 minutes on one thread of a shared 2-core machine (5.5 min of CPU time); it was
# chosen among the settings compared in docs/results/lm/README.md. paper is the paper's width with a
# schedule meant for one GPU (not measured here).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-small": {"dim": 64, "vocab_size": 4000, "steps": 1000, "batch_size": 32, "seq_len": 32, "lr": 3e-3,
                  "warmup": 50, "dropout": 0.0, "eval_every": 100, "eval_tokens": 5000, "checkpoint_every": 200},
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

    def train_config(self) -> TrainConfig:
        names = [f.name for f in dataclasses.fields(TrainConfig)]
        return TrainConfig(**{name: getattr(self, name) for name in names})

    def model_config(self, trial: Trial, vocab_size: int) -> LSTMLMConfig:
        return LSTMLMConfig(trial.model, vocab_size, dim=self.dim, k=self.k, dropout=self.dropout,
                            w_importance=trial.w_importance, w_load=trial.w_load)

    def trials(self) -> list[Trial]:
        if not self.ablation:
            return [Trial(m, m, self.w_importance, self.w_load) for m in self.models]
        return [Trial(f"{m}_wimp{wi:g}_wload{wl:g}", m, wi, wl) for m in self.models for wi, wl in ABLATION_GRID]


class Trial(NamedTuple):
    """One model to train: ``label`` names it in the outputs."""

    label: str
    model: str
    w_importance: float
    w_load: float


class LMData(NamedTuple):
    vocab: Vocab
    train: torch.Tensor  # [N] token ids
    valid: torch.Tensor
    test: torch.Tensor
    source: str
    split: str  # how the corpus was split, in words


_OPTIONS: dict[str, tuple[type, str]] = {
    "dim": (int, "model width D (expert hidden 2*D)"),
    "k": (int, "experts per token of the flat MoEs (hierarchical: sqrt(k) per level)"),
    "dropout": (float, "dropout on every layer's output"),
    "vocab_size": (int, "vocabulary cap, <unk> and <eos> included"),
    "steps": (int, "training steps per model"),
    "batch_size": (int, "sequences per batch"),
    "seq_len": (int, "tokens per sequence"),
    "lr": (float, "Adam's peak learning rate"),
    "warmup": (int, "linear warm-up steps, then 1/sqrt(step) decay"),
    "clip": (float, "gradient-norm clipping threshold"),
    "w_importance": (float, "coefficient of the importance loss (--ablation varies it)"),
    "w_load": (float, "coefficient of the load loss (--ablation varies it)"),
    "eval_every": (int, "validate every this many steps"),
    "eval_tokens": (int, "validation tokens per evaluation during training (the final one uses all)"),
    "checkpoint_every": (int, "checkpoint every this many steps"),
}
_FIXED_DEFAULTS = {"k": 4, "clip": 1.0, "w_importance": 0.1, "w_load": 0.1}


def add_args(parser: argparse.ArgumentParser) -> None:
    """The job's own options (``--out --seed --quiet --resume --force --device`` are common ones)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small",
                        help="default sizes and schedule (default: cpu-small); options given here win")
    parser.add_argument("--models", metavar="M1,M2,...",
                        help=f"comma-separated models (default: {','.join(MODEL_NAMES)}; with --ablation: moe-32)")
    parser.add_argument("--ablation", action="store_true",
                        help="train the models once per (w_importance, w_load) of the paper's Table 6")
    parser.add_argument("--data", metavar="FILE", help="UTF-8 text file to use instead of the King James Bible")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (default: torch's choice); not part of the run's configuration")
    add_parallel_arg(parser, "lm", "N must divide --batch-size and the experts of every MoE model of --models; "
                                   "every model of the run is trained this way (dense ones data-parallel).")
    for name, (kind, text) in _OPTIONS.items():
        default = _FIXED_DEFAULTS.get(name)
        shown = f"default: {default}" if default is not None else "default: from --preset"
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"{text} ({shown})")


def config_from_args(args: argparse.Namespace) -> LMJobConfig:
    """Preset values, overridden by the options given; ``ConfigError`` names a bad value."""
    values: dict[str, Any] = {**_FIXED_DEFAULTS, **PRESETS[args.preset]}
    values.update({name: getattr(args, name) for name in _OPTIONS if getattr(args, name) is not None})
    if args.models:
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    else:
        models = ("moe-32",) if args.ablation else MODEL_NAMES
    cfg = LMJobConfig(models=models, ablation=args.ablation, preset=args.preset, seed=args.seed,
                      data=args.data, **values)
    check_config(cfg)
    return cfg


def check_config(cfg: LMJobConfig) -> None:
    if not cfg.models:
        raise ConfigError("--models is empty")
    if len(set(cfg.models)) != len(cfg.models):
        raise ConfigError(f"--models lists a model twice: {','.join(cfg.models)}")
    for name in ("dim", "k", "vocab_size", "steps", "batch_size", "seq_len", "warmup", "eval_every",
                 "eval_tokens", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 1")
    for name in ("lr", "clip"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be > 0")
    for name in ("w_importance", "w_load"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 0")
    for trial in cfg.trials():
        try:
            cfg.model_config(trial, cfg.vocab_size).check()
        except ValueError as e:
            raise ConfigError(str(e)) from e


def check_parallel(cfg: LMJobConfig, par: SingleProcess) -> None:
    """``ConfigError`` unless the global batch and every MoE model's experts split over the ranks."""
    par.check_divisible("batch_size", cfg.batch_size)
    for model in cfg.models:
        spec = parse_model(model)
        if spec.kind in ("moe", "hmoe"):
            par.check_divisible(f"the number of experts of {model}", spec.experts)


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
    if cfg.data is None:
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
                  corpus.source, split)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _Run:
    """The state of a run across its models: finished results, and where training stands."""

    def __init__(self, cfg: LMJobConfig, data: LMData, out: Path, device: torch.device, quiet: bool,
                 par: SingleProcess):
        self.cfg, self.data, self.out, self.device, self.quiet, self.par = cfg, data, out, device, quiet, par
        self.trials = cfg.trials()
        self.results: list[dict[str, Any]] = []  # one per finished model, in order
        self.raw: dict[str, dict[str, torch.Tensor]] = {}  # label -> per-token test/valid NLL
        self.resume_state: dict[str, Any] | None = None  # a checkpoint of the model in training

    def restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        if ckpt["vocab"] != self.data.vocab.to_list():
            raise OutDirError(f"checkpoint {str(path)!r} was trained on a different vocabulary (data changed?)")
        self.results, self.raw = ckpt["results"], ckpt["raw"]
        if ckpt["model"] is not None:
            self.resume_state = ckpt
        _log(self.quiet, f"resuming from {path} ({len(self.results)} of {len(self.trials)} models finished"
                         + (f", {self.trials[ckpt['trial']].label} at step {ckpt['step']})" if ckpt["model"] else ")"))

    def _save(self, index: int, step: int, model=None, opt=None, progress=None) -> None:
        """Every rank calls this; rank 0 writes the single-process state of the whole model."""
        global_step = index * self.cfg.steps + step
        state = {"trial": index, "step": step, "results": self.results, "raw": self.raw,
                 "vocab": self.data.vocab.to_list(), "model": None, "optimizer": None, "progress": progress,
                 "rng": self.par.capture_rng()}
        if model is not None:
            state["model"], state["optimizer"] = self.par.state_dicts(model, opt)

        def write() -> None:
            save_checkpoint(checkpoint_path(self.out, global_step), state)
            prune_checkpoints(self.out, keep=1)

        self.par.main_only(write)

    def run_trial(self, index: int) -> None:
        """Build (or restore), train and evaluate model ``index``; record its result."""
        cfg, data, trial = self.cfg, self.data, self.trials[index]
        par = self.par
        _seed(cfg.seed)  # each model starts from the same seed, whatever ran before it
        mcfg = cfg.model_config(trial, len(data.vocab))
        model = LSTMLM(mcfg, device=self.device)
        params = body_params(model)  # counted before the experts are sharded
        if par.world_size > 1:
            model.drop = RowShardDropout(mcfg.dropout, par.rank, par.world_size)
        model = par.prepare(model, {"job": dataclasses.asdict(cfg), "trial": index})
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        progress = new_progress()
        if self.resume_state is not None:
            ckpt, self.resume_state = self.resume_state, None
            par.load_state_dicts(model, opt, ckpt["model"], ckpt["optimizer"])
            par.restore_rng(ckpt["rng"])
            progress = ckpt["progress"]
        desc = f"{trial.label} [{index + 1}/{len(self.trials)}]"
        train_model(model, opt, progress, cfg.train_config(), data.train, data.valid, self.device,
                    lambda: self._save(index, progress["step"], model, opt, progress), desc, self.quiet, par)
        t0 = time.perf_counter()
        valid = evaluate(model, data.valid, cfg.batch_size, cfg.seq_len, self.device, par=par)
        test = evaluate(model, data.test, cfg.batch_size, cfg.seq_len, self.device, par=par)
        eval_time_s = time.perf_counter() - t0
        spec = parse_model(trial.model)
        self.results.append({
            "name": trial.label, "model": trial.model,
            "experts": spec.experts or None, "k": None if spec.kind == "lstm" else (1 if spec.experts == 1 else cfg.k),
            "ops_per_timestep": ops_per_timestep(mcfg), "params": params,
            "test_ppl": test.ppl, "valid_ppl": valid.ppl, **balance_metrics(test),
            **train_balance(progress["history"]),
            "w_importance": trial.w_importance, "w_load": trial.w_load,
            "steps": progress["step"], "train_time_s": progress["elapsed_s"],
            "eval_time_s": eval_time_s, "history": progress["history"],
        })
        self.raw[trial.label] = {"test_nll": test.nll_N, "valid_nll": valid.nll_N}
        _log(self.quiet, f"{trial.label}: validation perplexity {valid.ppl:.2f}, test perplexity {test.ppl:.2f}")
        # The checkpoint of the finished model is replaced by one with its result and no weights.
        self._save(index + 1, 0)


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
    run = _Run(cfg, data, out, device, quiet or not par.is_main, par)
    if resume_from is not None:
        run.restore(resume_from)
    for index in range(len(run.results), len(run.trials)):
        run.run_trial(index)
    return par.main_only(lambda: lm_report.write_outputs(out, cfg, data, run.results, run.raw,
                                                         par.describe(device), command_line(cfg)))


def command_line(cfg: LMJobConfig) -> str | None:
    """The ``moekit lm`` command that reproduces ``cfg`` (None for a configuration no preset starts from)."""
    if cfg.preset not in PRESETS:
        return None
    defaults = {**_FIXED_DEFAULTS, **PRESETS[cfg.preset]}
    words = ["moekit", "lm", "--preset", cfg.preset, "--models", ",".join(cfg.models)]
    words += ["--ablation"] if cfg.ablation else []
    words += ["--seed", str(cfg.seed)] if cfg.seed else []
    words += ["--data", cfg.data] if cfg.data else []
    for name in _OPTIONS:
        if getattr(cfg, name) != defaults[name]:
            words += [f"--{name.replace('_', '-')}", f"{getattr(cfg, name):g}"]
    return " ".join(words)


def demo_comparison(demo_cfg: Any, out: Path, device: torch.device, *, resume: bool, quiet: bool) -> dict[str, Any]:
    """``moekit demo``'s short version of the comparison: lstm-4x vs moe-32 at half the demo's width.

    It takes the demo's data, vocabulary, batches, steps and schedule (``demo_cfg`` is a
    ``DemoConfig``), runs in its own out directory inside the demo's, and prints its table. The
    demo's own out-directory check has already passed, so this one may start over (``force``).
    """
    d = demo_cfg
    cfg = LMJobConfig(models=("lstm-4x", "moe-32"), ablation=False, preset="demo", dim=max(4, d.dim // 2), k=4,
                      dropout=0.0, vocab_size=d.vocab_size, steps=d.steps, batch_size=d.batch_size,
                      seq_len=d.seq_len, lr=d.lr, warmup=max(1, d.steps // 20), clip=1.0, w_importance=0.1,
                      w_load=0.1, eval_every=d.eval_every, eval_tokens=d.eval_tokens,
                      checkpoint_every=d.checkpoint_every, seed=d.seed, data=d.data)
    _log(quiet, f"comparison: lstm-4x vs moe-32 at width {cfg.dim}, {cfg.steps} steps each")
    metrics = execute(cfg, out, device, resume=resume, force=True, quiet=quiet)
    print(lm_report.short_table(metrics["models"]))
    for line in lm_report.findings(metrics["models"], ablation=False):
        print(line)
    return metrics


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """The lm job: train (or resume) every model, evaluate, write the out directory, print the table."""
    cfg = config_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"threads={args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    par, device = from_args(args)
    try:
        metrics = execute(cfg, Path(args.out), device, resume=args.resume, force=args.force, quiet=args.quiet,
                          par=par)
    finally:
        par.close()
    if par.is_main:
        print(lm_report.summary_table(metrics["models"], cfg.ablation))
        print(f"results in {args.out}")
    return 0
