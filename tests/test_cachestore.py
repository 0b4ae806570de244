import asyncio

import nats
import pytest
import torch

from libs.kv.client import CacheClient, CacheError
from libs.kv.codec import BlockCorrupt, encode_block, split_blocks
from libs.kv.keys import block_hashes, namespace_digest
from libs.bus import TransferError, connect, synced
from libs.config import Settings
from libs.natsserver import NatsServer
from libs.protocol import Heartbeat, Subjects, decode
from services.cachestore.service import CacheStoreService
from services.cachestore.store import DiskTier, DramTier, StoreChanges, TieredStore


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def block(i: int, head_dim: int = 8) -> bytes:
    """A small valid encoded block whose content depends on ``i``."""
    t = torch.full((1, 2, 1, 4, head_dim), float(i))
    return encode_block(key(i), t)


BLOCK_BYTES = len(block(0))


# ---------------------------------------------------------------- DRAM tier
def test_dram_bound_and_lru_order():
    dram = DramTier(3 * BLOCK_BYTES)
    for i in range(3):
        assert dram.put(key(i), block(i)) == []
    assert dram.get(key(0)) == block(0)  # 0 is now the most recent; 1 is the oldest
    evicted = dram.put(key(3), block(3))
    assert evicted == [(key(1), block(1))]
    assert dram.keys() == [key(2), key(0), key(3)]
    assert dram.bytes == 3 * BLOCK_BYTES and len(dram) == 3
    assert dram.evictions == 1
    # Re-putting an existing key refreshes it without evicting anything.
    assert dram.put(key(2), block(2)) == []
    assert dram.keys() == [key(0), key(3), key(2)]


def test_dram_keeps_views_of_a_blob_and_a_hot_block_does_not_hold_the_rest_of_it(tmp_path):
    import gc
    import weakref

    import numpy as np

    from libs.protocol import BlocksMeta

    blob = np.frombuffer(b"".join(block(i) for i in range(3)), dtype=np.uint8).copy()  # as received
    alive = weakref.ref(blob)
    pieces = BlocksMeta(keys=[key(i) for i in range(3)], sizes=[BLOCK_BYTES] * 3).pieces(memoryview(blob))
    store = TieredStore(3 * BLOCK_BYTES, tmp_path / "lmdb", 1 << 20)
    store.put_many(pieces)
    del pieces
    assert store.dram.bytes == 3 * BLOCK_BYTES
    blob[:BLOCK_BYTES] = 0  # kept, not copied: the store holds the received buffer itself
    assert bytes(store.dram._items[key(0)][:8]) == bytes(8)
    blob[:BLOCK_BYTES] = np.frombuffer(block(0), dtype=np.uint8)
    del blob
    assert alive() is not None
    assert store.get_many([key(1)]) == [(key(1), block(1))]  # read: copied out of the blob
    for i in range(3, 5):  # blocks 0 and 2 leave DRAM (for the disk); 1 stays
        store.put(key(i), block(i))
    gc.collect()
    assert alive() is None and key(1) in store.dram  # the blob is freed though one of its blocks is hot
    assert store.get_many([key(i) for i in range(5)]) == [(key(i), block(i)) for i in range(5)]
    store.close()


def test_dram_many_puts_stay_bounded():
    dram = DramTier(10 * BLOCK_BYTES + BLOCK_BYTES // 2)
    evicted = []
    for i in range(100):
        evicted += dram.put(key(i), block(i))
        assert dram.bytes <= dram.capacity_bytes
    assert [k for k, _ in evicted] == [key(i) for i in range(90)]
    assert dram.keys() == [key(i) for i in range(90, 100)]


def test_dram_value_bigger_than_tier_comes_back():
    dram = DramTier(BLOCK_BYTES - 1)
    assert dram.put(key(0), block(0)) == [(key(0), block(0))]
    assert len(dram) == 0 and dram.bytes == 0


# ---------------------------------------------------------------- disk tier
def test_disk_bound_respected_under_many_puts(tmp_path):
    disk = DiskTier(tmp_path / "db", 10 * BLOCK_BYTES)
    evicted = []
    for i in range(200):
        evicted += disk.put(key(i), block(i))
        assert disk.bytes <= 10 * BLOCK_BYTES
    assert evicted == [key(i) for i in range(190)]
    assert len(disk) == 10
    assert disk.keys() == [key(i) for i in range(190, 200)]
    assert disk.get(key(0)) is None
    assert disk.get(key(199)) == block(199)
    disk.close()


def test_disk_lru_order_and_recency_survive_reopen(tmp_path):
    disk = DiskTier(tmp_path / "db", 3 * BLOCK_BYTES)
    for i in range(3):
        disk.put(key(i), block(i))
    assert disk.get(key(0)) == block(0)  # 0 becomes most recent
    disk.close()

    disk = DiskTier(tmp_path / "db", 3 * BLOCK_BYTES)
    assert len(disk) == 3 and disk.bytes == 3 * BLOCK_BYTES
    assert disk.keys() == [key(1), key(2), key(0)]
    assert disk.put(key(3), block(3)) == [key(1)]
    assert disk.touch(key(2))
    assert disk.put(key(4), block(4)) == [key(0)]
    assert disk.keys() == [key(3), key(2), key(4)]
    assert disk.get(key(4)) == block(4)
    assert disk.evictions == 2
    disk.close()


KILLED_WRITER = """
import os, signal, sys, torch
from libs.kv.codec import encode_block
from services.cachestore.store import TieredStore
store = TieredStore(1 << 20, sys.argv[1], 1 << 24)
for i in range(20):
    store.put(i.to_bytes(16, "big"), encode_block(i.to_bytes(16, "big"), torch.full((1, 2, 1, 4, 8), float(i))))
os.kill(os.getpid(), signal.SIGKILL)  # no close, no sync
"""


def test_blocks_put_before_a_kill_9_are_on_disk_after_it(tmp_path):
    """Commits are not flushed one by one, yet a process crash loses none of them."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "pool")], timeout=120)
    assert proc.returncode == -9
    disk = DiskTier(tmp_path / "pool", 1 << 24)
    assert len(disk) == 20
    assert all(disk.get(key(i)) == block(i) for i in range(20))
    disk.close()


def test_a_disk_sync_never_waits_for_the_store_lock(tmp_path):
    import threading

    store = TieredStore(4 * BLOCK_BYTES, tmp_path / "pool", 64 * BLOCK_BYTES)
    for i in range(8):
        store.put(key(i), block(i))
    with store._lock:  # a put or a load in progress
        syncer = threading.Thread(target=store.sync_disk)
        syncer.start()
        syncer.join(timeout=30)
        assert not syncer.is_alive()
    store.close()


def _stall(obj, name: str):
    """Make ``obj.name`` wait until released; returns (entered, release) events."""
    import threading

    entered, release = threading.Event(), threading.Event()
    original = getattr(obj, name)

    def stalled(*args, **kwargs):
        entered.set()
        release.wait(30)
        return original(*args, **kwargs)

    setattr(obj, name, stalled)
    return entered, release


def _start(fn):
    import threading

    t = threading.Thread(target=fn)
    t.start()
    return t


def _close_waits_for(store: TieredStore, release, worker, **close_kw) -> None:
    """``store.close`` waits while ``worker``'s disk operation is stalled, and both end once released."""
    closer = _start(lambda: store.close(**close_kw))
    closer.join(timeout=0.5)
    assert closer.is_alive()  # the disk stays open for the operation in progress
    release.set()
    worker.join(timeout=30)
    closer.join(timeout=30)
    assert not worker.is_alive() and not closer.is_alive()


def test_a_load_from_disk_holds_up_no_put_and_the_close_waits_for_it(tmp_path):
    store = TieredStore(2 * BLOCK_BYTES, tmp_path / "pool", 64 * BLOCK_BYTES)
    for i in range(4):
        store.put(key(i), block(i))  # 0 and 1 were demoted: on disk only
    assert store.where_many([key(0), key(3)]) == ["disk", "dram"]
    reading, release = _stall(store.disk, "get")
    got = []
    loader = _start(lambda: got.extend(store.get_many([key(0), key(3)])))
    assert reading.wait(30)
    store.put(key(4), block(4))  # the device read is in progress: a put goes on
    _close_waits_for(store, release, loader)
    assert got == [(key(0), block(0)), (key(3), block(3))]


def test_a_put_writing_the_disk_holds_up_no_load_and_the_close_waits_for_it(tmp_path):
    store = TieredStore(4 * BLOCK_BYTES, tmp_path / "db", 10 * BLOCK_BYTES)
    store.put(key(0), block(0))
    writing, release = _stall(store.disk, "add_many")
    changes = []
    putter = _start(lambda: changes.append(store.put(key(1), block(1))))
    assert writing.wait(30)
    # the transaction is in progress: loads from DRAM and presence checks go on
    seen = []
    reader = _start(lambda: seen.extend([store.get_many([key(0), key(1)]), store.where_many([key(0), key(2)])]))
    reader.join(timeout=10)
    assert not reader.is_alive(), "a load waited for a put's disk write"
    assert seen == [[(key(0), block(0)), (key(1), block(1))], ["dram", None]]
    _close_waits_for(store, release, putter, flush=False)
    assert changes == [StoreChanges(stored=[key(1)])]
    with pytest.raises(RuntimeError, match="closed"):
        store.put(key(2), block(2))
    reopened = DiskTier(tmp_path / "db", 10 * BLOCK_BYTES)
    assert reopened.keys() == [key(0), key(1)]
    reopened.close()


def test_disk_replace_and_delete_keep_the_byte_count(tmp_path):
    disk = DiskTier(tmp_path / "db", 10 * BLOCK_BYTES)
    disk.put(key(1), b"a" * 100)
    disk.put(key(1), b"b" * 40)
    assert disk.bytes == 40 and len(disk) == 1 and disk.get(key(1)) == b"b" * 40
    assert disk.delete(key(1)) and not disk.delete(key(1))
    assert disk.bytes == 0 and len(disk) == 0 and disk.keys() == []
    assert disk.put(key(2), b"x" * (10 * BLOCK_BYTES + 1)) == [key(2)]  # larger than the tier
    assert not disk.contains(key(2))
    disk.close()


def test_disk_bound_counts_lmdb_pages_so_small_blocks_never_fill_the_map(tmp_path):
    # blocks of 8,266 bytes take three 4 KiB pages each; the bound must hold on pages, and the
    # map (bound + headroom) must never fill, however many blocks go through
    disk = DiskTier(tmp_path / "db", 4 << 20)
    for i in range(2000):
        assert disk.put(key(i), bytes([i % 256]) * 8266) != [key(i)]  # never dropped
    assert disk.bytes <= 4 << 20 and len(disk) == (4 << 20) // (3 * 4096)
    disk.close()


def test_disk_map_full_evicts_and_retries(tmp_path):
    # The logical bound is far above what the map can hold, so only MapFullError stops puts.
    disk = DiskTier(tmp_path / "db", 1 << 30, map_size=1 << 20)
    value = lambda i: bytes([i % 256]) * (64 << 10)  # noqa: E731
    for i in range(60):  # ~3.8 MiB into a 1 MiB map
        disk.put(key(i), value(i))
        assert disk.get(key(i)) == value(i)
    assert 0 < len(disk) < 60
    footprint = 17 * 4096  # 64 KiB + LMDB's 16-byte overflow header: 17 pages
    assert disk.bytes == len(disk) * footprint
    assert disk.evictions == 60 - len(disk)
    assert disk.keys()[-1] == key(59)
    disk.close()
    disk = DiskTier(tmp_path / "db", 1 << 30, map_size=1 << 20)
    assert disk.bytes == len(disk) * footprint and disk.get(key(59)) == value(59)
    disk.close()


# ---------------------------------------------------------------- tiered store
def test_disk_add_many_keeps_held_values_and_orders_recency(tmp_path):
    disk = DiskTier(tmp_path / "db", 3 * BLOCK_BYTES, policy="lru")
    for i in range(3):
        disk.put(key(i), block(i))
    # 1 is held: its value stays, it only becomes the most recent; 3 then pushes out the oldest (0)
    assert disk.add_many([(key(1), block(9)), (key(3), block(3))]) == [key(0)]
    assert disk.keys() == [key(2), key(1), key(3)]
    assert disk.get(key(1)) == block(1) and disk.get(key(3)) == block(3)
    # a batch larger than the tier keeps its last blocks and reports the others as evicted
    assert disk.add_many([(key(i), block(i)) for i in range(10, 15)]) == [key(2), key(1), key(3), key(10), key(11)]
    assert disk.keys() == [key(12), key(13), key(14)] and len(disk) == 3
    disk.close()


def test_disk_add_many_larger_than_the_map_keeps_the_last_blocks(tmp_path):
    disk = DiskTier(tmp_path / "db", 1 << 30, map_size=1 << 20)
    value = lambda i: bytes([i % 256]) * (64 << 10)  # noqa: E731
    dropped = disk.add_many([(key(i), value(i)) for i in range(40)])  # ~2.5 MiB into a 1 MiB map
    assert 0 < len(disk) < 40 and len(dropped) == 40 - len(disk)
    assert disk.get(key(39)) == value(39) and key(39) not in dropped
    disk.close()


def test_tiered_put_many_stores_the_valid_blocks_and_names_the_bad(tmp_path):
    store = TieredStore(BLOCK_BYTES, tmp_path / "db", 3 * BLOCK_BYTES)
    bad = bytearray(block(1))
    bad[-1] ^= 0xFF
    changes, refused = store.put_many([(key(0), block(0)), (key(1), bytes(bad)), (key(2), block(5)),
                                       (key(3), memoryview(block(3)))])
    assert changes == StoreChanges(stored=[key(0), key(3)])
    assert set(refused) == {key(1), key(2)} and "key" in refused[key(2)]
    # written through in order: DRAM keeps the last, the disk all, 0 older than 3
    assert store.where_many([key(0), key(1), key(2), key(3)]) == ["disk", None, None, "dram"]
    assert store.disk.keys() == [key(0), key(3)]
    changes, refused = store.put_many([(key(4), block(4)), (key(5), block(5))])
    assert changes == StoreChanges(stored=[key(4), key(5)], removed=[key(0)]) and not refused
    assert store.get_many([key(0), key(3), key(5)]) == [(key(3), block(3)), (key(5), block(5))]
    store.close()


def test_tiered_demotion_and_promotion(tmp_path):
    store = TieredStore(2 * BLOCK_BYTES, tmp_path / "db", 100 * BLOCK_BYTES)
    for i in range(3):
        store.put(key(i), block(i))
    assert store.where_many([key(0), key(1), key(2), key(9)]) == ["disk", "dram", "dram", None]
    st = store.stats()
    assert (st.dram_blocks, st.disk_blocks, st.evictions_dram) == (2, 3, 1)  # written through to disk

    assert store.get(key(0)) == block(0)  # disk hit: promoted, 1 (oldest in DRAM) demoted
    assert store.where(key(0)) == "dram"
    assert store.where(key(1)) == "disk"
    assert store.get(key(9)) is None
    assert store.longest_prefix([key(0), key(1), key(2), key(9), key(0)]) == 3
    assert store.longest_prefix([key(9), key(0)]) == 0
    assert store.exists(key(2)) and not store.exists(key(9))
    assert store.keys() == {key(0), key(1), key(2)}
    st = store.stats()
    assert st.dram_blocks == 2 and st.dram_bytes == 2 * BLOCK_BYTES
    assert st.disk_blocks == 3  # tiers are inclusive: every block has its disk copy
    assert st.promotions == 1 and st.hits == {"dram": 0, "disk": 1}
    assert store.get(key(0)) == block(0)  # now a DRAM hit: nothing promoted
    st = store.stats()
    assert st.promotions == 1 and st.hits == {"dram": 1, "disk": 1}
    store.close()

    store = TieredStore(2 * BLOCK_BYTES, tmp_path / "db", 100 * BLOCK_BYTES)
    assert store.where_many([key(0), key(1), key(2)]) == ["disk"] * 3  # close flushed DRAM
    assert [store.get(key(i)) for i in range(3)] == [block(i) for i in range(3)]
    store.close()


def test_tiered_disk_eviction_drops_from_pool(tmp_path):
    store = TieredStore(BLOCK_BYTES, tmp_path / "db", 2 * BLOCK_BYTES)
    for i in range(5):
        store.put(key(i), block(i))
    # the disk holds the two most recent blocks (3, and 4 which DRAM holds too)
    assert store.where_many([key(i) for i in range(5)]) == [None, None, None, "disk", "dram"]
    assert store.stats().evictions_disk == 3
    store.close()


def test_tiered_rejects_invalid_blocks(tmp_path):
    store = TieredStore(10 * BLOCK_BYTES, tmp_path / "db", 10 * BLOCK_BYTES)
    with pytest.raises(BlockCorrupt):
        store.put(key(2), block(1))  # key does not match the block's header
    bad = bytearray(block(1))
    bad[-1] ^= 0xFF
    with pytest.raises(BlockCorrupt):
        store.put(key(1), bytes(bad))
    assert store.stats().dram_blocks == 0
    store.close()


def test_corrupted_bytes_on_disk_are_a_miss(tmp_path):
    store = TieredStore(0, tmp_path / "db", 10 * BLOCK_BYTES)  # no DRAM: everything on disk
    store.put(key(1), block(1))
    store.put(key(2), block(2))
    assert store.where_many([key(1), key(2)]) == ["disk", "disk"]
    store.close(flush=False)

    # Flip one byte of block 1 as stored in LMDB.
    disk = DiskTier(tmp_path / "db", 10 * BLOCK_BYTES)
    stored = bytearray(disk.get(key(1)))
    stored[-3] ^= 0x40
    disk.put(key(1), bytes(stored))
    disk.close()

    store = TieredStore(0, tmp_path / "db", 10 * BLOCK_BYTES)
    assert store.where(key(1)) == "disk"  # where does not read the bytes
    assert store.get(key(1)) is None
    assert store.where(key(1)) is None  # deleted
    assert store.get(key(2)) == block(2)
    assert store.get_many([key(1), key(2)]) == [(key(2), block(2))]
    assert store.drain_changes() == StoreChanges(removed=[key(1)])  # deleted as corrupt
    assert store.held_keys() == [key(2)]
    st = store.stats()
    assert st.corrupt == 1 and st.disk_blocks == 1
    store.close()


def test_tiered_reports_what_enters_and_leaves(tmp_path):
    store = TieredStore(BLOCK_BYTES, tmp_path / "db", 2 * BLOCK_BYTES, eviction="lru")
    assert store.put(key(0), block(0)) == StoreChanges(stored=[key(0)])
    assert store.put(key(0), block(0)) == StoreChanges()  # a re-put is no news
    assert store.put(key(1), block(1)) == StoreChanges(stored=[key(1)])  # 0 demoted: not a removal
    # written through, the disk holds two blocks: each new one pushes the oldest out of the store
    assert store.put(key(2), block(2)) == StoreChanges(stored=[key(2)], removed=[key(0)])
    assert store.put(key(3), block(3)) == StoreChanges(stored=[key(3)], removed=[key(1)])
    assert store.put(key(0), block(0)) == StoreChanges(stored=[key(0)], removed=[key(2)])
    assert set(store.held_keys()) == store.keys() == {key(0), key(3)}
    drained = store.drain_changes()  # net effect since the start: 0 came back, 1 and 2 left
    assert set(drained.stored) == {key(0), key(3)} and set(drained.removed) == {key(1), key(2)}
    assert not store.drain_changes()
    # A disk hit promotes (0 leaves DRAM for its disk copy): nothing enters or leaves the store.
    assert store.get(key(3)) == block(3)
    assert set(store.held_keys()) == store.keys()
    assert store.drain_changes().stored == []
    store.close()


def test_tiered_held_keys_track_the_tiers(tmp_path):
    import random

    rng = random.Random(7)
    store = TieredStore(3 * BLOCK_BYTES, tmp_path / "db", 5 * BLOCK_BYTES)
    held: set[bytes] = set()
    for _ in range(300):
        i = rng.randrange(20)
        if rng.random() < 0.6:
            store.put(key(i), block(i))
        else:
            store.get_many([key(i), key(rng.randrange(20))])
        ch = store.drain_changes()
        assert not set(ch.stored) & set(ch.removed)
        held = (held | set(ch.stored)) - set(ch.removed)
        assert held == set(store.held_keys()) == store.keys()
    store.flush()  # DRAM-only blocks go to disk, which may drop older ones to make room
    ch = store.drain_changes()
    assert ch.stored == []
    held -= set(ch.removed)
    assert held == set(store.held_keys()) == store.keys()
    store.close()
    store = TieredStore(3 * BLOCK_BYTES, tmp_path / "db", 5 * BLOCK_BYTES)
    assert set(store.held_keys()) == store.keys() == held  # everything is on disk now
    store.close()


def test_oversized_block_is_never_held(tmp_path):
    store = TieredStore(BLOCK_BYTES - 1, tmp_path / "db", BLOCK_BYTES - 1)
    assert store.put(key(1), block(1)) == StoreChanges()
    assert store.held_keys() == [] and not store.drain_changes()
    store.close()


# ---------------------------------------------------------------- eviction policy and watermarks
def test_disk_evicts_by_its_policy_leaf_first_and_keeps_parents_across_reopen(tmp_path):
    def chain_then_one(policy: str) -> tuple[DiskTier, list[bytes]]:
        disk = DiskTier(tmp_path / policy, 3 * BLOCK_BYTES, policy=policy)
        disk.put(key(0), block(0))
        disk.put(key(1), block(1), parent=key(0))
        disk.put(key(2), block(2), parent=key(1))
        return disk, disk.put(key(3), block(3))

    disk, evicted = chain_then_one("lru")
    assert evicted == [key(0)]  # the chain's head: 1 and 2 are held but can never be reused
    disk.close()
    disk, evicted = chain_then_one("lfuda_leaf")
    assert evicted == [key(2)]  # its tail: 0 and 1 still serve a prefix
    assert (disk.parent(key(1)), disk.parent(key(0)), disk.parent(key(2))) == (key(0), None, None)
    assert disk.evicted_by["capacity"] == 1 == disk.evictions
    disk.close()

    # parents and recency persist: reopened, the policy knows 1 is 0's child (and now a leaf)
    disk = DiskTier(tmp_path / "lfuda_leaf", 3 * BLOCK_BYTES, policy="lfuda_leaf")
    assert disk.parent(key(1)) == key(0) and disk.policy.has_child(key(0))
    assert disk.put(key(4), block(4)) == [key(1)]
    assert disk.put(key(5), block(5)) == [key(0)]  # a leaf once 1 is gone, and older than 3 and 4
    disk.close()


def test_disk_lfuda_keeps_the_blocks_used_more(tmp_path):
    disk = DiskTier(tmp_path / "db", 3 * BLOCK_BYTES, policy="lfuda")
    for i in range(3):
        disk.put(key(i), block(i))
    assert disk.get(key(0)) == block(0)  # a use: stored recency and the policy
    disk.used([key(0), key(1)])  # uses only (a DRAM hit): the stored order stays
    assert disk.keys() == [key(1), key(2), key(0)]
    assert disk.put(key(3), block(3)) == [key(2)]  # one use, where 0 has three and 1 two
    # that eviction aged the cache to 1: 3 enters with rank 1 + 1, as high as 1's two uses, and 1
    # is the less recent of the two
    assert disk.put(key(4), block(4)) == [key(1)]
    assert disk.policy.age == 2
    disk.close()


def test_tiered_maintenance_evicts_from_the_high_to_the_low_watermark(tmp_path):
    store = TieredStore(0, tmp_path / "db", 10 * BLOCK_BYTES, eviction="lru", evict_high=0.85, evict_low=0.55)
    for i in range(8):
        store.put(key(i), block(i))
    assert not store.needs_maintenance() and store.maintain() == StoreChanges()  # 8 blocks: at most 8.5
    store.put(key(8), block(8))
    assert store.needs_maintenance()
    store.drain_changes()
    assert store.maintain() == StoreChanges(removed=[key(i) for i in range(4)])  # down to 5.5 blocks
    st = store.stats()
    assert st.disk_blocks == 5 and not store.needs_maintenance()
    assert st.evictions_by_reason == {"watermark": 4, "capacity": 0, "map_full": 0, "too_large": 0}
    assert st.evictions_disk == 4
    # without the maintenance a put still never takes the disk past its bound: it evicts on its path
    changes, _ = store.put_many([(key(i), block(i)) for i in range(9, 15)])
    assert changes.removed == [key(4)] and store.stats().disk_blocks == 10
    assert store.stats().evictions_by_reason["capacity"] == 1
    store.close()


def test_dram_hits_are_uses_for_the_disk_policy(tmp_path):
    store = TieredStore(3 * BLOCK_BYTES, tmp_path / "db", 3 * BLOCK_BYTES, eviction="lru")
    for i in range(3):
        store.put(key(i), block(i))
    assert store.get_many([key(0)]) == [(key(0), block(0))]  # a DRAM hit: the disk's copy untouched
    # 3 demotes 1 from DRAM and takes the disk past its bound: the disk lets 1 go, not 0, whose
    # copy on disk is the oldest but which was just used
    assert store.put(key(3), block(3)) == StoreChanges(stored=[key(3)], removed=[key(1)])
    assert store.where_many([key(i) for i in range(4)]) == ["dram", None, "dram", "dram"]
    store.close()


def test_put_many_with_parents_and_a_demotion_in_the_same_put(tmp_path):
    store = TieredStore(BLOCK_BYTES, tmp_path / "db", 3 * BLOCK_BYTES, eviction="lfuda_leaf")
    changes, _ = store.put_many([(key(i), block(i)) for i in range(3)], {key(1): key(0), key(2): key(1)})
    assert changes == StoreChanges(stored=[key(0), key(1), key(2)])
    # DRAM (one block) let 0 and 1 go within the put: written once each, not a use
    assert [store.disk.policy._uses[key(i)] for i in range(3)] == [1, 1, 1]
    assert store.put(key(3), block(3)) == StoreChanges(stored=[key(3)], removed=[key(2)])
    store.close()


# ---------------------------------------------------------------- leases and pins
def test_a_block_being_read_from_disk_is_not_evicted_under_the_read(tmp_path):
    store = TieredStore(BLOCK_BYTES, tmp_path / "db", 4 * BLOCK_BYTES, eviction="lru")
    for i in range(4):
        store.put(key(i), block(i))  # 0 is the least recently used, on disk only
    reading, release = _stall(store.disk, "get")
    got = []
    loader = _start(lambda: got.extend(store.get_many([key(0)])))
    assert reading.wait(30)
    # the read is in progress: puts that take the disk past its bound evict the others, not 0
    changes, _ = store.put_many([(key(i), block(i)) for i in (4, 5)])
    assert changes.removed == [key(1), key(2)]
    release.set()
    loader.join(timeout=30)
    assert got == [(key(0), block(0))]
    # the lease ended with the read: 0 (read last: the most recently used) is evictable again
    assert [store.put(key(i), block(i)).removed for i in (6, 7, 8, 9)] == [[key(3)], [key(4)], [key(5)], [key(0)]]
    store.close()


def test_reads_from_disk_count_as_uses_for_the_eviction_policy(tmp_path):
    """Each load leases the blocks it reads; the policy still counts the read as a use, so under
    LFU with ageing a block read three times outlives blocks written after it that nobody read."""
    store = TieredStore(0, tmp_path / "db", 3 * BLOCK_BYTES, eviction="lfuda")
    for i in range(3):
        store.put(key(i), block(i))
    for _ in range(3):
        assert store.get_many([key(0)]) == [(key(0), block(0))]
    removed = [k for i in range(3, 7) for k in store.put(key(i), block(i)).removed]
    assert removed == [key(1), key(2), key(3), key(4)]
    assert store.where_many([key(0)]) == ["disk"]
    store.close()


def test_pinned_blocks_stay_until_their_time_to_live_and_pins_are_bounded(tmp_path):
    from services.cachestore.holds import PinLimit

    store = TieredStore(0, tmp_path / "db", 3 * BLOCK_BYTES, eviction="lfuda_leaf", max_pins=3)
    store.put(key(0), block(0))
    # 0 is held, 1 not yet: its pin applies when it arrives
    assert store.pin([key(0), key(1)], until=100.0) == 1
    store.put(key(1), block(1), parent=key(0))
    for i in range(2, 8):  # a stream of other blocks: only they make room for each other
        store.put(key(i), block(i))
    assert store.where_many([key(0), key(1), key(7)]) == ["disk", "disk", "disk"]
    assert (store.stats().pinned, store.stats().pinned_held) == (2, 2)
    with pytest.raises(PinLimit):  # 2 pinned + 2 new > 3: none of them pinned
        store.pin([key(6), key(7)], until=100.0)
    assert store.stats().pinned == 2
    assert store.pin([key(1), key(7)], until=50.0) == 2  # 1 keeps its later end
    assert store.expire_pins(now=60.0) == 1  # 7's pin is over; 0's and 1's last to 100
    assert store.put(key(8), block(8)).removed == [key(7)]
    assert store.expire_pins(now=100.0) == 2
    # evictable again, as blocks that just arrived: the leaf of the chain before its parent
    removed = [k for i in range(9, 13) for k in store.put(key(i), block(i)).removed]
    assert key(0) in removed and removed.index(key(1)) < removed.index(key(0))
    assert store.unpin([key(5)]) == 0
    store.close()


# ---------------------------------------------------------------- service end to end
@pytest.fixture(scope="module")
def nats_server(tmp_path_factory):
    srv = NatsServer(tmp_path_factory.mktemp("nats")).start()
    yield srv
    srv.stop()


def make_kv(tokens: int) -> torch.Tensor:
    # 4 layers x K,V x 4 heads x 640 dims x fp32 = 80 KiB per position: 1.25 MiB per 16-token block.
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 2, 4, tokens, 640, generator=g)


async def test_service_end_to_end_and_restart(nats_server, tmp_path):
    settings = Settings(
        nats_url=nats_server.url,
        instance_id="cachestore-e2e",
        data_dir=str(tmp_path / "data"),
        dram_bytes=3 << 20,  # two blocks: the first one put is demoted to LMDB
        disk_bytes=64 << 20,
        heartbeat_interval=0.2,
    )
    nc = await connect(nats_server.url, "test-client")
    client = CacheClient(nc, timeout=10)
    await client.start()
    hb_sub = await nc.subscribe(Subjects.heartbeat("cachestore", "cachestore-e2e"))
    svc = CacheStoreService(settings)
    await svc.start()
    try:
        hb = decode((await hb_sub.next_msg(timeout=10)).data, Heartbeat)
        assert hb.kind == "cachestore" and hb.instance_id == "cachestore-e2e"
        assert await client.wait_for_pool(10)
        assert client.live() == ["cachestore-e2e"]

        tokens = list(range(100, 153))  # 3 full blocks of 16 + a tail of 5
        keys = block_hashes(tokens, 16, namespace_digest("test-model", "float32", 16))
        blocks = split_blocks(make_kv(len(tokens)), 16)
        assert len(keys) == len(blocks) == 3
        assert len(encode_block(keys[0], blocks[0])) > 1 << 20  # chunked on the bus
        for k, b in zip(keys, blocks):
            await client.put_block(k, b)

        missing = b"\x00" * 16
        assert await client.exists(keys + [missing]) == [True, True, True, False]
        assert await client.where(keys + [missing]) == ["disk", "dram", "dram", ""]
        got = await client.get_blocks(keys + [missing])
        assert set(got) == set(keys)
        for k, b in zip(keys, blocks):
            assert torch.equal(got[k], b)
        assert await client.get_blocks([missing]) == {}
        assert await client.lookup(keys + [missing]) == 3
        assert await client.lookup([missing] + keys) == 0

        [st] = await client.stats()
        assert st.instance_id == "cachestore-e2e"
        assert st.dram_blocks == 2 and st.evictions_dram >= 1 and st.disk_blocks >= 1

        # Malformed messages are dropped; the service keeps answering.
        subject = lambda op: Subjects.cache("cachestore-e2e", op)  # noqa: E731
        await nc.publish(subject("put"), b"\xc1garbage")
        await nc.publish(subject("get"), b"\xc1garbage")
        await nc.publish(subject("exists"), b"not msgpack")
        with pytest.raises(nats.errors.TimeoutError):  # dropped: no reply
            await nc.request(subject("exists"), b"\x93\x01\x02\x03", timeout=0.5)
        assert await client.exists(keys) == [True, True, True]
    finally:
        await svc.stop()

    # A restart on the same data dir finds every block in LMDB.
    svc = CacheStoreService(settings)
    await svc.start()
    try:
        assert await client.where(keys) == ["disk"] * 3
        got = await client.get_blocks(keys)
        assert all(torch.equal(got[k], b) for k, b in zip(keys, blocks))
    finally:
        await svc.stop()
        await client.close()
        await nc.close()


async def test_service_stores_parents_and_evicts_down_to_the_low_watermark_after_puts(nats_server, tmp_path):
    from prometheus_client import REGISTRY

    from libs.protocol import CachePutMeta

    iid = "cachestore-evict"
    settings = Settings(nats_url=nats_server.url, instance_id=iid, data_dir=str(tmp_path), dram_bytes=0,
                        disk_bytes=10 * BLOCK_BYTES, pool_eviction="lru_leaf", pool_evict_high=0.85,
                        pool_evict_low=0.55, heartbeat_interval=0.2)
    svc = CacheStoreService(settings)
    await svc.start()
    nc = await connect(nats_server.url, "test-client-evict")
    client = CacheClient(nc, timeout=10)
    try:
        assert await client.wait_for_pool(10)
        tensors = [torch.full((1, 2, 1, 4, 8), float(i)) for i in range(9)]
        # a prompt of six blocks, then three one-block prompts: nine blocks, above 8.5
        await client.put_blocks([(key(i), tensors[i]) for i in range(6)],
                                parents={key(i): key(i - 1) for i in range(1, 6)})
        assert svc.store.disk.parent(key(3)) == key(2) and svc.store.disk.parent(key(0)) is None
        for i in range(6, 9):
            await client.put_blocks([(key(i), tensors[i])])
        # after the last put, the maintenance evicts down to 5.5 blocks, leaves first: the prompt's
        # tail (5, 4, 3, 2), not its head, though 6 to 8 are newer
        for _ in range(200):
            if svc.store.stats().disk_blocks == 5:
                break
            await asyncio.sleep(0.02)
        assert await client.exists([key(i) for i in range(9)]) == [True, True] + [False] * 4 + [True] * 3
        st = svc.store.stats()
        assert st.evictions_by_reason["watermark"] == 4 and st.evictions_by_reason["capacity"] == 0
        sample = REGISTRY.get_sample_value("yuebing:cache_disk_evictions_total",
                                           {"instance_id": iid, "reason": "watermark"})
        assert sample == 4
        # a writer that sends no parents (an older one) is still served
        assert CachePutMeta(keys=[key(0)], sizes=[1]).parent_map() == {}
        with pytest.raises(ValueError, match="parents"):
            CachePutMeta(keys=[key(0), key(1)], sizes=[1, 1], parents=[b""]).pieces(b"ab")
    finally:
        await client.close()
        await svc.stop()
        await nc.close()


async def test_client_with_no_pool_misses_and_raises(nats_server):
    nc = await connect(nats_server.url, "test-client-nopool")
    client = CacheClient(nc, timeout=2)
    await client.start()
    try:
        assert not await client.wait_for_pool(0.3)
        k = b"\x01" * 16
        assert await client.exists([k]) == [False]
        assert await client.where([k]) == [""]
        assert await client.lookup([k]) == 0
        assert await client.get_blocks([k]) == {}
        assert await client.stats() == []
        with pytest.raises(CacheError, match="no live cachestore"):
            await client.put_block(k, torch.zeros(1, 2, 1, 4, 8))
    finally:
        await nc.close()


async def test_put_of_corrupt_block_is_not_stored(nats_server, tmp_path):
    from libs.bus import send_blob
    from libs.protocol import CachePutMeta, encode

    settings = Settings(nats_url=nats_server.url, instance_id="cachestore-bad", data_dir=str(tmp_path))
    svc = CacheStoreService(settings)
    await svc.start()
    nc = await connect(nats_server.url, "test-client-bad")
    try:
        # Used without start(): the client starts itself and waits for the pool's first heartbeat.
        client = CacheClient(nc, timeout=5)
        good = torch.ones(1, 2, 1, 4, 8)
        k1, k2 = b"\x01" * 16, b"\x02" * 16
        put = Subjects.cache("cachestore-bad", "put")
        # A block announced under another key than its header's is refused by the store, and the
        # sender hears so.
        with pytest.raises(TransferError, match="key mismatch"):
            await send_blob(nc, put, "t1", encode_block(k1, good),
                            meta=encode(CachePutMeta(keys=[k2], sizes=[len(encode_block(k1, good))])))
        with pytest.raises(TransferError, match="corrupt block"):
            await send_blob(nc, put, "t2", b"not a block", meta=encode(CachePutMeta(keys=[k1], sizes=[11])))
        # in a blob of several, the valid blocks are kept and the sender hears which were not
        k3 = b"\x03" * 16
        parts = [encode_block(k3, good), b"not a block either"]
        with pytest.raises(TransferError, match=f"corrupt block: {k2.hex()}"):
            await send_blob(nc, put, "t3", b"".join(parts),
                            meta=encode(CachePutMeta(keys=[k3, k2], sizes=[len(p) for p in parts])))
        with pytest.raises(TransferError, match="does not match"):
            await send_blob(nc, put, "t4", parts[0], meta=encode(CachePutMeta(keys=[k1, k2], sizes=[1, 2])))
        assert await client.exists([k3]) == [True]
        await client.put_block(k1, good)
        assert await client.exists([k1, k2]) == [True, False]
        assert torch.equal((await client.get_blocks([k1]))[k1], good)
    finally:
        await svc.stop()
        await nc.close()


async def test_client_with_a_stuck_pool_returns_misses(nats_server):
    """A pool that answers but never streams, or never answers, yields misses, not a hang."""
    from libs.protocol import CacheGetReply, CacheGetRequest, encode

    nc = await connect(nats_server.url, "test-client-stuck")
    fake = await connect(nats_server.url, "fake-pool")
    k = b"\x05" * 16
    beat = encode(Heartbeat(kind="cachestore", instance_id="fake", interval=30.0))

    async def announce_but_never_send(msg):
        req = decode(msg.data, CacheGetRequest)
        await msg.respond(encode(CacheGetReply(found=req.keys)))

    async def never_answer(msg):
        pass

    subs = [
        await fake.subscribe(Subjects.cache("fake", "get"), cb=announce_but_never_send),
        await fake.subscribe(Subjects.cache("fake", "exists"), cb=never_answer),
        await fake.subscribe(Subjects.cache("fake", "put"), cb=never_answer),
    ]
    await synced(fake)
    client = CacheClient(nc, timeout=0.3)
    await client.start()
    await synced(nc)
    await fake.publish(Subjects.heartbeat("cachestore", "fake"), beat)
    try:
        assert await client.wait_for_pool(5)
        assert await client.get_blocks([k]) == {}
        assert await client.where([k]) == [""]
        assert await client.lookup([k]) == 0
        with pytest.raises(CacheError):
            await client.put_block(k, torch.zeros(1, 2, 1, 4, 8))
        assert client.live() == ["fake"]  # slow is not gone
    finally:
        for s in subs:
            await s.unsubscribe()
        await client.close()
        await fake.close()
        await nc.close()
