"""How well learned patterns (mixture components) match known ground-truth labels."""

from __future__ import annotations

from collections.abc import Sequence


def purity(assigned: Sequence[int], labels: Sequence[int], k: int) -> dict:
    """How well patterns match known labels, by majority mapping.

    Each pattern is mapped to the label most of its pairs carry; ``purity`` is the share of pairs
    whose label is their pattern's majority label, ``per_pattern`` the same within each pattern
    (None for a pattern with no pair), ``mapping`` the majority label of each pattern.
    """
    if len(assigned) != len(labels):
        raise ValueError(f"{len(assigned)} assignments for {len(labels)} labels")
    per: list[float | None] = []
    mapping: list[int | None] = []
    hits = 0
    for p in range(k):
        mine = [lab for a, lab in zip(assigned, labels, strict=True) if a == p]
        if not mine:
            per.append(None)
            mapping.append(None)
            continue
        top = max(set(mine), key=lambda lab: (mine.count(lab), -lab))
        per.append(mine.count(top) / len(mine))
        mapping.append(top)
        hits += mine.count(top)
    return {"purity": hits / max(len(assigned), 1), "per_pattern": per, "mapping": mapping}
