"""``moekit`` under torchrun with one rank stopped by SIGSTOP in its N-th training step (for tests).

Usage: ``torchrun ... stopped_run.py STEP RANK PIDFILE JOB [options]``. That rank writes its pid to
PIDFILE and stops itself (all its threads, its watchdog's included) before the step's gradient
all-reduce; the test sends SIGCONT once the other rank's watchdog has named it.
"""

import os
import signal
import sys
from pathlib import Path

from moekit.cli import main
from moekit.train.strategy import ExpertParallel

STEP, RANK, PIDFILE = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
_original = ExpertParallel.clip_and_step
_calls = 0


def clip_and_step(self, *args):  # called once per training step, counted over the whole job
    global _calls
    _calls += 1
    if _calls == STEP and self.rank == RANK:
        PIDFILE.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)
    return _original(self, *args)


ExpertParallel.clip_and_step = clip_and_step
sys.exit(main(sys.argv[4:]))
