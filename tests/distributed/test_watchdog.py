"""The watchdog on 2 gloo ranks: a rank stopped by SIGSTOP is named while the other waits for it.

Rank 1 stops itself (SIGSTOP: every thread of it, its watchdog's included) just before a
collective of the training loop; rank 0 blocks in that collective. Rank 0's watchdog must name
rank 1 and the collective well before the collective's timeout; its report handler then sends
SIGCONT, and both ranks finish normally.
"""

import os
import signal

import torch
import torch.distributed as dist
from torch import nn

from moekit.parallel import spawn_local
from moekit.train.loop import LoopConfig, StepOutput, TrainState, train
from moekit.train.strategy import ExpertParallel
from moekit.train.watchdog import Watchdog, group_store


def _stopped_rank(rank, world_size):
    pids = [None] * world_size
    dist.all_gather_object(pids, os.getpid())
    reports = []

    def report(message):  # rank 0: note the report, then wake rank 1 up
        reports.append(message)
        os.kill(pids[1], signal.SIGCONT)

    par = ExpertParallel(rank, world_size, torch.device("cpu"))
    par.watchdog = Watchdog(group_store(), rank, world_size, after_s=1.0, timeout_s=120, interval_s=0.1,
                            report=report if rank == 0 else lambda message: None).start()
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)

    def step(i):
        if rank == 1 and i == 2:
            os.kill(os.getpid(), signal.SIGSTOP)  # stopped in its step 3, before the gradient all_reduce
        loss = model(par.shard(x)).pow(2).mean()
        return StepOutput(loss, {"loss": par.mean(loss.detach()).item()})

    state = train(model, opt, TrainState(), LoopConfig(4, checkpoint_every=100), step, lambda s: None, desc="net",
                  quiet=True, strategy=par)
    par.watchdog.stop()
    return state.step, reports


def test_a_stopped_rank_is_named_by_the_rank_waiting_for_it():
    (steps0, reports0), (steps1, reports1) = spawn_local(_stopped_rank, 2, timeout_s=120)
    assert steps0 == steps1 == 4  # woken up, both finished
    assert reports1 == []
    (report,) = reports0  # one report, then SIGCONT ended the wait
    # Rank 1 stopped before its first collective of step 3 (the loss's mean); rank 0 waits there. Where
    # rank 1 was last seen depends on when its thread last published before the stop.
    assert report.startswith("moekit: rank 0 has waited 1 s in the all_reduce of a mean over the ranks during "
                             "training step 3 of net for rank 1 (behind: last seen at ")
    assert "stopped or hung?)" in report and "times out after 120 s (--timeout)" in report
