"""The watchdog's reports, driven by hand: a shared in-memory store, a clock that only moves when told."""

import argparse
import threading

import pytest
import torch.distributed as dist

from moekit.parallel.groups import DistInfo
from moekit.train import strategy
from moekit.train.watchdog import JoinWatch, Watchdog


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _ranks(n=3, after_s=10.0, interval_s=1.0):
    store, clock = dist.HashStore(), Clock()
    return [Watchdog(store, r, n, after_s, timeout_s=300, interval_s=interval_s, clock=clock) for r in range(n)], clock


def _advance(clock, dogs, seconds, step=1.0):
    """Let ``seconds`` pass with every watchdog in ``dogs`` looking once per second; rank 0's reports."""
    reports = []
    for _ in range(int(seconds / step)):
        clock.now += step
        for dog in dogs:
            message = dog.check()
            if dog is dogs[0] and message:
                reports.append(message)
    return reports


def test_a_rank_behind_is_named_with_where_it_last_was():
    (r0, r1, r2), clock = _ranks()
    for dog in (r0, r1, r2):
        dog.enter("training step 1 of demo")
    r0.enter("the all_reduce of the gradients during training step 1 of demo")
    r2.enter("the all_reduce of the gradients during training step 1 of demo")
    # r1 is still in its forward pass (alive: its thread keeps publishing).
    assert _advance(clock, [r0, r1, r2], 9) == []  # not yet: 9 s < 10 s
    (report,) = _advance(clock, [r0, r1, r2], 1)
    assert report == ("moekit: rank 0 has waited 10 s in the all_reduce of the gradients during training step 1 of "
                      "demo for rank 1 (behind: last seen at training step 1 of demo); the collective times out after "
                      "300 s (--timeout)")


def test_a_stopped_rank_is_named_as_silent_even_at_the_same_point():
    (r0, r1), clock = _ranks(n=2)
    r0.enter("the all_reduce of the stop flag during training step 4 of demo")
    r1.enter("the all_reduce of the stop flag during training step 4 of demo")
    r1.check()  # its last word, then SIGSTOP: its thread stops with it
    (report,) = _advance(clock, [r0], 10)
    # Silence is timed from rank 0's first look at the record, one interval after rank 1's last word.
    assert "for rank 1 (last seen at the all_reduce of the stop flag during training step 4 of demo; silent for 9 s: " \
           "stopped or hung?)" in report


def test_ranks_all_present_and_alive_are_working_not_reported():
    (r0, r1), clock = _ranks(n=2)
    r0.enter("rank 0's work on --out and its broadcast")
    r1.enter("rank 0's work on --out and its broadcast")
    assert _advance(clock, [r0, r1], 60) == []  # rank 1 waits for rank 0's long write: nobody is missing


def test_reports_repeat_every_after_s_and_stop_when_the_rank_arrives():
    (r0, r1), clock = _ranks(n=2)
    r0.enter("point A")
    reports = _advance(clock, [r0, r1], 35)
    assert [r.split(" in ")[0] for r in reports] == [f"moekit: rank 0 has waited {s} s" for s in (10, 20, 30)]
    r1.enter("point A")
    r0.enter("point B")
    r1.enter("point B")
    assert _advance(clock, [r0, r1], 30) == []


def test_a_rank_that_never_spoke_is_named():
    (r0, _), clock = _ranks(n=2)
    r0.enter("point A")
    (report,) = _advance(clock, [r0], 10)
    assert "for rank 1 (no word from it for 9 s)" in report  # timed from rank 0's first look


def test_the_thread_reports_through_its_callback_and_stops():
    seen, done = [], threading.Event()
    store = dist.HashStore()

    def report(message):
        seen.append(message)
        done.set()

    dog = Watchdog(store, 0, 2, after_s=0.05, interval_s=0.01, report=report).start()
    dog.enter("point A")  # rank 1 never comes
    assert done.wait(10)
    dog.stop()
    assert "rank 0 has waited" in seen[0] and "rank 1" in seen[0]


def test_a_start_up_waiting_for_ranks_that_do_not_join_is_reported():
    seen = []
    with JoinWatch(0, 4, after_s=0.02, timeout_s=300, report=seen.append):
        threading.Event().wait(0.1)
    assert seen and seen[0].startswith("moekit: rank 0 has waited 0 s for the other ranks of 4 to join")
    assert "--timeout" in seen[0]


@pytest.mark.parametrize("given, timeout_s, watchdog_s", [([], 300.0, 60.0), (["--timeout", "30", "--watchdog", "5"],
                                                                           30.0, 5.0)])
def test_the_options_reach_the_process_group_and_the_watchdog(monkeypatch, given, timeout_s, watchdog_s):
    parser = argparse.ArgumentParser()
    strategy.add_parallel_arg(parser, "lm", "")
    args = parser.parse_args(["--expert-parallel", *given])
    seen = {}

    def init_distributed(device, timeout_s):
        seen["timeout_s"] = timeout_s
        return DistInfo(0, 1, 0, device)

    class JoinWatchSpy(JoinWatch):
        def __init__(self, rank, world_size, after_s, timeout_s, report=None):
            seen["join_after_s"] = after_s
            super().__init__(rank, world_size, after_s, timeout_s, report)

    monkeypatch.setattr("moekit.parallel.init_distributed", init_distributed)
    monkeypatch.setattr("moekit.parallel.check_same_config", lambda *a, **k: None)
    monkeypatch.setattr(strategy, "JoinWatch", JoinWatchSpy)
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args.job, args.device = "lm", "cpu"
    par, _ = strategy.from_args(args)
    assert seen == {"timeout_s": timeout_s, "join_after_s": watchdog_s}
    par.close()


@pytest.mark.parametrize("option, value", [("--timeout", "0"), ("--timeout", "inf"), ("--watchdog", "-1")])
def test_bad_seconds_are_refused(option, value):
    parser = argparse.ArgumentParser(exit_on_error=False)
    strategy.add_parallel_arg(parser, "lm", "")
    with pytest.raises(argparse.ArgumentError, match=f"{option}: must be"):
        parser.parse_args([option, value])
