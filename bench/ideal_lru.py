"""The prefix reuse an ideal LRU cache of a given capacity (in blocks) reaches on a sequence of
requests: the offline reference ``bench trace`` sets each measured configuration against.

Plain logic, no I/O. A request is the chain of its full KV blocks' keys, in prompt order (a key
names the block together with everything before it, as ``libs.kv.keys.block_hashes`` does). On
each request, in order:

1. it reuses the leading run of its chain held in the cache (at most ``reusable`` blocks of it:
   the system always computes at least one prompt token, so a prompt that is whole blocks reuses
   all but its last one);
2. every block of its chain is then made the most recently used, in chain order (the ones not
   held are inserted), evicting the least recently used blocks beyond ``capacity``.

This is what a single cache of that size with exact LRU recency does: no routing (one cache, not
one per instance), no load-or-recompute choice, nothing lost between a request and the next.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence


def leading_run(held, chain: Sequence[Hashable]) -> int:
    """How many leading keys of ``chain`` are in ``held`` (anything with ``in``)."""
    n = 0
    for k in chain:
        if k not in held:
            break
        n += 1
    return n


class PrefixCache:
    """A cache of block keys serving requests as the pool does: a request reuses the leading run
    of its chain that is held, then its whole chain is touched (``touch_all``, the subclass's)."""

    def leading_run(self, chain: Sequence[Hashable]) -> int:
        """How many leading keys of ``chain`` are held (recency unchanged)."""
        return leading_run(self, chain)

    def touch_all(self, chain: Sequence[Hashable]) -> None:
        raise NotImplementedError

    def request(self, chain: Sequence[Hashable], reusable: int | None = None) -> int:
        """Serve one request: the blocks it reuses; then its chain is cached."""
        run = self.leading_run(chain)
        if reusable is not None:
            run = min(run, max(0, reusable))
        self.touch_all(chain)
        return run


class IdealLRU(PrefixCache):
    """An LRU set of block keys holding at most ``capacity`` of them."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._keys: OrderedDict[Hashable, None] = OrderedDict()  # least recently used first
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys

    def touch_all(self, chain: Sequence[Hashable]) -> None:
        """Make every key of ``chain`` the most recently used, in order, inserting the missing ones."""
        if self.capacity == 0:
            return
        for k in chain:
            if k in self._keys:
                self._keys.move_to_end(k)
            else:
                self._keys[k] = None
                if len(self._keys) > self.capacity:
                    self._keys.popitem(last=False)
                    self.evictions += 1

def prefix_hits(cache, chains: Sequence[Sequence[Hashable]], reusable: Sequence[int] | None = None) -> list[int]:
    """Per request, the blocks ``cache`` (anything with ``IdealLRU.request``) lets it reuse, the
    requests served in order (``reusable``: per request, the most blocks it may reuse)."""
    if reusable is None:
        return [cache.request(c) for c in chains]
    if len(reusable) != len(chains):
        raise ValueError("one reusable count per request")
    return [cache.request(c, r) for c, r in zip(chains, reusable)]


def lru_prefix_hits(chains: Sequence[Sequence[Hashable]], capacity: int,
                    reusable: Sequence[int] | None = None) -> list[int]:
    """Per request, the blocks an ideal LRU cache of ``capacity`` blocks lets it reuse, the
    requests served in order (``reusable``: per request, the most blocks it may reuse)."""
    return prefix_hits(IdealLRU(capacity), chains, reusable)
