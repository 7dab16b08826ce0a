"""Keep freed memory in the process for reuse (glibc).

torch allocates CPU tensors with ``malloc``. By default glibc serves every block over 32 MB (and, before its
threshold adapts, every block over 128 KB) with a fresh ``mmap`` and gives it back to the system on ``free``; a
training step allocates and frees hundreds of such blocks (a 512-token window's logits over a 49,152-token
vocabulary are 100 MB), and every one of their pages is faulted in and zeroed by the kernel again, step after
step. ``reuse_freed_memory`` makes ``malloc`` serve all blocks from its heap and keep freed pages, so the next
step reuses them: an adaptation step of SmolLM2-135M on 2 CPU cores that scores every token takes 17-24% less
time. The price is resident memory: what was freed stays with the process (3% more at the peak of that step, 40% in
a small model's step whose large memory bank grew by doubling; BENCHMARKS.md). The ``longmem`` command line calls it
at start; ``LONGMEM_MALLOC=system`` in the environment leaves glibc's default, for a machine short of memory. A
program using the library can call it once, early.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # glibc's mallopt parameters (malloc.h)
_KEEP = 1 << 30  # free memory at the heap's top kept up to 1 GiB instead of 128 KB
_PAD = 64 << 20  # and the heap grown 64 MB at a time


@functools.cache
def reuse_freed_memory() -> bool:
    """Tune glibc's ``malloc`` for repeated large allocations (see the module's docstring): no ``mmap`` per block,
    freed memory kept for reuse. Returns whether it applied: False where the C library is not glibc (macOS, musl),
    where it changes nothing, and under ``LONGMEM_MALLOC=system``."""
    if not sys.platform.startswith("linux") or os.environ.get("LONGMEM_MALLOC", "").lower() == "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _KEEP) and mallopt(_M_TOP_PAD, _PAD))
