"""Child-process helpers."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM if the process that started it dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Give every allocation above ``threshold`` bytes its own mapping, for good (glibc).

    glibc raises its mmap threshold each time a mapped chunk is freed, up to 32 MB. After the
    first prompt's KV buffer (tens of MB) is freed, the next ones come from the heap, and the
    heap keeps the holes they leave between longer-lived objects: a prefill process grew by about
    twice its block cache. With the threshold fixed, KV buffers go back to the system when freed,
    while blocks and bus chunks (below it) keep reusing heap memory without new page faults.
    Returns False where this is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
