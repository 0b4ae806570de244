"""The block codec: one block's KV as the bytes stored on the bus, in DRAM and in LMDB.

One block is the KV of ``block_size`` positions in the wire layout
``[num_layers, 2 (K, V), num_kv_heads, block_size, head_dim]``, contiguous, little-endian.
It is stored and sent as the MessagePack of ``KVBlock`` (a map with the fields below); ``data``
holds the raw tensor bytes and ``checksum`` their XXH3-64 (``libs/checksum.py``). A block that
fails any check decodes to ``BlockCorrupt``, never to a tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec
import torch

from libs import checksum as sums

BLOCK_FORMAT_VERSION = 2  # 2: the checksum is XXH3-64 (1: CRC32)


class BlockCorrupt(ValueError):
    """The bytes are not a valid block (garbage, checksum, shape or key mismatch)."""


class KVBlock(msgspec.Struct, kw_only=True):
    v: int = BLOCK_FORMAT_VERSION
    key: bytes
    shape: list[int]  # [num_layers, 2, num_kv_heads, block_size, head_dim]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    checksum: int  # XXH3-64 of data
    data: bytes  # the tensor's raw bytes, C-contiguous, little-endian


class KVBlockView(msgspec.Struct, kw_only=True):
    """``KVBlock`` as decoded for reading: ``data`` is a view into the decoded buffer, not a copy."""

    v: int = BLOCK_FORMAT_VERSION
    key: bytes
    shape: list[int]
    dtype: str
    checksum: int
    data: memoryview


KV_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "int8", "uint8")
}
_block_encoder = msgspec.msgpack.Encoder()
_block_decoder = msgspec.msgpack.Decoder(KVBlockView)


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in KV_DTYPES:
        raise ValueError(f"unsupported KV dtype {dtype}")
    return name


def _check_shape(shape: Sequence[int]) -> None:
    if len(shape) != 5 or shape[1] != 2 or any(d <= 0 for d in shape):
        raise ValueError(f"KV block shape must be [layers, 2, kv_heads, block_size, head_dim], got {list(shape)}")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous host tensor of any dtype (bfloat16 included, which numpy has not),
    without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _kv_block(key: bytes, tensor: torch.Tensor) -> KVBlock:
    _check_shape(tensor.shape)
    t = tensor.detach().to("cpu").contiguous()
    raw = tensor_bytes(t)  # no copy: encoded straight from the tensor
    return KVBlock(
        key=bytes(key),
        shape=list(t.shape),
        dtype=_dtype_name(t.dtype),
        checksum=sums.checksum(raw),
        data=raw,  # type: ignore[arg-type] - msgspec encodes any buffer as bin
    )


def encode_block(key: bytes, tensor: torch.Tensor) -> bytes:
    """Encode one block's KV (wire layout) as ``KVBlock`` MessagePack."""
    return _block_encoder.encode(_kv_block(key, tensor))


def encode_blocks(blocks: Sequence[tuple[bytes, torch.Tensor]]) -> tuple[bytearray, list[int]]:
    """``encode_block`` of each, concatenated straight into one buffer (no copy to join them);
    returns it and the size of each encoded block."""
    buf, sizes = bytearray(), []
    for key, tensor in blocks:
        start = len(buf)
        _block_encoder.encode_into(_kv_block(key, tensor), buf, -1)
        sizes.append(len(buf) - start)
    return buf, sizes


def block_view(key: bytes, tensor: torch.Tensor) -> KVBlock:
    """A block held as a tensor, described as a stored one (shape, dtype, checksum) for a layered get;
    its ``data`` is a view of the tensor's memory (contiguous: no copy), valid while the tensor is."""
    return _kv_block(key, tensor)


def block_header(buf: bytes | bytearray | memoryview) -> KVBlockView:
    """Parse a stored block's header without checking its data (the reader of a layered get checks
    the checksum end to end); raises ``BlockCorrupt`` when it is not a block at all."""
    try:
        return _block_decoder.decode(buf)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise BlockCorrupt(f"not a KV block: {e}") from e


def verify_block(buf: bytes | bytearray | memoryview, expected_key: bytes | None = None) -> KVBlockView:
    """Parse and check a block without building a tensor (nor copying its data); raises ``BlockCorrupt``.

    The result's ``data`` is a memoryview into ``buf``.
    """
    blk = block_header(buf)
    if blk.v != BLOCK_FORMAT_VERSION:
        raise BlockCorrupt(f"unsupported block format version {blk.v}")
    if expected_key is not None and blk.key != expected_key:
        raise BlockCorrupt(f"key mismatch: expected {expected_key.hex()}, got {blk.key.hex()}")
    if sums.checksum(blk.data) != blk.checksum:
        raise BlockCorrupt(f"checksum mismatch for block {blk.key.hex()}")
    dtype = KV_DTYPES.get(blk.dtype)
    if dtype is None:
        raise BlockCorrupt(f"unknown dtype {blk.dtype!r}")
    try:
        _check_shape(blk.shape)
    except ValueError as e:
        raise BlockCorrupt(str(e)) from e
    if math.prod(blk.shape) * dtype.itemsize != len(blk.data):
        raise BlockCorrupt(f"shape {blk.shape} x {blk.dtype} does not match {len(blk.data)} data bytes")
    return blk


def decode_block(
    buf: bytes | bytearray | memoryview, expected_key: bytes | None = None, *, copy: bool = True
) -> tuple[bytes, torch.Tensor]:
    """Decode ``encode_block`` output to ``(key, tensor)``, bit-identical; raises ``BlockCorrupt``.

    With ``copy=False`` and a writable ``buf`` (a bytearray, or a writable memoryview) the
    tensor shares ``buf``'s memory instead of owning a copy (unless its data is not aligned for the
    dtype, then it is copied anyway). A read-only ``buf`` is always copied.
    """
    blk = verify_block(buf, expected_key)
    dtype = KV_DTYPES[blk.dtype]
    data = blk.data
    if copy or data.readonly:
        return blk.key, torch.frombuffer(bytearray(data), dtype=dtype).reshape(blk.shape)
    tensor = torch.frombuffer(data, dtype=dtype).reshape(blk.shape)
    if tensor.data_ptr() % dtype.itemsize:
        tensor = tensor.clone()
    return blk.key, tensor


def split_blocks(kv: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """The full blocks of a request's KV ``[layers, 2, kv_heads, length, head_dim]`` (views)."""
    if kv.dim() != 5:
        raise ValueError(f"KV must be [layers, 2, kv_heads, length, head_dim], got {list(kv.shape)}")
    n = kv.shape[3] // block_size
    return [kv[:, :, :, i * block_size : (i + 1) * block_size, :] for i in range(n)]
