"""The probing loops of the key tables (``keyset.py``), compiled with numba. Plain logic, no I/O.

A table is three arrays: the first and last 8 bytes of each slot's key (``hi``, ``lo``) and its
state (``EMPTY``, ``LIVE``, or ``TOMB``: a removed key's slot, which probing walks past and an
insert may take). A key's first slot is the top bits of the product of its words' XOR with a
Fibonacci constant; probing is linear. Each function walks one batch of keys in one call: a key is
a few cache misses on a table of millions of slots, not a numpy step per probe (the batch's longest
probe sequence set how many steps a batch took, each a pass of fancy indexing over every key still
probing) nor a Python loop per key.

Compiled when first imported on a machine (0.7 s here) and cached beside this file, or where numba
keeps a user's cache when that is not writable (``NUMBA_CACHE_DIR`` overrides both); an import
after that loads the compiled code (0.15 s, and 0.2 s to import numba).
"""

from __future__ import annotations

import numpy as np
from numba import boolean, int64, njit, uint8, uint64, void

# the signatures, compiled when this module is imported (from the cache once compiled): a table's
# words are strided (a column of its slots' pairs), a batch's contiguous; both take "any layout"
_TABLE = (uint64[:], uint64[:], uint8[:], uint64, uint64[:], uint64[:])

EMPTY, LIVE, TOMB = 0, 1, 2
MIX = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: Fibonacci hashing


@njit(int64(uint64, uint64, uint64), cache=True, nogil=True)
def _home(hi, lo, shift):
    return np.int64(((hi ^ lo) * MIX) >> shift)


@njit(int64(uint64[:], uint64[:], uint8[:], uint64, uint64, uint64), cache=True, nogil=True)
def _slot(t_hi, t_lo, state, shift, h, lw):
    """The live slot of the key of words ``h`` and ``lw``, or -1."""
    mask = state.size - 1
    p = _home(h, lw, shift)
    while True:
        st = state[p]
        if st == EMPTY:
            return -1
        if st == LIVE and t_hi[p] == h and t_lo[p] == lw:
            return p
        p = (p + 1) & mask


@njit(void(*_TABLE, int64[:]), cache=True, nogil=True)
def find(t_hi, t_lo, state, shift, q_hi, q_lo, out):
    """``out[i]``: the live slot of key ``i``, or -1 (left as it is where a key is absent and
    ``out[i]`` was set already: a caller probing two tables keeps the first's answer)."""
    for i in range(q_hi.size):
        p = _slot(t_hi, t_lo, state, shift, q_hi[i], q_lo[i])
        if p >= 0:
            out[i] = p


@njit(int64(*_TABLE), cache=True, nogil=True)
def prefix_len(t_hi, t_lo, state, shift, q_hi, q_lo):
    """How many leading keys the table holds."""
    n = 0
    while n < q_hi.size and _slot(t_hi, t_lo, state, shift, q_hi[n], q_lo[n]) >= 0:
        n += 1
    return n


@njit(int64(*_TABLE, boolean[:]), cache=True, nogil=True)
def insert(t_hi, t_lo, state, shift, q_hi, q_lo, placed):
    """Place keys the table does not hold, each in the first tombstone or empty slot of its probe
    sequence, marking ``placed[i]``; a key given twice is placed once (its second probe meets the
    first before any free slot). Returns how many tombstones they took."""
    mask = state.size - 1
    tombs = 0
    for i in range(q_hi.size):
        h, lw = q_hi[i], q_lo[i]
        p = _home(h, lw, shift)
        while state[p] == LIVE:
            if t_hi[p] == h and t_lo[p] == lw:
                break
            p = (p + 1) & mask
        if state[p] == LIVE:
            continue
        if state[p] == TOMB:
            tombs += 1
        t_hi[p], t_lo[p], state[p] = h, lw, LIVE
        placed[i] = True
    return tombs


@njit(int64(*_TABLE, boolean[:]), cache=True, nogil=True)
def remove(t_hi, t_lo, state, shift, q_hi, q_lo, held):
    """Remove the keys (distinct) the table holds, marking ``held[i]``; returns how many."""
    gone = 0
    for i in range(q_hi.size):
        p = _slot(t_hi, t_lo, state, shift, q_hi[i], q_lo[i])
        if p >= 0:
            state[p] = TOMB
            held[i] = True
            gone += 1
    return gone
