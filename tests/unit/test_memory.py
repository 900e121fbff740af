"""keep_freed_memory: after it, a large tensor allocated again after being freed faults in no new pages."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
import moekit.memory
if sys.argv[1] == "keep":
    assert moekit.memory.keep_freed_memory()
torch.set_num_threads(1)
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(64, 1024, 1024)  # 256 MiB, far above glibc's 32 MiB mmap threshold
    t.fill_(1.0)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""


def _last_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_refaulting_large_tensors():
    pages = 256 * 2**20 // 4096
    assert _last_faults("default") > pages // 2  # glibc unmaps on free: every page faults in again
    assert _last_faults("keep") < pages // 100
