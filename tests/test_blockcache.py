"""The prefill instance's own block cache: LRU over a slab of fixed slots."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from services.prefill.blockcache import BlockCache

SHAPE = (2, 2, 1, 4, 8)  # layers, K/V, heads, block tokens, head dim
BLOCK_BYTES = torch.zeros(SHAPE, dtype=torch.float16).nbytes


def blk(i: int) -> torch.Tensor:
    return torch.full(SHAPE, float(i), dtype=torch.float16)


def key(i: int) -> bytes:
    return i.to_bytes(8, "big")


def test_lru_eviction_keeps_the_recent_blocks_and_their_bytes():
    cache = BlockCache(3 * BLOCK_BYTES)
    for i in range(3):
        assert cache.put(key(i), blk(i)) == (True, [])
    assert [t[0, 0, 0, 0, 0].item() for t in cache.prefix([key(0)])] == [0.0]  # 0 is now the most recent
    assert cache.put(key(3), blk(3)) == (True, [key(1)])
    assert cache.put(key(4), blk(4)) == (True, [key(2)])
    assert cache.keys() == [key(0), key(3), key(4)]
    assert cache.bytes == 3 * BLOCK_BYTES and len(cache) == 3 and cache.evictions == 2
    # a reused slot holds the new block; the others kept theirs
    for i in (0, 3, 4):
        assert torch.equal(cache.prefix([key(i)])[0], blk(i))
    assert cache.put(key(3), blk(99)) == (False, [])  # already held: recency only
    assert torch.equal(cache.prefix([key(3)])[0], blk(3))


def test_prefix_stops_at_the_first_missing_block_and_copies_are_private():
    cache = BlockCache(4 * BLOCK_BYTES)
    src = torch.cat([blk(i) for i in range(3)], dim=3)  # one prompt's KV, three blocks long
    for i in range(3):
        cache.put(key(i), src[:, :, :, i * 4 : (i + 1) * 4])
    src.zero_()  # the prompt's buffer is reused: the cache kept its own copy
    got = cache.prefix([key(0), key(1), key(5), key(2)])
    assert [t[0, 0, 0, 0, 0].item() for t in got] == [0.0, 1.0]


def test_pinned_blocks_are_passed_over_by_eviction_until_unpinned():
    cache = BlockCache(2 * BLOCK_BYTES)
    cache.put(key(0), blk(0))
    cache.put(key(1), blk(1))
    cache.pin([key(0), key(7)])  # a key not held is ignored
    cache.pin([key(0)])  # pins count
    assert cache.put(key(2), blk(2)) == (True, [key(1)])  # the LRU block is pinned: the next one goes
    cache.pin([key(2)])
    assert cache.put(key(3), blk(3)) == (False, [])  # every slot pinned: the new block is not kept
    assert torch.equal(cache.peek([key(0)])[0], blk(0)) and torch.equal(cache.peek([key(2)])[0], blk(2))
    cache.unpin([key(0)])
    assert cache.put(key(3), blk(3)) == (False, [])  # key 0 is still pinned once
    cache.unpin([key(0), key(7)])
    assert cache.put(key(3), blk(3)) == (True, [key(0)])
    assert cache.keys() == [key(2), key(3)]


def test_peek_does_not_count_as_a_use():
    cache = BlockCache(2 * BLOCK_BYTES)
    cache.put(key(0), blk(0))
    cache.put(key(1), blk(1))
    assert len(cache.peek([key(0), key(1), key(5)])) == 2
    assert cache.put(key(2), blk(2)) == (True, [key(0)])  # 0 stayed the least recently used


def test_a_block_of_another_shape_or_a_cache_smaller_than_a_block_keeps_nothing():
    cache = BlockCache(2 * BLOCK_BYTES)
    cache.put(key(0), blk(0))
    assert cache.put(key(1), torch.zeros((2, 2, 1, 4, 4), dtype=torch.float16)) == (False, [])
    assert cache.put(key(2), blk(2).float()) == (False, [])
    assert cache.keys() == [key(0)]
    tiny = BlockCache(BLOCK_BYTES - 1)
    assert tiny.put(key(0), blk(0)) == (False, []) and len(tiny) == 0 and tiny.bytes == 0


CHURN = textwrap.dedent("""
    import random, torch
    from services.prefill.blockcache import BlockCache
    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
    cache, rng = BlockCache(256 << 20), random.Random(0)
    base = rss_mb()
    for i in range(400):  # prompts' KV (1-20 MB, freed after) cut into 0.7 MB blocks, kept LRU
        kv = torch.ones(30, 2, 3, rng.choice([28, 100, 300, 700, 1200, 2500]), 64, dtype=torch.float16)
        for b in range(kv.shape[3] // 16):
            cache.put((i, b), kv[:, :, :, b * 16:(b + 1) * 16])
        chunks = [bytes(1 << 20) for _ in range(5)]  # a hand-off's bus chunks
        del kv, chunks
    print(rss_mb() - base, cache.bytes >> 20)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's size from /proc/self/statm")
def test_a_churning_cache_grows_its_process_by_about_its_capacity():
    """Blocks kept and dropped in LRU order, and prompts' KV buffers freed between them, must not
    leave the heap full of holes."""
    out = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, timeout=120, check=True)
    grown, held = map(int, out.stdout.split())
    assert held >= 250
    # the slab, plus what the freed KV buffers leave in the heap (about 100 MB here); blocks cloned
    # one by one grew the process by ~500 MB for the same 256 MB
    assert grown <= held + 160, f"the process grew {grown} MB for {held} MB of blocks"


def test_a_reserved_and_committed_slab_takes_blocks_of_its_shape_only():
    cache = BlockCache(4 * BLOCK_BYTES)
    assert cache.reserve(SHAPE, torch.float16) and not cache.reserve(SHAPE, torch.float16)
    cache.commit()  # every page written once, before any put
    assert cache.bytes == 0 and len(cache) == 0
    assert cache.put(key(1), blk(1)) == (True, [])
    assert cache.put(key(2), torch.zeros(SHAPE, dtype=torch.float32)) == (False, [])  # another dtype
    assert torch.equal(cache.prefix([key(1)])[0], blk(1))
    assert not BlockCache(BLOCK_BYTES - 1).reserve(SHAPE, torch.float16)  # no slot fits
