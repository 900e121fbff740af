"""Configuration, model construction, training steps and decoding for the ``patterns`` job.

Legend: B pairs in a batch, K outputs per input (patterns / mixture components / beams / samples).

Three networks are trained at most: ``single`` (serves both the ``beam`` and the ``sampling``
baseline), ``spmoe`` and ``hmoe``. Each is trained for the same number of steps on the same
batches; batch ``i`` depends only on ``(seed, i)``, so a resumed run sees what an uninterrupted
one would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from moekit.models.seq2seq import Seq2Seq, Seq2SeqConfig
from moekit.patterns.baselines import HardMixture, SingleModel
from moekit.patterns.data import EncodedPairs, Vocab, batch_indices, make_batch, pad
from moekit.patterns.spmoe import SPMoE, SPMoEConfig

MODELS = ("spmoe", "beam", "sampling", "hmoe")
# Which trained network serves each model of --models.
NETWORK_OF = {"spmoe": "spmoe", "beam": "single", "sampling": "single", "hmoe": "hmoe"}
NETWORK_ORDER = ("single", "spmoe", "hmoe")


@dataclass(frozen=True)
class Preset:
    """Sizes and schedule of one run; every field is saved in config.json."""

    dim: int
    heads: int
    layers: int
    ffn_dim: int
    dropout: float
    batch_size: int
    lr: float
    warmup: int
    steps: int
    vocab_size: int
    max_len: int
    """Tokens kept per source and per target (longer ones are cut) and the decoding length limit."""
    max_words: int | None
    """KJV -> WEB only: keep verses of at most this many words on both sides."""
    eval_sources: int
    """Test inputs decoded and scored (spread evenly over the test set)."""
    synthetic_examples: int
    """Synthetic data only: sources generated (90% train, 10% test)."""
    checkpoint_every: int


PRESETS: dict[str, Preset] = {
    # For tests and smoke runs: seconds.
    "tiny": Preset(dim=32, heads=2, layers=1, ffn_dim=64, dropout=0.1, batch_size=8, lr=3e-3, warmup=5,
                   steps=20, vocab_size=400, max_len=16, max_words=12, eval_sources=6, synthetic_examples=40,
                   checkpoint_every=10),
    # The synthetic set with K known patterns: a few minutes on one CPU thread.
    "synthetic": Preset(dim=64, heads=4, layers=2, ffn_dim=256, dropout=0.1, batch_size=32, lr=3e-3, warmup=50,
                        steps=2500, vocab_size=100, max_len=12, max_words=None, eval_sources=100,
                        synthetic_examples=1000, checkpoint_every=250),
    # KJV -> WEB, every model in about 15 minutes on one CPU thread.
    "cpu-small": Preset(dim=128, heads=4, layers=2, ffn_dim=256, dropout=0.1, batch_size=32, lr=2e-3, warmup=100,
                        steps=1000, vocab_size=4000, max_len=28, max_words=20, eval_sources=200,
                        synthetic_examples=1000, checkpoint_every=200),
    # KJV -> WEB on a GPU.
    "gpu": Preset(dim=512, heads=8, layers=6, ffn_dim=2048, dropout=0.1, batch_size=128, lr=5e-4, warmup=1000,
                  steps=30000, vocab_size=16000, max_len=64, max_words=None, eval_sources=1000,
                  synthetic_examples=1000, checkpoint_every=1000),
}


@dataclass(frozen=True)
class PatternsConfig:
    """Everything that determines the result of a ``moekit patterns`` run (saved as config.json)."""

    models: tuple[str, ...] = MODELS
    patterns: int = 3
    preset: str = "cpu-small"
    data: str | None = None
    """None: KJV -> WEB; "synthetic": the synthetic set; otherwise a JSON-lines file."""
    seed: int = 0
    beam: int = 4
    """Beam of the beam baseline (at least K wide) and of each pattern's own search (1 = greedy)."""
    spmoe: SPMoEConfig = field(default_factory=SPMoEConfig)
    sizes: Preset = field(default_factory=lambda: PRESETS["cpu-small"])

    def networks(self) -> list[str]:
        wanted = {NETWORK_OF[m] for m in self.models}
        return [n for n in NETWORK_ORDER if n in wanted]


def make_config(models: Sequence[str], patterns: int, preset: str, data: str | None, seed: int, beam: int,
                steps: int | None = None, head: str = "adapter") -> PatternsConfig:
    """Validate the job's options; ``ValueError`` names the bad one."""
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise ValueError(f"--models {','.join(models)!r}: choose from {', '.join(MODELS)}")
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r} is not one of {sorted(PRESETS)}")
    if patterns < 2:
        raise ValueError(f"--patterns {patterns}: K must be >= 2 for several outputs per input")
    if beam < 1:
        raise ValueError(f"--beam {beam} must be >= 1")
    sizes = PRESETS[preset]
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps {steps} must be >= 1")
        sizes = replace(sizes, steps=steps, warmup=min(sizes.warmup, max(1, steps // 10)))
    spmoe = SPMoEConfig(patterns=patterns, head=head)
    return PatternsConfig(tuple(dict.fromkeys(models)), patterns, preset, data, seed, beam, spmoe, sizes)


def build_network(name: str, cfg: PatternsConfig, vocab: Vocab, device=None) -> torch.nn.Module:
    """A freshly initialised ``single``, ``spmoe`` or ``hmoe`` network (seeded by the caller)."""
    s = cfg.sizes
    backbone = Seq2Seq(Seq2SeqConfig(len(vocab), dim=s.dim, heads=s.heads, encoder_layers=s.layers,
                                     decoder_layers=s.layers, ffn_dim=s.ffn_dim, dropout=s.dropout,
                                     pad_id=vocab.pad_id), device=device)
    if name == "single":
        return SingleModel(backbone)
    if name == "spmoe":
        return SPMoE(backbone, cfg.spmoe, device=device)
    if name == "hmoe":
        return HardMixture(backbone, [vocab.id(expert_token(i)) for i in range(cfg.patterns)])
    raise ValueError(f"unknown network {name!r}")


def expert_token(i: int) -> str:
    return f"<expert_{i}>"


def make_optimizer(model: torch.nn.Module, sizes: Preset):
    """Adam with a linear warm-up, then a cosine decay to a tenth of the peak rate."""
    opt = torch.optim.Adam(model.parameters(), lr=sizes.lr, betas=(0.9, 0.98))

    def factor(step: int) -> float:
        if step < sizes.warmup:
            return (step + 1) / sizes.warmup
        progress = min(1.0, (step - sizes.warmup) / max(1, sizes.steps - sizes.warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_step(model, opt, sched, pairs: EncodedPairs, vocab: Vocab, sizes: Preset, seed: int, step: int,
               device) -> tuple[float, list[int] | None]:
    """One optimiser step on batch number ``step``; returns its token NLL and the assignment (mixtures)."""
    model.train()
    batch = make_batch(pairs, batch_indices(len(pairs), sizes.batch_size, seed, step), vocab)
    batch = type(batch)(*(t.to(device) for t in batch))
    out = model.loss(batch)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    # Clipping keeps the occasional long-verse batch from throwing a small model off course.
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    assignment = None if out.assignment is None else out.assignment.tolist()
    return float(out.nll), assignment


@torch.no_grad()
def decode(model_name: str, net: torch.nn.Module, sources: Sequence[str], vocab: Vocab, cfg: PatternsConfig,
           device, chunk: int = 64) -> tuple[list[list[str]], list[list[float]] | None]:
    """K output strings per source, and (SPMoE with a learned prior) p(pattern | source)."""
    K, s = cfg.patterns, cfg.sizes
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    outputs: list[list[str]] = []
    priors: list[list[float]] | None = [] if model_name == "spmoe" and cfg.spmoe.learned_prior else None
    for start in range(0, len(sources), chunk):
        src = pad([vocab.encode(x, s.max_len - 1) + [vocab.eos_id] for x in sources[start : start + chunk]],
                  vocab.pad_id).to(device)
        if model_name == "spmoe":
            ids = net.generate(src, vocab.bos_id, vocab.eos_id, s.max_len, beam=cfg.beam)
            if priors is not None:
                priors.extend(net.prior_log_probs(src).exp().tolist())
        elif model_name == "hmoe":
            ids = net.generate(src, vocab.eos_id, s.max_len, beam=cfg.beam)
        else:
            ids = net.generate(src, K, vocab.bos_id, vocab.eos_id, s.max_len, mode=model_name, beam=cfg.beam,
                               generator=gen)
        outputs.extend([[vocab.decode(o) for o in outs] for outs in ids])
    return outputs, priors


@torch.no_grad()
def assignments(net: torch.nn.Module, pairs: EncodedPairs, vocab: Vocab, device, limit: int = 2000,
                chunk: int = 128) -> list[int]:
    """Winning pattern (lowest loss, dropout off) of the first ``limit`` training pairs."""
    out: list[int] = []
    n = min(limit, len(pairs))
    for start in range(0, n, chunk):
        batch = make_batch(pairs, range(start, min(n, start + chunk)), vocab)
        batch = type(batch)(*(t.to(device) for t in batch))
        nll_BK = net.responsibilities(batch)
        nll_BK = nll_BK[0] if isinstance(nll_BK, tuple) else nll_BK
        out.extend(nll_BK.argmin(1).tolist())
    return out


def purity(assigned: Sequence[int], labels: Sequence[int], k: int) -> dict:
    """How well patterns match known labels, by majority mapping.

    Each pattern is mapped to the label most of its pairs carry; ``purity`` is the share of pairs
    whose label is their pattern's majority label, ``per_pattern`` the same within each pattern
    (None for a pattern with no pair), ``mapping`` the majority label of each pattern.
    """
    if len(assigned) != len(labels):
        raise ValueError(f"{len(assigned)} assignments for {len(labels)} labels")
    per, mapping, hits = [], [], 0
    for p in range(k):
        mine = [lab for a, lab in zip(assigned, labels, strict=True) if a == p]
        if not mine:
            per.append(None)
            mapping.append(None)
            continue
        top = max(set(mine), key=lambda lab: (mine.count(lab), -lab))
        per.append(mine.count(top) / len(mine))
        mapping.append(top)
        hits += mine.count(top)
    return {"purity": hits / max(len(assigned), 1), "per_pattern": per, "mapping": mapping}
