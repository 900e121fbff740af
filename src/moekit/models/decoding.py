"""Decoding searches over any step function: greedy, ancestral sampling and beam search.

Legend: B sources, N hypotheses (sources x beams or samples), T prefix length, V vocabulary.

A step function maps ``(prefix_NT, rows_N, parents_N) -> log_probs_NV``: the log-probabilities of
the next token after each prefix. ``rows_N`` names the source of each hypothesis and stays fixed
during a search. ``parents_N`` is None on the first call of a search; afterwards hypothesis i
extends hypothesis ``parents_N[i]`` of the previous call by the last token of its prefix, which lets
a step function keep per-hypothesis caches (it may also ignore it and recompute). Every
prefix starts with a start token (``<bos>``, or an ``<expert_i>`` token for a hard mixture); the
returned sequences hold neither the start token nor ``<eos>``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _check(start_B: torch.Tensor, max_len: int) -> None:
    if start_B.dim() != 1 or start_B.dtype != torch.long:
        raise ValueError(f"start tokens must be a 1-D long tensor, got shape {tuple(start_B.shape)} {start_B.dtype}")
    if max_len < 1:
        raise ValueError(f"max_len={max_len} must be >= 1")


def _strip(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


@torch.no_grad()
def greedy_decode(step_fn: StepFn, start_B: torch.Tensor, max_len: int, eos_id: int, pad_id: int) -> list[list[int]]:
    """The most probable next token at every step, until ``<eos>`` or ``max_len`` tokens."""
    _check(start_B, max_len)
    rows_N = torch.arange(start_B.numel(), device=start_B.device)
    prefix_NT = start_B[:, None]
    done_N = torch.zeros_like(start_B, dtype=torch.bool)
    parents_N = None
    for _ in range(max_len):
        next_N = step_fn(prefix_NT, rows_N, parents_N).argmax(-1)
        parents_N = rows_N
        next_N = torch.where(done_N, torch.full_like(next_N, pad_id), next_N)
        prefix_NT = torch.cat([prefix_NT, next_N[:, None]], dim=1)
        done_N |= next_N == eos_id
        if bool(done_N.all()):
            break
    return [_strip(row[1:], eos_id) for row in prefix_NT.tolist()]


@torch.no_grad()
def sample_decode(step_fn: StepFn, start_B: torch.Tensor, max_len: int, eos_id: int, pad_id: int,
                  num_samples: int, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> list[list[list[int]]]:
    """``num_samples`` ancestral samples per source: result[b][j] is sample j of source b."""
    _check(start_B, max_len)
    if num_samples < 1 or temperature <= 0:
        raise ValueError(f"num_samples={num_samples} must be >= 1 and temperature={temperature} > 0")
    B = start_B.numel()
    rows_N = torch.arange(B, device=start_B.device).repeat_interleave(num_samples)
    prefix_NT = start_B[rows_N][:, None]
    done_N = torch.zeros(rows_N.numel(), dtype=torch.bool, device=start_B.device)
    parents_N, same_N = None, torch.arange(rows_N.numel(), device=start_B.device)
    for _ in range(max_len):
        probs_NV = torch.softmax(step_fn(prefix_NT, rows_N, parents_N) / temperature, dim=-1)
        parents_N = same_N
        next_N = torch.multinomial(probs_NV.cpu(), 1, generator=generator)[:, 0].to(prefix_NT.device)
        next_N = torch.where(done_N, torch.full_like(next_N, pad_id), next_N)
        prefix_NT = torch.cat([prefix_NT, next_N[:, None]], dim=1)
        done_N |= next_N == eos_id
        if bool(done_N.all()):
            break
    seqs = [_strip(row[1:], eos_id) for row in prefix_NT.tolist()]
    return [seqs[b * num_samples : (b + 1) * num_samples] for b in range(B)]


@torch.no_grad()
def beam_search(step_fn: StepFn, start_B: torch.Tensor, max_len: int, eos_id: int, beam_size: int,
                n_best: int = 1, length_penalty: float = 1.0) -> list[list[tuple[list[int], float]]]:
    """Batched beam search; result[b] holds the ``n_best`` hypotheses of source b, best first.

    Each hypothesis comes with its score ``log p / len ** length_penalty`` (len counts ``<eos>``),
    the ranking used by fairseq. A source stops growing once ``beam_size`` hypotheses have ended;
    those still open at ``max_len`` are ended there.
    """
    _check(start_B, max_len)
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best={n_best} must be in [1, beam_size={beam_size}]")
    B, W, dev = start_B.numel(), beam_size, start_B.device
    rows_N = torch.arange(B, device=dev).repeat_interleave(W)
    prefix_NT = start_B[rows_N][:, None]
    # Only beam 0 is live at the start, so the first expansion does not pick W copies of one token.
    scores_BW = torch.full((B, W), float("-inf"), device=dev)
    scores_BW[:, 0] = 0.0
    finished: list[list[tuple[list[int], float]]] = [[] for _ in range(B)]
    parents_N = None
    for t in range(1, max_len + 1):
        logp_NV = step_fn(prefix_NT, rows_N, parents_N).float()
        V = logp_NV.shape[-1]
        cand_BWV = scores_BW[:, :, None] + logp_NV.view(B, W, V)
        # 2W candidates hold at least W that do not end (each beam ends in at most one of them).
        top_scores, top_flat = cand_BWV.view(B, W * V).topk(2 * W, dim=-1)
        beam_B2W, tok_B2W = top_flat // V, top_flat % V
        ends_B2W = (tok_B2W == eos_id) & torch.isfinite(top_scores)
        _collect_finished(finished, prefix_NT.view(B, W, -1), beam_B2W, ends_B2W, top_scores, t, W,
                          length_penalty)
        # The first W candidates that do not end continue.
        rank_B2W = torch.cumsum((~ends_B2W).long(), dim=-1) - 1
        keep_B2W = (~ends_B2W) & (rank_B2W < W)
        pos_BW = keep_B2W.nonzero()[:, 1].view(B, W)
        scores_BW = top_scores.gather(1, pos_BW)
        src_beam_BW = beam_B2W.gather(1, pos_BW)
        new_tok_BW = tok_B2W.gather(1, pos_BW)
        done_B = torch.tensor([len(f) >= W for f in finished], device=dev)
        scores_BW = scores_BW.masked_fill(done_B[:, None], float("-inf"))
        parents_N = (torch.arange(B, device=dev)[:, None] * W + src_beam_BW).view(-1)
        prefix_NT = torch.cat([prefix_NT[parents_N], new_tok_BW.view(-1, 1)], dim=1)
        if bool(done_B.all()):
            break
    for b in range(B):
        for w in range(W):
            if len(finished[b]) < W and torch.isfinite(scores_BW[b, w]):
                seq = prefix_NT[b * W + w, 1:].tolist()
                finished[b].append((seq, float(scores_BW[b, w]) / max(len(seq), 1) ** length_penalty))
    return [sorted(f, key=lambda h: -h[1])[:n_best] for f in finished]


def best_decode(step_fn: StepFn, start_B: torch.Tensor, max_len: int, eos_id: int, pad_id: int,
                beam_size: int) -> list[list[int]]:
    """The single best sequence per row: greedy for ``beam_size <= 1``, else the top beam hypothesis."""
    if beam_size <= 1:
        return greedy_decode(step_fn, start_B, max_len, eos_id, pad_id)
    return [hyps[0][0] for hyps in beam_search(step_fn, start_B, max_len, eos_id, beam_size)]


def _collect_finished(finished, prefix_BWT, beam_B2W, ends_B2W, top_scores_B2W, t: int, W: int,
                      length_penalty: float) -> None:
    # Only an ending among the best W candidates counts (as in fairseq): a worse ending would not
    # have survived had it not ended.
    hits = (ends_B2W[:, :W]).nonzero().tolist()
    for b, j in hits:
        if len(finished[b]) >= W:
            continue
        seq = prefix_BWT[b, int(beam_B2W[b, j]), 1:].tolist()
        finished[b].append((seq, float(top_scores_B2W[b, j]) / t**length_penalty))
