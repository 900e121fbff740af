"""Quality and diversity of K outputs per input, as pure functions of strings.

Legend: B inputs, K outputs per input, R references of one input (R may differ between inputs).

``outputs[b][k]`` is output k of input b; ``references[b]`` is the list of references of input b.
BLEU is sacrebleu's corpus BLEU (0-100). Following Shen et al. 2019 ("Mixture models for diverse
machine translation"): pattern-level diversity is the pairwise BLEU among the K outputs of an
input (lower = more diverse), coverage is the share of references that are the closest
reference of at least one output. Corpus-level diversity is distinct-n (Li et al. 2016).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from sacrebleu.metrics import BLEU

Outputs = Sequence[Sequence[str]]
References = Sequence[Sequence[str]]


def _check(outputs: Outputs, references: References | None = None) -> int:
    if not outputs:
        raise ValueError("outputs is empty")
    k = len(outputs[0])
    for b, outs in enumerate(outputs):
        if len(outs) != k or k == 0:
            raise ValueError(f"input {b} has {len(outs)} outputs, expected the same K={k} >= 1 for every input")
    if references is not None:
        if len(references) != len(outputs):
            raise ValueError(f"{len(references)} reference lists for {len(outputs)} inputs")
        for b, refs in enumerate(references):
            if not refs:
                raise ValueError(f"input {b} has no reference")
    return k


def _ref_streams(references: References) -> list[list[str | None]]:
    # sacrebleu takes one stream per reference position; None fills in for inputs with fewer.
    width = max(len(r) for r in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


def corpus_bleu(hypotheses: Sequence[str], references: References, tokenize: str = "13a") -> float:
    """Multi-reference corpus BLEU of one hypothesis per input."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference lists")
    # force: text given as word tokens ("none") is tokenized on purpose; no warning about it.
    bleu = BLEU(tokenize=tokenize, force=tokenize == "none")
    # sacrebleu takes None for a reference a hypothesis does not have (fewer references than others).
    streams = cast(Sequence[Sequence[str]], _ref_streams(references))
    return float(bleu.corpus_score(list(hypotheses), streams).score)


def sentence_bleu(hypothesis: str, references: Sequence[str], tokenize: str = "13a") -> float:
    """Smoothed sentence BLEU (sacrebleu's ``exp`` smoothing, effective order)."""
    return float(BLEU(tokenize=tokenize, effective_order=True).sentence_score(hypothesis, list(references)).score)


def bleu_per_output(outputs: Outputs, references: References, tokenize: str = "13a") -> list[float]:
    """[K] corpus BLEU of the k-th output of every input."""
    k = _check(outputs, references)
    return [corpus_bleu([o[j] for o in outputs], references, tokenize) for j in range(k)]


def best_output_index(outputs: Outputs, references: References, tokenize: str = "13a") -> list[int]:
    """[B] index of the output with the highest sentence BLEU; the first one wins a tie."""
    _check(outputs, references)
    best = []
    for outs, refs in zip(outputs, references, strict=True):
        scores = [sentence_bleu(o, refs, tokenize) for o in outs]
        best.append(max(range(len(outs)), key=lambda j: (scores[j], -j)))
    return best


def oracle_bleu(outputs: Outputs, references: References, tokenize: str = "13a") -> float:
    """Corpus BLEU of the best-of-K output of each input (chosen by sentence BLEU)."""
    best = best_output_index(outputs, references, tokenize)
    return corpus_bleu([outs[j] for outs, j in zip(outputs, best, strict=True)], references, tokenize)


def pairwise_bleu(outputs: Outputs, tokenize: str = "13a") -> float:
    """Mean corpus BLEU of output i against output j over all ordered pairs i != j (Shen et al.).

    100 when the K outputs of every input are identical; lower is more diverse. K = 1 has no pair:
    the result is 100 (no diversity at all).
    """
    k = _check(outputs)
    if k == 1:
        return 100.0
    scores = [corpus_bleu([o[i] for o in outputs], [[o[j]] for o in outputs], tokenize)
              for i in range(k) for j in range(k) if i != j]
    return sum(scores) / len(scores)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the whitespace tokens of ``texts`` (0 when there are none)."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    seen, total = set(), 0
    for text in texts:
        toks = text.split()
        grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def _scores(outs: Sequence[str], refs: Sequence[str], tokenize: str) -> list[list[float]]:
    """[K][R] sentence BLEU of every output against every single reference."""
    return [[sentence_bleu(o, [r], tokenize) for r in refs] for o in outs]


def refs_covered(outputs: Outputs, references: References, tokenize: str = "13a",
                 min_bleu: float = 0.0) -> float:
    """Share of all references that are the closest reference (by sentence BLEU) of some output.

    The first reference wins a tie. ``min_bleu`` > 0 also asks that output to reach that sentence
    BLEU against it (100 means an exact match, the strict reading for synthetic data).
    """
    _check(outputs, references)
    covered = total = 0
    for outs, refs in zip(outputs, references, strict=True):
        hit: set[int] = set()
        for row in _scores(outs, refs, tokenize):
            j = max(range(len(refs)), key=lambda i: (row[i], -i))
            if row[j] >= min_bleu:
                hit.add(j)
        covered += len(hit)
        total += len(refs)
    return covered / total


def closest_output_usage(outputs: Outputs, references: References, tokenize: str = "13a") -> list[float]:
    """[K] share of references whose closest output (by sentence BLEU) is output k.

    Outputs tied for closest share the reference equally, so K identical outputs get 1/K each.
    For a model whose output k comes from pattern k this is the per-pattern usage at test time.
    """
    k = _check(outputs, references)
    usage, total = [0.0] * k, 0
    for outs, refs in zip(outputs, references, strict=True):
        scores = _scores(outs, refs, tokenize)
        for r in range(len(refs)):
            best = max(scores[j][r] for j in range(k))
            winners = [j for j in range(k) if scores[j][r] == best]
            for j in winners:
                usage[j] += 1.0 / len(winners)
        total += len(refs)
    return [u / total for u in usage]


def pattern_usage(indices: Sequence[int], k: int) -> list[float]:
    """[K] share of ``indices`` (e.g. the training assignments) that falls on each pattern."""
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    counts = [0] * k
    for i in indices:
        if not 0 <= i < k:
            raise ValueError(f"pattern index {i} is outside [0, {k})")
        counts[i] += 1
    n = max(len(indices), 1)
    return [c / n for c in counts]


def generation_metrics(outputs: Outputs, references: References, tokenize: str = "13a") -> dict:
    """Every metric of one model's outputs, as written to ``metrics.json``."""
    k = _check(outputs, references)
    flat = [o for outs in outputs for o in outs]
    per_output = bleu_per_output(outputs, references, tokenize)
    best = best_output_index(outputs, references, tokenize)
    oracle = corpus_bleu([outs[j] for outs, j in zip(outputs, best, strict=True)], references, tokenize)
    return {
        "bleu": sum(per_output) / k,
        "bleu_per_output": per_output,
        "oracle_bleu": oracle,
        "pairwise_bleu": pairwise_bleu(outputs, tokenize),
        "distinct_1": distinct_n(flat, 1),
        "distinct_2": distinct_n(flat, 2),
        "refs_covered": refs_covered(outputs, references, tokenize),
        "pattern_usage": closest_output_usage(outputs, references, tokenize),
        "num_inputs": len(outputs),
        "k": k,
    }
