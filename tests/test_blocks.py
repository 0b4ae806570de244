import msgspec
import pytest
import torch

from libs.kv.blobs import blob_groups
from libs.kv.codec import BlockCorrupt, decode_block, encode_block, encode_blocks, KVBlock, split_blocks
from libs.kv.keys import block_hashes, KEY_BYTES, namespace_digest

NS = namespace_digest("model-a", "float32", 4)


def test_namespace_binds_every_field():
    digests = {
        namespace_digest("model-a", "float32", 4),
        namespace_digest("model-b", "float32", 4),
        namespace_digest("model-a", "bfloat16", 4),
        namespace_digest("model-a", "float32", 8),
        namespace_digest("model-a", "float32", 4, layout_version=2),
    }
    assert len(digests) == 5
    assert all(len(d) == KEY_BYTES for d in digests)
    assert namespace_digest("model-a", "float32", 4) == NS


def test_one_key_per_full_block_tail_excluded():
    assert block_hashes(list(range(3)), 4, NS) == []
    assert len(block_hashes(list(range(8)), 4, NS)) == 2
    keys = block_hashes(list(range(11)), 4, NS)
    assert len(keys) == 2
    assert keys == block_hashes(list(range(8)), 4, NS)  # the 3 tail tokens change nothing
    assert all(len(k) == KEY_BYTES for k in keys)


def test_same_prefix_same_keys_divergence_changes_the_rest():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 4, NS)
    b = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0], 4, NS)
    assert a[:2] == b[:2]
    assert a[2] != b[2]
    # A key names its whole prefix: equal block tokens after a different prefix give a new key.
    c = block_hashes([9, 9, 9, 9, 5, 6, 7, 8], 4, NS)
    assert c[1] != a[1]
    assert len(set(a)) == 3


def test_different_namespace_different_keys():
    tokens = list(range(16))
    other = namespace_digest("model-b", "float32", 4)
    assert not set(block_hashes(tokens, 4, NS)) & set(block_hashes(tokens, 4, other))


def test_chain_matches_definition():
    import hashlib
    import struct

    tokens = [5, 70000, -1, 2**31 - 1, 3, 3, 3, 3]
    k0 = hashlib.blake2b(NS + struct.pack("<4i", *tokens[:4]) + NS, digest_size=16).digest()
    k1 = hashlib.blake2b(k0 + struct.pack("<4i", *tokens[4:]) + NS, digest_size=16).digest()
    assert block_hashes(tokens, 4, NS) == [k0, k1]


def test_token_out_of_int32_range_rejected():
    with pytest.raises(ValueError):
        block_hashes([2**31, 0, 0, 0], 4, NS)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.dtype.itemsize])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codec_round_trip_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 2, 2, 4, 8, generator=g).to(dtype)
    t[0, 0, 0, 0, 0] = float("nan")
    t[0, 0, 0, 0, 1] = -0.0
    key = b"k" * KEY_BYTES
    buf = encode_block(key, t)
    k, out = decode_block(buf, expected_key=key)
    assert k == key
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(_bits(out), _bits(t))  # bit-exact, NaN and -0.0 included
    out += 1  # the decoded tensor owns writable memory
    assert decode_block(buf)[0] == key


def test_codec_accepts_non_contiguous_views():
    kv = torch.arange(2 * 2 * 1 * 10 * 3, dtype=torch.float32).reshape(2, 2, 1, 10, 3)
    blocks = split_blocks(kv, 4)
    assert len(blocks) == 2  # 10 positions -> 2 full blocks, tail of 2 dropped
    decoded = [decode_block(encode_block(bytes([i]) * 16, b))[1] for i, b in enumerate(blocks)]
    assert torch.equal(torch.cat(decoded, dim=3), kv[:, :, :, :8, :])


def test_decode_without_copy_shares_a_writable_buffer():
    t = torch.randn(2, 2, 2, 4, 8)
    key = b"z" * KEY_BYTES
    enc = encode_block(key, t)
    data_at = len(enc) - t.numel() * t.element_size()  # the tensor bytes end the encoding
    for pad in range(4):
        buf = bytearray(pad) + enc
        _, out = decode_block(memoryview(buf)[pad:], copy=False)
        assert torch.equal(out, t)
        assert out.data_ptr() % 4 == 0  # a misaligned view is copied to an aligned tensor
        buf[pad + data_at] ^= 0xFF
        shares = not torch.equal(out, t)
        assert shares == ((pad + data_at) % 4 == 0)  # aligned: a view into buf, not a copy
    # Read-only input (bytes) is always copied, so the tensor owns writable memory.
    _, owned = decode_block(enc, copy=False)
    owned += 1
    assert torch.equal(owned, t + 1)


def test_blocks_encoded_into_one_blob_split_back_by_their_meta():
    from libs.protocol import BlocksMeta

    blocks = [(bytes([i]) * 16, torch.full((1, 2, 1, 4, 8), float(i))) for i in range(3)]
    blob, sizes = encode_blocks(blocks)
    assert bytes(blob) == b"".join(encode_block(k, t) for k, t in blocks)
    pieces = BlocksMeta(keys=[k for k, _ in blocks], sizes=sizes).pieces(blob)
    for (k, t), (pk, piece) in zip(blocks, pieces):
        assert pk == k and torch.equal(decode_block(piece, expected_key=k)[1], t)
    for keys, sizes_ in (([b"a"], sizes), ([b"a", b"b", b"c"], [1, 2, 3]), ([b"a", b"b"], [len(blob) + 1, -1])):
        with pytest.raises(ValueError, match="does not match"):
            BlocksMeta(keys=keys, sizes=sizes_).pieces(blob)


def test_blob_groups_bound_blocks_and_bytes_and_send_a_large_block_alone():
    assert blob_groups([], 4, 10) == []
    assert blob_groups([3, 3, 3, 3, 3], 4, 10) == [(0, 3), (3, 5)]  # bytes bound
    assert blob_groups([1] * 9, 4, 100) == [(0, 4), (4, 8), (8, 9)]  # blocks bound
    assert blob_groups([2, 25, 2, 2], 4, 10) == [(0, 1), (1, 2), (2, 4)]  # 25 alone


def test_corrupted_byte_is_detected():
    t = torch.randn(2, 2, 2, 4, 8)
    key = b"x" * KEY_BYTES
    buf = bytearray(encode_block(key, t))
    for pos in (len(buf) - 1, len(buf) // 2):  # inside the tensor data
        bad = bytearray(buf)
        bad[pos] ^= 0x01
        with pytest.raises(BlockCorrupt):
            decode_block(bad)
    with pytest.raises(BlockCorrupt):
        decode_block(buf[: len(buf) // 2])  # truncated
    with pytest.raises(BlockCorrupt):
        decode_block(b"\x00garbage")
    with pytest.raises(BlockCorrupt):
        decode_block(buf, expected_key=b"y" * KEY_BYTES)


def test_shape_mismatch_is_detected():
    t = torch.randn(2, 2, 2, 4, 8)
    blk = msgspec.msgpack.decode(encode_block(b"k" * 16, t), type=KVBlock)
    blk.shape = [2, 2, 2, 4, 4]  # valid checksum, but the data does not fill this shape
    with pytest.raises(BlockCorrupt):
        decode_block(msgspec.msgpack.encode(blk))
    blk.shape = [2, 3, 2, 4, 8]  # not the wire layout
    with pytest.raises(BlockCorrupt):
        decode_block(msgspec.msgpack.encode(blk))


def test_block_of_the_crc32_format_is_refused_not_misread():
    """A block written by format 1 (its checksum a CRC32), as an older pool's LMDB file holds it,
    is a miss: refused as another format, not taken for a corrupt or a valid block."""
    import zlib

    t = torch.randn(2, 2, 2, 4, 8)
    blk = msgspec.msgpack.decode(encode_block(b"k" * 16, t), type=KVBlock)
    old = KVBlock(v=1, key=blk.key, shape=blk.shape, dtype=blk.dtype, checksum=zlib.crc32(blk.data), data=blk.data)
    with pytest.raises(BlockCorrupt, match="format version 1"):
        decode_block(msgspec.msgpack.encode(old))


def test_running_checksum_of_pieces_in_order_is_the_checksum_of_the_whole():
    """What a streamed hand-off and a layered load rely on: the sum taken piece by piece equals
    the one of the whole buffer, and any piece changed or out of order changes it."""
    from libs.checksum import Running, checksum

    data = torch.randn(3, 1000).numpy().tobytes()
    pieces = [data[i : i + 777] for i in range(0, len(data), 777)]
    run = Running()
    for piece in pieces:
        run.update(piece)
    assert run.intdigest() == checksum(data) == checksum(memoryview(bytearray(data)))
    swapped = Running()
    for piece in [pieces[1], pieces[0], *pieces[2:]]:
        swapped.update(piece)
    assert swapped.intdigest() != checksum(data)
    flipped = bytearray(data)
    flipped[1234] ^= 0x80
    assert checksum(flipped) != checksum(data)


def test_encode_rejects_wrong_layout():
    with pytest.raises(ValueError):
        encode_block(b"k" * 16, torch.zeros(2, 3, 4))


def test_split_and_join():
    kv = torch.randn(2, 2, 3, 13, 4)
    blocks = split_blocks(kv, 4)
    assert [b.shape[3] for b in blocks] == [4, 4, 4]
    assert torch.equal(torch.cat(blocks, dim=3), kv[:, :, :, :12])
    assert split_blocks(kv, 16) == []
