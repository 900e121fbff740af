"""A small transformer encoder-decoder: the backbone shared by every pattern of SPMoE.

Legend: B batch (sources), S source length, T target length, D model dim, H attention heads,
F feed-forward hidden dim, V vocabulary, N decoding hypotheses (e.g. B * beam).

Pre-norm blocks (LayerNorm before attention and before the feed-forward, a final LayerNorm after
the stack) train stably without a learning-rate warm-up at this small scale. Sequences are
right-padded with ``pad_id``; masks are True on real tokens. Positions are sinusoidal, so a real
token's encoding does not depend on how much padding follows it: a batch decodes exactly as each
of its sources would alone. The decoding searches live in ``moekit.models.decoding``.

``text_infilling`` is BART's denoising noise (Lewis et al. 2020), for pre-training a backbone to
reconstruct text from a corrupted copy before it is fine-tuned, as SPMoE adapts pre-trained BART.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.decoding import beam_search, greedy_decode, sample_decode

__all__ = ["Seq2Seq", "Seq2SeqConfig", "beam_search", "greedy_decode", "sample_decode", "text_infilling"]


@dataclass
class Seq2SeqConfig:
    """Sizes of the encoder-decoder."""

    vocab_size: int
    """V, shared by source and target (tied embeddings need one vocabulary)."""
    dim: int = 128
    """D."""
    heads: int = 4
    """H; must divide D."""
    encoder_layers: int = 2
    decoder_layers: int = 2
    ffn_dim: int | None = None
    """F; None means 4 * D."""
    dropout: float = 0.1
    pad_id: int = 0
    tie_embeddings: bool = True
    """Use the token embedding as the output projection (fewer parameters, better at small data)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "heads", "encoder_layers", "decoder_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if self.dim % self.heads:
            raise ValueError(f"heads={self.heads} does not divide dim={self.dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id={self.pad_id} is outside the vocabulary of {self.vocab_size}")


def sinusoidal_positions(length: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """[length, D] fixed position encodings of Vaswani et al. 2017 (sin on even, cos on odd dims)."""
    pos_L1 = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(length, dim, device=device, dtype=torch.float32)
    out[:, 0::2] = torch.sin(pos_L1 * freq)
    out[:, 1::2] = torch.cos(pos_L1 * freq[: dim // 2])
    return out.to(dtype or torch.get_default_dtype())


class Attention(nn.Module):
    """Multi-head attention; ``mask`` [B, 1 or Tq, Tk] bool, True where a query may look."""

    def __init__(self, dim: int, heads: int, dropout: float, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim, **kw)
        self.kv = nn.Linear(dim, 2 * dim, **kw)
        self.out = nn.Linear(dim, dim, **kw)

    def keys_values(self, ctx_BKD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, Tk, D/H] of a context (cached during incremental decoding)."""
        B, _, D = ctx_BKD.shape
        k, v = self.kv(ctx_BKD).view(B, -1, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def attend(self, x_BQD: torch.Tensor, k, v, mask_BQK: torch.Tensor | None) -> torch.Tensor:
        B, Q, D = x_BQD.shape
        q = self.q(x_BQD).view(B, Q, self.heads, D // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask_BQK is None else mask_BQK[:, None],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, Q, D))

    def forward(self, x_BQD: torch.Tensor, ctx_BKD: torch.Tensor, mask_BQK: torch.Tensor) -> torch.Tensor:
        return self.attend(x_BQD, *self.keys_values(ctx_BKD), mask_BQK)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float, device=None, dtype=None):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.w2 = nn.Linear(hidden, dim, device=device, dtype=dtype)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.drop(F.gelu(self.w1(x))))


class Block(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention, feed-forward, each residual."""

    def __init__(self, cfg: Seq2SeqConfig, cross: bool, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        D = cfg.dim
        self.norm1 = nn.LayerNorm(D, **kw)
        self.attn = Attention(D, cfg.heads, cfg.dropout, **kw)
        self.norm_x: nn.LayerNorm | None = nn.LayerNorm(D, **kw) if cross else None
        self.cross: Attention | None = Attention(D, cfg.heads, cfg.dropout, **kw) if cross else None
        self.norm2 = nn.LayerNorm(D, **kw)
        self.ffn = FeedForward(D, cfg.ffn_dim or 4 * D, cfg.dropout, **kw)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD, self_mask_BTT, memory_BSD=None, cross_mask_BTS=None):
        h = self.norm1(x_BTD)
        x_BTD = x_BTD + self.drop(self.attn(h, h, self_mask_BTT))
        if self.cross is not None and self.norm_x is not None:
            x_BTD = x_BTD + self.drop(self.cross(self.norm_x(x_BTD), memory_BSD, cross_mask_BTS))
        return x_BTD + self.drop(self.ffn(self.norm2(x_BTD)))

    def keys_values_of(self, memory_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention keys and values of the source (a decoder block's)."""
        if self.cross is None:
            raise RuntimeError("an encoder block has no cross-attention")
        return self.cross.keys_values(memory_BSD)

    def step(self, x_N1D, cache: dict, cross_kv, cross_mask_N1S):
        """One new position per hypothesis; ``cache`` holds this block's past keys/values [N, H, t, D/H]."""
        h = self.norm1(x_N1D)
        k_new, v_new = self.attn.keys_values(h)
        cache["k"] = k_new if cache.get("k") is None else torch.cat([cache["k"], k_new], dim=2)
        cache["v"] = v_new if cache.get("v") is None else torch.cat([cache["v"], v_new], dim=2)
        # No mask: the cache holds only earlier positions, which is what the causal mask allows.
        x_N1D = x_N1D + self.attn.attend(h, cache["k"], cache["v"], None)
        if self.cross is None or self.norm_x is None:
            raise RuntimeError("step() is for decoder blocks, which attend to the source")
        cross_k, cross_v = cross_kv
        x_N1D = x_N1D + self.cross.attend(self.norm_x(x_N1D), cross_k, cross_v, cross_mask_N1S)
        return x_N1D + self.ffn(self.norm2(x_N1D))


class Seq2Seq(nn.Module):
    """Transformer encoder-decoder over one shared vocabulary.

    ``encode`` and ``decode`` expose the hidden states so that output heads (one per SPMoE pattern)
    can sit on top of the shared decoder; ``project`` is the shared output projection.
    """

    def __init__(self, cfg: Seq2SeqConfig, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.cfg = cfg
        D = cfg.dim
        self.embed = nn.Embedding(cfg.vocab_size, D, padding_idx=cfg.pad_id, **kw)
        self.encoder = nn.ModuleList(Block(cfg, cross=False, **kw) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(Block(cfg, cross=True, **kw) for _ in range(cfg.decoder_layers))
        self.enc_norm = nn.LayerNorm(D, **kw)
        self.dec_norm = nn.LayerNorm(D, **kw)
        self.drop = nn.Dropout(cfg.dropout)
        self.out_proj = None if cfg.tie_embeddings else nn.Linear(D, cfg.vocab_size, bias=False, **kw)
        # Embeddings at std D^-1/2 keep tied logits O(1) at initialisation.
        nn.init.normal_(self.embed.weight, std=D**-0.5)
        with torch.no_grad():
            self.embed.weight[cfg.pad_id].zero_()


    def decoder_blocks(self) -> list[Block]:
        return [cast(Block, block) for block in self.decoder]
    def _embed(self, ids_BL: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids_BL) * math.sqrt(self.cfg.dim)
        pos = sinusoidal_positions(ids_BL.shape[1], self.cfg.dim, device=x.device, dtype=x.dtype)
        return self.drop(x + pos)

    def encode(self, src_BS: torch.Tensor, src_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        """memory [B, S, D]; ``src_mask_BS`` defaults to ``src != pad_id``."""
        check_ids(src_BS, self.cfg.vocab_size, "source")
        if src_mask_BS is None:
            src_mask_BS = src_BS != self.cfg.pad_id
        x = self._embed(src_BS)
        mask_B1S = src_mask_BS[:, None, :]
        for block in self.encoder:
            x = block(x, mask_B1S)
        return self.enc_norm(x)

    def decode(self, tgt_in_BT: torch.Tensor, memory_BSD: torch.Tensor, src_mask_BS: torch.Tensor) -> torch.Tensor:
        """Decoder hidden states [B, T, D] (after the final norm) for teacher-forced inputs.

        Target padding needs no key mask: it only ever follows the real tokens, and the causal
        mask keeps every real position from seeing what comes after it.
        """
        check_ids(tgt_in_BT, self.cfg.vocab_size, "target")
        T = tgt_in_BT.shape[1]
        causal_1TT = torch.ones(T, T, dtype=torch.bool, device=tgt_in_BT.device).tril()[None]
        cross_B1S = src_mask_BS[:, None, :]
        x = self._embed(tgt_in_BT)
        for block in self.decoder:
            x = block(x, causal_1TT, memory_BSD, cross_B1S)
        return self.dec_norm(x)

    def project(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """Shared output projection: logits [..., V]."""
        if self.out_proj is not None:
            return self.out_proj(h_BTD)
        return h_BTD @ self.embed.weight.t()

    def forward(self, src_BS: torch.Tensor, tgt_in_BT: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, T, V]."""
        src_mask_BS = src_BS != self.cfg.pad_id
        memory = self.encode(src_BS, src_mask_BS)
        return self.project(self.decode(tgt_in_BT, memory, src_mask_BS))

    def step_fn(self, memory_BSD: torch.Tensor, src_mask_BS: torch.Tensor, head=None, cache: bool = True):
        """A decoding step function ``(prefix_NT, rows_N, parents_N) -> log_probs_NV`` (see ``moekit.models.decoding``).

        ``rows_N`` says which source each hypothesis belongs to; ``head`` maps the last hidden state
        [N, D] to logits (default: the shared projection). With ``cache`` the keys and values of past
        positions are kept and reordered by ``parents_N``, so each step computes one new position;
        without it every step recomputes the whole prefix (the reference the cache is tested against).
        """
        head = head or self.project
        if not cache:
            def full(prefix_NT: torch.Tensor, rows_N: torch.Tensor, parents_N=None) -> torch.Tensor:
                h_NTD = self.decode(prefix_NT, memory_BSD[rows_N], src_mask_BS[rows_N])
                return torch.log_softmax(head(h_NTD[:, -1]).float(), dim=-1)

            return full
        blocks = self.decoder_blocks()
        cross_kv = [block.keys_values_of(memory_BSD) for block in blocks]
        state: dict = {"len": 0, "layers": []}

        def step(prefix_NT: torch.Tensor, rows_N: torch.Tensor, parents_N=None) -> torch.Tensor:
            if parents_N is None:
                # A new search: hypotheses keep their source from here on, so the cross-attention
                # keys/values are gathered per hypothesis once.
                state["len"], state["layers"] = 0, [{} for _ in self.decoder]
                state["kv"] = [(k[rows_N], v[rows_N]) for k, v in cross_kv]
                state["mask"] = src_mask_BS[rows_N][:, None, :]
            else:
                for layer in state["layers"]:
                    layer["k"], layer["v"] = layer["k"][parents_N], layer["v"][parents_N]
            mask_N1S, kv = state["mask"], state["kv"]
            T = prefix_NT.shape[1]
            pos_TD = sinusoidal_positions(T, self.cfg.dim, device=memory_BSD.device, dtype=memory_BSD.dtype)
            for t in range(state["len"], T):
                x = self.embed(prefix_NT[:, t : t + 1]) * math.sqrt(self.cfg.dim) + pos_TD[t]
                for block, layer, ckv in zip(blocks, state["layers"], kv, strict=True):
                    x = block.step(x, layer, ckv, mask_N1S)
            state["len"] = T
            return torch.log_softmax(head(self.dec_norm(x[:, 0])).float(), dim=-1)

        return step


def check_ids(ids: torch.Tensor, vocab_size: int, what: str) -> None:
    """Token ids must be a 2-D long tensor within the vocabulary; the error names the bad value."""
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long:
        raise TypeError(f"{what} ids must be a long tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"{what} ids must have shape [batch, length >= 1], got {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"{what} id {bad} is outside the vocabulary of {vocab_size}")


def sequence_nll(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[B] summed negative log-likelihood of each target sequence; padding positions count 0."""
    nll_BT = F.cross_entropy(logits_BTV.float().transpose(1, 2), targets_BT, reduction="none")
    return (nll_BT * (targets_BT != pad_id)).sum(1)


def _poisson(rng: random.Random, lam: float) -> int:
    """A Poisson(lam) draw by counting uniform products (Knuth): exact, and quick for small lam."""
    limit, k, prod = math.exp(-lam), 0, rng.random()
    while prod > limit:
        k += 1
        prod *= rng.random()
    return k


def text_infilling(ids: Sequence[int], mask_id: int, rng: random.Random, ratio: float = 0.3,
                   mean_span: float = 3.0) -> list[int]:
    """BART's text infilling: spans of Poisson(``mean_span``) lengths, ``round(ratio * len(ids))`` tokens
    in all, are each replaced by a single ``mask_id``; a span of length 0 inserts a mask.

    The model must thus say how many tokens a mask stands for, as well as which. Spans do not
    overlap; a span that finds no room among the others is dropped (short texts mask a little
    less). The tokens left keep their order. Deterministic given ``rng``'s state.
    """
    if not 0.0 <= ratio <= 1.0 or mean_span <= 0:
        raise ValueError(f"ratio={ratio} must be in [0, 1] and mean_span={mean_span} > 0")
    n = len(ids)
    budget = round(ratio * n)
    lengths: list[int] = []
    while sum(lengths) < budget:
        lengths.append(min(_poisson(rng, mean_span), budget - sum(lengths)))
    covered = [False] * n
    starts: dict[int, int] = {}  # span start -> its length (0: a mask inserted before this position)
    for length in lengths:
        if length:
            free = [i for i in range(n + 1 - length)
                    if all(not covered[j] and j not in starts for j in range(i, i + length))]
        else:
            free = [i for i in range(n + 1) if i not in starts and (i == n or not covered[i])]
        if not free:
            continue
        start = rng.choice(free)
        starts[start] = length
        for i in range(start, start + length):
            covered[i] = True
    out: list[int] = []
    for i in range(n + 1):
        if i in starts:
            out.append(mask_id)
        if i < n and not covered[i]:
            out.append(ids[i])
    return out
