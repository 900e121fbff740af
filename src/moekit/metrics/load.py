"""Expert load metrics from ``RoutingStats.counts``: load relative to the ideal, its maximum, and dead experts.

Legend: E experts.

The ideal load is the even share ``sum(counts) / E``. ``fraction_of_ideal[e] = counts[e] / ideal``
(1 everywhere at perfect balance, E for one expert taking everything), ``max_over_ideal`` its
largest value (what capacity planning must accommodate; Shazeer et al. Table 6 calls it
max/mean load), and ``dead`` the number of experts that got no token. Over one batch a rare
expert may idle by chance; ``LoadWindow`` sums the counts of the last few steps, so an expert
counts as dead only if it got no token in the whole window.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import torch

from moekit.types import RoutingStats


class LoadMetrics(NamedTuple):
    """``fraction_of_ideal`` [E] float, ``max_over_ideal`` float, ``dead`` int, ``tokens`` int (the slots counted).

    With no slot at all the fractions and ``max_over_ideal`` are 0 and every expert is dead.
    """

    fraction_of_ideal: torch.Tensor
    max_over_ideal: float
    dead: int
    tokens: int


def _counts(source: RoutingStats | torch.Tensor) -> torch.Tensor:
    counts_E = source.counts if isinstance(source, RoutingStats) else source
    if not isinstance(counts_E, torch.Tensor) or counts_E.dim() != 1 or counts_E.numel() == 0:
        raise ValueError(f"expected RoutingStats or [E] counts, got {getattr(counts_E, 'shape', counts_E)!r}")
    if counts_E.is_floating_point() or (counts_E < 0).any():
        raise ValueError(f"counts must be non-negative integers, got {counts_E.tolist()}")
    return counts_E.detach().to("cpu", torch.long)


def load_metrics(source: RoutingStats | torch.Tensor) -> LoadMetrics:
    """The load metrics of one batch's ``RoutingStats`` (its ``counts``) or of [E] integer counts."""
    counts_E = _counts(source)
    total = int(counts_E.sum())
    if total == 0:
        return LoadMetrics(torch.zeros(counts_E.numel(), dtype=torch.float64), 0.0, counts_E.numel(), 0)
    fraction_E = counts_E.double() * counts_E.numel() / total
    return LoadMetrics(fraction_E, float(fraction_E.max()), int((counts_E == 0).sum()), total)


class LoadWindow:
    """The load metrics over the last ``window`` steps of one layer.

    ``update(stats)`` after each step (``RoutingStats`` or [E] counts); ``metrics()`` over the summed
    counts of the steps in the window.
    """

    def __init__(self, num_experts: int, window: int = 100):
        for name, value in (("num_experts", num_experts), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        self.num_experts, self.window = num_experts, window
        self._steps: deque[torch.Tensor] = deque(maxlen=window)

    def update(self, source: RoutingStats | torch.Tensor) -> None:
        counts_E = _counts(source)
        if counts_E.numel() != self.num_experts:
            raise ValueError(f"counts have {counts_E.numel()} experts, the window {self.num_experts}")
        self._steps.append(counts_E)

    def __len__(self) -> int:
        return len(self._steps)

    def counts(self) -> torch.Tensor:
        """[E] long, the counts summed over the window."""
        return torch.stack(list(self._steps)).sum(0) if self._steps else torch.zeros(self.num_experts, dtype=torch.long)

    def metrics(self) -> LoadMetrics:
        return load_metrics(self.counts())
