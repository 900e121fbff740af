"""The one timing utility of the benchmarks: warm-up, median of repeats, fixed thread count.

Machines here are shared and noisy, so candidates are timed *interleaved* (A B C A B C ...) and
summarised by their medians: slow phases of the machine hit every candidate alike, and the
ratios between candidates are what the benchmarks report.
"""

from __future__ import annotations

import gc
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                     device: str = "cpu", budget_s: float | None = None,
                     min_round_s: float | None = None) -> dict[str, dict]:
    """Median wall time of each callable, run round-robin ``repeats`` times after ``warmup`` rounds.

    A callable slower than ``budget_s`` on its warm-up is run once more only (its median then
    rests on fewer samples; the count is reported). With ``min_round_s``, a callable faster than
    that on its last warm-up runs ``calls`` times back to back in each round and its time is the
    round's mean: a single call of a millisecond measures the wake-up of idle threads and cold
    caches rather than the call in a steady loop, as in serving or generation.

    Returns ``{name: {"median_s", "samples", "times_s", "calls"}}``.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    calls = dict.fromkeys(fns, 1)
    slow = set()
    for w in range(warmup):
        for name, fn in fns.items():
            t = _once(fn, device, calls[name])
            if budget_s is not None and t > budget_s:
                slow.add(name)
                times[name].append(t)
            if min_round_s is not None and w == warmup - 1:
                calls[name] = max(1, math.ceil(min_round_s / max(t, 1e-9)))
    for r in range(repeats):
        for name, fn in fns.items():
            if name in slow and r > 0:
                continue
            times[name].append(_once(fn, device, calls[name]))
    return {name: {"median_s": statistics.median(ts), "samples": len(ts), "times_s": ts, "calls": calls[name]}
            for name, ts in times.items()}


def _once(fn: Callable[[], object], device: str, calls: int = 1) -> float:
    gc.collect()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def peak_memory(fn: Callable[[], object], device: str = "cpu") -> int | None:
    """Peak bytes allocated while ``fn`` runs: CUDA allocator stats, or the CPU profiler's record."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Walk allocations in time order to find the high-water mark of live bytes.
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak


def machine_tag(device: str = "cpu") -> dict:
    """What the results depend on: machine, threads, torch version, date."""
    info = {"machine": platform.node() or "unknown", "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "date": date.today().isoformat(),
            "device": device}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def results_path(directory: Path, stem: str, tag: dict) -> Path:
    """``<dir>/<stem>_<cpu-or-gpu-name>_torch<version>_<date>.json``."""
    hw = tag.get("gpu") or f"cpu{tag['threads']}t"
    safe = "".join(c if c.isalnum() or c in "-." else "-" for c in hw)
    return directory / f"{stem}_{safe}_torch{tag['torch'].split('+')[0]}_{tag['date']}.json"


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
