"""The one training loop of every moekit job.

A job hands ``train`` its model, optimizer and a ``step`` function (one batch's forward pass,
returning the objective to descend and the values to record); the loop does the rest, the same
way for every job:

- sets the learning rate of the step from a schedule (``moekit.train.schedules``);
- runs backward, clips the gradient norm and takes the optimizer step through the strategy
  (one process, or a rank of an expert-parallel launch: ``moekit.train.strategy``);
- records the step's values in ``TrainState.history`` and shows them on a progress bar;
- evaluates every ``eval_every`` steps and after the last one;
- checkpoints every ``checkpoint_every`` steps, after the last one and when stopped;
- turns Ctrl-C (SIGINT) or SIGTERM into a stop after the current step, with a checkpoint: a second
  signal interrupts at once.

Resumption is exact: the batches of a step are a function of its index (the jobs' samplers), the
RNG state is in every checkpoint (``moekit.train.session``), and no scheduler state is needed, so
a run resumed from step s continues as the uninterrupted run did.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from moekit.train.schedules import Schedule
from moekit.train.stop import StopRequest
from moekit.train.strategy import SINGLE_PROCESS, SingleProcess


@dataclass
class TrainState:
    """Where one run's training stands (plain data, saved in every checkpoint).

    Attributes:
        step: optimizer steps taken.
        elapsed_s: wall time spent in training steps (evaluations excluded).
        history: per-step series by name (``"train_step"`` and the values the step function
            returned) and per-evaluation series (``"valid_step"`` and the values the evaluation returned).
    """

    step: int = 0
    elapsed_s: float = 0.0
    history: dict[str, list[Any]] = field(default_factory=dict)

    def record(self, **values: Any) -> None:
        """Append each value to its series; a None value is not recorded."""
        for name, value in values.items():
            if value is not None:
                self.history.setdefault(name, []).append(value)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "elapsed_s": self.elapsed_s, "history": self.history}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(int(d["step"]), float(d["elapsed_s"]), {k: list(v) for k, v in d["history"].items()})


class StepOutput(NamedTuple):
    """What a step function returns.

    Attributes:
        objective: the scalar to run backward on (task loss plus any aux loss).
        values: what to record for this step (numbers already reduced over ranks; None: nothing);
            the first one is shown on the progress bar.
    """

    objective: torch.Tensor
    values: dict[str, Any]


@dataclass(frozen=True)
class LoopConfig:
    """How a run is trained, whatever the job.

    Attributes:
        steps: optimizer steps of the run.
        checkpoint_every: checkpoint every this many steps (and after the last one, and when stopped).
        eval_every: evaluate every this many steps and after the last one (None: never).
        clip: gradient-norm clipping threshold (None: no clipping).
        tokens_per_step: shown as a rate on the progress bar when given.
    """

    steps: int
    checkpoint_every: int
    eval_every: int | None = None
    clip: float | None = None
    tokens_per_step: int | None = None


def train(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, loop: LoopConfig,
          step: Callable[[int], StepOutput], save: Callable[[TrainState], None], *, desc: str, quiet: bool,
          lr: Schedule | None = None, evaluate: Callable[[], dict[str, Any]] | None = None,
          after_step: Callable[[], None] | None = None, strategy: SingleProcess = SINGLE_PROCESS) -> TrainState:
    """Train ``model`` from ``state.step`` to ``loop.steps``; returns ``state``, updated in place.

    Args:
        step: ``step(i)`` runs the forward pass of step ``i`` (0-based) in training mode.
        save: writes a checkpoint of the run at ``state`` (every rank calls it).
        lr: the learning-rate schedule (None: the optimizer's rates are left alone).
        after_step: called after each optimizer step (e.g. ``moekit.update_expert_bias``, which moves
            the routers' selection biases from the step's loads).
        evaluate: returns the values to record at ``valid_step`` (the model is put back in training
            mode afterwards).
        strategy: one process, or this rank of an expert-parallel launch; every rank runs the same
            steps and stops on the same one.
    Raises:
        KeyboardInterrupt: after the step during which a stop was requested, once it is checkpointed.
    """
    bar = tqdm(total=loop.steps, initial=state.step, desc=desc, unit="step", disable=quiet, dynamic_ncols=True,
               file=sys.stderr)
    session_start, session_steps = time.perf_counter(), 0
    model.train()
    with StopRequest() as stop, bar:
        while state.step < loop.steps:
            t0 = time.perf_counter()
            strategy.progress(f"training step {state.step + 1} of {desc}")
            if lr is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr(state.step)
            out = step(state.step)
            optimizer.zero_grad(set_to_none=True)
            out.objective.backward()
            strategy.clip_and_step(model, optimizer, loop.clip)
            if after_step is not None:
                after_step()
            state.step += 1
            state.elapsed_s += time.perf_counter() - t0
            session_steps += 1
            state.record(train_step=state.step, **out.values)
            last = state.step == loop.steps
            if evaluate is not None and loop.eval_every and (state.step % loop.eval_every == 0 or last):
                strategy.progress(f"the evaluation after step {state.step} of {desc}")
                state.record(valid_step=state.step, **evaluate())
                model.train()
            stopping = strategy.any(stop.requested)
            if state.step % loop.checkpoint_every == 0 or last or stopping:
                strategy.progress(f"the checkpoint after step {state.step} of {desc}")
                save(state)
            bar.set_postfix(_postfix(out.values, loop.tokens_per_step, session_steps, session_start), refresh=False)
            bar.update(1)
            if stopping:
                raise KeyboardInterrupt(f"stopped after step {state.step} of {desc}; checkpoint saved")
    return state


def _postfix(values: dict[str, Any], tokens_per_step: int | None, steps: int, since: float) -> dict[str, str]:
    shown = {}
    if values:
        name, value = next(iter(values.items()))
        shown[name] = f"{value:.3f}"
    if tokens_per_step:
        shown["tok_s"] = f"{steps * tokens_per_step / (time.perf_counter() - since):,.0f}"
    return shown
