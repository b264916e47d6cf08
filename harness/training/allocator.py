"""Keep freed tensor memory inside the process (glibc), so CPU training does not page-fault every step.

Why: PyTorch's CPU allocator is plain malloc. With glibc's defaults, blocks above the mmap threshold
are unmapped when freed, and free memory at the top of the heap is trimmed back to the OS, so every
training step maps its activations afresh and the kernel zero-fills them page by page. On the
2-core reference VM a PGD-10 AT step of the small CNN took about 75,000 minor page faults: 15-20% of
its wall time and most of its run-to-run spread (`harness bench at-step` gave 9.8, 9.2 and 8.4 within
minutes; with the memory kept: no faults, 267 ms instead of 320 per step, 8.0-8.3). While the VM's
host was reclaiming memory, one measurement took 7.3 s per step without it against 0.28 s with it.
The price is that the process keeps its peak heap, which a training loop reaches every step anyway.

The CLI applies this once at start-up; the environment of every record says whether it was applied.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# <malloc.h>: mallopt parameters. The values are C ints.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 1 << 30  # serve blocks up to 1 GiB from the heap, where freed ones are reused
_TRIM_THRESHOLD_BYTES = (1 << 31) - 1  # the largest int: never trim the heap's top

_state = {"keep_freed_memory": False}


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds high; False (and no change) off glibc or if refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = (
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1
        and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1
    )
    _state["keep_freed_memory"] = applied
    return applied


def allocator_state() -> dict[str, bool]:
    """For run records: timings depend on it."""
    return dict(_state)
