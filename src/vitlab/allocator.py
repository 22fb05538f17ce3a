"""Keep freed memory in the process instead of handing it back to the OS (glibc only).

glibc serves large blocks with mmap and trims the heap top eagerly, so every step of a training or inference loop
unmaps its activations when they are freed and page-faults them in again on the next step, a sizeable share of a
CPU step (docs/performance.md). Fixed thresholds stop that, at the cost of a process that keeps its peak heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _libc() -> ctypes.CDLL | None:
    """glibc, where this process runs on it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 2**31 - 1,
                      top_pad: int = 256 << 20) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; returns False where there is no glibc."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)  # musl and other libcs have no mallopt
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold), (_M_TOP_PAD, top_pad)))


def release_freed_memory() -> bool:
    """Hand the freed pages of every heap back to the OS now (glibc's `malloc_trim`); False where there is no
    glibc. For long-running servers: requests of varying batch sizes otherwise leave the heap holding the pieces of
    every shape it has seen, so resident memory creeps up long after start."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    trim(0)
    return True
