"""Hot blocks: how many extra copies of a block the pool should keep on other shards, from how
often it is read. Plain logic, no I/O.

A block's primary shard (the first instance of its rendezvous ranking) counts the reads of each
block it serves as an exponentially decayed sum, with half-life ``half_life`` seconds: under a
steady rate of ``r`` reads/s the sum settles at ``r * half_life / ln 2``, so the rate is read back
from it. Readers that know a block is hot spread their reads at random over the primary and its
``n`` advertised copies, so the primary sees about one read in ``n + 1``: each read it serves
counts ``n + 1`` times, which keeps the estimate of the block's total rate steady as copies come
and go.

The copies wanted grow with the rate, one per ``reads_per_replica`` reads/s, up to
``max_replicas``; the copies advertised are the ones that were made (``made``), so a reader is
never sent to a shard that was not given the block. A copy made at ``n`` times that rate is kept
while the rate stays above ``n - 1/2`` times it (so a rate near a threshold does not make and drop
copies in turn); when the rate falls below, the advertised count falls with it (decay): readers go back to fewer shards, and the copies nobody reads any
more age out of their shards by those shards' own eviction. At most ``max_keys`` blocks are
tracked: past that, the coldest half is forgotten.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

Key = bytes


class HotBlocks:
    def __init__(self, *, reads_per_replica: float, max_replicas: int, half_life: float, max_keys: int = 65536):
        if reads_per_replica <= 0 or half_life <= 0 or max_replicas < 0 or max_keys < 1:
            raise ValueError("reads_per_replica and half_life must be > 0, max_replicas >= 0, max_keys >= 1")
        self.reads_per_replica = reads_per_replica
        self.max_replicas = max_replicas
        self.half_life = half_life
        self.max_keys = max_keys
        self._decay = math.log(2) / half_life
        self._reads: dict[Key, tuple[float, float]] = {}  # key -> (decayed sum of reads, as of when)
        self._made: dict[Key, int] = {}  # key -> extra copies made on the next shards of its ranking
        self._making: set[Key] = set()  # copies being made now

    @property
    def enabled(self) -> bool:
        return self.max_replicas > 0

    def _sum(self, key: Key, now: float) -> float:
        value, at = self._reads.get(key, (0.0, now))
        return value * math.exp(-self._decay * max(0.0, now - at))

    def rate(self, key: Key, now: float) -> float:
        """The block's estimated reads per second, over all its copies."""
        return self._sum(key, now) * self._decay

    def wanted(self, key: Key, now: float) -> int:
        """Extra copies the block's read rate calls for (0 .. ``max_replicas``)."""
        return min(self.max_replicas, int(self.rate(key, now) / self.reads_per_replica))

    def advertised(self, key: Key, now: float) -> int:
        """Extra copies readers may use now: the wanted ones that exist. A fall in the rate lowers
        it (and forgets the copies past it: should the rate rise again, they are made again)."""
        made = self._made.get(key, 0)
        if not made:
            return 0
        n = min(made, int(self.rate(key, now) / self.reads_per_replica + 0.5))
        if n < made:
            if n:
                self._made[key] = n
            else:
                del self._made[key]
        return n

    def read(self, keys: Iterable[Key], now: float) -> list[tuple[Key, int]]:
        """Count a read of each of ``keys`` (served by this, their primary shard); returns the keys
        whose wanted copies exceed those made and not being made, with the count wanted."""
        if not self.enabled:
            return []
        due = []
        for key in keys:
            weight = 1 + self.advertised(key, now)  # readers spread over the advertised copies
            self._reads[key] = (self._sum(key, now) + weight, now)
            want = self.wanted(key, now)
            if want > self._made.get(key, 0) and key not in self._making:
                due.append((key, want))
        if len(self._reads) > self.max_keys:
            self._forget_coldest(now)
        return due

    def making(self, key: Key) -> None:
        """Copies of ``key`` are being made: ``read`` does not ask for them again meanwhile."""
        self._making.add(key)

    def made(self, key: Key, n: int) -> None:
        """The copying of ``key`` ended with ``n`` extra copies on the next shards of its ranking
        (the leading run of them that took it)."""
        self._making.discard(key)
        if n > 0:
            self._made[key] = n
        else:
            self._made.pop(key, None)

    def hot_blocks(self, now: float) -> int:
        """Blocks with extra copies advertised."""
        return sum(1 for k in list(self._made) if self.advertised(k, now))

    def _forget_coldest(self, now: float) -> None:
        by_heat = sorted(self._reads, key=lambda k: self._sum(k, now), reverse=True)
        for key in by_heat[self.max_keys // 2:]:
            del self._reads[key]
            self._made.pop(key, None)
