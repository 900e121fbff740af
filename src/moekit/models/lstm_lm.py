"""The LSTM-MoE language model of Shazeer et al. 2017 (§5.1, appendix C) and its dense baselines.

Legend: B batch, S sequence length, T = B*S tokens, D model dim, F expert hidden dim, V vocabulary,
E experts, K experts per token.

Every model is embedding -> LSTM -> middle -> LSTM -> softmax. Each layer's output goes through
dropout and is then added to the layer's input (a residual); the middle block's output goes
through a sigmoid first, as in the paper. The models differ only in the middle block, and all of
them spend the same multiply-adds per time step on it (``ops_per_timestep``):

    lstm-4x      two more LSTM layers (4 in all)                     2 * 8D^2
    moe-1-wide   one expert D -> K*F -> D                            2*D*K*F
    moe-1-deep   one expert D -> F -> ... -> F -> D, K hidden layers 2*D*F + (K-1)*F^2
    moe-E        E experts D -> F -> D, noisy top-K (K = 4)          K * 2*D*F  + gate D*E
    moe-E-h      hierarchical, G = B = sqrt(E), 2 per level          K * 2*D*F  + gates D*(2G+E)

With F = 2D (the paper's 512 -> 1024 -> 512) and K = 4 each middle block costs 16 D^2, the same
as two LSTM layers of width D (4 gates x (D inputs + D recurrent) x D). The MoE is applied to all
B*S time steps of the first LSTM's output at once, the paper's "convolutional" batching.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from moekit.layer import HierarchicalMoE, MoE
from moekit.metrics.flops import count_flops, loop_experts
from moekit.types import RoutingStats

# The seven models of the paper's Table 7 that fit one machine (MoE-1024-h and MoE-4096-h need a cluster).
MODEL_NAMES = ("lstm-4x", "moe-1-wide", "moe-1-deep", "moe-4", "moe-32", "moe-256", "moe-256-h")
_MOE_RE = re.compile(r"^moe-(\d+)(-h)?$")


@dataclass(frozen=True)
class ModelSpec:
    """What a model name means. ``kind`` is "lstm", "wide", "deep", "moe" or "hmoe"."""

    name: str
    kind: str
    experts: int


def parse_model(name: str) -> ModelSpec:
    """``lstm-4x``, ``moe-1-wide``, ``moe-1-deep``, ``moe-<E>`` (flat) or ``moe-<E>-h`` (hierarchical)."""
    fixed = {"lstm-4x": ("lstm", 0), "moe-1-wide": ("wide", 1), "moe-1-deep": ("deep", 1)}
    if name in fixed:
        kind, experts = fixed[name]
        return ModelSpec(name, kind, experts)
    m = _MOE_RE.match(name)
    if m is None:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)} (or moe-<E>, moe-<E>-h)")
    experts = int(m[1])
    if m[2]:
        groups = math.isqrt(experts)
        if groups * groups != experts or groups < 2:
            raise ValueError(f"model {name!r}: a hierarchical MoE needs a square number of experts >= 4")
        return ModelSpec(name, "hmoe", experts)
    if experts < 2:
        raise ValueError(f"model {name!r}: a flat MoE needs at least 2 experts (use moe-1-wide or moe-1-deep)")
    return ModelSpec(name, "moe", experts)


@dataclass(frozen=True)
class LSTMLMConfig:
    """One language model of the comparison.

    Attributes:
        model: a name accepted by ``parse_model``.
        vocab_size: V.
        dim: D, the width of the embedding, the LSTMs and the MoE input/output (paper: 512).
        expert_hidden: F, the hidden width of one expert; None means 2*D (paper: 1024).
        k: experts per token of a flat MoE (paper: 4); a hierarchical MoE uses sqrt(k) per level,
            and the dense models use it to size their middle block (K*F wide, or K layers deep).
        dropout: on every layer's output, before the residual.
        w_importance, w_load: balancing-loss coefficients (paper, LM: 0.1 each).
        router, router_kwargs: the flat MoE's router (``moekit.MoE(router=..., router_kwargs=...)``;
            the paper's noisy top-k by default), the keyword arguments as (name, value) pairs.
    """

    model: str
    vocab_size: int
    dim: int = 512
    expert_hidden: int | None = None
    k: int = 4
    dropout: float = 0.1
    w_importance: float = 0.1
    w_load: float = 0.1
    router: str = "noisy_topk"
    router_kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def hidden(self) -> int:
        return 2 * self.dim if self.expert_hidden is None else self.expert_hidden

    @property
    def spec(self) -> ModelSpec:
        return parse_model(self.model)

    def check(self) -> None:
        """Raise ``ValueError`` naming a bad value."""
        spec = self.spec
        for name in ("vocab_size", "dim", "hidden", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if spec.kind == "moe" and self.k > spec.experts:
            raise ValueError(f"k={self.k} exceeds the {spec.experts} experts of {self.model}")
        if spec.kind == "hmoe":
            per_level = math.isqrt(self.k)
            if per_level * per_level != self.k or per_level > math.isqrt(spec.experts):
                raise ValueError(f"k={self.k} must be a square, sqrt(k) per level of {self.model}")


class ExpertMLP(nn.Module):
    """A dense feed-forward block D -> F -> ... -> F -> D with ``layers`` ReLU hidden layers."""

    def __init__(self, dim: int, hidden: int, layers: int = 1, device=None, dtype=None):
        super().__init__()
        widths = [dim] + [hidden] * layers + [dim]
        kw = {"device": device, "dtype": dtype}
        self.linears = nn.ModuleList(nn.Linear(a, b, **kw) for a, b in zip(widths[:-1], widths[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, linear in enumerate(self.linears):
            x = linear(x)
            if i < len(self.linears) - 1:
                x = torch.relu(x)
        return x


class LMOutput(NamedTuple):
    """``logits`` [B, S, V]; ``aux_loss`` scalar (0 for dense models); ``stats`` None for dense models."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    stats: RoutingStats | None


class LSTMLM(nn.Module):
    """Embedding -> LSTM -> middle block -> LSTM -> softmax (see the module docstring)."""

    def __init__(self, cfg: LSTMLMConfig, device=None, dtype=None):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        spec, D, F = cfg.spec, cfg.dim, cfg.hidden
        kw = {"device": device, "dtype": dtype}
        self.embed = nn.Embedding(cfg.vocab_size, D, **kw)
        self.drop: nn.Module = nn.Dropout(cfg.dropout)  # swapped for a row-sharded dropout under expert parallelism
        self.lstm_in = nn.LSTM(D, D, batch_first=True, **kw)
        self.lstm_out = nn.LSTM(D, D, batch_first=True, **kw)
        self.middle: nn.Module
        if spec.kind == "lstm":
            self.middle = nn.ModuleList(nn.LSTM(D, D, batch_first=True, **kw) for _ in range(2))
        elif spec.kind == "wide":
            self.middle = ExpertMLP(D, cfg.k * F, 1, **kw)
        elif spec.kind == "deep":
            self.middle = ExpertMLP(D, F, cfg.k, **kw)
        elif spec.kind == "moe":
            self.middle = MoE(D, spec.experts, cfg.k, F, router=cfg.router, w_importance=cfg.w_importance,
                              w_load=cfg.w_load, router_kwargs=dict(cfg.router_kwargs), **kw)
        else:
            groups, per_level = math.isqrt(spec.experts), math.isqrt(cfg.k)
            self.middle = HierarchicalMoE(D, groups, groups, per_level, per_level, F,
                                          w_importance=cfg.w_importance, w_load=cfg.w_load, **kw)
        self.head = nn.Linear(D, cfg.vocab_size, **kw)

    def _lstm(self, lstm: nn.LSTM, x_BSD: torch.Tensor) -> torch.Tensor:
        return x_BSD + self.drop(lstm(x_BSD)[0])

    def body(self, ids_BS: torch.Tensor, mask_BS: torch.Tensor | None = None):
        """Everything but the softmax: ``(x_BSD, aux_loss, stats)``.

        ``mask_BS`` (True = real token) keeps padding out of the routing, its losses and stats.
        Padding must be on the right of each row: the LSTMs run over it, but, being causal, it
        cannot change the outputs at the real positions before it.
        """
        x_BSD = self.drop(self.embed(ids_BS))
        x_BSD = self._lstm(self.lstm_in, x_BSD)
        aux, stats = x_BSD.new_zeros((), dtype=torch.float32), None
        if isinstance(self.middle, nn.ModuleList):
            for lstm in self.middle:
                x_BSD = self._lstm(cast(nn.LSTM, lstm), x_BSD)
        else:
            if isinstance(self.middle, MoE):
                y_BSD, aux, stats = self.middle(x_BSD, mask=mask_BS)
            else:
                y_BSD = self.middle(x_BSD)
            # The paper puts a sigmoid on the MoE output; the dense middle blocks get it too, so
            # the models differ only in how the middle block computes.
            x_BSD = x_BSD + self.drop(torch.sigmoid(y_BSD))
        x_BSD = self._lstm(self.lstm_out, x_BSD)
        return x_BSD, aux, stats

    def forward(self, ids_BS: torch.Tensor, mask_BS: torch.Tensor | None = None) -> LMOutput:
        x_BSD, aux, stats = self.body(ids_BS, mask_BS)
        return LMOutput(self.head(x_BSD), aux, stats)


def ops_per_timestep(cfg: LSTMLMConfig) -> int:
    """Multiply-adds per token of the model without its embedding and softmax, at inference.

    The convention of the paper's Table 7 (LSTM-512: 2M, four 512->1024->512 experts: 4M). Biases,
    element-wise ops and the top-k are not counted; the gating matmuls are (``x @ W_g``; the noise
    matmul runs only in training).
    """
    spec, D, F, K = cfg.spec, cfg.dim, cfg.hidden, cfg.k
    lstm = 4 * (D + D) * D  # four gates, each over [input, previous hidden]
    if spec.kind == "lstm":
        middle = 2 * lstm
    elif spec.kind == "wide":
        middle = 2 * D * K * F
    elif spec.kind == "deep":
        middle = 2 * D * F + (K - 1) * F * F
    elif spec.kind == "moe":
        middle = K * 2 * D * F + D * spec.experts
    else:
        # HierarchicalRouter computes the primary logits over G = sqrt(E) groups and the secondary
        # logits of every group (one [T, G, B] einsum, D*E).
        middle = K * 2 * D * F + D * (math.isqrt(spec.experts) + spec.experts)
    return 2 * lstm + middle


def measure_ops_per_timestep(model: LSTMLM, batch: int = 2, seq_len: int = 3) -> float:
    """``ops_per_timestep`` measured by ``FlopCounterMode`` on a forward of the body (eval mode, CPU).

    oneDNN's fused LSTM kernel is invisible to the counter, so it is switched off here; the MoE
    experts are run one segment at a time, so that no padding rows are counted.
    """
    was_training = model.training
    model.eval()
    ids_BS = torch.randint(0, model.cfg.vocab_size, (batch, seq_len), device=model.head.weight.device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about TF32 on Intel GPUs when the flag flips
            with torch.backends.mkldnn.flags(enabled=False), loop_experts(model):
                flops = count_flops(model.body, ids_BS)
    finally:
        model.train(was_training)
    return flops / 2 / (batch * seq_len)  # the counter counts a multiply-add as 2


def body_params(model: LSTMLM) -> int:
    """Parameters without the embedding and the softmax (the paper's Table 7 convention)."""
    skip = {id(p) for p in (*model.embed.parameters(), *model.head.parameters())}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
