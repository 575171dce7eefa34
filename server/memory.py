"""Handing freed memory back to the operating system once the cluster is idle.

CPython and glibc keep freed heap memory for reuse: the model-sized buffers are mmap'ed
and go back to the system when freed, but the many chunk-sized (512 KiB-1 MiB) protobuf
messages and bytes of pushes and deltas come from malloc's arenas, and free pages in the
middle of an arena stay resident until glibc trims them. `malloc_trim(0)` returns every
free page of every arena. The server calls it once when the last worker leaves (after it
dropped the history), so an idle server's RSS is its model and its code, not the high-water
mark of the last training run (docs/operations.md, "Server memory", has the measurement).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the allocator's free pages to the system (glibc); False where there is no way to."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
