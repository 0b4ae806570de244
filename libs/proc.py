"""Child-process helpers."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 << 10  # glibc's starting value, kept fixed


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM if the process that started it dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations above ``threshold`` bytes from their own mappings, always (glibc).

    glibc raises its mmap threshold each time a mapped chunk is freed, up to 32 MB. After the
    first freed prompt KV (tens of MB) every KV block (~0.7 MB) and buffer below that size comes
    from the heap, and a cache that keeps some blocks and drops others leaves the heap full of
    holes it never returns: a prefill instance with a 768 MB block cache grew to ~1.5 GB of RSS.
    Fixing the threshold turns that off, so freed blocks go back to the system at once. Returns
    False where this is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
