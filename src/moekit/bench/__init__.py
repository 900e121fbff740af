"""The layer benchmark that ``moekit bench`` runs: timing utility (``timing``), baselines
(``baselines``: the dense-FLOPs limit and the dispatchers of other projects' designs) and the cases
(``layer``), and the ``moekit bench`` job (``cli``). It is part of the package, so an installed
wheel can run it; ``python -m moekit.bench.layer`` runs the cases without the job's ``--out``."""
