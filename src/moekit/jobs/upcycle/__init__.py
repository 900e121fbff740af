"""``moekit upcycle``: config (``config``), the job (``job``), its outputs (``report``).

Importing it does not import transformers (``moekit --help`` builds every job's options); the
job checks for it when it runs.
"""

from moekit.jobs.upcycle.job import add_args, run

__all__ = ["add_args", "run"]
