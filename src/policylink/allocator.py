"""Keep glibc from handing message buffers back to the OS after every message.

A request of a few hundred kilobytes and up (camera frames) is read into,
decoded from and encoded into buffers above glibc's default mmap threshold
(128 KiB, adjusted dynamically up to a point). Each such buffer is mapped
fresh and unmapped again when freed, so every message pays for page faults
on memory it touched a moment ago: on this project's test machine about 110
faults per message on the server, and writing 451 KB into fresh pages took
370 µs against 12 µs into pages already mapped.

:func:`tune_allocator` raises the mmap threshold and the trim threshold with
``mallopt``, so those buffers come from, and go back to, the process's own
heap. It is opt-in (``policylink serve --malloc-tuning``, or a call in your
own program): on this project's 2-core test machine it takes the client's
page faults from about 190 per request to none, yet the round trip does not
change measurably (BENCHMARKS.md, "Round trip"), and the process keeps up
to the trim threshold of freed memory instead of returning it.

Only glibc has ``mallopt``; elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["tune_allocator", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

logger = logging.getLogger("policylink")

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations above this are mmap'ed: glibc's largest allowed value on 64-bit systems (32 MiB).
MMAP_THRESHOLD = 32 * 2**20
#: Free memory at the top of the heap above this is returned to the OS.
TRIM_THRESHOLD = 256 * 2**20

_tuned: bool | None = None


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); whether it took effect."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:
        logger.debug("no mallopt in this C library: allocator left as it is")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. Setting the mmap threshold also stops glibc's dynamic adjustment of it.
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    logger.debug("malloc tuning %s (mmap threshold %d, trim threshold %d)", "on" if _tuned else "refused", MMAP_THRESHOLD, TRIM_THRESHOLD)
    return _tuned
