"""Naive per-token implementations, written for clarity, not speed.

Tests compare every fast path against these; users can do the same for their own routers.
Legend: T tokens, D model dim, E experts, K slots per token.
"""

from __future__ import annotations

import math

import torch

from moekit.routing.losses import normal_cdf
from moekit.types import MoEOutput


def reference_noisy_top_k(clean_TE: torch.Tensor, noise_TE: torch.Tensor, noise_std_TE: torch.Tensor, k: int):
    """Eq. 3-5 and 8-9 token by token, with an explicit noise sample.

    Returns (indices [T, k], gates [T, k], prob_in_top_k [T, E]).
    """
    num_tokens, num_experts = clean_TE.shape
    indices, gates, probs = [], [], []
    for t in range(num_tokens):
        h = [float(clean_TE[t, i] + noise_TE[t, i] * noise_std_TE[t, i]) for i in range(num_experts)]
        order = sorted(range(num_experts), key=lambda i: -h[i])[:k]
        top = [h[i] for i in order]
        z = [math.exp(v - top[0]) for v in top]
        indices.append(order)
        gates.append([v / sum(z) for v in z])
        row = []
        for i in range(num_experts):
            others = sorted((h[j] for j in range(num_experts) if j != i), reverse=True)
            kth_excluding = others[k - 1]
            row.append(float(normal_cdf(torch.tensor((float(clean_TE[t, i]) - kth_excluding)
                                                     / float(noise_std_TE[t, i]), dtype=torch.float64))))
        probs.append(row)
    return torch.tensor(indices), torch.tensor(gates, dtype=torch.float64), torch.tensor(probs, dtype=torch.float64)


def reference_moe(moe, x: torch.Tensor, mask: torch.Tensor | None = None) -> MoEOutput:
    """The layer ``moe`` computed one token-slot at a time with a Python loop.

    Routing comes from ``moe.router`` (seed the RNG identically to compare a noisy router in
    training mode); capacity, dispatch, expert compute and combine are re-implemented naively:
    slots claim buffer places rank by rank, tokens in order (or by their top gate with BPR).
    """
    x_TD = x.reshape(-1, moe.dim)
    mask_T = None if mask is None else mask.reshape(-1)
    routing = moe.route(x_TD, mask_T)
    num_tokens, k = routing.indices.shape
    idx = routing.indices.tolist()
    keep = [[i >= 0 for i in row] for row in idx]
    if moe.capacity_factor is not None:
        num_real = num_tokens if mask_T is None else int(mask_T.sum())
        cap = math.ceil(num_real * k * moe.capacity_factor / moe.num_experts)
        multiple = getattr(moe, "capacity_multiple", 1)
        cap = math.ceil(cap / multiple) * multiple
        order = list(range(num_tokens))
        if moe.batch_prioritized:
            top = [max(row) for row in routing.weights.tolist()]
            order.sort(key=lambda t: -top[t])  # Python's sort is stable, like the fast path's.
        used = [0] * moe.num_experts
        for j in range(k):
            for t in order:
                e = idx[t][j]
                if e >= 0:
                    keep[t][j] = used[e] < cap
                    used[e] += 1
    y = [torch.zeros(moe.dim, dtype=x.dtype, device=x.device) for _ in range(num_tokens)]
    counts = [0] * moe.num_experts
    dropped = 0
    for t in range(num_tokens):
        for j in range(k):
            e = idx[t][j]
            if e < 0:
                continue
            if not keep[t][j]:
                dropped += 1
                continue
            counts[e] += 1
            h = moe.experts.expert_forward(e, x_TD[t : t + 1])[0]
            y[t] = y[t] + routing.weights[t, j].to(x.dtype) * h
    y_TD = torch.stack(y) if y else x_TD.new_zeros(0, moe.dim)
    stats = routing.stats._replace(counts=torch.tensor(counts), dropped=dropped)
    return MoEOutput(y_TD.reshape(x.shape), routing.aux_loss, stats)
