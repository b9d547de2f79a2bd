"""Keep freed memory in the process between training steps (glibc only).

Why: a CPU training step frees and allocates the same multi-MB activation buffers hundreds of
times. With glibc's defaults many go back to the kernel (``munmap`` of mmapped chunks, trimming
of the heap top) and return as fresh zero-filled pages: about a million page faults per 20
steps of the embedded pretraining, a quarter of its time spent in the kernel. Raising the mmap
threshold to its maximum (32 MB) and the trim threshold to 2 GB keeps those buffers in the heap:
the bf16 step on 2 cores went from 254 to 184 ms (sys time 2.0 -> 0.5 s per 18 steps; the
side-by-side numbers are in benchmarks/README.md, "CPU step"). The cost is that the process
keeps its peak heap instead of shrinking after it.
"""

from __future__ import annotations

import ctypes
import platform
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (and children it forks); False
    where the C library is not glibc, or refuses, and nothing changed."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
