"""``moekit facts``: config (``config``), the job (``job``), its outputs (``report``)."""

from moekit.jobs.facts.job import add_args, run

__all__ = ["add_args", "run"]
