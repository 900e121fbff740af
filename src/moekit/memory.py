"""CPU memory: make glibc keep freed memory for reuse instead of handing it back to the kernel.

A training step allocates its large tensors afresh (activations, and with
``zero_grad(set_to_none=True)`` every weight gradient: 1 GiB per step for 256 experts of
512 x 1024). glibc serves blocks over 32 MiB with ``mmap`` and unmaps them on free, so each step
page-faults all of that memory in again: measured here, ~0.45 s of kernel time per GiB, a third
of a step at E=256. jemalloc and tcmalloc keep freed memory by default; ``keep_freed_memory``
gives glibc the same behaviour for the whole process. The process then keeps its peak footprint.

glibc (2.36) cannot serve torch's 64-byte-aligned ``posix_memalign`` request from a freed block of
exactly that size, so in the first steps the heap may grow a few times by a whole tensor before
freed blocks coalesce into ones that fit; after that a repeated step faults in no new pages.

The same effect without code: ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295``
in the environment, or preloading jemalloc/tcmalloc (``LD_PRELOAD``).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt(3) parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never trim it (``mallopt``); process-wide.

    Returns True when glibc accepted both settings, False where the C library is not glibc
    (nothing is changed then). Call it once, early; it cannot be undone for memory already kept.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
