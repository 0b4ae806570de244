"""Chunked blobs over a real nats-server: reassembly, checksums, refusals; the sync barrier."""

import asyncio
import os

from libs.bus import BlobAssembler, connect, send_blob, synced, taking_turns
from libs.checksum import checksum
from libs.protocol import NO_BLOB_CHECKSUM, Chunk, ChunkAck, decode, encode


async def test_a_chunked_blob_is_written_into_the_receivers_own_buffer(nats_server):
    nc = await connect(nats_server.url, "test-bus-alloc")
    given, got = [], {}

    def alloc(n):
        buf = memoryview(bytearray(n))
        given.append(buf)
        return buf

    asm = BlobAssembler(nc, lambda tid, meta, data: got.setdefault(tid, data) and None, alloc=alloc)
    sub = await nc.subscribe("test.alloc", cb=asm.handle)
    try:
        data = os.urandom(5000)
        await send_blob(nc, "test.alloc", "t1", data, chunk_bytes=1024, window=2)
        assert len(given) == 1 and got["t1"] is given[0] and bytes(got["t1"]) == data
        await send_blob(nc, "test.alloc", "t2", data[:100])  # one chunk: no buffer asked for
        assert len(given) == 1 and bytes(got["t2"]) == data[:100]
        single = BlobAssembler(nc, lambda tid, meta, data: got.setdefault(tid, data) and None, alloc=alloc,
                               alloc_single=True)  # ... unless the receiver wants every blob in its own
        sub2 = await nc.subscribe("test.alloc1", cb=single.handle)
        await send_blob(nc, "test.alloc1", "t3", data[:100])
        assert len(given) == 2 and got["t3"] is given[1] and bytes(got["t3"]) == data[:100]
        await sub2.unsubscribe()
    finally:
        await sub.unsubscribe()
        await nc.close()


async def test_blobs_reassemble_and_bad_checksums_are_refused(nats_server):
    nc = await connect(nats_server.url, "test-bus")
    got: dict[str, tuple[bytes, bytes]] = {}

    def on_blob(tid, meta, data):
        got[tid] = (meta, bytes(data))
        return None

    asm = BlobAssembler(nc, on_blob)
    sub = await nc.subscribe("test.blobs", cb=asm.handle)
    try:
        big, small = os.urandom(10_000), os.urandom(300)
        await send_blob(nc, "test.blobs", "many", big, b"meta-1", chunk_bytes=1024, window=4)  # 10 chunks
        await send_blob(nc, "test.blobs", "one", small, b"meta-2", checksum=False)  # one chunk, own checksum
        assert got["many"] == (b"meta-1", big) and got["one"] == (b"meta-2", small)

        async def send(chunk: Chunk) -> ChunkAck:
            return decode((await nc.request("test.blobs", encode(chunk), timeout=5)).data, ChunkAck)

        wrong = Chunk(transfer_id="bad", index=0, count=1, offset=0, total_bytes=len(small),
                      checksum=checksum(small) ^ 1, data=memoryview(small))
        ack = await send(wrong)
        assert not ack.ok and "checksum" in ack.error and "bad" not in got
        # without a blob checksum the bytes are passed on as they are (their reader checks them)
        unchecked = Chunk(transfer_id="raw", index=0, count=1, offset=0, total_bytes=len(small),
                          checksum=NO_BLOB_CHECKSUM, data=memoryview(small))
        assert (await send(unchecked)).ok and got["raw"][1] == small
        # a single chunk that claims a different size than it carries is refused
        short = Chunk(transfer_id="short", index=0, count=1, offset=0, total_bytes=len(small) + 5,
                      checksum=NO_BLOB_CHECKSUM, data=memoryview(small))
        ack = await send(short)
        assert not ack.ok and "short" not in got
    finally:
        await sub.unsubscribe()
        await nc.close()


def test_a_message_with_its_data_joined_in_decodes_like_one_encoded_whole():
    from libs.protocol import LayerPiece, encode_with_data

    parts = [os.urandom(n) for n in (0, 7, 300, 70_000)]
    whole = b"".join(parts)
    joined = encode_with_data(LayerPiece(transfer_id="t", layer=3, first=1, count=4, data=b""), parts)
    piece = decode(joined, LayerPiece)
    assert (piece.transfer_id, piece.layer, piece.first, piece.count) == ("t", 3, 1, 4)
    assert bytes(piece.data) == whole
    assert decode(encode(LayerPiece(transfer_id="t", layer=3, first=1, count=4, data=whole)), LayerPiece) == piece


async def test_a_blob_sent_as_it_is_produced_waits_for_its_bytes_and_is_checked_by_its_last_chunk(nats_server):
    import asyncio

    nc = await connect(nats_server.url, "test-bus-stream")
    got: dict[str, bytes] = {}
    seen: list[int] = []  # chunk indexes as they reach the receiver

    def on_blob(tid, meta, data):
        got[tid] = bytes(data)

    asm = BlobAssembler(nc, on_blob)

    async def handle(msg):
        seen.append(decode(msg.data, Chunk).index)
        await asm.handle(msg)

    sub = await nc.subscribe("test.stream", cb=handle)
    try:
        data = bytearray(10_000)
        final = os.urandom(len(data))
        ready = 0
        changed = asyncio.Event()

        async def available(end):
            while ready < end:
                changed.clear()
                await changed.wait()

        async def produce(upto):  # the producer writes its bytes, then says so
            nonlocal ready
            data[ready:upto] = final[ready:upto]
            ready = upto
            changed.set()
            await nc.flush()
            await asyncio.sleep(0.2)

        send = asyncio.ensure_future(send_blob(nc, "test.stream", "s", data, b"m", chunk_bytes=1024, window=4,
                                               available=available))
        await produce(0)
        assert seen == []
        await produce(2500)  # chunks 0 and 1 are whole, chunk 2 is not
        assert seen == [0, 1]
        await produce(len(data))
        await asyncio.wait_for(send, 5)
        assert seen == list(range(10)) and got["s"] == final

        # the last chunk's checksum is the one checked
        small = os.urandom(300)
        first = Chunk(transfer_id="p", index=0, count=2, offset=0, total_bytes=300, checksum=NO_BLOB_CHECKSUM,
                      data=memoryview(small[:200]))
        await nc.publish("test.stream", encode(first))
        last = Chunk(transfer_id="p", index=1, count=2, offset=200, total_bytes=300, checksum=checksum(small) ^ 1,
                     data=memoryview(small[200:]))
        ack = decode((await nc.request("test.stream", encode(last), timeout=5)).data, ChunkAck)
        assert not ack.ok and "checksum" in ack.error and "p" not in got
        # it covers every chunk's bytes: a flipped byte in an earlier chunk is caught at the end
        bent = bytes([small[0] ^ 1]) + small[1:200]
        await nc.publish("test.stream", encode(Chunk(transfer_id="q", index=0, count=2, offset=0, total_bytes=300,
                                                     checksum=NO_BLOB_CHECKSUM, data=memoryview(bent))))
        last = Chunk(transfer_id="q", index=1, count=2, offset=200, total_bytes=300, checksum=checksum(small),
                     data=memoryview(small[200:]))
        ack = decode((await nc.request("test.stream", encode(last), timeout=5)).data, ChunkAck)
        assert not ack.ok and "checksum" in ack.error and "q" not in got
    finally:
        await sub.unsubscribe()
        await nc.close()


async def test_a_half_sent_blob_is_forgotten_once_its_sender_goes_quiet(nats_server):
    import asyncio

    nc = await connect(nats_server.url, "test-bus-stale")
    asm = BlobAssembler(nc, lambda *a: None, stale_after=0.05)
    sub = await nc.subscribe("test.stale", cb=asm.handle)

    def half(tid: str) -> bytes:
        return encode(Chunk(transfer_id=tid, index=0, count=2, offset=0, total_bytes=20,
                            checksum=NO_BLOB_CHECKSUM, data=memoryview(b"x" * 10)))

    try:
        await nc.request("test.stale", half("quiet"), timeout=5)
        assert set(asm._partials) == {"quiet"}
        await asyncio.sleep(1.1)  # the assembler looks for stale blobs at most once a second
        await nc.request("test.stale", half("fresh"), timeout=5)
        # forgotten even though only two are held (a cancelled hand-off must not pin its buffer)
        assert set(asm._partials) == {"fresh"}
    finally:
        await sub.unsubscribe()
        await nc.close()


async def test_synced_subscription_sees_the_next_publish_of_another_connection(nats_server):
    """Once ``synced`` returns, a subscription just made is on the server: a message another
    connection publishes right after reaches it (a bare flush lets its PING overtake the SUB)."""
    sub_nc = await connect(nats_server.url, "test-sync-sub")
    pub_nc = await connect(nats_server.url, "test-sync-pub")
    try:
        for i in range(60):
            got = asyncio.Event()

            async def on_msg(msg, got=got):
                got.set()

            sub = await sub_nc.subscribe(f"test.sync.{i}", cb=on_msg)
            await synced(sub_nc)
            await pub_nc.publish(f"test.sync.{i}", b"x")
            await pub_nc.flush()
            await asyncio.wait_for(got.wait(), 5)
            await sub.unsubscribe()
    finally:
        await pub_nc.close()
        await sub_nc.close()


def test_the_nats_server_gives_freed_heap_back_lazily_unless_told_otherwise(nats_server):
    from libs.natsserver import server_env

    environ = dict(e.split("=", 1) for e in
                   open(f"/proc/{nats_server.proc.pid}/environ").read().split("\0") if "=" in e)
    assert environ["GODEBUG"].endswith("madvdontneed=0")  # the server started so
    assert server_env({"GODEBUG": "gctrace=1"})["GODEBUG"] == "gctrace=1,madvdontneed=0"  # kept, added to
    assert server_env({"GODEBUG": "madvdontneed=1"})["GODEBUG"] == "madvdontneed=1"  # an operator's choice stands
    assert server_env({})["GODEBUG"] == "madvdontneed=0"


async def test_a_burst_on_one_subscription_lets_a_message_of_another_through_between_its_messages(nats_server):
    """The conductor's inputs take turns: a schedule request published after a burst of heartbeats
    is handled after those that had arrived with it, not after the whole burst (a plain callback
    takes its subscription's queued messages back to back)."""
    sender = await connect(nats_server.url, "burst-sender")
    nc = await connect(nats_server.url, "burst-receiver")
    order: list[str] = []
    done = asyncio.Event()

    async def busy(msg):
        order.append("hb")
        sum(range(20_000))  # a heartbeat's worth of work

    async def schedule(msg):
        order.append("sched")
        done.set()

    try:
        await nc.subscribe("t.hb", cb=taking_turns(busy))
        await nc.subscribe("t.sched", cb=taking_turns(schedule))
        await synced(nc)
        for _ in range(300):
            await sender.publish("t.hb", b"x")
        await sender.publish("t.sched", b"y")
        await sender.flush()
        await asyncio.wait_for(done.wait(), 10)
        assert order.index("sched") < 250, order.index("sched")  # (300: the burst first, whole)
    finally:
        await nc.close()
        await sender.close()
