"""``moekit patterns``: config (``config``), the job (``job``), its outputs (``report``)."""

from moekit.jobs.patterns.job import add_args, run

__all__ = ["add_args", "run"]
