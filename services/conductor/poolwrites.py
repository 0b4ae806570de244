"""Which of a prompt's new blocks are worth writing to the cachestore pool.

Plain logic with no I/O. Every block written costs the bus, the pool and the writing prefill
instance its bytes, and most blocks of a conversation trace are never read again (the last turn of
every conversation). ``all`` writes every block the pool lacks. ``seen`` writes a block on its
second sight: only the leading blocks that an earlier admitted request also had, which for a
conversation means a turn's prefix (the previous turns) once a next turn has come. The first reuse of
a turn (turn 2 reading turn 1) then comes from the prefill instances' own caches, or is computed
again; later turns find the pool holding the conversation so far.

The memory of what has been seen is bounded (least recently seen keys forgotten first) and local
to one conductor.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

POOL_WRITE_MODES = ("all", "seen")


class PoolWriteAdmission:
    def __init__(self, mode: str = "all", capacity: int = 1_000_000):
        if mode not in POOL_WRITE_MODES:
            raise ValueError(f"unknown pool write mode {mode!r}; choose one of {', '.join(POOL_WRITE_MODES)}")
        if capacity < 1:
            raise ValueError(f"the memory of seen blocks needs a capacity >= 1, got {capacity}")
        self.mode = mode
        self.capacity = capacity
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def blocks_to_write(self, keys: Sequence[bytes]) -> int:
        """How many leading blocks of ``keys`` (a hash chain) an admitted request's prefill may write
        to the pool (-1: all of them); the keys are remembered as seen."""
        if self.mode == "all":
            return -1
        n = 0
        for k in keys:
            if k not in self._seen:
                break
            n += 1
        for k in keys:
            self._seen[k] = None
            self._seen.move_to_end(k)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return n

    def __len__(self) -> int:
        return len(self._seen)
