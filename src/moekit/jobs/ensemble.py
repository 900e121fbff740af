"""``moekit ensemble``: dense ViT vs V-MoE vs E^3 vs a deep ensemble of V-MoEs, with uncertainty metrics.

Legend: N examples, C classes, M ensemble members, E experts, K experts per token.

The job trains a list of *runs* one after the other, each for its own step budget, and evaluates
each as soon as it is trained; the *models* of the report are made of runs:

- ``dense``: a ViT; ``vmoe``: the same ViT with MoE MLPs in its last 2 odd blocks;
- ``e3``: the V-MoE as an Efficient Ensemble of Experts, M members on the same E experts;
- ``deep-ensemble``: M independently trained V-MoEs (the ``vmoe`` run is member 0, the others use
  seeds ``seed+1 ...``), their probabilities averaged;
- ``e3-init``: an E^3 initialised from the trained ``vmoe`` run, then fine-tuned.

All runs share one checkpoint stream in ``--out/checkpoints`` (numbered by the total of steps
done), holding the state of the run in progress plus the weights and test predictions of every
finished run, so ``--resume`` continues where the last checkpoint left off.

Under torchrun with ``--expert-parallel`` every run is trained on all ranks: the V-MoE and E^3
runs with their experts sharded, the dense ViT data-parallel (``moekit.train.parallel``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from moekit.data.images import ImageSplits, load_fashion_mnist, load_npz
from moekit.ensemble import init_e3_from_vmoe
from moekit.jobs import ensemble_report
from moekit.metrics.flops import routed_flops_per_example
from moekit.models.vit_moe import ViTConfig, ViTMoE, VMoEConfig
from moekit.train.checkpoint import load_checkpoint, save_checkpoint
from moekit.train.outdir import ConfigError, checkpoint_path, prepare_out_dir, prune_checkpoints
from moekit.train.parallel import SINGLE_PROCESS, SingleProcess, add_parallel_arg, from_args
from moekit.train.stop import StopRequest

MODELS = ("dense", "vmoe", "e3", "deep-ensemble", "e3-init")


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
    capacity_factor: float = 1.5
    eval_batch_size: int = 500
    checkpoint_every: int = 200


PRESETS: dict[str, dict[str, Any]] = {
    # All five models in 5-15 minutes on one CPU thread (5 measured on a shared 2-core machine).
    "cpu-small": {},
    # The whole training set and a wider ViT (about ViT-Ti width), for a GPU.
    "gpu": {"steps": 6000, "finetune_steps": 1500, "batch_size": 256, "train_examples": None, "patch_size": 4,
            "dim": 192, "depth": 8, "heads": 3, "mlp_dim": 768, "lr": 1e-3, "finetune_lr": 3e-4,
            "warmup_steps": 500, "checkpoint_every": 1000, "eval_batch_size": 1000},
}


def add_args(parser: argparse.ArgumentParser) -> None:
    """The job's options (``--out --seed --quiet --resume --force --device`` are common to every job)."""
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated models to train and compare, from {', '.join(MODELS)} (default: all)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small",
                        help="cpu-small: all models in 5-15 minutes on one CPU thread; gpu: full data, "
                             "wider ViT (default: cpu-small)")
    parser.add_argument("--data", metavar="FILE.npz",
                        help="image set with arrays x_train, y_train, x_test, y_test (optional x_ood) "
                             "instead of Fashion-MNIST")
    parser.add_argument("--steps", type=int, help="training steps of every run (default: the preset's)")
    parser.add_argument("--finetune-steps", type=int, help="fine-tuning steps of e3-init (default: the preset's)")
    parser.add_argument("--k", type=int, choices=(1, 2), default=1, help="experts per token (default: 1)")
    parser.add_argument("--checkpoint-every", type=int, help="checkpoint every this many steps (default: preset's)")
    parser.add_argument("--train-examples", type=int,
                        help="train on a fixed random subset of this many images (default: the preset's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    add_parallel_arg(parser, "ensemble", "N must divide the batch size (64 in cpu-small, 256 in gpu) and the "
                                         "8 experts; every model is trained this way (dense: data-parallel).")


def config_from_args(args: argparse.Namespace) -> EnsembleConfig:
    """The preset's values, overridden by the options given; ``ConfigError`` names a bad value."""
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise ConfigError(f"--models {args.models!r}: unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    values = {**PRESETS[args.preset], "models": tuple(m for m in MODELS if m in models), "preset": args.preset,
              "data": None if args.data is None else str(Path(args.data).resolve()), "seed": args.seed, "k": args.k}
    for name in ("steps", "finetune_steps", "checkpoint_every", "train_examples"):
        if getattr(args, name) is not None:
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
            values[name] = getattr(args, name)
    return EnsembleConfig(**values)


# --- runs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One training run: which architecture, its seed, its steps, and what it starts from."""

    name: str
    kind: str  # "dense", "vmoe" or "e3"
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
    return sorted(runs.values(), key=lambda r: (r.init_from is not None, list(MODELS).index(model_of_run(r.name))))


def model_runs(cfg: EnsembleConfig, model: str) -> list[RunSpec]:
    """The runs whose predictions make up ``model`` (``e3-init``'s also needs the ``vmoe`` run to start from)."""
    vmoe = RunSpec("vmoe", "vmoe", cfg.seed, cfg.steps, cfg.lr)
    if model in ("dense", "e3"):
        return [RunSpec(model, model, cfg.seed, cfg.steps, cfg.lr)]
    if model == "vmoe":
        return [vmoe]
    if model == "deep-ensemble":
        return [vmoe] + [RunSpec(f"vmoe-seed{cfg.seed + i}", "vmoe", cfg.seed + i, cfg.steps, cfg.lr)
                         for i in range(1, cfg.ensemble_size)]
    return [RunSpec("e3-init", "e3", cfg.seed, cfg.finetune_steps, cfg.finetune_lr, init_from="vmoe")]


def model_of_run(run: str) -> str:
    return "deep-ensemble" if run.startswith("vmoe-seed") else run


def build_model(cfg: EnsembleConfig, kind: str, data: ImageSplits, device) -> ViTMoE:
    channels, height, width = data.image_shape
    patch = max(p for p in range(1, cfg.patch_size + 1) if height % p == 0 and width % p == 0)
    vit = ViTConfig((height, width), patch, channels, data.num_classes, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_dim)
    if kind == "dense":
        return ViTMoE(vit, None, device=device)
    moe = VMoEConfig(num_experts=cfg.num_experts, k=cfg.k, layout="last_n", last_n=2,
                     capacity_factor=cfg.capacity_factor, ensemble_size=cfg.ensemble_size if kind == "e3" else None)
    return ViTMoE(vit, moe, device=device)


# --- data ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensors:
    """Standardised image tensors on the training device."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_ood: torch.Tensor | None


def load_data(cfg: EnsembleConfig) -> ImageSplits:
    data = load_npz(cfg.data) if cfg.data else load_fashion_mnist()
    rng = np.random.default_rng(0)
    take_train = _subset(rng, len(data.x_train), cfg.train_examples)
    take_test = _subset(rng, len(data.x_test), cfg.test_examples)
    return dataclasses.replace(data, x_train=data.x_train[take_train], y_train=data.y_train[take_train],
                               x_test=data.x_test[take_test], y_test=data.y_test[take_test])


def _subset(rng: np.random.Generator, n: int, size: int | None) -> np.ndarray:
    return np.arange(n) if size is None or size >= n else np.sort(rng.permutation(n)[:size])


def to_tensors(data: ImageSplits, device) -> Tensors:
    # Per-channel standardisation with the training set's statistics, applied to every set.
    mean = data.x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = data.x_train.std(axis=(0, 2, 3), keepdims=True) + 1e-6

    def prep(x):
        return None if x is None else torch.from_numpy((x - mean) / std).float().to(device)

    return Tensors(prep(data.x_train), torch.from_numpy(data.y_train).to(device), prep(data.x_test),
                   torch.from_numpy(data.y_test).to(device), prep(data.x_ood))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Examples of training step ``step``: epochs of random permutations, a pure function of its arguments.

    Being stateless, the data order needs no checkpointing: a resumed run sees the same batches.
    """
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = (pos // n).unique().tolist()
    perms = {e: torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + e)) for e in epochs}
    return torch.stack([perms[int(p) // n][int(p) % n] for p in pos])


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 0."""
    warmup = min(warmup, max(1, steps // 10))
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


# --- training -----------------------------------------------------------------------------------------


def train_run(spec: RunSpec, model: ViTMoE, tensors: Tensors, cfg: EnsembleConfig, job: dict,
              out: Path, quiet: bool, par: SingleProcess = SINGLE_PROCESS) -> None:
    """Train ``model`` from ``job["current"]["step"]`` to ``spec.steps``, checkpointing on schedule.

    Under expert parallelism (``par``) each rank trains on its rows of every batch; all stop on the same step.
    """
    cur = job["current"]
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=cfg.weight_decay)
    if "optimizer" in cur:  # resuming: the state of the interrupted run
        par.load_state_dicts(model, opt, cur.pop("model"), cur.pop("optimizer"))
    model.train()
    bar = tqdm(total=spec.steps, initial=cur["step"], desc=spec.name, unit="step", disable=quiet,
               dynamic_ncols=True, file=sys.stderr)
    with StopRequest() as stop, bar:
        while cur["step"] < spec.steps:
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(cur["step"], spec.steps, spec.lr, cfg.warmup_steps)
            idx = batch_indices(cur["step"], cfg.batch_size, len(tensors.x_train), spec.seed)
            idx = par.shard(idx).to(tensors.x_train.device)
            # The mean over this rank's images; equal shards make the mean over ranks the global mean.
            loss, out_ = model.loss(tensors.x_train[idx], tensors.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            par.clip_and_step(model, opt, 1.0)
            cur["step"] += 1
            cur["seconds"] += time.perf_counter() - t0
            cur["losses"].append(par.mean((loss - out_.aux_loss).detach()).item())
            bar.set_postfix(loss=f"{cur['losses'][-1]:.3f}", refresh=False)
            bar.update(1)
            stopping = par.any(stop.requested)
            if cur["step"] % cfg.checkpoint_every == 0 or stopping:
                save_job(out, job, model, opt, par)
            if stopping:
                raise KeyboardInterrupt(f"stopped after step {cur['step']} of run {spec.name}; checkpoint saved")


def save_job(out: Path, job: dict, model: ViTMoE | None, opt: torch.optim.Optimizer | None,
             par: SingleProcess = SINGLE_PROCESS) -> None:
    """Checkpoint the whole job, numbered by the total of steps done so far.

    Every rank calls this; rank 0 writes the single-process state of the whole model.
    """
    state = {"finished": job["finished"], "rng": par.capture_rng()}
    if job.get("current") is not None:
        model_state, opt_state = par.state_dicts(model, opt)
        state["current"] = {**job["current"], "model": model_state, "optimizer": opt_state}
    total = sum(r["steps"] for r in job["finished"].values()) + (job["current"] or {}).get("step", 0)

    def write() -> None:
        save_checkpoint(checkpoint_path(out, total), state)
        prune_checkpoints(out, keep=1)

    par.main_only(write)


@torch.no_grad()
def predict(model: ViTMoE, x: torch.Tensor | None, batch_size: int,
            par: SingleProcess = SINGLE_PROCESS) -> torch.Tensor | None:
    """[N, M, C] float32 member probabilities on CPU, in eval mode (M = 1 for a single model).

    Under expert parallelism each rank computes its rows of every batch and every rank gets them all.
    """
    if x is None:
        return None
    model.eval()
    return torch.cat([par.gather(model.member_probs(par.split(x[i:i + batch_size]))).cpu()
                      for i in range(0, len(x), batch_size)])


def evaluate_run(spec: RunSpec, model: ViTMoE, tensors: Tensors, cfg: EnsembleConfig, seconds: float,
                 losses: list[float], params: int, par: SingleProcess = SINGLE_PROCESS,
                 local_model: Callable[[], ViTMoE] | None = None) -> dict[str, Any]:
    """Everything the report needs from a finished run, as checkpointable plain data.

    ``params`` counts the whole model (before its experts were sharded). Under expert parallelism
    the FLOPs are counted on rank 0 in ``local_model()``, a single-process copy.
    """
    model.eval()
    state = {k: v.cpu() for k, v in par.state_dicts(model, None)[0].items()}
    x_flops = tensors.x_test[: min(len(tensors.x_test), cfg.eval_batch_size)]
    if not par.distributed:
        flops = routed_flops_per_example(model, x_flops)
    else:
        def count() -> float:
            local = local_model()
            local.load_state_dict(state)
            return routed_flops_per_example(local.eval(), x_flops)

        flops = par.main_only(count)
    return {"spec": dataclasses.asdict(spec), "steps": spec.steps, "seconds": seconds,
            "losses": torch.tensor(losses), "params": params,
            "flops_per_example": flops, "member_probs": predict(model, tensors.x_test, cfg.eval_batch_size, par),
            "ood_member_probs": predict(model, tensors.x_ood, cfg.eval_batch_size, par),
            "model": state}


def run_all(cfg: EnsembleConfig, data: ImageSplits, tensors: Tensors, device, out: Path, job: dict,
            quiet: bool, par: SingleProcess = SINGLE_PROCESS) -> None:
    """Train and evaluate every planned run not finished yet."""
    for spec in plan_runs(cfg):
        if spec.name in job["finished"]:
            continue
        torch.manual_seed(spec.seed)
        model = build_model(cfg, spec.kind, data, device)
        params = sum(p.numel() for p in model.parameters())  # counted before the experts are sharded
        cur = job.get("current")
        resuming = cur is not None and cur["name"] == spec.name
        if not resuming and spec.init_from is not None:
            init_e3_from_vmoe(model, job["finished"][spec.init_from]["model"])
        model = par.prepare(model, {"job": dataclasses.asdict(cfg), "run": spec.name})
        if resuming:
            # The router noise continues the random stream of the interrupted run; its weights
            # and optimizer state are loaded by train_run.
            par.restore_rng(job.pop("rng"))
        else:
            job["current"] = cur = {"name": spec.name, "step": 0, "seconds": 0.0, "losses": []}
        cur["losses"] = list(cur["losses"])
        train_run(spec, model, tensors, cfg, job, out, quiet, par)
        job["finished"][spec.name] = evaluate_run(spec, model, tensors, cfg, cur["seconds"], cur["losses"], params,
                                                  par, lambda kind=spec.kind: _local_copy(cfg, kind, data, device))
        job["current"] = None
        save_job(out, job, None, None, par)


def _local_copy(cfg: EnsembleConfig, kind: str, data: ImageSplits, device) -> ViTMoE:
    """A fresh single-process model, built without moving the random generators: only rank 0
    builds it, and the ranks' generators must stay in step."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return build_model(cfg, kind, data, device)


def check_parallel(cfg: EnsembleConfig, par: SingleProcess) -> None:
    """``ConfigError`` unless the batch and (when an MoE model is trained) the experts split over the ranks."""
    par.check_divisible("batch_size", cfg.batch_size)
    if any(model != "dense" for model in cfg.models):
        par.check_divisible("num_experts", cfg.num_experts)


def run(args: argparse.Namespace) -> int:
    """The ensemble job: train (or resume) every run, evaluate, write the out directory, print the table."""
    cfg = config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    par, device = from_args(args)
    try:
        return _run(args, cfg, par, device)
    finally:
        par.close()


def _run(args: argparse.Namespace, cfg: EnsembleConfig, par: SingleProcess, device: torch.device) -> int:
    """``run`` once the ranks (if any) have started; every rank calls this, rank 0 alone writes."""
    quiet = args.quiet or not par.is_main
    check_parallel(cfg, par)
    data = load_data(cfg)
    try:
        build_model(cfg, "e3", data, "meta")  # fail on a bad configuration before touching --out
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if data.x_ood is None:
        _log(quiet, f"{data.source} has no x_ood: OOD metrics are left out")
    out = Path(args.out)

    def prepare() -> Path | None:
        resume_from = prepare_out_dir(out, dataclasses.asdict(cfg), resume=args.resume, force=args.force)
        if resume_from is None:  # a fresh start: no output of an earlier run may survive next to the new ones
            for pattern in ("predictions_*.npz", "reliability_*.png", "flops_vs_nll.png"):
                for path in out.glob(pattern):
                    path.unlink()
        return resume_from

    resume_from = par.main_only(prepare)
    job: dict[str, Any] = {"finished": {}, "current": None}
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        job = {"finished": state["finished"], "current": state.get("current"), "rng": state["rng"]}
        _log(quiet, f"resuming from {resume_from} ({len(job['finished'])} run(s) finished)")
    tensors = to_tensors(data, device)
    run_all(cfg, data, tensors, device, out, job, quiet, par)
    env = {"device": par.describe(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.machine(), "python": platform.python_version()}
    vit = dataclasses.asdict(build_model(cfg, "dense", data, "meta").vit)  # the patch size actually used
    metrics = par.main_only(lambda: ensemble_report.write_outputs(out, cfg, data, job["finished"], env, model_runs,
                                                                  vit))
    if par.is_main:
        print(ensemble_report.metrics_table(metrics))
        print(f"results in {out}")
    return 0


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr)


__all__ = ["EnsembleConfig", "add_args", "config_from_args", "plan_runs", "run"]
