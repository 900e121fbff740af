"""Capacity-limited dispatch: each expert computes at most C token-slots; the rest are dropped.

Legend: T tokens, E experts, K slots per token.

Slots claim buffer places in priority order: all first choices before any second choice
(GShard, V-MoE), and within one choice rank either in token order or, with batch-prioritised
routing (BPR, Riquelme et al. 2021), in order of each token's highest gate, so confident tokens
keep their place when an expert overflows. A dropped slot contributes nothing; the caller's
residual connection carries the token.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int, k: int, capacity_factor: float, num_experts: int,
                    multiple: int = 1) -> int:
    """``C = ceil(T * k * capacity_factor / E)``, rounded up to a multiple of ``multiple``."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor={capacity_factor} must be > 0")
    if multiple < 1:
        raise ValueError(f"multiple={multiple} must be >= 1")
    cap = math.ceil(num_tokens * k * capacity_factor / num_experts)
    return int(math.ceil(cap / multiple) * multiple)


def slot_priority(weights_TK: torch.Tensor, batch_prioritized: bool) -> torch.Tensor:
    """[T] token order in which slots of one choice rank claim places."""
    num_tokens = weights_TK.shape[0]
    if not batch_prioritized:
        return torch.arange(num_tokens, device=weights_TK.device)
    top_T = weights_TK.max(dim=-1).values if weights_TK.shape[1] else weights_TK.new_zeros(num_tokens)
    return torch.argsort(top_T, descending=True, stable=True)


def capacity_keep(indices_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, capacity: int,
                  batch_prioritized: bool = False) -> torch.Tensor:
    """[T, K] bool: which routed slots fit in their expert's buffer of ``capacity`` places.

    Empty (-1) slots are never kept (and never counted as dropped by the caller).
    """
    num_tokens, k = indices_TK.shape
    order_T = slot_priority(weights_TK.detach(), batch_prioritized)
    # Sequence of slots in claim order: rank 0 of every token (in priority order), then rank 1, ...
    seq_KT = indices_TK[order_T].t().reshape(-1)
    seq = torch.where(seq_KT < 0, num_experts, seq_KT)
    sorted_pos = torch.argsort(seq, stable=True)
    counts = torch.bincount(seq, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    place_sorted = torch.arange(seq.numel(), device=seq.device) - starts[seq[sorted_pos]]
    place = torch.empty_like(place_sorted).scatter_(0, sorted_pos, place_sorted)
    keep_seq = (place < capacity) & (seq < num_experts)
    keep_TK = torch.empty_like(keep_seq.view(k, num_tokens).t())
    keep_TK[order_T] = keep_seq.view(k, num_tokens).t()
    return keep_TK
