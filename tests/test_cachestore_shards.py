"""A pool of several cachestore instances: rendezvous sharding, replicas, and KV events."""

import asyncio
import collections
import random

import pytest
import torch
from nats.js.api import DeliverPolicy
from prometheus_client import REGISTRY

from libs.kv.blobs import GET_BLOB_MAX_BLOCKS, PUT_BLOB_MAX_BLOCKS
from libs.kv.client import CacheClient
from libs.kv.sharding import owners, rank
from libs.bus import connect
from libs.config import Settings
from libs.engine.prefill_kv import PastNotLoaded, PrefillKV
from libs.protocol import (
    BlockHeader,
    CacheGetReply,
    Chunk,
    KVDump,
    KVDumpRequest,
    KVEvent,
    LayerPiece,
    Subjects,
    decode,
    encode,
)
from services.cachestore.service import CacheStoreService

SHAPE = (1, 2, 1, 4, 8)


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def tensor(i: int) -> torch.Tensor:
    return torch.full(SHAPE, float(i)) + torch.arange(8, dtype=torch.float32)


# ---------------------------------------------------------------- rendezvous hashing
IDS = ["cs-a", "cs-b", "cs-c", "cs-d"]
_rng = random.Random(1)
KEYS = [_rng.randbytes(16) for _ in range(8000)]


def test_owners_deterministic_and_distinct():
    k = KEYS[5]
    assert owners(k, IDS, 2) == owners(k, list(reversed(IDS)) + IDS, 2)  # order and duplicates don't matter
    assert len(set(owners(k, IDS, 3))) == 3
    assert owners(k, IDS, 2) == rank(k, IDS)[:2]
    assert sorted(rank(k, IDS)) == sorted(IDS)
    assert owners(k, IDS, 9) == rank(k, IDS)  # more replicas than instances: all of them
    assert owners(k, [], 2) == [] and owners(k, IDS, 0) == []


def test_owners_spread_is_balanced():
    for replicas in (1, 2):
        counts = collections.Counter(i for k in KEYS for i in owners(k, IDS, replicas))
        expected = len(KEYS) * replicas / len(IDS)
        assert set(counts) == set(IDS)
        assert all(abs(c - expected) < 0.1 * expected for c in counts.values()), counts


@pytest.mark.parametrize("replicas", [1, 2])
def test_owners_minimal_movement(replicas):
    gone, rest = "cs-b", [i for i in IDS if i != "cs-b"]
    moved = 0
    for k in KEYS:
        before, after = owners(k, IDS, replicas), owners(k, rest, replicas)
        if gone in before:
            # The survivors keep the key; only the departed one's share goes to the next in rank.
            assert after[: replicas - 1] == [i for i in before if i != gone]
            moved += 1
        else:
            assert after == before
        # Joining is the same in reverse: a key only moves to the newcomer.
        assert set(before) - set(after) <= {gone}
    assert abs(moved - len(KEYS) * replicas / len(IDS)) < 0.1 * len(KEYS) * replicas / len(IDS)


# ---------------------------------------------------------------- a live pool
async def start_pool(url, tmp_path, ids, **overrides):
    from libs.bus import ensure_streams

    nc = await connect(url, "test-streams")  # the streams, as a conductor creates them
    await ensure_streams(nc.jetstream())
    await nc.close()
    svcs = []
    for iid in ids:
        settings = Settings(nats_url=url, instance_id=iid, data_dir=str(tmp_path / "data"),
                            heartbeat_interval=0.2, **overrides)
        svc = CacheStoreService(settings)
        await svc.start()
        svcs.append(svc)
    return svcs


async def pool_client(nc, ids, **kw) -> CacheClient:
    client = CacheClient(nc, **kw)
    await client.start()
    for _ in range(100):
        if client.live() == sorted(ids):
            return client
        await asyncio.sleep(0.05)
    raise AssertionError(f"pool not seen: {client.live()}")


async def test_two_instances_shard_and_replicate(nats_server, tmp_path):
    ids = ["cs-one", "cs-two"]
    svcs = await start_pool(nats_server.url, tmp_path, ids)
    nc = await connect(nats_server.url, "test-shards")
    try:
        # replicas=1: each key lives on exactly its rendezvous owner.
        client = await pool_client(nc, ids, timeout=5)
        keys = [key(i) for i in range(40)]
        for i, k in enumerate(keys):
            await client.put_block(k, tensor(i))
        held = {svc.instance_id: set(svc.store.keys()) for svc in svcs}
        assert all(held.values())  # both hold some
        assert held["cs-one"].isdisjoint(held["cs-two"]) and set.union(*held.values()) == set(keys)
        for k in keys:
            assert k in held[owners(k, ids, 1)[0]]
        missing = key(999)
        assert await client.exists(keys + [missing]) == [True] * 40 + [False]
        assert await client.lookup(keys) == 40
        assert await client.lookup(keys[:7] + [missing] + keys[7:]) == 7
        got = await client.get_blocks(keys + [missing] + keys[:3])  # duplicates are fine
        assert list(got) == keys
        assert all(torch.equal(got[k], tensor(i)) for i, k in enumerate(keys))
        assert sorted(st.instance_id for st in await client.stats()) == ids

        # replicas=2: every key on both.
        client2 = await pool_client(nc, ids, timeout=5, replicas=2)
        keys2 = [key(100 + i) for i in range(40)]
        for i, k in enumerate(keys2):
            await client2.put_block(k, tensor(100 + i))
        for svc in svcs:
            assert set(keys2) <= svc.store.keys()

        # One instance stops: with replicas=2 every key is still found, at once (before its
        # heartbeats are missed), and puts go on to the survivor.
        await svcs[0].stop()
        assert await client2.exists(keys2) == [True] * 40
        assert await client2.lookup(keys2) == 40
        got = await client2.get_blocks(keys2)
        assert list(got) == keys2 and all(torch.equal(got[k], tensor(100 + i)) for i, k in enumerate(keys2))
        assert client2.live() == ["cs-two"]
        await client2.put_block(key(500), tensor(500))
        assert await client2.exists([key(500)]) == [True]
        # replicas=1: the keys the stopped instance owned are misses now, never errors or hangs.
        assert sum(await client.exists(keys)) == len(held["cs-two"])
        await client.close()
        await client2.close()
    finally:
        for svc in svcs:
            await svc.stop()
        await nc.close()


async def test_put_blocks_sends_each_instance_its_blocks_in_few_blobs(nats_server, tmp_path):
    ids = ["cs-p1", "cs-p2"]
    svcs = await start_pool(nats_server.url, tmp_path, ids)
    nc = await connect(nats_server.url, "test-put-many")
    blobs: collections.Counter = collections.Counter()

    async def count(msg):
        if decode(msg.data, Chunk).index == 0:
            blobs[msg.subject.split(".")[2]] += 1

    spy = await nc.subscribe(Subjects.cache("*", "put"), cb=count)
    try:
        client = await pool_client(nc, ids, timeout=10)
        n = 3 * PUT_BLOB_MAX_BLOCKS
        keys = [key(i) for i in range(n)]
        await client.put_blocks([(k, tensor(i)) for i, k in enumerate(keys)])
        await nc.flush()
        share = collections.Counter(owners(k, ids, 1)[0] for k in keys)
        # each instance got its own blocks, in as few blobs as the per-blob bound allows
        assert blobs == {iid: -(-share[iid] // PUT_BLOB_MAX_BLOCKS) for iid in ids}
        for svc in svcs:
            assert svc.store.keys() == {k for k in keys if owners(k, ids, 1)[0] == svc.instance_id}
        got = await client.get_blocks(keys)
        assert list(got) == keys and all(torch.equal(got[k], tensor(i)) for i, k in enumerate(keys))
        # replicas=2: both instances take every block; a key given twice is sent once
        client2 = await pool_client(nc, ids, timeout=10, replicas=2)
        blobs.clear()
        more = [(key(1000 + i), tensor(i)) for i in range(20)]
        await client2.put_blocks(more + more[:3])
        await nc.flush()
        assert blobs == {iid: 1 for iid in ids}
        for svc in svcs:
            assert {k for k, _ in more} <= svc.store.keys()
        await client.close()
        await client2.close()
    finally:
        await spy.unsubscribe()
        for svc in svcs:
            await svc.stop()
        await nc.close()


async def test_large_batched_get_spans_several_blobs(nats_server, tmp_path):
    [svc] = await start_pool(nats_server.url, tmp_path, ["cs-big"])
    nc = await connect(nats_server.url, "test-big")
    try:
        client = await pool_client(nc, ["cs-big"], timeout=10)
        n = 2 * GET_BLOB_MAX_BLOCKS + 5
        keys = [key(i) for i in range(n)]
        for i, k in enumerate(keys):
            await client.put_block(k, tensor(i))
        got = await client.get_blocks(list(reversed(keys)))
        assert list(got) == list(reversed(keys))
        assert all(torch.equal(got[k], tensor(i)) for i, k in enumerate(keys))
        hits = REGISTRY.get_sample_value("yuebing:cache_get_hit_blocks_total", {"instance_id": "cs-big"})
        assert hits == n
        await client.close()
    finally:
        await svc.stop()
        await nc.close()


# ---------------------------------------------------------------- layered loads
LAYERED = (6, 2, 3, 4, 8)  # layers, K/V, heads, block size, head dim


def layered_block(i: int) -> torch.Tensor:
    return torch.randn(LAYERED, generator=torch.Generator().manual_seed(i))


def layered_dest(positions: int, past: int) -> PrefillKV:
    layers, _, heads, _, dim = LAYERED
    return PrefillKV(torch.zeros(layers, 2, heads, positions, dim), past, ready=False, timeout=10)


async def test_layered_load_across_two_shards(nats_server, tmp_path, monkeypatch):
    """Blocks stream layer by layer from both owners into the buffer; layers are released in
    order; a key the pool lacks ends the reusable prefix there."""
    import libs.kv.layers as layers_mod

    monkeypatch.setattr(layers_mod, "LAYER_PIECE_TARGET_BYTES", 3000)  # several pieces per layer (each 768 B a block)
    ids = ["cs-l1", "cs-l2"]
    svcs = await start_pool(nats_server.url, tmp_path, ids)
    nc = await connect(nats_server.url, "test-layered")
    try:
        client = await pool_client(nc, ids, timeout=10)
        n, start = 24, 8
        keys = [key(1000 + i) for i in range(n)]
        blocks = [layered_block(i) for i in range(n)]
        for k, b in zip(keys, blocks):
            await client.put_block(k, b)
        assert {owners(k, ids)[0] for k in keys} == set(ids)  # both shards serve this load
        bs = LAYERED[3]
        dest = layered_dest(start + n * bs + 5, start + n * bs)
        released = []
        release = dest.layer_ready
        dest.layer_ready = lambda upto: (released.append(upto), release(upto))
        assert await client.load_layers(keys, dest, start) == n
        assert dest.failed is None and released == sorted(released) and released[-1] == LAYERED[0]
        assert torch.equal(dest.kv[:, :, :, start : start + n * bs], torch.cat(blocks, dim=3))
        assert torch.count_nonzero(dest.kv[:, :, :, :start]) == 0  # nothing written outside the range
        dest.wait_layer(LAYERED[0] - 1)  # released: returns at once

        hole = keys[:10] + [key(99999)] + keys[10:20]
        dest = layered_dest(len(hole) * bs, len(hole) * bs)
        assert await client.load_layers(hole, dest, 0) == 10
        assert dest.failed
        assert torch.equal(dest.kv[:, :, :, : 10 * bs], torch.cat(blocks[:10], dim=3))
        with pytest.raises(PastNotLoaded):
            dest.wait_layer(0)
        await client.close()
    finally:
        for svc in svcs:
            await svc.stop()
        await nc.close()


def _pieces(tid: str, blocks: list[torch.Tensor]):
    """The pieces a store sends for ``blocks``: every layer, one piece of all blocks per layer."""
    for layer in range(LAYERED[0]):
        data = b"".join(b[layer].contiguous().numpy().tobytes() for b in blocks)
        yield LayerPiece(transfer_id=tid, layer=layer, first=0, count=len(blocks), data=memoryview(data))


def _expect(load, keys, blocks, checksums=None):
    from libs.checksum import checksum

    sums = checksums or [checksum(b.contiguous().numpy().tobytes()) for b in blocks]
    headers = [BlockHeader(shape=list(LAYERED), dtype="float32", checksum=c) for c in sums]
    load.expect(CacheGetReply(found=keys, headers=headers, transfer_id="t1"), keys, list(range(len(keys))))
    load.announced()


def test_layered_load_holds_back_the_last_layer_until_every_checksum_checks():
    from libs.kv.layers import LayeredLoad

    bs = LAYERED[3]
    keys = [key(i) for i in range(4)]
    blocks = [layered_block(i) for i in range(4)]
    dest = layered_dest(4 * bs + 1, 4 * bs)
    load = LayeredLoad(keys, dest, 0)
    from libs.checksum import checksum

    sums = [checksum(b.contiguous().numpy().tobytes()) for b in blocks]
    sums[2] ^= 1  # block 2's data does not match its stored checksum
    _expect(load, keys, blocks, sums)
    pieces = list(_pieces("t1", blocks))
    for p in pieces[:-1]:
        load._place(p)
    assert load.ready == LAYERED[0] - 1 and not dest.failed  # all but the last layer released
    load._place(pieces[-1])
    assert dest.failed and "checksum" in dest.failed
    assert load.finish() == 2  # blocks 0 and 1 are whole and verified
    with pytest.raises(PastNotLoaded):
        dest.wait_layer(LAYERED[0] - 1)

    good = layered_dest(4 * bs + 1, 4 * bs)
    load = LayeredLoad(keys, good, 0)
    _expect(load, keys, blocks)
    pieces = list(_pieces("t1", blocks))
    load._place(pieces[1])  # layer 1 before layer 0: no block's checksum can be trusted
    for p in [pieces[0], *pieces[2:]]:
        load._place(p)
    assert good.failed and load.finish() == 0

    # an announcement with a block of another shape is refused whole (its pieces number blocks by
    # their place in it): all its blocks are missing, and an early piece of it is dropped
    odd = layered_dest(4 * bs + 1, 4 * bs)
    load = LayeredLoad(keys, odd, 0)
    load.early["t1"] = [next(_pieces("t1", blocks))]
    headers = [BlockHeader(shape=list(LAYERED), dtype="float32", checksum=0) for _ in keys]
    headers[3] = BlockHeader(shape=[LAYERED[0], 2, LAYERED[2], LAYERED[3] * 2, LAYERED[4]], dtype="float32",
                             checksum=0)
    load.expect(CacheGetReply(found=keys, headers=headers, transfer_id="t1"), keys, list(range(4)))
    load.announced()
    assert "t1" not in load.senders and not load.early and odd.failed and load.finish() == 0

    cut = layered_dest(4 * bs + 1, 4 * bs)
    load = LayeredLoad(keys, cut, 0)
    _expect(load, keys, blocks)
    pieces = list(_pieces("t1", blocks))
    load._place(pieces[0])
    short = LayerPiece(transfer_id="t1", layer=1, first=0, count=4, data=pieces[1].data[:-4])
    with pytest.raises(ValueError):
        load._place(short)
    load._abandon("t1")  # its sender was told no: nothing more is owed, the load is over at once
    assert load.done.is_set() and cut.failed and load.finish() == 0


def test_a_live_load_checks_every_piece_releases_every_layer_and_ends_on_the_senders_abort():
    """A live get (a pipeline stage's KV as it is computed): no block checksum up front, each
    piece checked as it lands, every layer released as it completes (the last one too); a piece
    that does not match its checksum fails the load; an abort ends it at once."""
    from libs.checksum import checksum
    from libs.kv.layers import LayeredLoad

    bs = LAYERED[3]
    keys = [key(i) for i in range(3)]
    blocks = [layered_block(i) for i in range(3)]
    live_reply = CacheGetReply(found=keys, transfer_id="t1", live=True, reused_tokens=bs,
                               headers=[BlockHeader(shape=list(LAYERED), dtype="float32", checksum=0)] * 3)

    def live_pieces():
        for p in _pieces("t1", blocks):
            yield LayerPiece(transfer_id="t1", layer=p.layer, first=0, count=p.count, checksum=checksum(p.data),
                             data=p.data)

    dest = layered_dest(3 * bs + 1, 3 * bs)
    load = LayeredLoad(keys, dest, 0)
    load.expect(live_reply, keys, [0, 1, 2])
    load.announced()
    assert load.reused_tokens == bs
    for p in live_pieces():
        load._place(p)
        assert load.ready == p.layer + 1  # released as it completes, the last layer included
    assert load.finish() == 3 and not dest.failed
    assert torch.equal(dest.kv[:, :, :, : 3 * bs], torch.cat(blocks, dim=3))

    bad = layered_dest(3 * bs + 1, 3 * bs)
    load = LayeredLoad(keys, bad, 0)
    load.expect(live_reply, keys, [0, 1, 2])
    load.announced()
    pieces = list(live_pieces())
    load._place(pieces[0])
    wrong = LayerPiece(transfer_id="t1", layer=1, first=0, count=3, checksum=pieces[1].checksum ^ 1,
                       data=pieces[1].data)
    with pytest.raises(ValueError):
        load._place(wrong)

    cut = layered_dest(3 * bs + 1, 3 * bs)
    load = LayeredLoad(keys, cut, 0)
    load.expect(live_reply, keys, [0, 1, 2])
    load.announced()
    load._place(pieces[0])
    load._place(LayerPiece(transfer_id="t1", layer=0, first=0, count=0, data=memoryview(b"")))  # the abort
    assert load.done.is_set() and cut.failed and load.finish() == 0


# ---------------------------------------------------------------- KV events
async def read_events(js, instance_id: str) -> list[KVEvent]:
    subject = Subjects.kv_events(instance_id)
    info = await js.stream_info(Subjects.KV_EVENTS_STREAM, subjects_filter=subject)
    total = info.state.subjects.get(subject, 0) if info.state.subjects else 0
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    try:
        return [decode((await sub.next_msg(timeout=5)).data, KVEvent) for _ in range(total)]
    finally:
        await sub.unsubscribe()


async def dump(nc, instance_id: str, page: int) -> tuple[str, set[bytes]]:
    keys, offset = [], 0
    while True:
        resp = await nc.request(Subjects.kv_dump(instance_id), encode(KVDumpRequest(offset=offset, limit=page)), timeout=5)
        d = decode(resp.data, KVDump)
        assert d.instance_id == instance_id and d.source == "cachestore" and d.offset == offset
        keys += d.keys
        offset += len(d.keys)
        if offset >= d.total:
            return d.epoch, set(keys)


async def test_kv_events_track_what_the_instance_holds(nats_server, tmp_path):
    from libs.kv.codec import encode_block

    block_bytes = len(encode_block(key(0), tensor(0)))
    disk_bytes = 6 * block_bytes
    [svc] = await start_pool(nats_server.url, tmp_path, ["cs-ev"], dram_bytes=2 * block_bytes, disk_bytes=disk_bytes)
    nc = await connect(nats_server.url, "test-events")
    js = nc.jetstream()
    try:
        client = await pool_client(nc, ["cs-ev"], timeout=5)
        rng = random.Random(3)
        puts = 0
        for _ in range(60):
            i = rng.randrange(25)
            if rng.random() < 0.25:
                await client.get_blocks([key(i), key(rng.randrange(25))])  # promotions push others out
            else:
                await client.put_block(key(i), tensor(i))
                puts += 1
                assert svc.store.stats().disk_bytes <= disk_bytes
        await client.put_block(key(99), tensor(99))  # acked after every earlier change is published
        puts += 1
        # ... but for what a maintenance started by a put (eviction down to the low watermark)
        # takes out after its ack: the instance is idle once none runs (none is due then)
        for _ in range(500):
            if not svc._maintaining:
                break
            await asyncio.sleep(0.01)
        assert not svc._maintaining and not svc.store.needs_maintenance()

        events = await read_events(js, "cs-ev")
        assert [e.seq for e in events] == list(range(1, len(events) + 1))  # gap-free from 1
        assert {(e.instance_id, e.source, e.epoch) for e in events} == {("cs-ev", "cachestore", svc.events.epoch)}
        held: set[bytes] = set()
        for e in events:
            assert not set(e.stored) & held  # stored only when new
            assert set(e.removed) <= held  # removed only what was there
            held = (held | set(e.stored)) - set(e.removed)
        assert any(e.removed for e in events)  # the bounds forced evictions
        epoch, dumped = await dump(nc, "cs-ev", page=4)
        assert epoch == svc.events.epoch
        assert held == dumped == svc.store.keys()
        st = svc.store.stats()
        assert st.disk_bytes <= disk_bytes and st.evictions_disk > 0

        labels = {"instance_id": "cs-ev"}
        assert REGISTRY.get_sample_value("yuebing:cache_puts_total", labels) == puts
        assert REGISTRY.get_sample_value("yuebing:cache_pool_blocks", {**labels, "tier": "disk"}) == st.disk_blocks
        assert REGISTRY.get_sample_value("yuebing:cache_pool_bytes", {**labels, "tier": "dram"}) == st.dram_bytes
        assert REGISTRY.get_sample_value("yuebing:cache_evictions_total", {**labels, "tier": "disk"}) == st.evictions_disk
        assert st.promotions > 0  # gets of blocks DRAM had let go
        assert REGISTRY.get_sample_value("yuebing:cache_promotions_total", labels) == st.promotions
        for tier in ("dram", "disk"):
            assert REGISTRY.get_sample_value("yuebing:cache_tier_hit_blocks_total", {**labels, "tier": tier}) == st.hits[tier]
        await client.close()
    finally:
        await svc.stop()
        await nc.close()



async def test_writers_never_get_a_stalled_store_cut_off(nats_server, tmp_path):
    # A cachestore process starved of CPU for a moment stops reading. Twelve prefills writing to it
    # meanwhile must not push more than the NATS server holds for one client (64 MiB), or the
    # server drops the cachestore as a slow consumer and every write and load to it fails.
    import os
    import signal
    import subprocess
    import sys

    from libs.proc import die_with_parent

    log = tmp_path / "cachestore.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "yuebing.cli", "serve", "cachestore", "--nats", nats_server.url,
             "--data-dir", str(tmp_path / "data"), "--instance-id", "cs-stalled"],
            stdout=out, stderr=out, env=dict(os.environ, YUEBING_DRAM_BYTES=str(64 << 20)),
            preexec_fn=die_with_parent)
    ncs = [await connect(nats_server.url, f"test-writer-{w}") for w in range(12)]
    try:
        clients = []
        for nc in ncs:
            client = CacheClient(nc, timeout=60)
            assert await client.wait_for_pool(60)
            clients.append(client)
        block = torch.zeros(30, 2, 3, 16, 64)  # SmolLM2-135M's block: 737,280 bytes of KV
        batches = [[key(10_000 * (w + 1) + i) for i in range(24)] for w in range(12)]  # 12 x 18 MB
        proc.send_signal(signal.SIGSTOP)
        try:
            writes = [asyncio.ensure_future(c.put_blocks([(k, block) for k in ks])) for c, ks in zip(clients, batches)]
            await asyncio.sleep(3)  # every writer has sent what it may before an ack
        finally:
            proc.send_signal(signal.SIGCONT)
        await asyncio.gather(*writes)
        written = [k for ks in batches for k in ks]
        assert await clients[0].exists(written) == [True] * len(written)
        assert "Slow Consumer" not in (tmp_path / "nats.log").read_text()
        for c in clients:
            await c.close()
    finally:
        for nc in ncs:
            await nc.close()
        proc.terminate()
        proc.wait(30)


# ---------------------------------------------------------------- hot blocks
def test_hot_blocks_copies_grow_with_the_read_rate_are_bounded_and_decay():
    from services.cachestore.hot import HotBlocks

    hot = HotBlocks(reads_per_replica=10.0, max_replicas=2, half_life=1.0)
    k, cold = key(1), key(2)
    # 10 reads/s for a while: the decayed sum settles at rate * half_life / ln 2 -> one copy wanted
    due = []
    for i in range(200):
        due += hot.read([k], i * 0.1)
    assert 9.0 < hot.rate(k, 20.0) < 11.0
    assert due and due[0] == (k, 1)
    assert hot.advertised(k, 20.0) == 0  # wanted, not made: readers are not sent to it
    hot.making(k)
    assert hot.read([k], 20.0) == []  # being made: not asked for again
    hot.made(k, 1)
    assert hot.advertised(k, 20.0) == 1 and hot.hot_blocks(20.0) == 1
    # readers now send the primary half of the reads: each counts twice, the estimate holds (and
    # a rate just under the threshold keeps the copy made)
    for i in range(200):
        hot.read([k], 20.0 + i * 0.2)
    assert 9.0 < hot.rate(k, 60.0) < 11.0 and hot.advertised(k, 60.0) == 1
    # a burst far above the bound still asks for at most max_replicas
    burst = []
    for _ in range(500):
        burst += hot.read([k], 60.0)
    assert burst and max(n for _, n in burst) == 2
    hot.made(k, 2)
    assert hot.advertised(k, 60.0) == 2
    # the rate decays with no reads: fewer copies advertised, then none
    assert hot.advertised(k, 60.0 + 8.0) < 2
    assert hot.advertised(k, 60.0 + 20.0) == 0 and hot.hot_blocks(80.0) == 0
    # a block read now and then never gets a copy
    assert all(not hot.read([cold], t) for t in range(0, 100, 5))
    # off: nothing tracked
    assert HotBlocks(reads_per_replica=1.0, max_replicas=0, half_life=1.0).read([k] * 100, 0.0) == []


def test_hot_blocks_track_a_bounded_number_of_blocks_and_keep_the_hottest():
    from services.cachestore.hot import HotBlocks

    hot = HotBlocks(reads_per_replica=1.0, max_replicas=1, half_life=10.0, max_keys=100)
    for _ in range(30):
        hot.read([key(0)], 0.0)
    hot.made(key(0), 1)
    for i in range(1, 400):
        hot.read([key(i)], 0.0)
    assert len(hot._reads) <= 100
    assert hot.advertised(key(0), 0.0) == 1  # the hot one survived the pruning


async def test_hot_blocks_get_copies_readers_spread_over_them_and_fall_back_to_the_primary(nats_server, tmp_path):
    """A block read often gets copies on the next instances of its ranking (at most
    pool_hot_replicas), readers spread their loads over them, and a copy's holder that is gone
    costs nothing: the read goes to the primary."""
    from services.cachestore.service import GET_HITS

    ids = ["cs-h1", "cs-h2", "cs-h3", "cs-h4"]
    # the test's blocks: those ranked h1, h2, h3, h4 (primary h1, copies on h2 then h3, never h4)
    keys = [k for k in (key(5000 + i) for i in range(2000)) if rank(k, ids) == ids][:4]
    assert len(keys) == 4
    svcs = await start_pool(nats_server.url, tmp_path, ids, pool_hot_replicas=2, pool_hot_reads_per_second=1.0,
                            pool_hot_half_life_seconds=30.0)
    by_id = {s.instance_id: s for s in svcs}
    nc = await connect(nats_server.url, "test-hot")
    try:
        client = await pool_client(nc, ids, timeout=10)
        for s in svcs:  # each instance knows the pool (its copies go to the others)
            for _ in range(100):
                if s.peers.live() == ids:
                    break
                await asyncio.sleep(0.05)
        blocks = [layered_block(i) for i in range(len(keys))]
        await client.put_blocks(list(zip(keys, blocks)))
        bs = LAYERED[3]
        total = len(keys) * bs

        async def load() -> None:
            dest = layered_dest(total, total)
            assert await client.load_layers(keys, dest, 0) == len(keys), dest.failed
            assert torch.equal(dest.kv, torch.cat(blocks, dim=3))

        for _ in range(200):  # 1 read/s per copy: a few dozen reads in a burst want both copies
            await load()
            if all(set(keys) <= by_id[i].store.keys() for i in ids[:3]):
                break
            await asyncio.sleep(0.01)
        assert all(set(keys) <= by_id[i].store.keys() for i in ids[:3])
        assert not set(keys) & by_id["cs-h4"].store.keys()  # bounded by pool_hot_replicas
        copies = REGISTRY.get_sample_value("yuebing:cache_hot_copies_total", {"instance_id": "cs-h1"})
        assert copies >= 2 * len(keys)

        hits = lambda: {i: GET_HITS.labels(i)._value.get() for i in ids}  # noqa: E731
        before = hits()
        for _ in range(30):
            await load()
        after = hits()
        served = {i: after[i] - before[i] for i in ids}
        assert served["cs-h1"] + served["cs-h2"] + served["cs-h3"] == 30 * len(keys) and served["cs-h4"] == 0
        assert min(served[i] for i in ids[:3]) > 0  # every copy took some of the reads
        got = await client.get_blocks(keys)  # the batched get spreads the same way
        assert all(torch.equal(got[k], b) for k, b in zip(keys, blocks))

        # a copy's holder stops: loads asked of it go on to the primary, every block arrives
        await by_id["cs-h2"].stop()
        for _ in range(10):
            await load()
        await client.close()
    finally:
        for svc in svcs:
            await svc.stop()
        await nc.close()
