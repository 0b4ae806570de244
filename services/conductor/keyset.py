"""A compact set of 16-byte block keys: numpy open addressing. Plain logic, no I/O.

The prefix index holds one such set per instance. A Python ``set`` of ``bytes`` costs about 100
bytes a key (a 49-byte object per key, and a hash table of 16-byte entries kept under two thirds
full); here a key is its 16 bytes in two ``uint64`` arrays, in a table kept between 40 % and 80 %
full: 20 to 40 bytes a key, and no object per key for the garbage collector to walk.

Slots are found by linear probing from the key's low 64 bits (block keys are BLAKE2b digests, so
any bits of them are uniformly spread). A slot is empty when both words are zero (a BLAKE2b digest
is never all zeros in practice), live when ``used`` is set, and a tombstone (a removed key, kept so
that probing walks past it) when its words are set but ``used`` is not; ``used`` is a packed bit
array. Operations take whole batches of keys (a ``KeyBatch``) and run as numpy array operations,
one probing step at a time for every key still probing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KEY_BYTES = 16
MIN_CAPACITY = 64
# live and tombstone slots: past MAX_LOAD the table is rebuilt, with the live keys only, at the
# smallest power of two they fill at most MAX_LOAD of (so at least half that); live slots below
# MIN_LOAD of a table larger than MIN_CAPACITY: rebuilt smaller the same way. A slot is 17 bytes:
# a live key costs 21 to 57 bytes
MAX_LOAD = 0.8
MIN_LOAD = 0.3


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
        pairs = np.unique(np.stack([self.hi, self.lo], axis=1), axis=0)
        return KeyBatch(pairs[:, 0].copy(), pairs[:, 1].copy())

    def keys(self) -> list[bytes]:
        raw = np.stack([self.hi, self.lo], axis=1).astype("<u8", copy=False).tobytes()
        return [raw[i : i + KEY_BYTES] for i in range(0, len(raw), KEY_BYTES)]


class KeySet:
    """A set of 16-byte keys, added and removed in batches."""

    def __init__(self, capacity: int = MIN_CAPACITY):
        self._alloc(max(MIN_CAPACITY, 1 << (max(1, capacity) - 1).bit_length()))

    def _alloc(self, capacity: int) -> None:
        self._hi = np.zeros(capacity, np.uint64)
        self._lo = np.zeros(capacity, np.uint64)
        self._used = np.zeros(capacity, bool)
        self._mask = np.uint64(capacity - 1)
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
        return self._hi.nbytes + self._lo.nbytes + self._used.nbytes

    def _find(self, b: KeyBatch) -> np.ndarray:
        """Per key, its live slot, or -1."""
        out = np.full(len(b), -1, np.int64)
        if not len(b) or not self._live:
            return out
        idx = np.arange(len(b))
        pos = (b.lo & self._mask).astype(np.int64)
        hi, lo = b.hi, b.lo
        while idx.size:
            shi, slo = self._hi[pos], self._lo[pos]
            same = (shi == hi) & (slo == lo)
            hit = same & self._used[pos]
            out[idx[hit]] = pos[hit]
            going = ~same & ((shi != 0) | (slo != 0))  # neither this key nor an empty slot: walk on
            idx, pos, hi, lo = idx[going], (pos[going] + 1) & int(self._mask), hi[going], lo[going]
        return out

    def contains(self, b: KeyBatch) -> np.ndarray:
        return self._find(b) >= 0

    def prefix_len(self, b: KeyBatch) -> int:
        """How many leading keys of the batch (a prefix chain) the set holds."""
        if not self._live or not len(b):
            return 0
        present = self.contains(b)
        missing = np.flatnonzero(~present)
        return int(missing[0]) if missing.size else len(b)

    def holds_first(self, key: bytes) -> bool:
        """Whether the set holds ``key``, without building a batch (one key, probed in Python)."""
        if not self._live:
            return False
        hi = int.from_bytes(key[:8], "little")
        lo = int.from_bytes(key[8:], "little")
        mask = int(self._mask)
        pos = lo & mask
        while True:
            shi, slo = int(self._hi[pos]), int(self._lo[pos])
            if shi == hi and slo == lo:
                return bool(self._used[pos])
            if shi == 0 and slo == 0:
                return False
            pos = (pos + 1) & mask

    def batch(self) -> KeyBatch:
        return KeyBatch(self._hi[self._used], self._lo[self._used])

    def keys(self) -> list[bytes]:
        return self.batch().keys()

    # ---- changing
    def add(self, b: KeyBatch) -> KeyBatch:
        """Add the keys; returns those that were not in the set."""
        if not len(b):
            return b
        b = b.unique() if len(b) > 1 else b
        new = b.take(self._find(b) < 0)
        if not len(new):
            return new
        if self._live + self._tombs + len(new) > MAX_LOAD * self.capacity:
            self._rebuild(self._live + len(new))
        self._insert(new)
        return new

    def _insert(self, b: KeyBatch) -> None:
        """Place keys known to be absent (and distinct): each in the first tombstone or empty slot of
        its probe sequence; keys that race for one slot take it in turn."""
        idx = np.arange(len(b))
        pos = (b.lo & self._mask).astype(np.int64)
        mask = int(self._mask)
        while idx.size:
            free = ~self._used[pos]
            # a key's own tombstone, or another's, or an empty slot: take the first one reached
            take_idx, take_pos = idx[free], pos[free]
            if take_idx.size:
                slots, first = np.unique(take_pos, return_index=True)
                winners = take_idx[first]
                was_tomb = (self._hi[slots] != 0) | (self._lo[slots] != 0)
                self._hi[slots], self._lo[slots] = b.hi[winners], b.lo[winners]
                self._used[slots] = True
                self._live += int(slots.size)
                self._tombs -= int(np.count_nonzero(was_tomb))
                placed = np.zeros(len(b), bool)
                placed[winners] = True
                keep = ~placed[idx]
                idx, pos = idx[keep], pos[keep]
            pos = np.where(self._used[pos], (pos + 1) & mask, pos)

    def remove(self, b: KeyBatch) -> KeyBatch:
        """Remove the keys; returns those that were in the set."""
        if not len(b):
            return b
        b = b.unique() if len(b) > 1 else b
        slots = self._find(b)
        held = slots >= 0
        slots = slots[held]
        self._used[slots] = False  # the words stay: a tombstone
        self._live -= int(slots.size)
        self._tombs += int(slots.size)
        if self.capacity > MIN_CAPACITY and self._live < MIN_LOAD * self.capacity:
            self._rebuild(self._live)
        return b.take(held)

    def clear(self) -> None:
        self._alloc(MIN_CAPACITY)

    def _rebuild(self, live: int) -> None:
        """A table for ``live`` keys (at most ``MAX_LOAD`` full, at least half that), holding the live
        keys and no tombstones."""
        keep = self.batch()
        capacity = MIN_CAPACITY
        while live > capacity * MAX_LOAD:
            capacity *= 2
        self._alloc(capacity)
        self._insert(keep)

    @classmethod
    def of(cls, keys: Sequence[bytes] | KeyBatch) -> "KeySet":
        b = keys if isinstance(keys, KeyBatch) else KeyBatch.of(keys)
        s = cls()
        s.add(b)
        return s
