"""Baselines for K outputs per input, on the same backbone as SPMoE.

Legend: B pairs (or sources), S source length, T target length, D model dim, V vocabulary,
K outputs per input (= mixture components).

* ``SingleModel``: one encoder-decoder; K outputs by top-K beam search or by K ancestral samples.
* ``HardMixture``: Shen et al. 2019's hMoEup, a hard mixture with a uniform prior whose components
  share every parameter and differ only by the decoder's start token ``<expert_i>``. The E-step
  runs with dropout off and no gradient, like SPMoE's, so the comparison isolates SPMoE's
  separate linear pattern heads and balanced gate.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moekit.data.pairs import PairBatch
from moekit.models.decoding import beam_search, best_decode, sample_decode
from moekit.models.seq2seq import Seq2Seq, sequence_nll


class ModelLoss(NamedTuple):
    loss: torch.Tensor  # scalar to minimise
    nll: torch.Tensor  # scalar, mean token NLL (detached)
    assignment: torch.Tensor | None  # [B] component each pair trained (mixtures only)


def token_nll(logits_BTV: torch.Tensor, tgt_out_BT: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Mean NLL per real target token."""
    return sequence_nll(logits_BTV, tgt_out_BT, pad_id).sum() / (tgt_out_BT != pad_id).sum().clamp_min(1)


class SingleModel(torch.nn.Module):
    """One encoder-decoder trained by maximum likelihood; K outputs from beam search or sampling."""

    def __init__(self, backbone: Seq2Seq):
        super().__init__()
        self.backbone = backbone

    def loss(self, batch: PairBatch) -> ModelLoss:
        nll = token_nll(self.backbone(batch.src, batch.tgt_in), batch.tgt_out, self.backbone.cfg.pad_id)
        return ModelLoss(nll, nll.detach(), None)

    @torch.no_grad()
    def generate(self, src_BS: torch.Tensor, k: int, bos_id: int, eos_id: int, max_len: int,
                 mode: str = "beam", beam: int = 4, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> list[list[list[int]]]:
        """result[b] holds K outputs: the top-K of a beam of ``max(beam, k)``, or K samples."""
        self.eval()
        pad = self.backbone.cfg.pad_id
        src_mask = src_BS != pad
        step = self.backbone.step_fn(self.backbone.encode(src_BS, src_mask), src_mask)
        start_B = torch.full((src_BS.shape[0],), bos_id, dtype=torch.long, device=src_BS.device)
        if mode == "beam":
            hyps = beam_search(step, start_B, max_len, eos_id, max(beam, k), n_best=k)
            # A short source may end fewer than K hypotheses; repeat the last so every input has K.
            return [[hs[min(j, len(hs) - 1)][0] for j in range(k)] for hs in hyps]
        if mode == "sampling":
            return sample_decode(step, start_B, max_len, eos_id, pad, k, temperature, generator)
        raise ValueError(f"mode={mode!r} must be 'beam' or 'sampling'")


class HardMixture(torch.nn.Module):
    """hMoEup: K components marked by the decoder start token ``<expert_i>`` (Shen et al. 2019).

    Args:
        backbone: its vocabulary must hold the K expert tokens.
        expert_ids: the K token ids of ``<expert_0>`` ... ``<expert_{K-1}>``.
    """

    def __init__(self, backbone: Seq2Seq, expert_ids: list[int]):
        super().__init__()
        if len(set(expert_ids)) != len(expert_ids) or not expert_ids:
            raise ValueError(f"expert_ids={expert_ids} must be distinct and non-empty")
        if max(expert_ids) >= backbone.cfg.vocab_size:
            raise ValueError(f"expert id {max(expert_ids)} is outside the vocabulary of {backbone.cfg.vocab_size}")
        self.backbone = backbone
        self.expert_ids = list(expert_ids)

    @property
    def patterns(self) -> int:
        return len(self.expert_ids)

    def _with_start(self, tgt_in_BT: torch.Tensor, component_B: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor(self.expert_ids, dtype=torch.long, device=tgt_in_BT.device)
        out = tgt_in_BT.clone()
        out[:, 0] = ids[component_B]
        return out

    @torch.no_grad()
    def responsibilities(self, batch: PairBatch) -> torch.Tensor:
        """[B, K] sequence NLL under each component, with dropout off and no gradient."""
        was_training = self.training
        self.eval()
        try:
            B, K = batch.src.shape[0], self.patterns
            comp = torch.arange(K, device=batch.src.device).repeat_interleave(B)
            rep = lambda t: t.repeat(K, 1)  # noqa: E731  (K copies of the batch, component-major)
            logits = self.backbone(rep(batch.src), self._with_start(rep(batch.tgt_in), comp))
            nll = sequence_nll(logits, rep(batch.tgt_out), self.backbone.cfg.pad_id)
            return nll.view(K, B).t()
        finally:
            self.train(was_training)

    def loss(self, batch: PairBatch) -> ModelLoss:
        assignment_B = self.responsibilities(batch).argmin(1)
        logits = self.backbone(batch.src, self._with_start(batch.tgt_in, assignment_B))
        nll = token_nll(logits, batch.tgt_out, self.backbone.cfg.pad_id)
        return ModelLoss(nll, nll.detach(), assignment_B)

    @torch.no_grad()
    def generate(self, src_BS: torch.Tensor, eos_id: int, max_len: int, beam: int = 1) -> list[list[list[int]]]:
        """result[b][k] is component k's output (greedy, or the 1-best of a beam)."""
        self.eval()
        pad = self.backbone.cfg.pad_id
        src_mask = src_BS != pad
        step = self.backbone.step_fn(self.backbone.encode(src_BS, src_mask), src_mask)
        out: list[list[list[int]]] = [[] for _ in range(src_BS.shape[0])]
        for expert in self.expert_ids:
            start_B = torch.full((src_BS.shape[0],), expert, dtype=torch.long, device=src_BS.device)
            for b, seq in enumerate(best_decode(step, start_B, max_len, eos_id, pad, beam)):
                out[b].append(seq)
        return out
