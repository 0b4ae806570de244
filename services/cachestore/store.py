"""The cache store's two tiers: a bytes-bounded LRU in DRAM and an LMDB database on disk, which
evicts by an eviction policy (``services.cachestore.eviction``; LFU with ageing, leaf first, unless
configured otherwise) between two watermarks.

Values are encoded blocks (``libs.kv.codec.encode_block``); keys are block hashes.
Tiers are inclusive: a block promoted from disk keeps its disk copy, so demoting it again only
refreshes its recency. DRAM is volatile; ``TieredStore.close`` writes DRAM-only blocks to disk so
a clean restart loses nothing. ``TieredStore`` serialises its operations with one lock, except
the disk reads of loads and the disk writes of puts, which run beside it (``DiskTier`` guards its
own writers), so the service can call it from worker threads.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from libs.kv.codec import BlockCorrupt, verify_block
from libs.log import get_logger
from services.cachestore.eviction import DEFAULT_EVICT_HIGH, DEFAULT_EVICT_LOW, DEFAULT_POLICY, make_policy
from services.cachestore.holds import Holds

log = get_logger("cachestore.store")

Block = bytes | memoryview  # an encoded block as a tier holds it: its own bytes, or a view (DramTier)


class DramTier:
    """Bytes-bounded LRU of key -> encoded block (most recently used last).

    A block may be kept as a view into the buffer it arrived in (a received blob of several
    blocks) rather than copied out of it. Such a buffer lives while any of its blocks does, so on
    its first read a block is copied out of a buffer much larger than itself: a block that stays
    hot does not keep the rest of its blob in memory, and the tier's count stays near what it holds.
    """

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[bytes, Block] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: bytes) -> bool:
        return key in self._items

    def put(self, key: bytes, value: Block) -> list[tuple[bytes, Block]]:
        """Store ``value``; returns the (key, value) pairs evicted to make room, oldest first.

        A value larger than the whole tier is not kept and comes straight back as evicted.
        """
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        if len(value) > self.capacity_bytes:
            self.evictions += 1
            return [(key, value)]
        evicted = []
        while self.bytes + len(value) > self.capacity_bytes:
            k, v = self._items.popitem(last=False)
            self.bytes -= len(v)
            evicted.append((k, v))
        self._items[key] = value
        self.bytes += len(value)
        self.evictions += len(evicted)
        return evicted

    def get(self, key: bytes) -> Block | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
            if isinstance(value, memoryview) and memoryview(value.obj).nbytes > 2 * value.nbytes:
                value = self._items[key] = bytes(value)
        return value

    def pop(self, key: bytes) -> bytes | None:
        value = self._items.pop(key, None)
        if value is not None:
            self.bytes -= len(value)
        return value

    def keys(self) -> list[bytes]:
        """Keys from least to most recently used."""
        return list(self._items)


DEFAULT_MAX_PINS = 65536  # blocks pinned at once, at most (``pool_max_pinned_blocks``)
_SEQ = struct.Struct(">Q")  # recency sequence number; big-endian so LMDB orders it numerically
_ENTRY = struct.Struct(">QQ")  # (seq, size) of a stored block, followed by its parent's key if known

# LMDB needs room beyond the payload: B-tree pages, page-rounded overflow pages for large values,
# and copy-on-write pages that are only reused after the transactions that freed them end.
_MAP_HEADROOM_FRACTION = 0.5
_MAP_HEADROOM_MIN = 64 << 20
_PAGE = 4096
# why a block left the disk tier (``DiskTier.evicted_by``, ``StoreStats.evictions_by_reason``)
EVICTION_REASONS = (
    "watermark",  # the tier held more than its high watermark: evicted down to the low one, after puts
    "capacity",  # a put would have taken the tier past its bound: evicted on the put's path
    "map_full",  # LMDB's map was full though the bound was not (pages not yet reusable)
    "too_large",  # a block larger than the whole tier, never kept
)


def _footprint(n: int) -> int:
    """Bytes a value of ``n`` bytes takes in LMDB: values over about half a page go to their own
    overflow pages (with a 16-byte header), so a block of 8,266 bytes costs 12,288. The bound is
    kept on footprints, or a tier of small blocks would fill the map long before its bound."""
    return n if n <= _PAGE // 2 else -(-(n + 16) // _PAGE) * _PAGE


def _entry(seq: int, size: int, parent: bytes | None) -> bytes:
    return _ENTRY.pack(seq, size) + (parent or b"")


def _unentry(entry: bytes) -> tuple[int, int, bytes | None]:
    """(seq, size, parent key or None) of an ``index`` value (entries written before parents were
    kept have none)."""
    seq, size = _ENTRY.unpack_from(entry)
    return seq, size, bytes(entry[_ENTRY.size:]) or None


class DiskTier:
    """LMDB at ``path``: key -> block, bounded to ``capacity_bytes`` of values, evicting by an
    eviction policy (``services.cachestore.eviction``; ``policy`` names it).

    Three sub-databases, updated in one transaction per operation:
    ``blocks`` key -> value, ``index`` key -> (seq, size, parent key), ``lru`` seq -> key. The
    lowest ``seq`` is the least recently used block. Everything persists, so reopening the
    directory finds the blocks, their recency and their parents; the byte count and the policy's
    state are rebuilt from ``index`` and ``lru`` on open (the policy sees the blocks inserted in
    their order of recency: what it knew of their uses beyond that is lost).

    The policy picks the victims; it is told of every block that enters or leaves, and of uses:
    ``get`` and ``touch`` (which also refresh the stored recency), ``used`` (only the policy: a
    DRAM hit), and a put of a block already held. A put evicts only what keeps the tier within its
    bound ("capacity"); ``evict_to_low`` is the maintenance that evicts from ``high`` down to
    ``low`` of it ("watermark"). Evictions are counted by reason in ``evicted_by``.
    """

    def __init__(self, path: str | Path, capacity_bytes: int, *, map_size: int | None = None,
                 policy: str = DEFAULT_POLICY, high: float = DEFAULT_EVICT_HIGH, low: float = DEFAULT_EVICT_LOW,
                 max_pins: int = DEFAULT_MAX_PINS):
        if not 0 < low <= high <= 1:
            raise ValueError(f"eviction watermarks: 0 < low ({low}) <= high ({high}) <= 1")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.high_bytes = int(capacity_bytes * high)
        self.low_bytes = int(capacity_bytes * low)
        if map_size is None:
            map_size = capacity_bytes + max(int(capacity_bytes * _MAP_HEADROOM_FRACTION), _MAP_HEADROOM_MIN)
        # Commits reach the page cache, not the device: a crash of the process loses nothing
        # committed, a crash of the machine may lose what was written since the last ``sync``
        # (the cachestore syncs every ``disk_sync_seconds``, off the store's lock). A flush per
        # commit held the store for a device write per block: puts queued behind it and so did
        # every load. No readahead: the pool is usually larger than the page cache, and the index
        # and LRU pages every put and touch visits are read at random.
        self._env = lmdb.open(str(self.path), map_size=map_size, max_dbs=3, metasync=False, sync=False,
                              readahead=False)
        self._sync_lock = threading.Lock()  # a sync and the close never overlap
        # Writers from several threads (a put's transaction runs outside the store's lock): LMDB
        # serialises them itself, this guards the counters kept beside it.
        self._write_lock = threading.RLock()
        # The policy has a lock of its own, held only for its in-memory steps: a use noted from a
        # DRAM hit (``used``) never waits for a disk transaction.
        self._policy_lock = threading.Lock()
        self._blocks = self._env.open_db(b"blocks")
        self._index = self._env.open_db(b"index")
        self._lru = self._env.open_db(b"lru")
        self.bytes = 0
        self.count = 0
        self.evicted_by: dict[str, int] = dict.fromkeys(EVICTION_REASONS, 0)
        self._seq = 0
        with self._env.begin() as txn:
            for _, entry in txn.cursor(db=self._index):
                self.bytes += _unentry(entry)[1]
                self.count += 1
            self.policy = make_policy(policy, 1)
            # the blocks leased or pinned: held in the policy, never its victims
            self.holds = Holds(self.policy, max_pins)
            self._sized = False
            self._size_policy()
            for seq, key in txn.cursor(db=self._lru):
                entry = txn.get(key, db=self._index)
                self.policy.insert(key, _unentry(entry)[2] if entry is not None else None)
                self._seq = _SEQ.unpack(seq)[0]

    def __len__(self) -> int:
        return self.count

    def _size_policy(self) -> None:
        """Tell the policy how many blocks the bound holds, from the blocks held (once there are some)."""
        if not self._sized and self.count:
            self.policy.resize(max(1, self.capacity_bytes * self.count // max(1, self.bytes)))
            self._sized = True

    @property
    def evictions(self) -> int:
        """Blocks that left the tier to make room (any reason)."""
        return sum(self.evicted_by.values())

    def _next_seq(self) -> bytes:
        self._seq += 1  # gaps after an aborted transaction are harmless
        return _SEQ.pack(self._seq)

    # ---- writes
    def put(self, key: bytes, value: bytes, parent: bytes | None = None) -> list[bytes]:
        """Store ``value`` (replacing any previous one); returns the keys evicted to make room.

        A value that cannot be stored at all (larger than the tier, or the map stays full) is
        reported as evicted itself.
        """
        return self._write([(key, value)], replace=True, parents={key: parent} if parent else None)

    def add_many(self, items: list[tuple[bytes, bytes]], parents: dict[bytes, bytes] | None = None, *,
                 demoted: int = 0) -> list[bytes]:
        """Store each (key, value) in order, in one transaction: a key already held keeps its value
        and only becomes the most recently used (a use, but for the first ``demoted`` items: blocks
        DRAM let go, whose stored recency alone is refreshed). ``parents``: key -> the key of the
        block before it in its prompt, where known. Returns the keys evicted (or not storable), as ``put``."""
        return self._write(items, replace=False, parents=parents, demoted=demoted)

    def _write(self, items: list[tuple[bytes, bytes]], *, replace: bool, parents: dict[bytes, bytes] | None = None,
               demoted: int = 0) -> list[bytes]:
        todo = [(key, value, i >= demoted) for i, (key, value) in enumerate(items)]
        with self._write_lock:
            return self._write_locked(todo, replace, parents or {})

    def _write_locked(self, items: list[tuple[bytes, bytes, bool]], replace: bool, parents: dict[bytes, bytes]
                      ) -> list[bytes]:
        evicted: list[bytes] = []
        todo = []
        for item in items:
            key, value, _ = item
            if _footprint(len(value)) > self.capacity_bytes:
                self.delete(key)
                self.evicted_by["too_large"] += 1
                evicted.append(key)
            else:
                todo.append(item)
        if not todo:
            return evicted
        for _ in range(16):
            try:
                return evicted + self._write_txn(todo, replace, parents)
            except lmdb.MapFullError:
                # The map is fuller than the logical count says: free real pages and retry.
                freed = self._evict(max(1, self.count // 8), "map_full")
                evicted += freed
                if not freed:
                    break
        if len(todo) > 1:  # more than the map can take at once: one by one, the last ones stay
            for item in todo:
                evicted += self._write_locked([item], replace, parents)
            return evicted
        log.warning("disk_put_dropped", keys=len(todo), size=sum(len(v) for _, v, _ in todo))
        self.evicted_by["map_full"] += len(todo)
        return evicted + [k for k, _, _ in todo]

    def _write_txn(self, items: list[tuple[bytes, bytes, bool]], replace: bool, parents: dict[bytes, bytes]
                   ) -> list[bytes]:
        """One transaction; the policy follows it as it goes, and is put back if it aborts (the
        blocks it had evicted come back as if new: the one thing an abort costs)."""
        evicted: list[bytes] = []
        inserted: list[bytes] = []
        replaced: list[bytes] = []
        victim_parents: dict[bytes, bytes | None] = {}
        total, count = self.bytes, self.count
        policy = self.policy
        try:
            with self._env.begin(write=True) as txn:
                for key, value, use in items:
                    size = _footprint(len(value))
                    old = txn.get(key, db=self._index)
                    parent = parents.get(key)
                    if old is not None:
                        old_seq, old_size, old_parent = _unentry(old)
                        txn.delete(_SEQ.pack(old_seq), db=self._lru)
                        if not replace:  # recency only
                            if use:
                                with self._policy_lock:
                                    policy.access(key)
                            self._place(txn, key, old_size, old_parent)
                            continue
                        # replaced: out of the policy while room is made, then in again, used
                        total, count = total - old_size, count - 1
                        parent = parent or old_parent
                        with self._policy_lock:
                            victim_parents[key] = policy.parent(key)
                            policy.remove(key)
                        replaced.append(key)
                    while total + size > self.capacity_bytes:
                        with self._policy_lock:
                            victim = policy.victim()
                            if victim is not None:
                                victim_parents[victim] = policy.parent(victim)
                                policy.remove(victim, evicted=True)
                        if victim is None:
                            break
                        total -= self._drop(txn, victim)
                        count -= 1
                        evicted.append(victim)
                    txn.put(key, value, db=self._blocks)
                    self._place(txn, key, size, parent)
                    with self._policy_lock:
                        policy.insert(key, parent)
                        if old is not None:
                            policy.access(key)
                    inserted.append(key)
                    total, count = total + size, count + 1
        except BaseException:
            with self._policy_lock:
                for key in inserted:
                    policy.remove(key)
                gone = set(inserted) - set(replaced)  # new in the aborted transaction
                for key in dict.fromkeys(evicted + replaced):
                    if key not in gone:
                        policy.insert(key, victim_parents.get(key))
            raise
        self.bytes, self.count = total, count
        self.evicted_by["capacity"] += len(evicted)
        self._size_policy()
        return evicted

    def _place(self, txn, key: bytes, size: int, parent: bytes | None) -> None:
        """Make ``key`` the most recently used (its old ``lru`` entry already gone)."""
        seq = self._next_seq()
        txn.put(seq, key, db=self._lru)
        txn.put(key, _entry(_SEQ.unpack(seq)[0], size, parent), db=self._index)

    def _drop(self, txn, key: bytes) -> int:
        """Remove ``key`` from ``blocks``, ``index`` and ``lru``; returns its size."""
        entry = txn.pop(key, db=self._index)
        txn.delete(key, db=self._blocks)
        if entry is None:
            return 0
        seq, size, _ = _unentry(entry)
        txn.delete(_SEQ.pack(seq), db=self._lru)
        return size

    def _evict(self, n: int, reason: str, nbytes: int | None = None) -> list[bytes]:
        """Evict the policy's next ``n`` victims (or fewer, once ``nbytes`` are freed) in their own
        transaction."""
        evicted, freed = [], 0
        victim_parents: dict[bytes, bytes | None] = {}
        try:
            with self._env.begin(write=True) as txn:
                while len(evicted) < n and (nbytes is None or freed < nbytes):
                    with self._policy_lock:
                        victim = self.policy.victim()
                        if victim is None:
                            break
                        victim_parents[victim] = self.policy.parent(victim)
                        self.policy.remove(victim, evicted=True)
                    freed += self._drop(txn, victim)
                    evicted.append(victim)
        except BaseException:
            with self._policy_lock:
                for key in evicted:
                    self.policy.insert(key, victim_parents[key])
            raise
        self.bytes -= freed
        self.count -= len(evicted)
        self.evicted_by[reason] += len(evicted)
        return evicted

    def over_high(self) -> bool:
        """Whether the tier holds more than its high watermark (``evict_to_low`` is due)."""
        return self.bytes > self.high_bytes

    def evict_to_low(self, batch: int = 4096) -> list[bytes]:
        """Evict down to the low watermark, ``batch`` blocks a transaction; the keys evicted."""
        evicted: list[bytes] = []
        with self._write_lock:
            while self.bytes > self.low_bytes:
                got = self._evict(batch, "watermark", self.bytes - self.low_bytes)
                if not got:
                    break
                evicted += got
        return evicted

    def used(self, keys: list[bytes]) -> None:
        """Tell the policy ``keys`` were used (those held); the stored recency is left as it is."""
        with self._policy_lock:
            for k in keys:
                self.policy.access(k)

    def delete(self, key: bytes) -> bool:
        with self._write_lock:
            with self._env.begin(write=True) as txn:
                entry = txn.get(key, db=self._index)
                if entry is None:
                    return False
                size = self._drop(txn, key)
            with self._policy_lock:
                self.policy.remove(key)
            self.bytes -= size
            self.count -= 1
            return True

    def touch(self, key: bytes, *, use: bool = True) -> bool:
        """Mark ``key`` most recently used (a use for the policy unless ``use`` is False); False when absent."""
        try:
            with self._write_lock, self._env.begin(write=True) as txn:
                entry = txn.get(key, db=self._index)
                if entry is None:
                    return False
                old_seq, size, parent = _unentry(entry)
                txn.delete(_SEQ.pack(old_seq), db=self._lru)
                self._place(txn, key, size, parent)
        except lmdb.MapFullError:
            log.warning("disk_touch_skipped_map_full", key=key.hex())
        if use:
            self.used([key])
        return True

    # ---- holds: blocks not evicted for now (``services.cachestore.holds``)
    def lease(self, keys: list[bytes]) -> None:
        with self._policy_lock:
            self.holds.lease(keys)

    def release(self, keys: list[bytes]) -> None:
        with self._policy_lock:
            self.holds.release(keys)

    def pin(self, keys: list[bytes], until: float) -> int:
        """Pin ``keys`` until ``until`` (monotonic seconds); how many are held now. ``PinLimit`` past the bound."""
        with self._policy_lock:
            return self.holds.pin(keys, until)

    def unpin(self, keys: list[bytes]) -> int:
        with self._policy_lock:
            return self.holds.unpin(keys)

    def expire_pins(self, now: float) -> int:
        with self._policy_lock:
            return self.holds.expire(now)

    # ---- reads
    def get(self, key: bytes, *, touch: bool = True) -> bytes | None:
        with self._env.begin() as txn:
            value = txn.get(key, db=self._blocks)
        if value is not None and touch:
            self.touch(key)
        return value

    def contains(self, key: bytes) -> bool:
        with self._env.begin() as txn:
            return txn.get(key, db=self._index) is not None

    def contains_many(self, keys: list[bytes]) -> list[bool]:
        with self._env.begin() as txn:
            return [txn.get(k, db=self._index) is not None for k in keys]

    def keys(self) -> list[bytes]:
        """Keys from least to most recently used."""
        with self._env.begin() as txn:
            return [k for _, k in txn.cursor(db=self._lru)]

    def parent(self, key: bytes) -> bytes | None:
        """The stored parent of ``key`` (None: not held, or none known)."""
        with self._env.begin() as txn:
            entry = txn.get(key, db=self._index)
        return _unentry(entry)[2] if entry is not None else None

    def sync(self) -> None:
        """Write what was committed through to the device (safe beside writers in other threads)."""
        with self._sync_lock:
            if self._env is not None:
                self._env.sync(True)

    def close(self) -> None:
        with self._write_lock, self._sync_lock:
            self._env.sync(True)
            self._env.close()
            self._env = None


@dataclass
class StoreStats:
    dram_bytes: int
    dram_blocks: int
    disk_bytes: int
    disk_blocks: int
    evictions_dram: int  # blocks demoted out of DRAM
    evictions_disk: int  # blocks dropped from disk (gone from the pool)
    corrupt: int  # blocks deleted because their bytes failed verification
    # evictions_disk by reason (``EVICTION_REASONS``: watermark, capacity, map_full, too_large)
    evictions_by_reason: dict[str, int] = field(default_factory=dict)
    pinned: int = 0  # keys pinned (held or awaited)
    pinned_held: int = 0  # pinned keys held
    hits: dict[str, int] = field(default_factory=dict)  # blocks gets found, per tier
    promotions: int = 0  # disk hits copied back into DRAM


@dataclass
class StoreChanges:
    """What entered and what left the store (both tiers together) over some operations."""

    stored: list[bytes] = field(default_factory=list)  # keys newly held
    removed: list[bytes] = field(default_factory=list)  # keys no longer held by either tier

    def __bool__(self) -> bool:
        return bool(self.stored or self.removed)


class TieredStore:
    """DRAM in front of LMDB, written through: every put lands in both, a DRAM eviction leaves
    the LMDB copy (a demotion), an LMDB hit is promoted back into DRAM. Thread-safe: every public
    method holds one lock, but for the disk reads of ``get_many`` and the disk transactions of
    ``put_many`` and ``maintain``, which run outside it.

    Blocks leave the store from the disk tier only, by its eviction policy (``eviction``, one of
    ``services.cachestore.eviction.POLICIES``), which hears of every hit in either tier and of each
    block's parent (the block before it in its prompt) where the put names it. DRAM is an LRU of
    the hot copies. A put evicts from disk only what keeps it within ``disk_bytes``; ``maintain``,
    due once the disk holds more than ``evict_high`` of it (``needs_maintenance``), evicts down to
    ``evict_low`` of it: the caller runs it after puts, off their path. Blocks a load is reading
    from disk are leased, and blocks an operator pinned (``pin``, until a time to live) are held:
    no eviction takes them (``services.cachestore.holds``).

    The store keeps the set of keys it holds (either tier) and an ordered log of changes to it:
    a key is *stored* when a put brings a key it did not hold, *removed* when it leaves both tiers
    (evicted from LMDB while not in DRAM, dropped as too large, or deleted as corrupt). Moving
    between tiers is neither. ``drain_changes`` hands the log out, e.g. to publish KV events.
    """

    def __init__(self, dram_bytes: int, disk_dir: str | Path, disk_bytes: int, *, disk_map_size: int | None = None,
                 eviction: str = DEFAULT_POLICY, evict_high: float = DEFAULT_EVICT_HIGH,
                 evict_low: float = DEFAULT_EVICT_LOW, max_pins: int = DEFAULT_MAX_PINS):
        self.dram = DramTier(dram_bytes)
        self.disk = DiskTier(disk_dir, disk_bytes, map_size=disk_map_size, policy=eviction, high=evict_high,
                             low=evict_low, max_pins=max_pins)
        self.corrupt = 0
        self.hits = {"dram": 0, "disk": 0}  # blocks gets found in each tier
        self.promotions = 0  # disk hits copied back into DRAM
        self._lock = threading.Lock()
        # Loads read the disk, and puts write it, outside the lock (LMDB serialises its writers and
        # never blocks a reader; ``DiskTier`` guards its own counters), so a DRAM hit or a
        # presence check never waits for a device read or a large write transaction.
        self._outside = 0  # such disk operations in progress: the disk stays open for them
        self._none_outside = threading.Condition(self._lock)
        self._closed = False
        # The held set and the change log have their own short lock, so reading them never waits
        # for a store operation (LMDB I/O) to finish.
        self._log_lock = threading.Lock()
        self._held: set[bytes] = set(self.disk.keys())
        self._log: list[tuple[bytes, bool]] = []  # (key, stored?) in the order it happened

    # ---- change tracking (callers hold self._lock)
    def _settle(self, candidates: list[bytes], new_keys: list[bytes] = ()) -> StoreChanges:
        """Record the effect of one operation: ``candidates`` may have left both tiers,
        ``new_keys`` may have entered."""
        changes = StoreChanges()
        new = dict.fromkeys(new_keys)
        for k in dict.fromkeys(candidates):
            if k not in new and k in self._held and k not in self.dram and not self.disk.contains(k):
                changes.removed.append(k)
        for k in new:
            held = k in self.dram or self.disk.contains(k)
            if held and k not in self._held:
                changes.stored.append(k)
            elif not held and k in self._held:
                changes.removed.append(k)
        if changes:
            with self._log_lock:
                for k in changes.removed:
                    self._held.discard(k)
                    self._log.append((k, False))
                for k in changes.stored:
                    self._held.add(k)
                    self._log.append((k, True))
        return changes

    def drain_changes(self) -> StoreChanges:
        """The net changes since the last drain: ``stored`` and ``removed`` are disjoint, and
        applying them (in either order) to the held set as of the last drain gives the current one."""
        with self._log_lock:
            log_, self._log = self._log, []
        last: dict[bytes, bool] = {}
        for k, stored in log_:
            last.pop(k, None)  # keep the order of the last change
            last[k] = stored
        return StoreChanges(stored=[k for k, st in last.items() if st], removed=[k for k, st in last.items() if not st])

    def held_keys(self) -> list[bytes]:
        """Every key held (either tier), from memory: cheap, never waits for LMDB."""
        with self._log_lock:
            return list(self._held)

    # ---- operations
    def put(self, key: bytes, value: bytes | bytearray | memoryview, parent: bytes | None = None) -> StoreChanges:
        """Store an encoded block (``parent``: the key of the block before it in its prompt, if
        known); raises ``BlockCorrupt`` if it is not a valid block for ``key``.

        Returns what this put changed: ``stored == [key]`` unless the key was already held (or
        could not be kept at all), and the keys evicted from the store entirely to make room.
        """
        changes, refused = self.put_many([(key, value)], {key: parent} if parent else None)
        if refused:
            raise BlockCorrupt(refused[key])
        return changes

    def put_many(self, items: list[tuple[bytes, bytes | bytearray | memoryview]],
                 parents: dict[bytes, bytes] | None = None) -> tuple[StoreChanges, dict[bytes, str]]:
        """Store encoded blocks, in order, with one LMDB transaction for all of them (``parents``:
        key -> the key of the block before it in its prompt, where known).

        Returns what the puts changed (as ``put``) and the blocks refused: key -> why it is not a
        valid block for that key. The valid ones are stored either way.

        The store keeps the buffers it is given, not copies (DRAM holds views into a received
        blob): the caller hands them over and must not change them afterwards.
        """
        good: list[tuple[bytes, Block]] = []
        refused: dict[bytes, str] = {}
        for key, value in items:
            try:
                verify_block(value, expected_key=key)
            except BlockCorrupt as e:
                refused[key] = str(e)
                continue
            good.append((key, value if isinstance(value, (bytes, memoryview)) else memoryview(value)))
        if not good:
            return StoreChanges(), refused
        with self._lock:
            if self._closed:
                raise RuntimeError("the store is closed")
            demoted: list[tuple[bytes, Block]] = []
            for key, data in good:
                demoted += self.dram.put(key, data)
            self._outside += 1
        # Write-through: LMDB holds every block too, so a crash (kill -9) loses nothing that was
        # acknowledged; DRAM is the fast copy of the recently used ones. Blocks DRAM let go are on
        # disk already and only refresh their recency there, before the new ones (a block of this
        # very put that DRAM let go is written with the others, once).
        mine = {k for k, _ in good}
        demoted = [(k, v) for k, v in demoted if k not in mine]
        try:
            dropped = self.disk.add_many(demoted + good, parents, demoted=len(demoted))
        except BaseException:
            self._done_outside()
            raise
        with self._lock:
            try:
                return self._settle(dropped, new_keys=[k for k, _ in good]), refused
            finally:
                self._outside_ended()

    def _done_outside(self) -> None:
        with self._lock:
            self._outside_ended()

    def _outside_ended(self) -> None:
        """(Under the lock.) A disk operation outside the lock is over."""
        self._outside -= 1
        self._none_outside.notify_all()

    def _demote(self, evicted: list[tuple[bytes, Block]]) -> list[bytes]:
        """Move DRAM evictions to disk (already there, tiers being inclusive: recency only);
        returns the keys the disk dropped on the way."""
        return self.disk.add_many(evicted, demoted=len(evicted)) if evicted else []

    # ---- eviction down to the low watermark
    def needs_maintenance(self) -> bool:
        """Whether the disk holds more than its high watermark: ``maintain`` is due."""
        return self.disk.over_high()

    def maintain(self) -> StoreChanges:
        """Evict from the disk tier, by its policy, down to its low watermark if it is above its
        high one; returns what left the store. The disk transaction runs outside the store's lock,
        as a put's does."""
        with self._lock:
            if self._closed or not self.disk.over_high():
                return StoreChanges()
            self._outside += 1
        try:
            dropped = self.disk.evict_to_low()
        except BaseException:
            self._done_outside()
            raise
        with self._lock:
            try:
                return self._settle(dropped)
            finally:
                self._outside_ended()

    # ---- pins (``services.cachestore.holds``)
    def pin(self, keys: list[bytes], until: float) -> int:
        """Keep ``keys`` in the store until ``until`` (monotonic seconds), those held now and those
        that arrive meanwhile; returns how many are held now. Raises ``PinLimit`` past the bound."""
        with self._lock:
            return self.disk.pin(keys, until)

    def unpin(self, keys: list[bytes]) -> int:
        """End the pins of ``keys``; returns how many were pinned."""
        with self._lock:
            return self.disk.unpin(keys)

    def expire_pins(self, now: float) -> int:
        """End the pins whose time has come (their blocks evictable again); returns how many."""
        with self._lock:
            return self.disk.expire_pins(now)

    def get(self, key: bytes) -> bytes | None:
        """The encoded block, or None. Bytes that fail verification are deleted: a miss."""
        with self._lock:
            dropped: list[bytes] = []
            value = self._get(key, dropped)
            self._settle(dropped)
            return value

    def get_many(self, keys: list[bytes]) -> list[tuple[bytes, Block]]:
        """(key, block) for every present key, in the order asked.

        Blocks on disk are read and verified outside the store's lock (an LMDB reader never waits
        for the writer), so a load from the device holds up no put and no other load; they are
        promoted into DRAM afterwards if still held."""
        keys = list(dict.fromkeys(keys))
        with self._lock:
            if self._closed:
                return []
            hot = {k: v for k in keys if (v := self.dram.get(k)) is not None}
            # the blocks to read from disk are leased: not evicted while this read is under way
            reading = [k for k in keys if k not in hot]
            self.disk.lease(reading)
            self._outside += 1  # the disk stays open until this read is done
        self.disk.used(list(hot))  # a DRAM hit is a use of the block for the disk's policy too
        cold: dict[bytes, bytes | None] = {}
        try:
            for k in reading:
                v = self.disk.get(k, touch=False)
                if v is not None:
                    cold[k] = v if self._valid(k, v, "disk") else None
        except BaseException:
            self.disk.release(reading)
            self._done_outside()
            raise
        with self._lock:
            try:
                return self._settle_load(keys, hot, cold)
            finally:
                self.disk.release(reading)
                self._outside_ended()

    def _settle_load(self, keys: list[bytes], hot: dict[bytes, Block], cold: dict[bytes, bytes | None]
                     ) -> list[tuple[bytes, Block]]:
        """(Under the lock.) The blocks found, in order; blocks read from disk are promoted if
        still held, corrupt ones deleted."""
        found: list[tuple[bytes, Block]] = []
        dropped: list[bytes] = []
        for k in keys:
            v = hot.get(k)
            tier = "dram"
            if v is None and k in cold:
                v, tier = cold[k], "disk"
                if v is None:  # corrupt on disk
                    if self.disk.delete(k) and k not in self.dram:
                        dropped.append(k)
                    continue
                if self.disk.touch(k) and k not in self.dram:  # still held: promote it
                    dropped += self._demote(self.dram.put(k, v))
                    self.promotions += 1
            if v is not None:
                found.append((k, v))
                self.hits[tier] += 1
        self._settle(dropped)
        return found

    def _get(self, key: bytes, dropped: list[bytes]) -> bytes | None:
        value = self.dram.get(key)
        if value is not None:
            # Verified when it entered DRAM (put or promotion) and immutable since; readers check
            # every block end to end anyway, and a re-put of the key replaces it.
            self.disk.used([key])
            self.hits["dram"] += 1
            return value
        value = self.disk.get(key)
        if value is None:
            return None
        if not self._valid(key, value, "disk"):
            self.disk.delete(key)
            dropped.append(key)
            return None
        dropped += self._demote(self.dram.put(key, value))  # promote; the disk copy stays
        self.promotions += 1
        self.hits["disk"] += 1
        return value

    def _valid(self, key: bytes, value: bytes, tier: str) -> bool:
        try:
            verify_block(value, expected_key=key)
            return True
        except BlockCorrupt as e:
            self.corrupt += 1
            log.warning("block_corrupt_dropped", key=key.hex(), tier=tier, error=str(e))
            return False

    def where(self, key: bytes) -> str | None:
        """"dram", "disk" or None. Does not verify the bytes nor change recency."""
        return self.where_many([key])[0]

    def where_many(self, keys: list[bytes]) -> list[str | None]:
        with self._lock:
            on_disk = self.disk.contains_many([k for k in keys if k not in self.dram])
            it = iter(on_disk)
            return ["dram" if k in self.dram else ("disk" if next(it) else None) for k in keys]

    def exists(self, key: bytes) -> bool:
        return self.where(key) is not None

    def longest_prefix(self, keys: list[bytes]) -> int:
        """How many leading ``keys`` are present (in either tier)."""
        n = 0
        for tier in self.where_many(keys):
            if tier is None:
                break
            n += 1
        return n

    def keys(self) -> set[bytes]:
        """Every key held, for an index resync."""
        with self._lock:
            return set(self.dram.keys()) | set(self.disk.keys())

    def usage(self) -> dict[str, tuple[int, int, int, int]]:
        """Per tier: (bytes held, its bound, blocks held, blocks gets found there). Counters read
        without the lock (a heartbeat's, never waiting for a disk transaction): each is current."""
        return {"dram": (self.dram.bytes, self.dram.capacity_bytes, len(self.dram), self.hits["dram"]),
                "disk": (self.disk.bytes, self.disk.capacity_bytes, len(self.disk), self.hits["disk"])}

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                dram_bytes=self.dram.bytes,
                dram_blocks=len(self.dram),
                disk_bytes=self.disk.bytes,
                disk_blocks=len(self.disk),
                evictions_dram=self.dram.evictions,
                evictions_disk=self.disk.evictions,
                corrupt=self.corrupt,
                evictions_by_reason=dict(self.disk.evicted_by),
                pinned=self.disk.holds.pinned,
                pinned_held=self.disk.holds.pinned_held,
                hits=dict(self.hits),
                promotions=self.promotions,
            )

    def flush(self) -> None:
        """Write DRAM-only blocks to disk, oldest first, so disk recency follows DRAM recency."""
        with self._lock:
            dropped: list[bytes] = []
            for k in self.dram.keys():
                if not self.disk.touch(k, use=False):
                    dropped += self.disk.put(k, self.dram.get(k))
            self._settle(dropped)

    def sync_disk(self) -> None:
        """Make the disk tier's committed blocks durable across a machine crash; never takes the
        store's lock, so puts and loads go on while the device writes."""
        self.disk.sync()

    def close(self, *, flush: bool = True) -> None:
        if flush:
            self.flush()
        with self._lock:
            self._closed = True
            while self._outside:
                self._none_outside.wait()
            self.disk.close()
