"""The layer benchmark that ``moekit bench`` runs: timing utility (``timing``), baselines
(``baselines``: the dense-FLOPs limit and the dispatchers of other projects' designs) and the cases
(``layer``). It is part of the package, so an installed wheel can run it."""

from moekit.bench.cli import add_args, run

__all__ = ["add_args", "run"]
