"""How a service process's C heap hands freed memory back to the kernel (glibc malloc).

By default glibc returns freed memory to the kernel as soon as a few MB of it sit free at the top
of a heap, and serves blocks above a moving threshold (128 KB at first) with their own mappings,
unmapped when freed. A service that moves KV blocks allocates and frees buffers of a few hundred
KB to a few MB all the time (a message's encoding, a chunk being sent, a block read from LMDB),
so most of them came from pages the kernel had to find and zero again; on a host that hands free
memory back to its hypervisor, that is tens of microseconds a page. ``keep_freed_heap`` makes
the process serve blocks up to 32 MB from its heap and keep up to ``keep_bytes`` of it free for
reuse, per malloc arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit; KV buffers above it keep their own mappings
_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def keep_freed_heap(keep_bytes: int) -> bool:
    """Serve allocations up to 32 MB from the heap and trim it only past ``keep_bytes`` free.
    Returns whether it was set: not with ``keep_bytes <= 0``, when glibc's own environment
    variables for these already decide, or where the C library has no ``mallopt``."""
    if keep_bytes <= 0 or any(v in os.environ for v in _ENV):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, min(keep_bytes, 2**31 - 1)))
