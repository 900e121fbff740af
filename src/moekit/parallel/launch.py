"""Run a function on W local CPU processes joined by a gloo group: for tests, benchmarks and
checking one's own router under expert parallelism without torchrun.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any


def _worker(rank: int, world_size: int, init_file: str, out_dir: str, timeout_s: float, threads: int,
            fn: Callable, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    result_path = Path(out_dir, f"rank{rank}.pkl")
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        result_path.write_bytes(pickle.dumps(("ok", result)))
    except BaseException:
        result_path.write_bytes(pickle.dumps(("error", traceback.format_exc())))
        raise SystemExit(1) from None


def spawn_local(fn: Callable, world_size: int, args: tuple = (), timeout_s: float = 120.0,
                threads: int = 1) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each in its own process.

    ``fn`` must be importable (a module-level function) and its result picklable. The processes
    share a gloo process group (the default group) whose collectives time out after ``timeout_s``.
    Raises ``RuntimeError`` with every failed rank's traceback when a rank fails, and kills the
    rest when the whole run exceeds ``timeout_s``.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="moekit-spawn-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, tmp, timeout_s, threads, fn, args),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s + 60.0  # start-up (imports) on top of the collective timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        results: list[Any] = []
        errors: list[str] = []
        for r in range(world_size):
            path = Path(tmp, f"rank{r}.pkl")
            if r in hung:
                errors.append(f"rank {r}: still running after {timeout_s + 60.0:.0f} s, killed")
            elif not path.exists():
                errors.append(f"rank {r}: exited with code {procs[r].exitcode} without a result")
            else:
                status, value = pickle.loads(path.read_bytes())
                (results if status == "ok" else errors).append(value if status == "ok" else f"rank {r}:\n{value}")
        if errors:
            raise RuntimeError(f"{len(errors)} of {world_size} ranks failed:\n" + "\n".join(errors))
        return results
