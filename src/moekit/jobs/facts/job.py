"""``moekit facts``: how many random facts dense and MoE language models store at equal ops per token.

Legend: N facts, B batch, S tokens per sequence (key + value), A key symbols, V value symbols, E experts.

The models are those of ``moekit lm`` (``moekit.models.lstm_lm``): at one width every middle block
costs the same multiply-adds per token, and the MoEs have several times the parameters. Each is
trained on N random key -> value facts (``moekit.data.facts``) with the loss on the value token
only, and its *recall* is the fraction of the N facts whose value is the argmax of its prediction
after training. Nothing can be inferred, so recall measures stored knowledge; sweeping N finds
each model's capacity, the number of facts it stores at 90% recall. The claim of Shazeer et al.
tested here, isolated from data scarcity: parameters added as experts add capacity without
adding compute.

Every (model, N, seed) is one run of the job's session; ``--resume`` continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from moekit.data.facts import FactSet, make_facts
from moekit.data.sampling import epoch_batch
from moekit.jobs.facts import report
from moekit.jobs.facts.config import FactsJobConfig, add_args, check_config, command_line, config_from_args
from moekit.models.lstm_lm import LSTMLM, body_params, ops_per_timestep, parse_model
from moekit.routing.losses import cv_squared
from moekit.train.loop import LoopConfig, StepOutput, train
from moekit.train.outdir import prepare_out_dir
from moekit.train.runtime import log, resolve_device, seed_everything
from moekit.train.schedules import warmup_cosine
from moekit.train.session import Session

__all__ = ["FactsJobConfig", "add_args", "config_from_args", "execute", "recall", "run"]


def value_logits(model: LSTMLM, seqs_BS: torch.Tensor, num_symbols: int) -> tuple[torch.Tensor, Any]:
    """The logits of the value symbols after each key ([B, V]) and the model's output.

    The model reads the key (the first S - 1 tokens); its prediction at the last key token is the
    value's. Only value symbols compete: the task says a value comes next.
    """
    out = model(seqs_BS[:, :-1])
    return out.logits[:, -1, num_symbols:].float(), out


class Recall(NamedTuple):
    """One pass over a fact set in eval mode."""

    recall: float  # fraction of facts whose value is the argmax
    nll: float  # mean negative log-likelihood of the values, nats
    load_E: torch.Tensor | None  # tokens routed to each expert (hard count), None for dense models


@torch.no_grad()
def recall(model: LSTMLM, facts: FactSet, batch_size: int, device: torch.device) -> Recall:
    """Recall, value NLL and expert load of ``model`` over every fact of ``facts``."""
    was_training = model.training
    model.eval()
    seqs_NS = facts.sequences()
    correct, nll, load_E = 0, 0.0, None
    for start in range(0, seqs_NS.shape[0], batch_size):
        seqs_BS = seqs_NS[start:start + batch_size].to(device)
        logits_BV, out = value_logits(model, seqs_BS, facts.num_symbols)
        target_B = seqs_BS[:, -1] - facts.num_symbols
        correct += int((logits_BV.argmax(-1) == target_B).sum().item())
        nll += F.cross_entropy(logits_BV, target_B, reduction="sum").item()
        if out.stats is not None:
            load = out.stats.load.detach().float().cpu()
            load_E = load if load_E is None else load_E + load
    model.train(was_training)
    n = seqs_NS.shape[0]
    return Recall(correct / n, nll / n, load_E)


def train_trial(cfg: FactsJobConfig, index: int, session: Session, device: torch.device,
                quiet: bool) -> dict[str, Any]:
    """Build (or restore), train and measure run ``index`` of the job; return its result."""
    trials = cfg.trials()
    label, model_name, n, seed = trials[index]
    facts = make_facts(n, cfg.num_symbols, cfg.num_values, cfg.key_len, seed)
    seqs_NS = facts.sequences()
    seed_everything(seed)  # the same initialisation for every number of facts of a seed
    mcfg = cfg.model_config(model_name)
    model = LSTMLM(mcfg, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = session.start(label, model, opt)
    steps = cfg.steps(n)

    def step(i: int) -> StepOutput:
        seqs_BS = seqs_NS[epoch_batch(i, cfg.batch_size, n, seed)].to(device)
        logits_BV, out = value_logits(model, seqs_BS, cfg.num_symbols)
        ce = F.cross_entropy(logits_BV, seqs_BS[:, -1] - cfg.num_symbols)
        return StepOutput(ce + out.aux_loss, {"train_loss": ce.item()})

    def validate() -> dict[str, float]:
        return {"recall": recall(model, facts, 1024, device).recall}

    # A run of few steps warms up over its first tenth at most.
    warmup = min(cfg.warmup, steps // 10)
    loop = LoopConfig(steps, cfg.checkpoint_every, cfg.eval_every, cfg.clip)
    train(model, opt, state, loop, step, lambda s: session.save(label, s, model, opt),
          desc=f"{label} [{index + 1}/{len(trials)}]", quiet=quiet, lr=warmup_cosine(cfg.lr, steps, warmup),
          evaluate=validate)
    final = recall(model, facts, 1024, device)
    spec = parse_model(model_name)
    load_E = final.load_E
    result = {
        "name": label, "model": model_name, "facts": n, "seed": seed,
        "experts": spec.experts or None, "params": body_params(model),
        "all_params": sum(p.numel() for p in model.parameters()), "ops_per_timestep": ops_per_timestep(mcfg),
        "recall": final.recall, "value_nll": final.nll, "steps": state.step, "train_time_s": state.elapsed_s,
        "cv_load": None if load_E is None else cv_squared(load_E).sqrt().item(),
        "unused_experts": None if load_E is None else int((load_E == 0).sum().item()),
        "history": state.history,
    }
    log(quiet, f"{label}: recall {final.recall:.3f} of {n} facts")
    session.finish(label, state, {"result": result})
    return result


def execute(cfg: FactsJobConfig, out: Path, device: torch.device, *, resume: bool, force: bool,
            quiet: bool) -> dict[str, Any]:
    """Train and measure every run of ``cfg`` into ``out``; return the metrics written there."""
    check_config(cfg)
    resume_from = prepare_out_dir(out, dataclasses.asdict(cfg), resume=resume, force=force)
    # The facts are generated from the configuration (its seed): the configuration is their fingerprint.
    session = Session(out, config=dataclasses.asdict(cfg))
    trials = cfg.trials()
    if resume_from is not None:
        session.restore(resume_from)
        log(quiet, f"resuming from {resume_from} ({len(session.finished)} of {len(trials)} runs finished)")
    for index, (label, *_) in enumerate(trials):
        if label not in session.finished:
            train_trial(cfg, index, session, device, quiet)
    results = [session.finished[t[0]]["result"] for t in trials]
    return report.write_outputs(out, cfg, results, str(device), command_line(cfg))


def run(args: argparse.Namespace) -> int:
    """The facts job: train (or resume) every run, write the out directory, print the capacities."""
    cfg = config_from_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    metrics = execute(cfg, Path(args.out), resolve_device(args.device), resume=args.resume, force=args.force,
                      quiet=args.quiet)
    print(report.capacity_table(metrics))
    print(f"results in {args.out}")
    return 0
