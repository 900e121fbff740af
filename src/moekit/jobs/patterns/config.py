"""``moekit patterns``'s configuration: presets (sizes and schedule), options and validation."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from moekit.data.pairs import SYNTHETIC_RULES
from moekit.data.vocab import SEQ2SEQ_SPECIALS
from moekit.jobs import options
from moekit.models.spmoe import HEAD_KINDS, SPMoEConfig
from moekit.train.outdir import ConfigError

SYNTHETIC = "synthetic"

MODELS = ("spmoe", "beam", "sampling", "hmoe")
# Which trained network serves each model of --models.
NETWORK_OF = {"spmoe": "spmoe", "beam": "single", "sampling": "single", "hmoe": "hmoe"}
NETWORK_ORDER = ("single", "spmoe", "hmoe")
PRETRAIN = "pretrain"  # the denoising pre-training run of the shared backbone, when asked for
MASK_TOKEN = "<mask>"  # BART's mask, in the vocabulary only when the backbone is pre-trained


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
    pretrain_steps: int = 0
    """Steps of BART-style denoising pre-training of one backbone on the training texts (sources and
    targets as plain English), which then initialises every network's backbone; 0: none."""

    def networks(self) -> list[str]:
        """The networks to train, in order: the pre-trained backbone first when there is one."""
        wanted = {NETWORK_OF[m] for m in self.models}
        return ([PRETRAIN] if self.pretrain_steps else []) + [n for n in NETWORK_ORDER if n in wanted]


def make_config(models: Sequence[str], patterns: int, preset: str, data: str | None, seed: int, beam: int,
                steps: int | None = None, head: str = "adapter", capacity_factor: float | None = 1.25,
                gate_weight: float = 1.0, pretrain_steps: int = 0) -> PatternsConfig:
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
    if data == SYNTHETIC and patterns > len(SYNTHETIC_RULES):
        raise ValueError(f"--patterns {patterns}: the synthetic set has {len(SYNTHETIC_RULES)} patterns "
                         f"({', '.join(SYNTHETIC_RULES)})")
    if capacity_factor is not None and not (math.isfinite(capacity_factor) and capacity_factor >= 1.0):
        raise ValueError(f"--capacity-factor {capacity_factor}: must be a finite number >= 1 (or none): below 1 "
                         "some pairs of a batch would find no pattern")
    if not (math.isfinite(gate_weight) and gate_weight >= 0):
        raise ValueError(f"--gate-weight {gate_weight}: must be a finite number >= 0")
    if pretrain_steps < 0:
        raise ValueError(f"--pretrain-steps {pretrain_steps} must be >= 0")
    # hMoEup gives each pattern a token of the vocabulary; words must still fit beside them.
    if len(SEQ2SEQ_SPECIALS) + patterns >= sizes.vocab_size:
        raise ValueError(f"--patterns {patterns} needs {patterns} pattern tokens, more than the vocabulary of "
                         f"preset {preset!r} ({sizes.vocab_size} tokens, {len(SEQ2SEQ_SPECIALS)} of them special) "
                         "can hold beside the words")
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps {steps} must be >= 1")
        sizes = replace(sizes, steps=steps, warmup=min(sizes.warmup, max(1, steps // 10)))
    spmoe = SPMoEConfig(patterns=patterns, head=head, capacity_factor=capacity_factor, gate_weight=gate_weight)
    return PatternsConfig(tuple(dict.fromkeys(models)), patterns, preset, data, seed, beam, spmoe, sizes,
                          pretrain_steps)


def special_tokens(cfg: PatternsConfig) -> list[str]:
    """The extra vocabulary entries: hMoEup's start tokens, and the mask of denoising pre-training."""
    return [expert_token(i) for i in range(cfg.patterns)] + ([MASK_TOKEN] if cfg.pretrain_steps else [])


def expert_token(i: int) -> str:
    return f"<expert_{i}>"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated models to compare, from {', '.join(MODELS)} (default: all)")
    parser.add_argument("--patterns", type=options.positive_int, default=3, metavar="K",
                        help="outputs per input, at least 2 (default: 3)")
    parser.add_argument("--steps", type=options.positive_int, default=None,
                        help="training steps per network (default: the preset's)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="sizes and schedule (default: cpu-small, or synthetic with --data synthetic)")
    parser.add_argument("--beam", type=options.positive_int, default=4,
                        help="beam width of the beam baseline (at least K) and of each pattern's search (default: 4)")
    parser.add_argument("--head", choices=HEAD_KINDS, default="adapter",
                        help="SPMoE pattern head: a D x D adapter before the shared projection, a full "
                             "output layer per pattern, or a residual MLP adapter per pattern (mlp) "
                             "(default: adapter)")
    parser.add_argument("--capacity-factor", type=capacity_or_none, default=1.25, metavar="C",
                        help="SPMoE: each pattern takes at most ceil(C*B/K) pairs of a batch of B; 'none' for "
                             "no limit (default: 1.25)")
    parser.add_argument("--gate-weight", type=options.non_negative_float, default=1.0,
                        help="SPMoE: nats of sequence likelihood the balanced gate's preference is worth in "
                             "the assignment, i.e. the inverse temperature of the likelihood (default: 1)")
    parser.add_argument("--pretrain-steps", type=options.non_negative_int, default=0,
                        help="BART-style denoising pre-training of the shared backbone on the training texts "
                             "for this many steps before the networks are trained from it (default: 0)")
    parser.add_argument("--threads", type=options.threads_or_zero, default=0,
                        help="CPU threads for torch (default: 0 = torch's own choice)")
    parser.add_argument("--data", metavar="FILE.jsonl", default=None,
                        help='JSON lines {"source": str, "targets": [str, ...]}, or "synthetic" for the set '
                             "with K known patterns (default: KJV -> World English Bible verse pairs)")


def config_from_args(args: argparse.Namespace) -> PatternsConfig:
    preset = args.preset or (SYNTHETIC if args.data == SYNTHETIC else "cpu-small")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    data = args.data if args.data in (None, SYNTHETIC) else str(Path(args.data))
    try:
        return make_config(models, args.patterns, preset, data, args.seed, args.beam, args.steps, args.head,
                           args.capacity_factor, args.gate_weight, args.pretrain_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def capacity_or_none(text: str) -> float | None:
    """``--capacity-factor``: a finite number >= 1, or "none" for no limit."""
    if text.strip().lower() == "none":
        return None
    value = float(text)  # ValueError: argparse reports "invalid capacity_or_none value"
    if not (math.isfinite(value) and value >= 1.0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 1 or 'none', got {text!r}")
    return value
