"""Keep freed upload buffers for reuse instead of handing them back to the kernel.

Every update the cloud receives passes through buffers of about its own size: the socket read,
the reassembled blob, the decoded tensors, the float64 change folded into the round's sum. glibc
serves blocks that large (above 128 KiB, adjusting) with a fresh mmap each time and unmaps them
on free, so each update's buffers arrive as new pages the kernel must zero on first touch. Profiled
at 1,000 devices (`perf record` of the cloud during benchmarks/scale.py), zeroing pages was 18% of
the cloud's CPU, the largest single item. Served from the heap instead, the same memory is reused
update after update; the cost is that the process keeps its peak heap rather than returning it.

The cloud calls it once per process (`Federation`); so does any process that moves many
update-sized messages, e.g. benchmarks/simdevice.py's worker hosting simulated devices.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("fedpft.allocator")

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2): blocks up to it come from the heap
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20  # free heap top kept before trimming: a round's working set

_done: bool | None = None


def broker_malloc_env() -> dict[str, str]:
    """The same thresholds for a process we do not run, through glibc's environment tunables: for
    Mosquitto, which mallocs and frees every message it routes. At 1,000 devices (0.6 MB updates)
    zeroing fresh pages was 60% of its CPU (perf, session 9). Harmless where the C library is not
    glibc (the variables are ignored)."""
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def reuse_large_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); False where the C library
    is not glibc (macOS, musl), which is left as it is."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # musl's mallopt is a stub returning 0: nothing changed, so nothing claimed
    _done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not _done:
        log.debug("mallopt refused the buffer-reuse thresholds; large buffers stay mmapped")
    return _done
