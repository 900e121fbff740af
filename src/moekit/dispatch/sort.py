"""Sort-based dropless dispatch: permute token-slots so each expert's tokens are contiguous.

Legend: T tokens, D model dim, E experts, K slots per token, N routed (non-empty) slots.

A stable argsort of the flat [T*K] expert ids groups the slots by expert while keeping token
order inside each group, so results do not depend on sort ties. Empty slots (-1) are mapped to
a sentinel id E and sorted last, then cut off: they are never computed.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch


class Permutation(NamedTuple):
    """Where each routed slot goes.

    Attributes:
        token_ids_N: [N] long, the source token of each slot, grouped by expert.
        slot_ids_N: [N] long, the flat slot index ``t*K + j`` of each slot (to look up its weight).
        counts_E: [E] long, slots per expert.
        counts: the same as a Python list (segment sizes for the expert compute).
    """

    token_ids_N: torch.Tensor
    slot_ids_N: torch.Tensor
    counts_E: torch.Tensor
    counts: list[int]


def sort_by_expert(indices_TK: torch.Tensor, num_experts: int) -> Permutation:
    """Group the non-empty slots of ``indices_TK`` [T, K] by expert (stable)."""
    k = indices_TK.shape[1]
    flat = indices_TK.reshape(-1)
    flat = torch.where(flat < 0, num_experts, flat)
    slot_ids = torch.argsort(flat, stable=True)
    counts_E = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    counts = counts_E.tolist()
    n = sum(counts)
    slot_ids_N = slot_ids[:n]
    return Permutation(slot_ids_N // k, slot_ids_N, counts_E, counts)


def combine(h_ND: torch.Tensor, perm: Permutation, weights_TK: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``y[t] = sum_j weights[t, j] * h[slot (t, j)]``; tokens with no routed slot get 0. Returns [T, D]."""
    w_N1 = weights_TK.reshape(-1)[perm.slot_ids_N].to(h_ND.dtype)[:, None]
    y_TD = h_ND.new_zeros(num_tokens, h_ND.shape[-1])
    return y_TD.index_add(0, perm.token_ids_N, h_ND * w_N1)


class Dispatcher(Protocol):
    """Moves each routed slot to its expert and combines the outputs: ``y_TD`` from ``x_TD`` [T, D],
    ``indices_TK``/``weights_TK`` [T, K] and the expert bank (``moekit.experts.Experts``)."""

    def __call__(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                 experts) -> torch.Tensor: ...


class LocalDispatcher:
    """Dropless single-device dispatch: permute, compute each expert's segment, weighted scatter back."""

    def __call__(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                 experts) -> torch.Tensor:
        if experts.takes_few(x_TD, indices_TK):  # a few tokens, no backward: no sort at all
            return experts.forward_few(x_TD, indices_TK, weights_TK)
        perm = sort_by_expert(indices_TK, experts.num_experts)
        return experts.forward_tokens(x_TD, perm, weights_TK)
