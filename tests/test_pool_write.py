"""Prefill writes the full blocks of every prompt to the cachestore pool, when the deployment has one."""

import torch

from conftest import start_cluster
from helpers import post, wait_until
from libs.kv.client import CacheClient
from libs.kv.keys import block_hashes, namespace_digest
from libs.bus import connect
from libs.engine.loading import model_identity
from libs.engine.runner import ModelRunner


async def test_prefill_stores_full_prompt_blocks(tiny_cluster, tiny_dir):
    prompt = list(range(1000, 1000 + 40))  # two full blocks of 16 and a tail of 8
    status, body, _ = await post(tiny_cluster.url + "/v1/completions",
                                 {"model": tiny_dir.name, "prompt": prompt, "max_tokens": 3, "temperature": 0})
    assert status == 200, body
    ns = namespace_digest(model_identity(tiny_dir), "float32", 16)
    keys = block_hashes(prompt, 16, ns)
    assert len(keys) == 2
    nc = await connect(tiny_cluster.nats.url, "test-pool")
    try:
        client = CacheClient(nc)

        async def stored():
            return all(await client.exists(keys))

        assert await wait_until(stored, timeout=30)
        blocks = await client.get_blocks(keys)
    finally:
        await nc.close()
    _, kv = ModelRunner(tiny_dir).prefill(prompt)
    for i, key in enumerate(keys):
        assert blocks[key].shape == (2, 2, 2, 16, 16)
        torch.testing.assert_close(blocks[key], kv[:, :, :, 16 * i : 16 * (i + 1)], rtol=1e-5, atol=1e-6)


async def _served_twice_then_pool_holds(tiny_dir, tmp_path, first_token: int, **settings):
    """Start a cluster with ``settings``, send one 40-token prompt twice; returns the cached token
    counts of the two responses and which of the prompt's two full blocks the pool holds."""
    cluster = start_cluster(tiny_dir, tmp_path, **settings)
    try:
        prompt = list(range(first_token, first_token + 40))
        keys = block_hashes(prompt, 16, namespace_digest(model_identity(tiny_dir), "float32", 16))
        usage = []
        for _ in range(2):
            status, body, _ = await post(cluster.url + "/v1/completions",
                                         {"model": tiny_dir.name, "prompt": prompt, "max_tokens": 3,
                                          "temperature": 0})
            assert status == 200, body
            usage.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
        nc = await connect(cluster.nats.url, "test-pool")
        try:
            return usage, await CacheClient(nc).exists(keys)
        finally:
            await nc.close()
    finally:
        cluster.stop()


async def test_a_deployment_without_the_pool_writes_nothing_to_it(tiny_dir, tmp_path):
    """use_pool off (the placement baselines): prompts are kept in the instance's own cache only."""
    usage, in_pool = await _served_twice_then_pool_holds(tiny_dir, tmp_path, 2000, use_pool=False)
    assert usage == [0, 32]  # the second request reused the first one's blocks from the instance's DRAM
    assert in_pool == [False, False]


async def test_a_full_write_backlog_skips_pool_writes_and_serves_on(tiny_dir, tmp_path):
    """A pool slower than the prompts: past the backlog bound, a prompt's blocks are not written
    (the instance does not hold every waiting prompt's KV); requests are served all the same."""
    usage, in_pool = await _served_twice_then_pool_holds(tiny_dir, tmp_path, 3000, pool_write_backlog_bytes=1)
    assert usage == [0, 32]  # the instance's own cache still kept the blocks
    assert in_pool == [False, False]


async def test_seen_pool_writes_keep_a_block_from_its_second_sight_on(tiny_dir, tmp_path):
    """pool_writes "seen": a prompt served once leaves nothing in the pool (its own cache keeps it);
    the same blocks seen again are written, and a new turn's own tail is not until it is seen again."""
    cluster = start_cluster(tiny_dir, tmp_path, pool_writes="seen")
    ns = namespace_digest(model_identity(tiny_dir), "float32", 16)
    once, twice = list(range(4000, 4040)), list(range(5000, 5040))
    turn2 = twice + list(range(6000, 6020))  # the twice-served prompt and one block more
    nc = await connect(cluster.nats.url, "test-pool")
    try:
        client = CacheClient(nc)
        for prompt in (once, twice, twice, turn2):
            status, body, _ = await post(cluster.url + "/v1/completions",
                                         {"model": tiny_dir.name, "prompt": prompt, "max_tokens": 2,
                                          "temperature": 0})
            assert status == 200, body
        twice_keys = block_hashes(twice, 16, ns)

        async def written():
            return all(await client.exists(twice_keys))

        assert await wait_until(written, timeout=30)  # on its second sight
        assert await client.exists(block_hashes(once, 16, ns)) == [False, False]
        assert await client.exists(block_hashes(turn2, 16, ns)) == [True, True, False]
    finally:
        await nc.close()
        cluster.stop()


def test_kv_held_for_pool_writes_leaves_half_the_arena_to_the_next_prompts():
    """A slow pool holds prompts' KV until written; held past half the KV arena's slab, the next
    long prompt would find no range left and be page-faulted in before its compute could start."""
    from libs.engine.arena import KVArena
    from services.prefill.service import pool_write_budget

    arena = KVArena(max_bytes=64 << 20, granule=4 << 20)
    budget = pool_write_budget(512 << 20, arena)
    assert budget == 32 << 20
    assert pool_write_budget(8 << 20, arena) == 8 << 20  # a smaller configured backlog stands
    assert pool_write_budget(512 << 20, None) == 512 << 20  # no arena: the configured backlog
    assert pool_write_budget(512 << 20, KVArena(1 << 20, granule=4 << 20)) == 512 << 20  # nor a slab
    # held up to the budget, a prompt as large as it still comes from the slab
    held, _ = arena.take((budget // 4,), torch.float32)
    nxt, _ = arena.take((budget // 4,), torch.float32)
    assert arena.allocated == 0 and arena.reused == 2
    arena.give(held)
    arena.give(nxt)
