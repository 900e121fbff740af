"""One-to-many pair data: the JSON-lines format, a synthetic set with known patterns, batching.

Legend: B pairs in a batch, S source length, T target length (+1 for the start/end token).

An example is a source with one or more targets. Training uses every (source, target) pair;
evaluation compares the K outputs of a source with all its targets (the references).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from moekit.data.corpus import DataFileError, tokenize
from moekit.data.vocab import SEQ2SEQ_SPECIALS, Vocab


class PairDataError(DataFileError):
    """A pair data file cannot be used; the message names the file and the line."""


class Example(NamedTuple):
    source: str
    targets: list[str]


def normalize(text: str) -> str:
    """The text as the models see it (``moekit.data.tokenize``: lower-cased words and punctuation
    marks) joined by single spaces: what the metrics compare."""
    return " ".join(tokenize(text))


def read_jsonl(path: str | Path) -> list[Example]:
    """Examples from a UTF-8 file of ``{"source": str, "targets": [str, ...]}`` lines.

    Blank lines are skipped. Anything else that is not such an object raises ``PairDataError``
    naming the file and the 1-based line number.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PairDataError(f"cannot read pair data {str(path)!r}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise PairDataError(f"cannot read pair data {str(path)!r}: {e}") from e
    examples = []
    for no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            examples.append(_parse_line(line, f"{path}:{no}"))
    if not examples:
        raise PairDataError(f"pair data {str(path)!r} holds no example")
    return examples


def _parse_line(line: str, where: str) -> Example:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise PairDataError(f"{where}: not valid JSON ({e.msg})") from e
    if not isinstance(obj, dict):
        raise PairDataError(f"{where}: expected an object with 'source' and 'targets', got {type(obj).__name__}")
    source, targets = obj.get("source"), obj.get("targets")
    if not isinstance(source, str) or not tokenize(source):
        raise PairDataError(f"{where}: 'source' must be a non-empty string, got {source!r}")
    if (not isinstance(targets, list) or not targets
            or not all(isinstance(t, str) and tokenize(t) for t in targets)):
        raise PairDataError(f"{where}: 'targets' must be a non-empty list of non-empty strings, got {targets!r}")
    return Example(source, list(targets))


def write_jsonl(path: str | Path, examples: Iterable[Example]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"source": ex.source, "targets": list(ex.targets)}) + "\n")


# Deterministic rewrite rules over a source of alphabet tokens; each is one ground-truth pattern.
SYNTHETIC_RULES: tuple[str, ...] = ("copy", "shift", "shift_back", "reverse", "rotate", "swap_pairs")


def _apply_rule(rule: str, ids: list[int], alphabet: int) -> list[int]:
    if rule == "copy":
        return list(ids)
    if rule == "reverse":
        return ids[::-1]
    if rule == "shift":
        return [(i + 1) % alphabet for i in ids]
    if rule == "rotate":
        return ids[1:] + ids[:1]
    if rule == "swap_pairs":
        out = list(ids)
        for i in range(0, len(out) - 1, 2):
            out[i], out[i + 1] = out[i + 1], out[i]
        return out
    if rule == "shift_back":
        return [(i - 1) % alphabet for i in ids]
    raise ValueError(f"unknown synthetic rule {rule!r}")


def synthetic_examples(n: int, k: int, seed: int = 0, alphabet: int = 16, min_len: int = 4,
                       max_len: int = 8) -> list[Example]:
    """``n`` sources of random alphabet tokens, each with the targets of the first ``k`` rules.

    ``targets[j]`` is always rule j's rewrite, so the ground-truth pattern of a pair is its index.
    Sources are distinct, and no two rules give the same target for any of them.
    """
    if not 1 <= k <= len(SYNTHETIC_RULES):
        raise ValueError(f"k={k} patterns: the synthetic set has rules for 1 to {len(SYNTHETIC_RULES)}")
    if not 2 <= min_len <= max_len or alphabet < 3:
        raise ValueError(f"need 2 <= min_len={min_len} <= max_len={max_len} and alphabet={alphabet} >= 3")
    rng = random.Random(seed)
    rules = SYNTHETIC_RULES[:k]
    seen: set[tuple[int, ...]] = set()
    out: list[Example] = []
    while len(out) < n:
        ids = [rng.randrange(alphabet) for _ in range(rng.randint(min_len, max_len))]
        targets = [tuple(_apply_rule(r, ids, alphabet)) for r in rules]
        if tuple(ids) in seen or len(set(targets)) < k:
            continue
        seen.add(tuple(ids))
        words = lambda seq: " ".join(f"w{i}" for i in seq)  # noqa: E731
        out.append(Example(words(ids), [words(t) for t in targets]))
    return out


def split_examples(examples: Sequence[Example], test_fraction: float = 0.1) -> tuple[list, list]:
    """Contiguous split: the last ``test_fraction`` of the examples (at least one) is the test set."""
    if len(examples) < 2:
        raise ValueError(f"need at least 2 examples to split into train and test, got {len(examples)}")
    n_test = min(max(1, round(len(examples) * test_fraction)), len(examples) - 1)
    return list(examples[:-n_test]), list(examples[-n_test:])


def pair_vocab(examples: Sequence[Example], max_size: int, extra: Sequence[str] = ()) -> Vocab:
    """The vocabulary of the sources and targets of ``examples``: ``<pad> <unk> <bos> <eos>``, then
    ``extra`` special tokens (e.g. ``<expert_0>``), then the words."""
    texts = [e.source for e in examples] + [t for e in examples for t in e.targets]
    return Vocab.build((tok for text in texts for tok in tokenize(text)), max_size, (*SEQ2SEQ_SPECIALS, *extra))


def encode_text(vocab: Vocab, text: str, max_len: int | None = None) -> list[int]:
    """The ids of ``text``'s tokens, at most ``max_len`` of them."""
    return vocab.encode(tokenize(text)).tolist()[:max_len]


def decode_text(vocab: Vocab, ids: Iterable[int]) -> str:
    """The words of ``ids`` joined by spaces, the structural tokens left out."""
    return " ".join(vocab.decode(ids, hide_specials=True))


class PairBatch(NamedTuple):
    src: torch.Tensor  # [B, S] long, ends with <eos>, right-padded
    tgt_in: torch.Tensor  # [B, T] long, <bos> + target, right-padded
    tgt_out: torch.Tensor  # [B, T] long, target + <eos>, right-padded
    labels: torch.Tensor  # [B] long, ground-truth pattern of each pair (-1 when unknown)


@dataclass
class EncodedPairs:
    """All training pairs as id lists; ``labels[i]`` is the target's index among its source's targets."""

    src: list[list[int]]
    tgt: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.src)


def encode_pairs(examples: Sequence[Example], vocab: Vocab, max_src: int, max_tgt: int) -> EncodedPairs:
    src, tgt, labels = [], [], []
    for ex in examples:
        s = encode_text(vocab, ex.source, max_src - 1) + [vocab.eos_id]
        for j, target in enumerate(ex.targets):
            src.append(s)
            tgt.append(encode_text(vocab, target, max_tgt - 1))
            labels.append(j)
    return EncodedPairs(src, tgt, labels)


def pad(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
    """[len(seqs), longest] long, right-padded."""
    width = max(1, max(len(s) for s in seqs))
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def make_batch(pairs: EncodedPairs, index: Sequence[int], vocab: Vocab) -> PairBatch:
    src = pad([pairs.src[i] for i in index], vocab.pad_id)
    tgt_in = pad([[vocab.bos_id, *pairs.tgt[i]] for i in index], vocab.pad_id)
    tgt_out = pad([[*pairs.tgt[i], vocab.eos_id] for i in index], vocab.pad_id)
    return PairBatch(src, tgt_in, tgt_out, torch.tensor([pairs.labels[i] for i in index], dtype=torch.long))
