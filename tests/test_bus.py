"""Chunked blobs over a real nats-server: reassembly, checksums, refusals."""

import os

from yuebing.libs.bus import BlobAssembler, connect, crc32, send_blob
from yuebing.libs.protocol import NO_BLOB_CHECKSUM, Chunk, ChunkAck, decode, encode


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
                      checksum=crc32(small) ^ 1, data=memoryview(small))
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
    from yuebing.libs.protocol import LayerPiece, encode_with_data

    parts = [os.urandom(n) for n in (0, 7, 300, 70_000)]
    whole = b"".join(parts)
    joined = encode_with_data(LayerPiece(transfer_id="t", layer=3, first=1, count=4, data=b""), parts)
    piece = decode(joined, LayerPiece)
    assert (piece.transfer_id, piece.layer, piece.first, piece.count) == ("t", 3, 1, 4)
    assert bytes(piece.data) == whole
    assert decode(encode(LayerPiece(transfer_id="t", layer=3, first=1, count=4, data=whole)), LayerPiece) == piece
