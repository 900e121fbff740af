"""keep_freed_memory: a large tensor allocated again after being freed reuses the heap's pages.

glibc serves torch's 64-byte-aligned requests with ``posix_memalign``, which cannot reuse a freed
block of exactly the requested size, so the heap may grow a few times (by a whole tensor each time)
before freed blocks coalesce into one that fits. Those growths are the only page faults allowed:
an allocation that does not grow the heap must fault in (almost) nothing, the heap is never handed
back, and some allocations must be served from kept memory. With glibc's defaults every allocation
is a fresh mmap that faults in every page.
"""

import json
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json, resource, sys, torch
import moekit.memory
if sys.argv[1] == "keep":
    assert moekit.memory.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
torch.set_num_threads(1)
steps = []
for _ in range(12):
    faults, brk = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, libc.sbrk(0)
    t = torch.empty(64, 1024, 1024)  # 256 MiB, far above glibc's 32 MiB mmap threshold
    t.fill_(1.0)
    del t
    steps.append([resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, libc.sbrk(0) - brk])
print(json.dumps(steps))
"""
TENSOR = 256 * 2**20
PAGES = TENSOR // 4096


def _steps(mode: str) -> list[tuple[int, int]]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return [tuple(step) for step in json.loads(out.stdout.splitlines()[-1])]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_default_glibc_faults_every_large_allocation_in_again():
    steps = _steps("default")
    assert all(faults > PAGES // 2 for faults, _ in steps[1:]), steps  # mmap'd afresh, unmapped on free
    assert all(growth < TENSOR // 2 for _, growth in steps), steps  # never from the heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_serves_large_tensors_from_kept_pages():
    steps = _steps("keep")
    assert all(growth >= 0 for _, growth in steps), steps  # the heap is never trimmed
    reused = [faults for faults, growth in steps if growth < TENSOR // 2]  # small objects may grow it a little
    assert len(reused) >= 4, steps  # growth by whole tensors stops once freed blocks coalesce
    assert all(faults < PAGES // 100 for faults in reused), steps
    assert sum(growth for _, growth in steps) < 12 * TENSOR, steps
