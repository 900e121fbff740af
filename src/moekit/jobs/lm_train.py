"""Training and evaluation of one language model of ``moekit lm``.

Legend: B batch, S sequence length, V vocabulary, E experts, N evaluated tokens.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moekit.data import eval_batches, lm_batches
from moekit.models.lstm_lm import LSTMLM
from moekit.routing.losses import cv_squared
from moekit.train.parallel import SINGLE_PROCESS, SingleProcess
from moekit.train.stop import StopRequest


@dataclass(frozen=True)
class TrainConfig:
    """How one model is trained; every model of a run gets the same one (and the same batches).

    Attributes:
        steps: optimizer steps.
        batch_size, seq_len: B sequences of S tokens per step; the MoE sees all B*S at once.
        lr: Adam's peak learning rate, reached after ``warmup`` steps, then decayed as 1/sqrt(step).
        clip: gradient-norm clipping threshold.
        eval_every: validate on the first ``eval_tokens`` validation tokens every this many steps.
        checkpoint_every: checkpoint every this many steps (and at the end, and on Ctrl-C).
        seed: seeds the initialisation, the dropout and router noise, and the batch order.
    """

    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    clip: float
    eval_every: int
    eval_tokens: int
    checkpoint_every: int
    seed: int


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up to ``lr`` at ``warmup``, then ``lr * sqrt(warmup / step)`` (paper, appendix C)."""
    return lr * min(step / warmup, math.sqrt(warmup / step))


def new_progress() -> dict[str, Any]:
    """The training state of one model that is not in its tensors (saved in checkpoints)."""
    return {
        "step": 0,
        "elapsed_s": 0.0,
        "history": {"train_step": [], "train_loss": [], "valid_step": [], "valid_ppl": []},
    }


def padded_batches(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], batch_size: int, seq_len: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Pad each ``(inputs, targets)`` batch on the right to [B, S] and add its mask (True = real).

    Every evaluation batch then has one shape (one set of kernels on a GPU); the mask keeps the
    padding out of the loss and, through ``MoE(mask=...)``, out of the routing statistics.
    """
    for x_bs, y_bs in batches:
        b, s = x_bs.shape
        x_BS = x_bs.new_zeros(batch_size, seq_len)
        y_BS = y_bs.new_zeros(batch_size, seq_len)
        mask_BS = torch.zeros(batch_size, seq_len, dtype=torch.bool)
        x_BS[:b, :s], y_BS[:b, :s], mask_BS[:b, :s] = x_bs, y_bs, True
        yield x_BS, y_BS, mask_BS


class EvalResult(NamedTuple):
    """Per-token losses and summed routing statistics of one pass over a token stream (eval mode)."""

    nll_N: torch.Tensor  # [N] float32 on the CPU, nats
    importance_E: torch.Tensor | None
    load_E: torch.Tensor | None  # in eval mode the hard count of tokens whose top-k holds the expert

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_N.double().mean().item())


@torch.no_grad()
def evaluate(
    model: LSTMLM, ids_N: torch.Tensor, batch_size: int, seq_len: int, device: torch.device,
    max_tokens: int | None = None, par: SingleProcess = SINGLE_PROCESS,
) -> EvalResult:
    """Every target of ``ids_N`` (or its first ``max_tokens``) once, in windows of ``seq_len``.

    Each window starts from a zero LSTM state, as the training windows do. Under expert
    parallelism each rank computes its rows of every batch and every rank gets the whole result.
    """
    was_training = model.training
    model.eval()
    nll, importance_E, load_E = [], None, None
    for x_BS, y_BS, mask_BS in padded_batches(eval_batches(ids_N, batch_size, seq_len, max_tokens),
                                              batch_size, seq_len):
        mask_bS = par.shard(mask_BS).to(device)
        out = model(par.shard(x_BS).to(device), mask_bS)
        nll_bS = F.cross_entropy(out.logits.flatten(0, 1).float(), par.shard(y_BS).to(device).flatten(),
                                 reduction="none").view(mask_bS.shape)
        nll.append(par.gather(nll_bS).flatten().cpu()[mask_BS.flatten()])
        if out.stats is not None:
            imp, ld = out.stats.importance.float(), out.stats.load.float()
            importance_E = imp if importance_E is None else importance_E + imp
            load_E = ld if load_E is None else load_E + ld
    model.train(was_training)
    to_cpu = (lambda t: None if t is None else t.cpu())  # noqa: E731
    return EvalResult(torch.cat(nll), to_cpu(importance_E), to_cpu(load_E))


def balance_metrics(ev: EvalResult) -> dict[str, Any]:
    """CV of importance and load (population std / mean, as in the losses) and max/mean load."""
    if ev.importance_E is None:
        return {"cv_importance": None, "cv_load": None, "max_mean_load": None, "importance": None, "load": None}
    load_E = ev.load_E
    return {
        "cv_importance": math.sqrt(cv_squared(ev.importance_E).item()),
        "cv_load": math.sqrt(cv_squared(load_E).item()),
        "max_mean_load": (load_E.max() / load_E.mean()).item() if load_E.sum() > 0 else None,
        "importance": ev.importance_E.tolist(),
        "load": load_E.tolist(),
    }


def batch_balance(stats) -> list[float]:
    """[CV(importance), CV(load), max/mean load] of one training batch, as its balancing losses see it.

    In training the load is the smooth estimate of eq. 10 (the paper's Table 6 reports these
    batch-level quantities).
    """
    load_E = stats.load.detach().float()
    max_mean = (load_E.max() / load_E.mean()).item() if load_E.sum() > 0 else math.nan
    return [math.sqrt(stats.losses["importance"].item()), math.sqrt(stats.losses["load"].item()), max_mean]


def train_balance(history: dict[str, Any], last_fraction: float = 0.1) -> dict[str, float | None]:
    """``batch_balance`` averaged over the last ``last_fraction`` of the training steps."""
    rows = history.get("train_balance")
    if not rows:
        return {"train_cv_importance": None, "train_cv_load": None, "train_max_mean_load": None}
    tail = rows[-max(1, int(len(rows) * last_fraction)):]
    means = [sum(col) / len(col) for col in zip(*tail, strict=True)]
    return dict(zip(("train_cv_importance", "train_cv_load", "train_max_mean_load"), means, strict=True))


def train_model(
    model: LSTMLM, opt: torch.optim.Optimizer, progress: dict[str, Any], tc: TrainConfig,
    train_ids: torch.Tensor, valid_ids: torch.Tensor, device: torch.device,
    save: Callable[[], None], desc: str, quiet: bool, par: SingleProcess = SINGLE_PROCESS,
) -> None:
    """Train from ``progress["step"]`` to ``tc.steps``; ``save()`` writes a checkpoint.

    Batch ``i`` depends only on ``(seed, i)``, and the RNG state is in every checkpoint, so a run
    resumed from step ``s`` continues exactly as the uninterrupted run did. A Ctrl-C stops after the
    current step and checkpoints it (a second one interrupts at once). Under expert parallelism
    (``par``) each rank trains on its rows of every batch, and all stop on the same step.
    """
    hist = progress["history"]
    batches = lm_batches(train_ids, tc.batch_size, tc.seq_len, tc.seed, start_step=progress["step"])
    bar = tqdm(total=tc.steps, initial=progress["step"], desc=desc, unit="step", disable=quiet,
               dynamic_ncols=True, file=sys.stderr)
    session_start, session_steps = time.perf_counter(), 0
    model.train()
    with StopRequest() as stop, bar:
        while progress["step"] < tc.steps:
            t0 = time.perf_counter()
            step = progress["step"] + 1
            for group in opt.param_groups:
                group["lr"] = lr_at(step, tc.lr, tc.warmup)
            x_BS, y_BS = next(batches)
            out = model(par.shard(x_BS).to(device))
            # The mean over this rank's rows; equal rows per rank make the mean over ranks the
            # mean over the global batch, which is what the synchronised gradients descend.
            ce = F.cross_entropy(out.logits.flatten(0, 1).float(), par.shard(y_BS).to(device).flatten())
            opt.zero_grad(set_to_none=True)
            (ce + out.aux_loss).backward()
            par.clip_and_step(model, opt, tc.clip)
            loss = par.mean(ce.detach()).item()
            progress["step"], session_steps = step, session_steps + 1
            hist["train_step"].append(step)
            hist["train_loss"].append(loss)
            if out.stats is not None:
                hist.setdefault("train_balance", []).append(batch_balance(out.stats))
            if step % tc.eval_every == 0 or step == tc.steps:
                ev = evaluate(model, valid_ids, tc.batch_size, tc.seq_len, device, tc.eval_tokens, par)
                hist["valid_step"].append(step)
                hist["valid_ppl"].append(ev.ppl)
            progress["elapsed_s"] += time.perf_counter() - t0  # wall time, the validations included
            stopping = par.any(stop.requested)
            if step % tc.checkpoint_every == 0 or step == tc.steps or stopping:
                save()
            rate = session_steps * tc.batch_size * tc.seq_len / (time.perf_counter() - session_start)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)
            if stopping:
                raise KeyboardInterrupt(f"stopped after step {step} of {desc}; checkpoint saved")
