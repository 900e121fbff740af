"""Naive per-token implementations, written for clarity, not speed.

Tests compare every fast path against these; users can do the same for their own routers.
Legend: T tokens, D model dim, F hidden dim, E experts, K slots per token.

Everything here is re-derived from the equations, one token (or one slot) at a time, with Python
loops and elementary tensor operations; nothing calls the fast path's kernels. Gradients flow
through the tensor operations, so outputs *and* gradients can be compared.
"""

from __future__ import annotations

import math
from typing import cast

import torch

from moekit.routing.losses import normal_cdf
from moekit.types import MoEOutput, RoutingStats


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


# --- expert maths ---------------------------------------------------------------------------------------
def reference_activation(h_F: torch.Tensor, up_F: torch.Tensor | None, activation: str,
                         settings: dict[str, float]) -> torch.Tensor:
    """The activation written out: ReLU, GELU (erf form), SiLU, SwiGLU and GPT-OSS's clamped SwiGLU."""
    sigmoid = lambda v: 1.0 / (1.0 + torch.exp(-v))  # noqa: E731
    if activation == "relu":
        return torch.where(h_F > 0, h_F, torch.zeros_like(h_F))
    if activation == "gelu":
        return 0.5 * h_F * (1.0 + torch.erf(h_F / math.sqrt(2.0)))
    if activation == "silu":
        return h_F * sigmoid(h_F)
    if activation in ("swiglu", "clamped_swiglu") and up_F is None:
        raise ValueError(f"activation={activation!r} needs the up projection")
    up_F = cast(torch.Tensor, up_F)
    if activation == "swiglu":
        return h_F * sigmoid(h_F) * up_F
    if activation == "clamped_swiglu":
        limit, alpha = settings["limit"], settings["alpha"]
        gate = torch.where(h_F > limit, torch.full_like(h_F, limit), h_F)
        up = torch.where(up_F > limit, torch.full_like(up_F, limit), up_F)
        up = torch.where(up < -limit, torch.full_like(up, -limit), up)
        return (up + 1.0) * gate * sigmoid(alpha * gate)
    raise ValueError(f"activation={activation!r} has no reference")


def _ffn(x_D, w1, b1, w2, b2, w3, b3, activation: str, settings: dict[str, float]) -> torch.Tensor:
    """One token through one FFN given its [D, F] / [F, D] weights (biases may be None)."""
    h_F = x_D @ w1 + (b1 if b1 is not None else 0.0)
    up_F = None if w3 is None else x_D @ w3 + (b3 if b3 is not None else 0.0)
    out_D = reference_activation(h_F, up_F, activation, settings) @ w2
    return out_D + b2 if b2 is not None else out_D


def reference_expert(experts, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of a ``moekit.experts.Experts`` on one token [D] -> [D]."""
    w1, b1, w2, b2, w3, b3 = (None if w is None else w[e].to(x_D.dtype)
                              for w in (experts.w1, experts.b1, experts.w2, experts.b2, experts.w3, experts.b3))
    return _ffn(x_D, w1, b1, w2, b2, w3, b3, experts.activation, experts.settings)


def reference_shared(shared, x_D: torch.Tensor) -> torch.Tensor:
    """A ``moekit.experts.SharedExperts`` on one token [D] -> [D], gate included."""
    w1, b1, w2, b2, w3, b3 = (None if w is None else w.to(x_D.dtype)
                              for w in (shared.w1, shared.b1, shared.w2, shared.b2, shared.w3, shared.b3))
    y_D = _ffn(x_D, w1, b1, w2, b2, w3, b3, shared.activation, shared.settings)
    if shared.w_gate is not None:
        y_D = y_D / (1.0 + torch.exp(-(x_D * shared.w_gate.to(x_D.dtype)).sum()))
    return y_D


# --- routing ---------------------------------------------------------------------------------------------
def _cv_squared(values: list[torch.Tensor]) -> torch.Tensor:
    """``var / (mean^2 + 1e-10)`` with the population variance, written out."""
    if len(values) < 2:
        return torch.zeros(())
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return cast(torch.Tensor, var / (mean * mean + 1e-10))


def _finish(router, indices: list[list[int]], weights: list[list], num_experts: int):
    """(indices [T, K], weights [T, K], aux_loss, stats) from per-token lists; CV^2 losses of the
    importance (sum of weights) and of the hard counts, weighted by the router's coefficients."""
    zero = torch.zeros((), dtype=torch.float32)
    importance = [zero] * num_experts
    counts = [0] * num_experts
    for row, w_row in zip(indices, weights, strict=True):
        for e, w in zip(row, w_row, strict=True):
            if e >= 0:
                importance[e] = importance[e] + w
                counts[e] += 1
    losses = {"importance": _cv_squared(importance), "load": _cv_squared([torch.tensor(float(c)) for c in counts])}
    aux = zero
    for name, coef in router.loss_weights.items():
        if coef and name in losses:
            aux = aux + coef * losses[name]
    width = max([len(row) for row in indices], default=1)
    w_TK = torch.stack([torch.stack(w_row) for w_row in weights]) if indices else torch.zeros(0, width)
    stats = RoutingStats(torch.stack(importance), torch.tensor(counts, dtype=torch.float32), torch.tensor(counts), 0,
                         losses)
    return torch.tensor(indices, dtype=torch.long).reshape(-1, width), w_TK, aux, stats


def reference_topk_routing(router, x_TD: torch.Tensor, mask_T: torch.Tensor | None = None):
    """A ``TopKRouter``'s decision token by token: (indices [T, K], weights [T, K], aux_loss, stats).

    Scores (softmax over all E, or sigmoid per expert) plus the selection bias choose; with groups,
    only the experts of the best groups (group score: sum of its two best choice scores) are
    eligible; the k eligible experts with the best choice scores are kept. Weights come from the
    unbiased scores (renormalised if asked; softmax-normalised = softmax over the kept logits),
    times the scale.
    """
    num_experts, k = router.num_experts, router.k
    per_group = num_experts // router.num_groups
    zero_w = [torch.zeros((), dtype=torch.float32)] * k
    indices, weights = [], []
    for t in range(x_TD.shape[0]):
        if mask_T is not None and not bool(mask_T[t]):
            indices.append([-1] * k)
            weights.append(zero_w)
            continue
        logits = x_TD[t].float() @ router.w_gate.float()
        if router.logit_bias is not None:
            logits = logits + router.logit_bias.float()
        if router.score == "softmax":
            scores = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
        else:
            scores = 1.0 / (1.0 + torch.exp(-logits))
        choice = [float(scores[e]) + (0.0 if router.expert_bias is None else float(router.expert_bias[e]))
                  for e in range(num_experts)]
        group_score = [sum(sorted(choice[g * per_group:(g + 1) * per_group], reverse=True)[:2])
                       for g in range(router.num_groups)]
        groups = sorted(range(router.num_groups), key=lambda g: -group_score[g])[:router.topk_groups]
        eligible = [e for e in range(num_experts) if e // per_group in groups]
        chosen = sorted(eligible, key=lambda e: -choice[e])[:k]
        if router.score == "softmax" and router.normalize:
            kept = logits[chosen]
            w = torch.exp(kept - kept.max()) / torch.exp(kept - kept.max()).sum()
        else:
            w = scores[chosen]
            if router.normalize:
                w = w / (w.sum() + 1e-20)
        w = w * router.scale
        indices.append(chosen)
        weights.append(list(w.unbind(0)))
    return _finish(router, indices, weights, num_experts)


def reference_expert_choice_routing(router, x_TD: torch.Tensor, mask_T: torch.Tensor | None = None):
    """An ``ExpertChoiceRouter``'s decision expert by expert: (indices [T, K'], weights, aux_loss, stats).

    Every expert takes the ``min(T, ceil(k*T/E))`` real tokens with the highest softmax score
    (T = real tokens; ties: the earlier token); a token's experts in index order, padded with -1.
    """
    num_tokens, num_experts = x_TD.shape[0], router.num_experts
    real = [t for t in range(num_tokens) if mask_T is None or bool(mask_T[t])]
    probs = []
    for t in range(num_tokens):
        logits = x_TD[t].float() @ router.w_gate.float()
        probs.append(torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum())
    m = min(len(real), math.ceil(router.k * len(real) / num_experts))
    taken: list[list[int]] = [[] for _ in range(num_tokens)]
    for e in range(num_experts):
        for t in sorted(real, key=lambda t: (-float(probs[t][e]), t))[:m]:
            taken[t].append(e)
    width = max([len(row) for row in taken], default=0) or 1
    zero = torch.zeros((), dtype=torch.float32)
    indices = [sorted(row) + [-1] * (width - len(row)) for row in taken]
    weights = [[probs[t][e] if e >= 0 else zero for e in row] for t, row in enumerate(indices)]
    return _finish(router, indices, weights, num_experts)


def reference_routing(moe, x_TD: torch.Tensor, mask_T: torch.Tensor | None, rederive: bool = True):
    """The routing of ``moe`` as (indices [T, K], weights [T, K], aux_loss, stats).

    With ``rederive``, the top-k and expert-choice routers' decisions are re-derived token by
    token; otherwise, and for the other routers, it is the router's own (seed the RNG identically
    to compare a noisy router in training mode). Routers compute in float32, so re-derived weights
    agree with theirs to float32 rounding only, whatever the layer's dtype.
    """
    from moekit.routing.expert_choice import ExpertChoiceRouter
    from moekit.routing.topk import TopKRouter

    if rederive and isinstance(moe.router, TopKRouter):
        return reference_topk_routing(moe.router, x_TD, mask_T)
    if rederive and isinstance(moe.router, ExpertChoiceRouter):
        return reference_expert_choice_routing(moe.router, x_TD, mask_T)
    routing = moe.route(x_TD, mask_T)
    return routing.indices, routing.weights, routing.aux_loss, routing.stats


# --- the layer -------------------------------------------------------------------------------------------
def _claim(idx: list[list[int]], keep: list[list[bool]], tokens: list[int], cap: int, num_experts: int) -> None:
    """Slots of ``tokens`` (in claim order) take buffer places, choice rank by choice rank."""
    used = [0] * num_experts
    for j in range(len(idx[0]) if idx else 0):
        for t in tokens:
            e = idx[t][j]
            if e >= 0:
                keep[t][j] = used[e] < cap
                used[e] += 1


def _keep(moe, idx: list[list[int]], weights_TK: torch.Tensor, num_real: int, seq_len: int) -> list[list[bool]]:
    """Which slots fit in their buffers: batch-wide capacity, per-sequence capacity, or all."""
    num_tokens, k = len(idx), weights_TK.shape[1]
    keep = [[i >= 0 for i in row] for row in idx]
    order = list(range(num_tokens))
    if moe.batch_prioritized:
        top = [max(row) for row in weights_TK.tolist()]
        order.sort(key=lambda t: -top[t])  # Python's sort is stable, like the fast path's.
    if getattr(moe, "sequence_capacity", None) is not None:
        for s in range(0, num_tokens, seq_len):
            _claim(idx, keep, [t for t in order if s <= t < s + seq_len], moe.sequence_capacity, moe.num_experts)
    elif moe.capacity_factor is not None:
        cap = math.ceil(num_real * k * moe.capacity_factor / moe.num_experts)
        multiple = getattr(moe, "capacity_multiple", 1)
        _claim(idx, keep, order, math.ceil(cap / multiple) * multiple, moe.num_experts)
    return keep


def reference_moe(moe, x: torch.Tensor, mask: torch.Tensor | None = None, routing: str = "router") -> MoEOutput:
    """The layer ``moe`` computed one token-slot at a time with a Python loop.

    Routing: ``routing="router"`` takes the layer's router's decision (so a float64 layer can be
    compared to float64 precision); ``"reference"`` re-derives it (``reference_routing``).
    Capacity, dispatch, expert compute, the input or output gating, the shared experts and the
    combine are re-implemented naively: slots claim buffer places rank by rank, tokens in order
    (or by their top gate with BPR), within each sequence for a per-sequence capacity.
    """
    x_TD = x.reshape(-1, moe.dim)
    mask_T = None if mask is None else mask.reshape(-1)
    if routing not in ("router", "reference"):
        raise ValueError(f"routing={routing!r} is not 'router' or 'reference'")
    indices_TK, weights_TK, aux_loss, stats = reference_routing(moe, x_TD, mask_T, rederive=routing == "reference")
    num_tokens, k = indices_TK.shape
    idx = indices_TK.tolist()
    num_real = num_tokens if mask_T is None else int(mask_T.sum())
    seq_len = x.shape[-2] if x.dim() >= 3 else num_tokens
    keep = _keep(moe, idx, weights_TK.detach(), num_real, seq_len)
    gate_input = getattr(moe, "gate_input", False)
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
            w = weights_TK[t, j].to(x.dtype)
            if gate_input:
                y[t] = y[t] + reference_expert(moe.experts, e, w * x_TD[t])
            else:
                y[t] = y[t] + w * reference_expert(moe.experts, e, x_TD[t])
        if getattr(moe, "shared", None) is not None and (mask_T is None or bool(mask_T[t])):
            y[t] = y[t] + reference_shared(moe.shared, x_TD[t])
    y_TD = torch.stack(y) if y else x_TD.new_zeros(0, moe.dim)
    stats = stats._replace(counts=torch.tensor(counts), dropped=dropped)
    return MoEOutput(y_TD.reshape(x.shape), aux_loss, stats)


def reference_soft_moe(soft, x: torch.Tensor, mask: torch.Tensor | None = None) -> MoEOutput:
    """A ``moekit.SoftMoE`` one sequence, slot and token at a time.

    Slot n of a sequence mixes its real tokens with weights softmax over tokens of ``x_s . phi_n``;
    expert ``n // P`` computes it; a real token's output mixes the slot outputs with weights
    softmax over slots of the same logits; padding tokens take no part and output 0.
    """
    B, S, _ = x.shape
    P, N = soft.slots_per_expert, soft.num_slots
    phi = soft.phi.float()
    if soft.scale is not None:
        phi = soft.scale.float() * phi / torch.sqrt((phi * phi).sum(0, keepdim=True))
    ys, importance = [], [torch.zeros(())] * soft.num_experts
    for b in range(B):
        real = [s for s in range(S) if mask is None or bool(mask[b, s])]
        logits = {}
        for s in range(S):
            x_s = x[b, s].float()
            if soft.scale is not None:
                x_s = x_s / torch.sqrt((x_s * x_s).sum())
            logits[s] = x_s @ phi  # [N]
        slot_out = []
        for n in range(N):
            column = torch.stack([logits[s][n] for s in real]) if real else torch.zeros(0)
            w = torch.exp(column - column.max()) / torch.exp(column - column.max()).sum() if real else column
            slot = sum((w[i].to(x.dtype) * x[b, s] for i, s in enumerate(real)), torch.zeros_like(x[b, 0]))
            slot_out.append(reference_expert(soft.experts, n // P, slot))
        for s in range(S):
            if s not in real:
                ys.append(torch.zeros_like(x[b, s]))
                continue
            c = torch.exp(logits[s] - logits[s].max()) / torch.exp(logits[s] - logits[s].max()).sum()
            ys.append(sum((c[n].to(x.dtype) * slot_out[n] for n in range(N)), torch.zeros_like(x[b, s])))
            for n in range(N):
                importance[n // P] = importance[n // P] + c[n]
    y = torch.stack(ys).reshape(x.shape) if ys else torch.zeros_like(x)
    counts = torch.full((soft.num_experts,), B * P, dtype=torch.long)
    imp = torch.stack(importance)
    stats = RoutingStats(imp, counts.float(), counts, 0, {"importance": _cv_squared(list(imp)),
                                                          "load": torch.zeros(())})
    return MoEOutput(y, torch.zeros(()), stats)
