"""moekit.bench.timing.time_interleaved: round-robin order, calls per round, slow candidates."""

import time

from moekit.bench.timing import time_interleaved


def test_rounds_are_interleaved_and_each_reports_its_samples():
    order = []
    out = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert all(r["samples"] == 3 and r["calls"] == 1 and len(r["times_s"]) == 3 for r in out.values())


def test_fast_calls_run_back_to_back_and_report_the_time_per_call():
    counts = {"fast": 0, "slow": 0}

    def fast():
        counts["fast"] += 1

    def slow():
        counts["slow"] += 1
        time.sleep(0.03)

    out = time_interleaved({"fast": fast, "slow": slow}, repeats=2, warmup=1, min_round_s=0.02)
    assert out["slow"]["calls"] == 1 and counts["slow"] == 3
    assert out["fast"]["calls"] > 100 and counts["fast"] == 1 + 2 * out["fast"]["calls"]
    assert out["fast"]["median_s"] < 0.02 / 100 < out["slow"]["median_s"]


def test_a_candidate_over_budget_runs_once_after_its_warm_up():
    counts = {"n": 0}

    def slow():
        counts["n"] += 1
        time.sleep(0.02)

    out = time_interleaved({"slow": slow}, repeats=4, warmup=1, budget_s=0.01)
    assert counts["n"] == 2 and out["slow"]["samples"] == 2
