"""``moekit`` under torchrun with a SIGINT raised on one rank during its N-th training step (for tests).

Usage: ``torchrun ... interrupted_run.py STEP RANK JOB [options]``. The signal reaches that rank
only, as a Ctrl-C in one process would: the ranks must still agree to stop after the same step.
"""

import signal
import sys

from moekit.cli import main
from moekit.train.strategy import ExpertParallel

STEP, RANK = int(sys.argv[1]), int(sys.argv[2])
_original = ExpertParallel.clip_and_step
_calls = 0


def clip_and_step(self, *args):  # called once per training step, counted over the whole job
    global _calls
    _calls += 1
    if _calls == STEP and self.rank == RANK:
        signal.raise_signal(signal.SIGINT)
    return _original(self, *args)


ExpertParallel.clip_and_step = clip_and_step
sys.exit(main(sys.argv[3:]))
