"""SPMoE: a sparse pattern mixture of experts that generates K distinct outputs per input.

Legend: B pairs (or sources), S source length, T target length, D model dim, V vocabulary,
K patterns, N decoding hypotheses.

After Cui et al. 2021 ("Generate multiple pattern-aware outputs with sparse pattern mixture of
experts"): one shared transformer encoder-decoder, K pattern heads that are single linear layers,
and a sparse assignment of every training pair to one pattern. Where that paper is silent we
follow Shen et al. 2019 ("Mixture Models for Diverse Machine Translation: Tricks of the Trade"):

* Responsibilities come from each pattern's sequence loss, computed with dropout OFF and no
  gradient. Shen et al. report that with dropout on, one component wins everything.
* Hard EM: each pair trains only its winning pattern.
* A gate q(z | x, y) over the pair (noisy top-1, zero-initialised like Shazeer's gate) joins the
  likelihood in choosing the winner, ``z = argmax_k log q_k(x, y) - nll_k``, and is trained to
  predict that choice under the core library's balancing losses (CV^2 of importance and of the
  smooth load). While the heads are still alike their losses nearly tie and the balanced gate
  decides, which spreads pairs over all patterns; once the heads differ, the likelihood decides.
* A per-batch capacity (the capacity factor of the core dispatchers, pairs placed in order of
  confidence as in batch-prioritised routing) guarantees that every pattern keeps training.
* An optional learned prior p(z | x) (mean-pooled encoder -> tanh -> linear, as in Shen et al.)
  ranks the K outputs at inference, when no target is known.
The gate and the prior read detached features, so only the likelihood shapes the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moekit.data.pairs import PairBatch
from moekit.dispatch.capacity import expert_capacity
from moekit.models.decoding import best_decode
from moekit.models.seq2seq import Seq2Seq, sequence_nll
from moekit.routing.losses import cv_squared, prob_in_top_k

HEAD_KINDS = ("adapter", "full", "mlp")


@dataclass
class SPMoEConfig:
    """The pattern part of SPMoE (the backbone has its own ``Seq2SeqConfig``)."""

    patterns: int = 3
    """K, the number of pattern heads (= outputs per input)."""
    head: str = "adapter"
    """"adapter": a D x D linear layer per pattern before the shared output projection;
    "full": a D x V output layer per pattern; "mlp": a residual bottleneck adapter per pattern
    (``h + W2 gelu(W1 h + b1) + b2``, hidden size ``adapter_hidden``) before the shared projection,
    the pattern head with more capacity than one linear layer."""
    adapter_hidden: int | None = None
    """With head "mlp": the adapter's hidden size (None: 2 D)."""
    w_importance: float = 1.0
    """Weight of CV^2 of the gate's importance. Larger than Shazeer's 0.1: here the gate's only job
    is to keep the assignment balanced while the heads are alike."""
    w_load: float = 1.0
    """Weight of CV^2 of the gate's smooth load (Shazeer eq. 10 with k = 1)."""
    gate_weight: float = 1.0
    """gamma in ``z = argmax_k gamma * log q_k(x, y) - nll_k``: how many nats of sequence likelihood
    the gate's preference is worth. Small values let the gate break near-ties only."""
    noise_epsilon: float = 1e-2
    assign_with_noise: bool = False
    """Let the gate's training noise into the assignment, or assign by its clean logits. The noise
    balances the patterns by making assignments partly random, which also trains every head on much
    the same pairs, so the heads tend to stay alike (measured in docs/results/patterns/README.md)."""
    capacity_factor: float | None = 1.25
    """None: each pair goes to its best pattern. Otherwise each pattern takes at most
    ``ceil(capacity_factor * B / K)`` pairs of a batch; pairs claim places in order of confidence
    (their score margin), and a pair whose best pattern is full takes its next best. This is the
    hard guarantee that no pattern starves: without it (or the noise) one head can take nearly
    every pair."""
    use_gate: bool = True
    """False: plain hard EM with a uniform prior (the winner is the lowest loss)."""
    learned_prior: bool = True
    """Train p(z | x) to rank the outputs at inference."""
    adapter_init_std: float = 0.1
    """Heads start as the shared output path plus noise of this relative size: alike, but not tied.
    Too little noise lets the heads drift back together (docs/results/patterns/README.md compares
    settings)."""

    def __post_init__(self) -> None:
        if isinstance(self.patterns, bool) or not isinstance(self.patterns, int) or self.patterns < 1:
            raise ValueError(f"patterns={self.patterns!r} must be a positive int")
        if self.head not in HEAD_KINDS:
            raise ValueError(f"head={self.head!r} is not one of {HEAD_KINDS}")
        if self.adapter_hidden is not None and (isinstance(self.adapter_hidden, bool)
                                                or not isinstance(self.adapter_hidden, int) or self.adapter_hidden < 1):
            raise ValueError(f"adapter_hidden={self.adapter_hidden!r} must be a positive int (or None)")
        if self.capacity_factor is not None and self.capacity_factor < 1.0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be >= 1 (or None): "
                             "below 1 some pairs would find no pattern")
        if min(self.w_importance, self.w_load, self.noise_epsilon, self.gate_weight) < 0:
            raise ValueError(f"w_importance={self.w_importance}, w_load={self.w_load}, gate_weight={self.gate_weight} "
                             f"and noise_epsilon={self.noise_epsilon} must be >= 0")


class PatternHeads(nn.Module):
    """K pattern heads on the shared decoder states.

    ``adapter``: logits = project(h @ W_k + b_k), W_k [D, D]; ``full``: logits = h @ W_k + b_k, W_k [D, V];
    ``mlp``: logits = project(h + gelu(h @ W1_k + b1_k) @ W2_k + b2_k), W1_k [D, F], W2_k [F, D].
    """

    def __init__(self, backbone: Seq2Seq, patterns: int, kind: str = "adapter", adapter_init_std: float = 0.1,
                 adapter_hidden: int | None = None, device=None, dtype=None):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"head kind {kind!r} is not one of {HEAD_KINDS}")
        kw = {"device": device, "dtype": dtype}
        D, V, K = backbone.cfg.dim, backbone.cfg.vocab_size, patterns
        self.kind, self.patterns = kind, K
        self._project = backbone.project  # shared; its parameters belong to the backbone
        if kind == "mlp":
            self._init_mlp(D, adapter_hidden or 2 * D, K, adapter_init_std, kw)
            return
        out = D if kind == "adapter" else V
        self.weight_KDO = nn.Parameter(torch.empty(K, D, out, **kw))
        self.bias_KO = nn.Parameter(torch.zeros(K, out, **kw))
        with torch.no_grad():
            # Every head starts as the shared output path plus a little noise: alike, so that no
            # head loses every pair before training has begun, but not tied, so hard EM can split them.
            if kind == "adapter":
                base_DO = torch.eye(D, **kw)
            else:
                base_DO = backbone.project(torch.eye(D, device=device, dtype=backbone.embed.weight.dtype))
            scale = adapter_init_std * (1.0 if kind == "adapter" else float(base_DO.std()) * D**0.5)
            self.weight_KDO.copy_(base_DO + scale * torch.randn(K, D, out, **kw))

    def _init_mlp(self, D: int, F: int, K: int, init_std: float, kw: dict) -> None:
        # The first layer is a standard fan-in initialisation; the second is small, so every head
        # starts as the shared output path plus a residual perturbation whose size grows with
        # init_std (the heads alike, but not tied, as for the linear adapter).
        self.w1_KDF = nn.Parameter(torch.randn(K, D, F, **kw) * D**-0.5)
        self.b1_KF = nn.Parameter(torch.zeros(K, F, **kw))
        self.w2_KFD = nn.Parameter(torch.randn(K, F, D, **kw) * (init_std * F**-0.5))
        self.b2_KD = nn.Parameter(torch.zeros(K, D, **kw))

    def logits(self, h_NTD: torch.Tensor, k: int) -> torch.Tensor:
        """Pattern k's logits [N, T, V] (or [N, V] for h [N, D])."""
        if self.kind == "mlp":
            hidden = F.gelu(h_NTD @ self.w1_KDF[k] + self.b1_KF[k])
            return self._project(h_NTD + hidden @ self.w2_KFD[k] + self.b2_KD[k])
        y = h_NTD @ self.weight_KDO[k] + self.bias_KO[k]
        return self._project(y) if self.kind == "adapter" else y

    def forward(self, h_BTD: torch.Tensor, pattern_B: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V], row b from pattern ``pattern_B[b]`` (computed pattern by pattern)."""
        out = None
        for k in pattern_B.unique().tolist():
            rows = (pattern_B == k).nonzero()[:, 0]
            part = self.logits(h_BTD[rows], k)
            if out is None:
                out = part.new_empty(*h_BTD.shape[:2], part.shape[-1])
            out[rows] = part
        if out is None:
            raise ValueError("no row to compute: pattern_B is empty")
        return out

    def nll_all(self, h_BTD: torch.Tensor, tgt_out_BT: torch.Tensor, pad_id: int) -> torch.Tensor:
        """[B, K] summed sequence NLL of every target under every pattern."""
        return torch.stack([sequence_nll(self.logits(h_BTD, k), tgt_out_BT, pad_id)
                            for k in range(self.patterns)], dim=1)


class PairGate(nn.Module):
    """q(z | x, y) from pooled source and target states: noisy top-1 over K patterns.

    The output layers start at zero ("no signal and some noise", Shazeer §4), so the first
    assignments are decided by the losses and uniform noise.
    """

    def __init__(self, dim: int, patterns: int, noise_epsilon: float = 1e-2, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.noise_epsilon = noise_epsilon
        self.hidden = nn.Linear(2 * dim, dim, **kw)
        self.w_gate = nn.Linear(dim, patterns, **kw)
        self.w_noise = nn.Linear(dim, patterns, **kw)
        for lin in (self.w_gate, self.w_noise):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, feat_B2D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clean logits [B, K] and the noise std [B, K] (None outside training)."""
        h = torch.tanh(self.hidden(feat_B2D))
        clean_BK = self.w_gate(h).float()
        if not self.training:
            return clean_BK, None
        return clean_BK, F.softplus(self.w_noise(h).float()) + self.noise_epsilon


class SourcePrior(nn.Module):
    """Learned prior p(z | x): mean-pooled encoder -> tanh -> linear -> log-softmax (Shen et al.)."""

    def __init__(self, dim: int, patterns: int, device=None, dtype=None):
        super().__init__()
        self.hidden = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.out = nn.Linear(dim, patterns, device=device, dtype=dtype)

    def forward(self, pooled_BD: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.out(torch.tanh(self.hidden(pooled_BD))).float(), dim=-1)


def capacity_assign(score_BK: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B] one pattern per pair, at most ``capacity`` pairs per pattern, greedy by confidence.

    Pairs are taken in order of the margin between their best and second-best score (the most
    decided first, as batch-prioritised routing orders tokens), each placed at its best pattern
    that still has room. Needs ``capacity * K >= B``.
    """
    B, K = score_BK.shape
    if capacity * K < B:
        raise ValueError(f"capacity={capacity} for {K} patterns cannot hold {B} pairs")
    top2 = score_BK.topk(min(2, K), dim=1).values
    margin_B = top2[:, 0] - top2[:, -1]
    prefs_BK = score_BK.argsort(dim=1, descending=True).tolist()
    room = [capacity] * K
    out = [0] * B
    for b in torch.argsort(margin_B, descending=True, stable=True).tolist():
        k = next(k for k in prefs_BK[b] if room[k] > 0)
        room[k] -= 1
        out[b] = k
    return torch.tensor(out, dtype=torch.long, device=score_BK.device)


def masked_mean(x_BLD: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    m = mask_BL.to(x_BLD.dtype)[..., None]
    return (x_BLD * m).sum(1) / m.sum(1).clamp_min(1.0)


def gate_losses(clean_BK: torch.Tensor, noise_std_BK: torch.Tensor | None, noisy_BK: torch.Tensor,
                assignment_B: torch.Tensor) -> dict[str, torch.Tensor]:
    """Unweighted gate losses: cross-entropy to the assignment, CV^2 of importance and of load.

    Importance is the summed softmax of the clean logits. Load is the smooth estimate of Shazeer
    eq. 10 with k = 1 (the probability that each pattern tops the noisy logits), or the hard count
    when there is no noise or only one pattern.
    """
    K = clean_BK.shape[1]
    importance_K = torch.softmax(clean_BK, dim=-1).sum(0)
    if noise_std_BK is not None and K > 1:
        top2 = noisy_BK.topk(2, dim=-1).values
        load_K = prob_in_top_k(clean_BK, noisy_BK, noise_std_BK, top2, 1).sum(0)
    else:
        load_K = torch.bincount(noisy_BK.argmax(-1), minlength=K).to(clean_BK.dtype)
    return {
        "assign": F.cross_entropy(clean_BK, assignment_B),
        "importance": cv_squared(importance_K),
        "load": cv_squared(load_K),
    }


class SPMoELoss(NamedTuple):
    loss: torch.Tensor  # scalar to minimise: token NLL of the winners + gate and prior losses
    nll: torch.Tensor  # scalar, mean token NLL of the trained (winning) patterns
    assignment: torch.Tensor  # [B] long, the pattern each pair trained
    nll_all: torch.Tensor  # [B, K] sequence NLL under every pattern (dropout off)
    losses: dict[str, torch.Tensor]  # unweighted components


class SPMoE(nn.Module):
    """Shared ``Seq2Seq`` backbone + K pattern heads + pair gate (+ optional source prior).

    ``loss(batch)`` runs one hard-EM step's forward; ``generate(src)`` returns K outputs per source.
    """

    def __init__(self, backbone: Seq2Seq, cfg: SPMoEConfig, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.cfg, self.backbone = cfg, backbone
        D = backbone.cfg.dim
        self.heads = PatternHeads(backbone, cfg.patterns, cfg.head, cfg.adapter_init_std, cfg.adapter_hidden, **kw)
        self.gate = PairGate(D, cfg.patterns, cfg.noise_epsilon, **kw) if cfg.use_gate else None
        self.prior = SourcePrior(D, cfg.patterns, **kw) if cfg.learned_prior else None

    @property
    def patterns(self) -> int:
        return self.cfg.patterns

    @torch.no_grad()
    def responsibilities(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pattern sequence NLL [B, K], and pooled source [B, D] and target [B, D] states.

        Computed with dropout off (the module is put in eval mode and restored) and no gradient:
        the E-step must compare the patterns as they are, not under one random dropout mask.
        """
        was_training = self.training
        self.eval()
        try:
            pad = self.backbone.cfg.pad_id
            src_mask = batch.src != pad
            memory = self.backbone.encode(batch.src, src_mask)
            h_BTD = self.backbone.decode(batch.tgt_in, memory, src_mask)
            nll_BK = self.heads.nll_all(h_BTD, batch.tgt_out, pad)
            return nll_BK, masked_mean(memory, src_mask), masked_mean(h_BTD, batch.tgt_out != pad)
        finally:
            self.train(was_training)

    def assign(self, nll_BK: torch.Tensor, feat_B2D: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The winning pattern of each pair and the gate's (unweighted) losses."""
        if self.gate is None:
            return nll_BK.argmin(1), {}
        clean_BK, noise_std_BK = self.gate(feat_B2D)
        noisy_BK = clean_BK if noise_std_BK is None else clean_BK + torch.randn_like(clean_BK) * noise_std_BK
        prior_BK = noisy_BK if self.cfg.assign_with_noise else clean_BK
        score_BK = self.cfg.gate_weight * torch.log_softmax(prior_BK.detach(), dim=-1) - nll_BK.float()
        if self.cfg.capacity_factor is None:
            assignment_B = score_BK.argmax(1)
        else:
            cap = expert_capacity(score_BK.shape[0], 1, self.cfg.capacity_factor, self.patterns)
            assignment_B = capacity_assign(score_BK, cap)
        return assignment_B, gate_losses(clean_BK, noise_std_BK, noisy_BK, assignment_B)

    def loss(self, batch: PairBatch) -> SPMoELoss:
        """E-step (no dropout, no gradient), assignment, then the M-step forward of the winners."""
        nll_BK, src_feat_BD, tgt_feat_BD = self.responsibilities(batch)
        assignment_B, losses = self.assign(nll_BK, torch.cat([src_feat_BD, tgt_feat_BD], dim=1))
        pad = self.backbone.cfg.pad_id
        src_mask = batch.src != pad
        h_BTD = self.backbone.decode(batch.tgt_in, self.backbone.encode(batch.src, src_mask), src_mask)
        logits_BTV = self.heads(h_BTD, assignment_B)
        nll = sequence_nll(logits_BTV, batch.tgt_out, pad).sum() / (batch.tgt_out != pad).sum().clamp_min(1)
        total = nll
        if losses:
            total = total + losses["assign"] + self.cfg.w_importance * losses["importance"] \
                + self.cfg.w_load * losses["load"]
        if self.prior is not None:
            losses["prior"] = F.nll_loss(self.prior(src_feat_BD), assignment_B)
            total = total + losses["prior"]
        return SPMoELoss(total, nll.detach(), assignment_B, nll_BK, losses)

    @torch.no_grad()
    def prior_log_probs(self, src_BS: torch.Tensor) -> torch.Tensor:
        """[B, K] log p(z | x); uniform without a learned prior."""
        B = src_BS.shape[0]
        if self.prior is None:
            return torch.full((B, self.patterns), -torch.log(torch.tensor(float(self.patterns))).item())
        src_mask = src_BS != self.backbone.cfg.pad_id
        return self.prior(masked_mean(self.backbone.encode(src_BS, src_mask), src_mask)).cpu()

    @torch.no_grad()
    def generate(self, src_BS: torch.Tensor, bos_id: int, eos_id: int, max_len: int,
                 beam: int = 1) -> list[list[list[int]]]:
        """K outputs per source, output k from pattern head k: result[b][k] is a token id list.

        Each pattern decodes greedily (``beam`` = 1) or with its own beam search (1-best).
        """
        self.eval()
        pad = self.backbone.cfg.pad_id
        src_mask = src_BS != pad
        memory = self.backbone.encode(src_BS, src_mask)
        start_B = torch.full((src_BS.shape[0],), bos_id, dtype=torch.long, device=src_BS.device)
        out: list[list[list[int]]] = [[] for _ in range(src_BS.shape[0])]
        for k in range(self.patterns):
            step = self.backbone.step_fn(memory, src_mask, head=lambda h, k=k: self.heads.logits(h, k))
            for b, seq in enumerate(best_decode(step, start_B, max_len, eos_id, pad, beam)):
                out[b].append(seq)
        return out
