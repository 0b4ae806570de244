"""A compact set of 16-byte block keys: numpy open addressing. Plain logic, no I/O.

The prefix index holds one such set per instance. A Python ``set`` of ``bytes`` costs about 100
bytes a key (a 49-byte object per key, and a hash table of 16-byte entries kept under two thirds
full); here a key is its 16 bytes in two ``uint64`` arrays and a state byte, in a table kept
between 25 % and 70 % full (mostly 35-55 %): 24 to 68 bytes a key, and no object per key for the
garbage collector to walk.

Slots are found by linear probing from a multiplicative hash of the key's two words (block keys
are BLAKE2b digests, whose bits are spread already; names that are not, counters say, would pile
up on a few home slots if their bits were taken as they are). A slot's state is a byte: empty,
live, or a tombstone (a removed key's slot, which probing walks past and an insert may take).
Operations take whole batches of keys (a ``KeyBatch``), each batch probed in one call of a compiled
loop (``keyprobe.py``); a single key (a decision's walk down a prompt's chain, key by key until an
instance's prefix ends) is probed in Python, cheaper than a call with its arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import struct

import numpy as np

from services.conductor import keyprobe as probe

KEY_BYTES = 16
MIN_CAPACITY = 64
# Live and tombstone slots past MAX_LOAD of the table: it is rebuilt with the live keys only, at
# the smallest power of two they fill at most REBUILD_LOAD of (twice the size when they are more
# than that, the same size when tombstones filled it, so that a cache churning at a steady size
# rebuilds only after 15 % of its table has churned; built at once, a rebuild would stop the loop
# about 0.1 s per million keys: see MOVE_AT_ONCE). Live slots below MIN_LOAD of a table larger than MIN_CAPACITY: rebuilt smaller the
# same way. A slot is 17 bytes. (Fuller tables make the probe sequences of absent keys long: at
# 80 % a batch took three times as many probing steps as at 70.)
MAX_LOAD = 0.7
REBUILD_LOAD = 0.55
MIN_LOAD = 0.25
# A table of more slots than MOVE_AT_ONCE is replaced in steps of MOVE_SLOTS slots an add or remove
# (a step moves their live keys: a few milliseconds; a table of 16 million slots, in 512 steps)
MOVE_AT_ONCE = 1 << 18
MOVE_SLOTS = 1 << 15
# A prefix is probed key by key up to this many, then the rest of the chain in one batch: a chain
# of hundreds of held keys (a conversation's history, a pool holding the whole prompt) is one
# compiled call instead of hundreds of Python probes.
PREFIX_KEYS = 16
_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: Fibonacci hashing
_WORD = (1 << 64) - 1
_PAIR = struct.Struct("<QQ")


def words(key: bytes) -> tuple[int, int]:
    """A key's two words, as ``has`` takes them."""
    return _PAIR.unpack(key)


def leading(held: np.ndarray) -> int:
    """How many of the first ``held`` flags are set before the first that is not."""
    missing = np.flatnonzero(~held)
    return int(missing[0]) if missing.size else len(held)


class KeyBatch:
    """Keys as two ``uint64`` arrays (``hi``, ``lo``: the first and last 8 bytes of each key)."""

    __slots__ = ("hi", "lo")

    def __init__(self, hi: np.ndarray, lo: np.ndarray):
        self.hi, self.lo = hi, lo

    @classmethod
    def of(cls, keys: Sequence[bytes]) -> "KeyBatch":
        if not keys:
            return cls(np.empty(0, np.uint64), np.empty(0, np.uint64))
        words = np.frombuffer(b"".join(keys), dtype="<u8").astype(np.uint64, copy=False)
        if words.size != 2 * len(keys):
            raise ValueError(f"block keys are {KEY_BYTES} bytes")
        words = words.reshape(-1, 2)
        return cls(words[:, 0].copy(), words[:, 1].copy())

    def __len__(self) -> int:
        return int(self.hi.size)

    def take(self, which) -> "KeyBatch":
        return KeyBatch(self.hi[which], self.lo[which])

    def unique(self) -> "KeyBatch":
        """The keys once each (in sorted order)."""
        if len(self) < 2:
            return self
        order = np.lexsort((self.hi, self.lo))
        hi, lo = self.hi[order], self.lo[order]
        first = np.ones(len(self), bool)
        first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
        return KeyBatch(hi[first], lo[first])

    def keys(self) -> list[bytes]:
        raw = np.stack([self.hi, self.lo], axis=1).astype("<u8", copy=False).tobytes()
        return [raw[i : i + KEY_BYTES] for i in range(0, len(raw), KEY_BYTES)]


EMPTY, LIVE, TOMB = probe.EMPTY, probe.LIVE, probe.TOMB


class _Table:
    """One open-addressing table of 16-byte keys (``KeySet`` holds one, two while it moves its keys
    to a table of another size). It never resizes itself."""

    def __init__(self, capacity: int = MIN_CAPACITY):
        self._alloc(max(MIN_CAPACITY, 1 << (max(1, capacity) - 1).bit_length()))

    def _alloc(self, capacity: int) -> None:
        # a slot's two words side by side: a probe that reads one finds the other in the same cache
        # line (a table of millions of slots misses the cache at every probe)
        words = np.zeros((capacity, 2), np.uint64)
        self._hi, self._lo = words[:, 0], words[:, 1]
        self._state = np.zeros(capacity, np.uint8)
        # the same memory as Python sequences: one key looked up reads them without numpy scalars
        self._hi_view, self._lo_view, self._state_view = (memoryview(self._hi), memoryview(self._lo),
                                                          memoryview(self._state))
        self._mask = capacity - 1
        self._shift = 64 - (capacity.bit_length() - 1)
        self._ushift = np.uint64(self._shift)
        self._live = 0
        self._tombs = 0

    # ---- reading
    def __len__(self) -> int:
        return self._live

    @property
    def capacity(self) -> int:
        return int(self._hi.size)

    @property
    def nbytes(self) -> int:
        return self._hi.nbytes + self._lo.nbytes + self._state.nbytes

    def _find(self, b: KeyBatch) -> np.ndarray:
        """Per key, its live slot, or -1."""
        out = np.full(len(b), -1, np.int64)
        if len(b) and self._live:
            probe.find(self._hi, self._lo, self._state, self._ushift, b.hi, b.lo, out)
        return out

    def contains(self, b: KeyBatch) -> np.ndarray:
        return self._find(b) >= 0

    def prefix_len(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` (a prefix chain) the set holds, probed one by one in Python up
        to the first missing, past ``PREFIX_KEYS`` the rest in one compiled call (a call with its
        arrays costs more than a few keys probed in Python)."""
        if not self._live:
            return 0
        n = 0
        for key in keys:
            if n == PREFIX_KEYS and len(keys) > 2 * PREFIX_KEYS:  # held so far: the rest in one call
                return n + self.batch_prefix_len(KeyBatch.of(keys[n:]))
            if not self.has(*_PAIR.unpack(key)):
                return n
            n += 1
        return n

    def batch_prefix_len(self, b: KeyBatch) -> int:
        """How many leading keys of ``b`` the set holds."""
        if not self._live:
            return 0
        return probe.prefix_len(self._hi, self._lo, self._state, self._ushift, b.hi, b.lo)

    def holds(self, key: bytes) -> bool:
        """Whether the set holds ``key`` (one key, probed in Python)."""
        return self.has(*_PAIR.unpack(key))

    def has(self, hi: int, lo: int) -> bool:
        """Whether the set holds the key of words ``hi`` and ``lo`` (``words``), probed in Python."""
        if not self._live:
            return False
        state, his, los, mask = self._state_view, self._hi_view, self._lo_view, self._mask
        pos = (((hi ^ lo) * _MIX) & _WORD) >> self._shift
        while (st := state[pos]) != EMPTY:
            if st == LIVE and his[pos] == hi and los[pos] == lo:
                return True
            pos = (pos + 1) & mask
        return False

    def batch(self) -> KeyBatch:
        live = self._state == LIVE
        return KeyBatch(self._hi[live], self._lo[live])

    def keys(self) -> list[bytes]:
        return self.batch().keys()

    # ---- changing
    def _insert(self, b: KeyBatch) -> np.ndarray:
        """Place keys the table does not hold (a key given twice, once), each in the first tombstone
        or empty slot of its probe sequence; returns which of them were placed."""
        placed = np.zeros(len(b), bool)
        if len(b):
            self._tombs -= probe.insert(self._hi, self._lo, self._state, self._ushift, b.hi, b.lo, placed)
            self._live += int(np.count_nonzero(placed))
        return placed

    def remove(self, b: KeyBatch) -> np.ndarray:
        """Remove the keys; returns which of them were held (a key given twice: its first)."""
        held = np.zeros(len(b), bool)
        if len(b) and self._live:
            gone = probe.remove(self._hi, self._lo, self._state, self._ushift, b.hi, b.lo, held)
            self._live -= gone
            self._tombs += gone
        return held

    def take_live(self, start: int, end: int) -> KeyBatch:
        """The live keys of slots ``start:end``, taken out (tombstones in their place: probes of
        the keys still here walk on past them)."""
        live = np.flatnonzero(self._state[start:end] == LIVE) + start
        self._state[live] = TOMB
        self._live -= live.size
        self._tombs += live.size
        return KeyBatch(self._hi[live], self._lo[live])


def _capacity_for(live: int) -> int:
    """The smallest table that ``live`` keys fill at most ``REBUILD_LOAD`` of."""
    capacity = MIN_CAPACITY
    while live > capacity * REBUILD_LOAD:
        capacity *= 2
    return capacity


class KeySet:
    """A set of 16-byte keys, added and removed in batches.

    A table that fills up (live keys and tombstones past ``MAX_LOAD``) or empties (live keys under
    ``MIN_LOAD``) is replaced by one of the size its live keys call for. A small one is rebuilt at
    once; a large one is moved in steps: the new table takes new keys at once, and every add or
    remove moves the live keys of ``MOVE_SLOTS`` more slots of the old one, which lookups consult
    too until it is empty. Rebuilt at once, the pool's table of 16 million slots stopped the
    conductor for 1.7 s, every 15 % of the pool churned."""

    def __init__(self, capacity: int = MIN_CAPACITY):
        self._t = _Table(capacity)
        self._old: _Table | None = None  # the table being emptied into ``_t``
        self._moved = 0  # slots of ``_old`` moved so far

    # ---- reading
    def __len__(self) -> int:
        return self._t._live + (self._old._live if self._old is not None else 0)

    @property
    def capacity(self) -> int:
        return self._t.capacity

    @property
    def nbytes(self) -> int:
        return self._t.nbytes + (self._old.nbytes if self._old is not None else 0)

    @property
    def moving(self) -> bool:
        """Whether the keys are being moved to a table of another size."""
        return self._old is not None

    def contains(self, b: KeyBatch) -> np.ndarray:
        held = self._t.contains(b)
        if self._old is not None and len(self._old) and not held.all():
            rest = ~held
            held[rest] = self._old.contains(b.take(rest))
        return held

    def prefix_len(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` (a prefix chain) the set holds."""
        if self._old is None:
            return self._t.prefix_len(keys)
        return self.batch_prefix_len(KeyBatch.of(list(keys)))

    def batch_prefix_len(self, b: KeyBatch) -> int:
        """How many leading keys of ``b`` the set holds (a compiled walk)."""
        if self._old is None:
            return self._t.batch_prefix_len(b)
        return leading(self.contains(b))

    def holds(self, key: bytes) -> bool:
        """Whether the set holds ``key`` (one key, probed in Python)."""
        return self.has(*_PAIR.unpack(key))

    def has(self, hi: int, lo: int) -> bool:
        """Whether the set holds the key of words ``hi`` and ``lo`` (``words``: one key's unpacked
        once for many sets)."""
        return self._t.has(hi, lo) or (self._old is not None and self._old.has(hi, lo))

    def batch(self) -> KeyBatch:
        b = self._t.batch()
        if self._old is None:
            return b
        o = self._old.batch()
        return KeyBatch(np.concatenate([b.hi, o.hi]), np.concatenate([b.lo, o.lo]))

    def keys(self) -> list[bytes]:
        return self.batch().keys()

    # ---- changing
    def add(self, b: KeyBatch) -> KeyBatch:
        """Add the keys; returns those that were not in the set (once each)."""
        if not len(b):
            return b
        self._move_some()
        new = b.take(~self.contains(b))  # (a key given twice is in ``new`` twice, placed once)
        if not len(new):
            return new
        t = self._t
        if t._live + t._tombs + len(new) > MAX_LOAD * t.capacity:
            self._resize(len(self) + len(new))
        return new.take(self._t._insert(new))

    def remove(self, b: KeyBatch) -> KeyBatch:
        """Remove the keys; returns those that were in the set (once each)."""
        if not len(b):
            return b
        self._move_some()
        held = self._t.remove(b)  # (a key given twice is removed once: the second finds it gone)
        if self._old is not None and not held.all():
            rest = ~held
            held[rest] = self._old.remove(b.take(rest))
        if self.capacity > MIN_CAPACITY and len(self) < MIN_LOAD * self.capacity:
            self._resize(len(self))
        return b.take(held)

    def clear(self) -> None:
        self._t, self._old = _Table(), None

    def _resize(self, live: int) -> None:
        """A table for ``live`` keys (at most ``REBUILD_LOAD`` full, at least half that), without
        tombstones: built at once when small, else filled in steps from the old one."""
        if self._old is not None:  # (a resize while moving: the rest of the last one at once)
            self._t._insert(self._old.take_live(self._moved, self._old.capacity))
            self._old = None
        old, self._t = self._t, _Table(_capacity_for(live))
        if old.capacity <= MOVE_AT_ONCE:
            self._t._insert(old.batch())
        else:
            self._old, self._moved = old, 0

    def _move_some(self) -> None:
        """Move the live keys of the next ``MOVE_SLOTS`` slots of the old table, if there is one."""
        old = self._old
        if old is None:
            return
        end = min(old.capacity, self._moved + MOVE_SLOTS)
        self._t._insert(old.take_live(self._moved, end))
        self._moved = end
        if end == old.capacity or not len(old):
            self._t._insert(old.take_live(end, old.capacity))
            self._old = None

    @classmethod
    def of(cls, keys: Sequence[bytes] | KeyBatch) -> "KeySet":
        b = keys if isinstance(keys, KeyBatch) else KeyBatch.of(keys)
        s = cls()
        s.add(b)
        return s
