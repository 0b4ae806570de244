"""Which block a cache lets go first: eviction policies as plain classes, no I/O.

The cachestore's disk tier (``store.DiskTier``) asks one for its victims, and ``bench eviction``
replays the conversation trace through the same classes. A policy only orders the keys it is told
about; the caller says when a key enters (``insert``, with its parent: the key of the block before
it in its prompt, when known), is used again (``access``) or leaves (``remove``), and takes
``victim()`` when it must make room.

Policies (``make_policy`` names them):

* ``lru``: the least recently used block first.
* ``lfuda``: LFU with dynamic ageing (Arlitt et al., "Evaluating content management techniques for
  Web proxy caches", 2000; a GreedyDual policy): a block's rank is the cache's age when it was last
  used plus its uses, the age being the rank of the last block evicted; the lowest rank goes first,
  ties to the least recently used. A block used often outlives one used once, but only while its
  uses are recent: each eviction ages the cache, and blocks used long ago fall behind new ones.
* ``s3fifo``: S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction", SOSP 2023):
  a small FIFO queue (10 % of the capacity) that new blocks enter, a main FIFO queue, and a ghost
  queue of keys recently evicted from the small one. A block reaching the head of the small queue
  moves to the main one if it was used again while there, and is evicted (its key to the ghost
  queue) if not: the many blocks that are never read again leave quickly. A block at the head of
  the main queue is evicted if it was not used since it last went round, else it goes round again
  with one use fewer (uses count up to 3). A block whose key is in the ghost queue enters the main
  queue directly.
* ``*_leaf`` (``lru_leaf``, ``lfuda_leaf``, ``s3fifo_leaf``): leaf first. A block is reusable only
  after all the blocks before it in its prompt (a request reuses the leading run of its blocks that
  the cache holds), so a block with a held child is kept while the child is: the victim is the block
  the policy would pick among those without a held child, as a radix-tree prefix cache evicts its
  leaves (a parent whose last child goes is ranked as it was). ``s3fifo_leaf`` passes over the
  blocks with a held child at the head of its queues, leaving them where they are.

``bench eviction`` compares them on the conversation trace, at 100/50/25/10 % of the working set,
on its first 1,000 requests and on the whole of it. ``lfuda_leaf`` is the cachestore's default
(``DEFAULT_POLICY``): up to 5 % more prompt tokens reused than plain LRU and never 0.05 % fewer.
``lru_leaf`` never reused fewer, but at most 1.2 % more; ``lfuda`` fell 1.2 % short at 50 % on the
first 1,000 requests; S3-FIFO, up to 32 % ahead there, fell 13 % behind on the whole trace (its
small queue lets a conversation's new blocks go before the next turn comes).

A caller may ``hold`` a key (a block being read, or pinned): it is never a victim while held, and
keeps its place, uses and parent, so a block read often stays ranked as one (``unhold`` ends it).

A key's parent is the block before it; "held child" counts the keys inserted with that parent and
not removed since, whether or not the parent itself is held (a child may arrive before its parent,
or, in a pool sharded over instances, live on an instance where its parent does not).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Hashable, Iterable

Key = Hashable

POLICIES = ("lru", "lru_leaf", "lfuda", "lfuda_leaf", "s3fifo", "s3fifo_leaf")
# the cachestore's defaults (libs/config.py ``pool_eviction``, ``pool_evict_high``, ``pool_evict_low``),
# chosen by ``bench eviction`` on the conversation trace (docs/results/eviction-*.json): the disk tier
# evicts down to DEFAULT_EVICT_LOW of its bound once it holds more than DEFAULT_EVICT_HIGH of it
DEFAULT_POLICY = "lfuda_leaf"
DEFAULT_EVICT_HIGH = 0.99
DEFAULT_EVICT_LOW = 0.97


class _Family:
    """The parent of each key and how many held keys name each key as their parent."""

    def __init__(self):
        self.parent: dict[Key, Key] = {}
        self.children: dict[Key, int] = {}

    def add(self, key: Key, parent: Key | None) -> Key | None:
        """Record ``key``'s parent; returns the parent that just got its first held child."""
        if parent is None or parent == key:
            return None
        self.parent[key] = parent
        n = self.children.get(parent, 0) + 1
        self.children[parent] = n
        return parent if n == 1 else None

    def drop(self, key: Key) -> Key | None:
        """Forget ``key`` (no longer held); returns its parent if that has no held child left."""
        parent = self.parent.pop(key, None)
        if parent is None:
            return None
        n = self.children[parent] - 1
        if n:
            self.children[parent] = n
            return None
        del self.children[parent]
        return parent

    def has_child(self, key: Key) -> bool:
        return key in self.children


class EvictionPolicy:
    """The interface: the held keys, in the order the policy would let them go."""

    name = "?"

    def __init__(self, leaf_first: bool = False):
        self.leaf_first = leaf_first
        self._family = _Family()
        self._held: set[Key] = set()  # never a victim while here; may name a key not held yet

    def __len__(self) -> int:
        raise NotImplementedError

    def __contains__(self, key: Key) -> bool:
        raise NotImplementedError

    def insert(self, key: Key, parent: Key | None = None) -> None:
        """``key`` is now held (a key already held is only ``access``-ed)."""
        raise NotImplementedError

    def access(self, key: Key) -> None:
        """``key`` was used; a key not held is ignored."""
        raise NotImplementedError

    def remove(self, key: Key, evicted: bool = False) -> None:
        """``key`` is no longer held: ``evicted`` (the victim, let go to make room) or deleted; a
        key not held is ignored."""
        raise NotImplementedError

    def victim(self) -> Key | None:
        """The key to let go next (still held until ``remove``d); None when none is held."""
        raise NotImplementedError

    def evict(self) -> Key | None:
        """Remove and return the victim."""
        key = self.victim()
        if key is not None:
            self.remove(key, evicted=True)
        return key

    def hold(self, key: Key) -> None:
        """Pass ``key`` over when choosing victims until ``unhold``; what the policy knows of it
        (rank, uses, parent) is kept and still follows its uses. ``key`` need not be held yet."""
        self._held.add(key)

    def unhold(self, key: Key) -> None:
        """``key`` may be a victim again, ranked as its uses say."""
        if key in self._held:
            self._held.discard(key)
            self._unheld(key)

    def _unheld(self, key: Key) -> None:
        pass

    def resize(self, capacity: int) -> None:
        """The cache now holds about ``capacity`` keys (a queue-based policy sizes its queues by it)."""

    def parent(self, key: Key) -> Key | None:
        return self._family.parent.get(key)

    def has_child(self, key: Key) -> bool:
        return self._family.has_child(key)


class _RankedPolicy(EvictionPolicy):
    """The held key of the lowest rank goes first (leaf first: the lowest among those without a
    held child). A heap of (rank, key) entries, stale ones skipped when they come up: a key whose
    rank changed, or that gained a child, has a newer entry or none; a key whose last child leaves
    is pushed back with its own rank, older than its children's."""

    def __init__(self, leaf_first: bool = False):
        super().__init__(leaf_first)
        self._rank: dict[Key, tuple] = {}
        self._heap: list[tuple[tuple, Key]] = []
        self._tick = 0

    def __len__(self) -> int:
        return len(self._rank)

    def __contains__(self, key: Key) -> bool:
        return key in self._rank

    def _new_rank(self, key: Key, inserted: bool) -> tuple:
        raise NotImplementedError

    def _eligible(self, key: Key) -> bool:
        return key not in self._held and not (self.leaf_first and self._family.has_child(key))

    def _unheld(self, key: Key) -> None:
        if key in self._rank and self._eligible(key):
            heapq.heappush(self._heap, (self._rank[key], key))

    def _rerank(self, key: Key, inserted: bool) -> None:
        self._tick += 1
        rank = self._rank[key] = self._new_rank(key, inserted)
        if self._eligible(key):
            heapq.heappush(self._heap, (rank, key))

    def insert(self, key: Key, parent: Key | None = None) -> None:
        if key in self._rank:
            self.access(key)
            return
        self._family.add(key, parent)  # a parent that gains its first child: its entry goes stale
        self._rank[key] = ()
        self._rerank(key, True)

    def access(self, key: Key) -> None:
        if key in self._rank:
            self._rerank(key, False)

    def remove(self, key: Key, evicted: bool = False) -> None:
        rank = self._rank.pop(key, None)
        if rank is None:
            return
        if evicted:
            self._evicted(rank)
        self._forget(key)
        freed = self._family.drop(key)
        if freed is not None and freed in self._rank:
            heapq.heappush(self._heap, (self._rank[freed], freed))
        if len(self._heap) > 4 * len(self._rank) + 64:
            self._heap = [e for e in self._heap if self._live(e)]
            heapq.heapify(self._heap)

    def _forget(self, key: Key) -> None:
        pass

    def _evicted(self, rank: tuple) -> None:
        pass

    def _live(self, entry: tuple[tuple, Key]) -> bool:
        rank, key = entry
        return self._rank.get(key) == rank and self._eligible(key)

    def victim(self) -> Key | None:
        while self._heap:
            if self._live(self._heap[0]):
                return self._heap[0][1]
            heapq.heappop(self._heap)
        # every key not held by the caller has a held child: only a cycle of parents does that;
        # the lowest rank of those then
        free = (k for k in self._rank if k not in self._held)
        return min(free, key=self._rank.__getitem__, default=None)

    def order(self) -> list[Key]:
        """Held keys, lowest rank first, whether or not they have a child."""
        return sorted(self._rank, key=self._rank.__getitem__)


class LRUPolicy(_RankedPolicy):
    """Least recently used first; leaf first: the least recently used block without a held child."""

    def __init__(self, leaf_first: bool = False):
        super().__init__(leaf_first)
        self.name = "lru_leaf" if leaf_first else "lru"

    def _new_rank(self, key: Key, inserted: bool) -> tuple:
        return (self._tick,)


class LFUDAPolicy(_RankedPolicy):
    """LFU with dynamic ageing (LFU-DA: Arlitt et al., "Evaluating content management techniques
    for Web proxy caches", 2000; the GreedyDual family): a block's rank is the cache's age ``L``
    when it was last used plus its uses, ``L`` being the rank of the last victim, ties to the least
    recently used. A block used often outranks one used once, but only while its uses are recent:
    every eviction ages the cache, so blocks used long ago fall behind new ones."""

    def __init__(self, leaf_first: bool = False):
        super().__init__(leaf_first)
        self.name = "lfuda_leaf" if leaf_first else "lfuda"
        self.age = 0
        self._uses: dict[Key, int] = {}

    def _new_rank(self, key: Key, inserted: bool) -> tuple:
        uses = self._uses[key] = 1 if inserted else self._uses[key] + 1
        return (self.age + uses, self._tick)

    def _forget(self, key: Key) -> None:
        del self._uses[key]

    def _evicted(self, rank: tuple) -> None:
        self.age = max(self.age, rank[0])


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (see the module docstring) over ``capacity`` keys; the small queue holds
    ``small_fraction`` of it, the ghost queue as many keys as the main queue's share.

    ``capacity`` sizes the queues only: the caller decides when to evict, and the policy evicts
    from the small queue while it holds at least its share, else from the main one."""

    MAX_FREQ = 3

    def __init__(self, capacity: int, leaf_first: bool = False, small_fraction: float = 0.1):
        super().__init__(leaf_first)
        self.name = "s3fifo_leaf" if leaf_first else "s3fifo"
        self.small_fraction = small_fraction
        self.resize(capacity)
        self._small: OrderedDict[Key, None] = OrderedDict()  # oldest first
        self._main: OrderedDict[Key, None] = OrderedDict()
        self._ghost: OrderedDict[Key, None] = OrderedDict()
        self._freq: dict[Key, int] = {}

    def resize(self, capacity: int) -> None:
        """Queue shares for a new capacity (keys held stay where they are)."""
        self.capacity = max(1, int(capacity))
        self.small_target = max(1, int(self.capacity * self.small_fraction))
        self.ghost_size = max(1, self.capacity - self.small_target)

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: Key) -> bool:
        return key in self._freq

    def insert(self, key: Key, parent: Key | None = None) -> None:
        if key in self._freq:
            self.access(key)
            return
        self._family.add(key, parent)
        self._freq[key] = 0
        if key in self._ghost:  # evicted from the small queue not long ago: straight to the main one
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def access(self, key: Key) -> None:
        f = self._freq.get(key)
        if f is not None and f < self.MAX_FREQ:
            self._freq[key] = f + 1

    def remove(self, key: Key, evicted: bool = False) -> None:
        if self._freq.pop(key, None) is None:
            return
        if key in self._small:
            del self._small[key]
            if evicted:  # evicted from the small queue: its key is remembered
                self._ghost[key] = None
                while len(self._ghost) > self.ghost_size:
                    self._ghost.popitem(last=False)
        self._main.pop(key, None)
        self._family.drop(key)

    def _pinned(self, key: Key) -> bool:
        return key in self._held or (self.leaf_first and self._family.has_child(key))

    def _scan(self, queue: OrderedDict) -> tuple[Key | None, bool]:
        """The first key of ``queue`` used since it entered (True) or evictable (False)."""
        for key in queue:
            if self._freq[key] > 0:
                return key, True
            if not self._pinned(key):
                return key, False
        return None, False

    def victim(self) -> Key | None:
        # Moving used keys on changes only their order, never the set held; a victim not removed
        # stays where it is and is found again.
        for _ in range(2 * len(self._freq) + 2):
            if self._small and (len(self._small) >= self.small_target or not self._main):
                key, used = self._scan(self._small)
                if used:  # to the main queue
                    del self._small[key]
                    self._main[key] = None
                    self._freq[key] = 0
                    continue
                if key is not None:
                    return key
            key, used = self._scan(self._main)
            if used:  # round again, one use fewer
                self._main.move_to_end(key)
                self._freq[key] -= 1
                continue
            if key is not None:
                return key
            key, used = self._scan(self._small)  # the main queue is all parents of held blocks
            if key is not None and not used:
                return key
            if key is None:
                break
            del self._small[key]
            self._main[key] = None
            self._freq[key] = 0
        # every key not held by the caller is a parent of a held key (a cycle of parents): the oldest
        return next((k for q in (self._main, self._small) for k in q if k not in self._held), None)


def make_policy(name: str, capacity: int) -> EvictionPolicy:
    """The policy called ``name`` (one of ``POLICIES``) for a cache of ``capacity`` keys."""
    if name == "lru":
        return LRUPolicy()
    if name == "lru_leaf":
        return LRUPolicy(leaf_first=True)
    if name == "lfuda":
        return LFUDAPolicy()
    if name == "lfuda_leaf":
        return LFUDAPolicy(leaf_first=True)
    if name == "s3fifo":
        return S3FIFOPolicy(capacity)
    if name == "s3fifo_leaf":
        return S3FIFOPolicy(capacity, leaf_first=True)
    raise ValueError(f"unknown eviction policy {name!r} (one of {', '.join(POLICIES)})")


def insert_chain(policy: EvictionPolicy, chain: Iterable[Key]) -> None:
    """Insert (or use again) the keys of one prompt, each the parent of the next."""
    parent = None
    for key in chain:
        policy.insert(key, parent)
        parent = key
