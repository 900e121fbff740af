"""``moekit ensemble``: dense ViT vs V-MoE vs E^3 vs a deep ensemble of V-MoEs, with uncertainty metrics.

Legend: N examples, C classes, M ensemble members, D pre-logit features, E experts, K experts per token.

The runs each model needs (``moekit.jobs.ensemble.config``) are trained one after the other, each
evaluated as soon as it is trained, as the runs of one session (``moekit.train.session``): its
checkpoints hold the run in progress plus the weights and test predictions of every finished run,
so ``--resume`` continues where the last checkpoint left off.

Under torchrun with ``--expert-parallel`` every run is trained on all ranks: the V-MoE and E^3
runs with their experts sharded, the dense ViT data-parallel (``moekit.train.strategy``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.data import DataFileError
from moekit.data.fingerprint import data_fingerprint
from moekit.data.images import DIGITS_OOD, ImageSplits, load_fashion_mnist, load_npz
from moekit.data.sampling import epoch_batch
from moekit.ensemble import init_e3_from_vmoe
from moekit.jobs.ensemble import report
from moekit.jobs.ensemble.config import (
    MODELS,
    EnsembleConfig,
    RunSpec,
    add_args,
    config_from_args,
    plan_runs,
)
from moekit.metrics.flops import routed_flops_per_example
from moekit.models.vit_moe import ViTConfig, ViTMoE, VMoEConfig
from moekit.train.loop import LoopConfig, StepOutput, TrainState, train
from moekit.train.outdir import ConfigError, prepare_out_dir
from moekit.train.runtime import environment, log
from moekit.train.schedules import warmup_cosine
from moekit.train.session import Session
from moekit.train.strategy import SINGLE_PROCESS, SingleProcess, from_args

__all__ = ["MODELS", "EnsembleConfig", "add_args", "config_from_args", "plan_runs", "run"]

CLIP = 1.0  # gradient-norm clipping of every run


def build_model(cfg: EnsembleConfig, kind: str, data: ImageSplits, device) -> ViTMoE:
    """A fresh model of one run's ``kind``: "dense", "vmoe", "e3", "soft" (Soft MoE) or "vmoe-ec"."""
    channels, height, width = data.image_shape
    patch = max(p for p in range(1, cfg.patch_size + 1) if height % p == 0 and width % p == 0)
    vit = ViTConfig((height, width), patch, channels, data.num_classes, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_dim)
    if kind == "dense":
        return ViTMoE(vit, None, device=device)
    moe = VMoEConfig(num_experts=cfg.num_experts, k=cfg.k, layout=cfg.layout, last_n=cfg.last_n,
                     capacity_factor=cfg.capacity_factor, ensemble_size=cfg.ensemble_size if kind == "e3" else None,
                     soft=kind == "soft", router="expert_choice" if kind == "vmoe-ec" else "vmoe")
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
    y_ood: np.ndarray | None = None
    """Labels of the OOD images when known (the digits' classes): the few-shot transfer set."""


def load_data(cfg: EnsembleConfig) -> tuple[ImageSplits, dict[str, Any]]:
    """The image set (the configured subsets of it) and the fingerprint of all that was loaded."""
    data = load_npz(cfg.data) if cfg.data else load_fashion_mnist()
    fingerprint = data_fingerprint(cfg.data, data.x_train, data.y_train, data.x_test, data.y_test, data.x_ood,
                                   data.num_classes)
    rng = np.random.default_rng(0)
    take_train = _subset(rng, len(data.x_train), cfg.train_examples)
    take_test = _subset(rng, len(data.x_test), cfg.test_examples)
    return dataclasses.replace(data, x_train=data.x_train[take_train], y_train=data.y_train[take_train],
                               x_test=data.x_test[take_test], y_test=data.y_test[take_test]), fingerprint


def _subset(rng: np.random.Generator, n: int, size: int | None) -> np.ndarray:
    return np.arange(n) if size is None or size >= n else np.sort(rng.permutation(n)[:size])


def to_tensors(data: ImageSplits, device) -> Tensors:
    """Per-channel standardisation with the training set's statistics, applied to every set.

    ``DataFileError`` when it is not finite: pixel values whose squares overflow float32 (beyond
    about 1e19) would make the std infinite and every standardised pixel 0.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, as an error
        mean = data.x_train.mean(axis=(0, 2, 3), keepdims=True)
        std = data.x_train.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise DataFileError(f"{data.source}: x_train's pixel values (up to {np.abs(data.x_train).max():.3g}) are too "
                            "large to standardise in float32; scale the images to a moderate range such as [0, 1]")

    def prep(x, key):
        if x is None:
            return None
        with np.errstate(over="ignore", invalid="ignore"):
            x = (x - mean) / std
        if not np.isfinite(x).all():
            raise DataFileError(f"{data.source}: {key}'s pixel values leave the float32 range when standardised "
                                "with x_train's statistics; scale the images to the range of x_train")
        return torch.from_numpy(x).float().to(device)

    return Tensors(prep(data.x_train, "x_train"), torch.from_numpy(data.y_train).to(device),
                   prep(data.x_test, "x_test"), torch.from_numpy(data.y_test).to(device), prep(data.x_ood, "x_ood"),
                   ood_labels(data))


def ood_labels(data: ImageSplits) -> np.ndarray | None:
    """The classes of the OOD images when they are scikit-learn's digits (in load_digits' order, as
    ``moekit.data.images.digits_ood`` keeps them), else None: an .npz's x_ood comes without labels."""
    if data.x_ood is None or data.ood_source != DIGITS_OOD:
        return None
    from sklearn.datasets import load_digits

    labels = load_digits().target.astype(np.int64)
    return labels if len(labels) == len(data.x_ood) else None


def train_run(spec: RunSpec, model: ViTMoE, tensors: Tensors, cfg: EnsembleConfig, session: Session,
              quiet: bool, par: SingleProcess = SINGLE_PROCESS) -> TrainState:
    """Train ``model`` for ``spec.steps`` (from where the session's checkpoint left it, if it holds this run).

    Under expert parallelism (``par``) each rank trains on its rows of every batch; all stop on the same step.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=cfg.weight_decay)
    state = session.start(spec.name, model, opt)
    n = len(tensors.x_train)

    def step(i: int) -> StepOutput:
        idx = par.shard(epoch_batch(i, cfg.batch_size, n, spec.seed)).to(tensors.x_train.device)
        # The mean over this rank's images; equal shards make the mean over ranks the global mean.
        loss, out = model.loss(tensors.x_train[idx], tensors.y_train[idx])
        return StepOutput(loss, {"loss": par.mean((loss - out.aux_loss).detach()).item()})

    warmup = min(cfg.warmup_steps, max(1, spec.steps // 10))
    return train(model, opt, state, LoopConfig(spec.steps, cfg.checkpoint_every, clip=CLIP), step,
                 lambda s: session.save(spec.name, s, model, opt), desc=spec.name, quiet=quiet,
                 lr=warmup_cosine(spec.lr, spec.steps, warmup), strategy=par)


@torch.no_grad()
def predict(model: ViTMoE, x: torch.Tensor | None, batch_size: int,
            par: SingleProcess = SINGLE_PROCESS) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """[N, M, C] float32 member probabilities and [N, M, D] float16 member pre-logits, on CPU, in eval
    mode (M = 1 for a single model). The features are kept in half precision: they feed only the
    few-shot probes, and a run's checkpoint carries them.

    Under expert parallelism each rank computes its rows of every batch and every rank gets them all.
    """
    if x is None:
        return None, None
    model.eval()
    probs, feats = [], []
    for i in range(0, len(x), batch_size):
        p, f = model.member_outputs(par.split(x[i:i + batch_size]))
        probs.append(par.gather(p).cpu())
        feats.append(par.gather(f).cpu().half())
    return torch.cat(probs), torch.cat(feats)


def evaluate_run(spec: RunSpec, model: ViTMoE, tensors: Tensors, cfg: EnsembleConfig, trained: TrainState,
                 params: int, par: SingleProcess = SINGLE_PROCESS,
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
            assert local_model is not None, "expert-parallel FLOPs need a single-process copy"
            local = local_model()
            local.load_state_dict(state)
            return routed_flops_per_example(local.eval(), x_flops)

        flops = par.main_only(count)
    probs, feats = predict(model, tensors.x_test, cfg.eval_batch_size, par)
    ood_probs, ood_feats = predict(model, tensors.x_ood, cfg.eval_batch_size, par)
    return {"spec": dataclasses.asdict(spec), "steps": spec.steps, "seconds": trained.elapsed_s,
            "losses": torch.tensor(trained.history.get("loss", [])), "params": params,
            "flops_per_example": flops, "member_probs": probs, "ood_member_probs": ood_probs,
            "member_features": feats, "ood_member_features": ood_feats, "model": state}


def run_all(cfg: EnsembleConfig, data: ImageSplits, tensors: Tensors, device: torch.device, session: Session,
            quiet: bool, par: SingleProcess = SINGLE_PROCESS) -> None:
    """Train and evaluate every planned run not finished yet."""
    for spec in plan_runs(cfg):
        if spec.name in session.finished:
            continue
        torch.manual_seed(spec.seed)
        model = build_model(cfg, spec.kind, data, device)
        params = sum(p.numel() for p in model.parameters())  # counted before the experts are sharded
        if spec.init_from is not None and session.pending_run != spec.name:
            init_e3_from_vmoe(model, session.finished[spec.init_from]["model"])
        model = par.prepare(model, {"job": dataclasses.asdict(cfg), "run": spec.name})
        state = train_run(spec, model, tensors, cfg, session, quiet, par)
        result = evaluate_run(spec, model, tensors, cfg, state, params, par,
                              functools.partial(_local_copy, cfg, spec.kind, data, device))
        session.finish(spec.name, state, result)


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
        par.check_experts("num_experts", cfg.num_experts)
    if par.distributed and "soft-moe" in cfg.models:
        raise ConfigError("--models soft-moe is not offered under torchrun (--expert-parallel, --ep-size): "
                          "Soft MoE experts are not sharded by moekit.parallel")


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
    data, fingerprint = load_data(cfg)
    tensors = to_tensors(data, device)  # before --out is touched: standardisation can fail on odd data
    try:
        build_model(cfg, "e3", data, "meta")  # fail on a bad configuration before touching --out
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if data.x_ood is None:
        log(quiet, f"{data.source} has no x_ood: OOD metrics are left out")
    out = Path(args.out)

    def prepare() -> Path | None:
        resume_from = prepare_out_dir(out, dataclasses.asdict(cfg), resume=args.resume, force=args.force)
        if resume_from is None:  # a fresh start: no output of an earlier run may survive next to the new ones
            for pattern in ("predictions_*.npz", "features_*.npz", "reliability_*.png", "flops_vs_nll.png"):
                for path in out.glob(pattern):
                    path.unlink()
        return resume_from

    resume_from = par.main_only(prepare)
    session = Session(out, fingerprint={"data": fingerprint}, strategy=par, config=dataclasses.asdict(cfg))
    if resume_from is not None:
        resume_from = session.restore(resume_from)
        log(quiet, f"resuming from {resume_from} ({len(session.finished)} run(s) finished)")
    run_all(cfg, data, tensors, device, session, quiet, par)
    env = environment(par.describe(device))
    vit = dataclasses.asdict(build_model(cfg, "dense", data, "meta").vit)  # the patch size actually used
    metrics = par.main_only(lambda: report.write_outputs(out, cfg, data, session.finished, env, vit,
                                                         tensors.y_ood))
    if par.is_main:
        print(report.metrics_table(metrics))
        print(f"results in {out}")
    return 0
