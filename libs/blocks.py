"""KV blocks: the hash chain that names them, the codec that stores them, and the cache client.

Hash chain (DESIGN section 4). Only full blocks of ``block_size`` tokens get a key::

    ns      = namespace_digest(model_id, dtype, block_size, layout_version)
    key_0   = blake2b(ns      || tokens_0 || ns, digest_size=16)
    key_i   = blake2b(key_i-1 || tokens_i || ns, digest_size=16)

where ``tokens_i`` are the block's token ids as little-endian int32. Equal prefixes therefore get
equal keys, and a key names its whole prefix, not just its own tokens.

Block codec. One block is the KV of ``block_size`` positions in the wire layout
``[num_layers, 2 (K, V), num_kv_heads, block_size, head_dim]``, contiguous, little-endian.
It is stored and sent as the MessagePack of ``KVBlock`` (a map with the fields below); ``data``
holds the raw tensor bytes and ``checksum`` their CRC32. The same bytes are used on the bus, in
DRAM and in LMDB; a block that fails any check decodes to ``BlockCorrupt``, never to a tensor.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
import uuid
import zlib
from collections.abc import Sequence

import msgspec
import nats
import torch

from .bus import BULK_PENDING_BYTES, BlobAssembler, TransferError, send_blob
from .log import get_logger
from .protocol import (
    CacheExistsReply,
    CacheExistsRequest,
    CacheGetReply,
    CacheGetRequest,
    CachePutMeta,
    CacheStats,
    Subjects,
    decode,
    encode,
)

log = get_logger("blocks")

KEY_BYTES = 16
BLOCK_FORMAT_VERSION = 1
LAYOUT_VERSION = 1


# ---------------------------------------------------------------- hash chain
def namespace_digest(model_id: str, dtype: str, block_size: int, layout_version: int = LAYOUT_VERSION) -> bytes:
    """16-byte digest binding model identity, dtype, block size and KV layout version."""
    ident = msgspec.msgpack.encode(["yuebing-kv-namespace", model_id, dtype, int(block_size), int(layout_version)])
    return hashlib.blake2b(ident, digest_size=KEY_BYTES).digest()


def block_hashes(token_ids: Sequence[int], block_size: int, namespace: bytes) -> list[bytes]:
    """One 16-byte key per full block of ``token_ids``; the tail that does not fill a block gets none."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    pack = struct.Struct(f"<{block_size}i").pack
    keys: list[bytes] = []
    parent = namespace
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        try:
            tokens = pack(*token_ids[start : start + block_size])
        except struct.error as e:
            raise ValueError(f"token ids must be int32: {e}") from e
        parent = hashlib.blake2b(parent + tokens + namespace, digest_size=KEY_BYTES).digest()
        keys.append(parent)
    return keys


# ---------------------------------------------------------------- codec
class BlockCorrupt(ValueError):
    """The bytes are not a valid block (garbage, checksum, shape or key mismatch)."""


class KVBlock(msgspec.Struct, kw_only=True):
    v: int = BLOCK_FORMAT_VERSION
    key: bytes
    shape: list[int]  # [num_layers, 2, num_kv_heads, block_size, head_dim]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    checksum: int  # zlib.crc32 of data
    data: bytes  # the tensor's raw bytes, C-contiguous, little-endian


_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "int8", "uint8")
}
_block_encoder = msgspec.msgpack.Encoder()
_block_decoder = msgspec.msgpack.Decoder(KVBlock)


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported KV dtype {dtype}")
    return name


def _check_shape(shape: Sequence[int]) -> None:
    if len(shape) != 5 or shape[1] != 2 or any(d <= 0 for d in shape):
        raise ValueError(f"KV block shape must be [layers, 2, kv_heads, block_size, head_dim], got {list(shape)}")


def encode_block(key: bytes, tensor: torch.Tensor) -> bytes:
    """Encode one block's KV (wire layout) as ``KVBlock`` MessagePack."""
    _check_shape(tensor.shape)
    t = tensor.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    blk = KVBlock(
        key=bytes(key),
        shape=list(t.shape),
        dtype=_dtype_name(t.dtype),
        checksum=zlib.crc32(raw) & 0xFFFFFFFF,
        data=raw,
    )
    return _block_encoder.encode(blk)


def verify_block(buf: bytes | bytearray | memoryview, expected_key: bytes | None = None) -> KVBlock:
    """Parse and check a block without building a tensor; raises ``BlockCorrupt``."""
    try:
        blk = _block_decoder.decode(buf)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise BlockCorrupt(f"not a KV block: {e}") from e
    if blk.v != BLOCK_FORMAT_VERSION:
        raise BlockCorrupt(f"unsupported block format version {blk.v}")
    if expected_key is not None and blk.key != expected_key:
        raise BlockCorrupt(f"key mismatch: expected {expected_key.hex()}, got {blk.key.hex()}")
    if (zlib.crc32(blk.data) & 0xFFFFFFFF) != blk.checksum:
        raise BlockCorrupt(f"checksum mismatch for block {blk.key.hex()}")
    dtype = _DTYPES.get(blk.dtype)
    if dtype is None:
        raise BlockCorrupt(f"unknown dtype {blk.dtype!r}")
    try:
        _check_shape(blk.shape)
    except ValueError as e:
        raise BlockCorrupt(str(e)) from e
    if math.prod(blk.shape) * dtype.itemsize != len(blk.data):
        raise BlockCorrupt(f"shape {blk.shape} x {blk.dtype} does not match {len(blk.data)} data bytes")
    return blk


def decode_block(buf: bytes | bytearray | memoryview, expected_key: bytes | None = None) -> tuple[bytes, torch.Tensor]:
    """Decode ``encode_block`` output to ``(key, tensor)``, bit-identical; raises ``BlockCorrupt``."""
    blk = verify_block(buf, expected_key)
    tensor = torch.frombuffer(bytearray(blk.data), dtype=_DTYPES[blk.dtype]).reshape(blk.shape)
    return blk.key, tensor


def split_blocks(kv: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """The full blocks of a request's KV ``[layers, 2, kv_heads, length, head_dim]`` (views)."""
    if kv.dim() != 5:
        raise ValueError(f"KV must be [layers, 2, kv_heads, length, head_dim], got {list(kv.shape)}")
    n = kv.shape[3] // block_size
    return [kv[:, :, :, i * block_size : (i + 1) * block_size, :] for i in range(n)]


def join_blocks(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate blocks along the length dimension (dim 3)."""
    if not blocks:
        raise ValueError("join_blocks needs at least one block")
    return torch.cat(list(blocks), dim=3)


# ---------------------------------------------------------------- client
class CacheError(RuntimeError):
    """A cache operation that must not be silently skipped (a put) failed."""


_NATS_ERRORS = (nats.errors.Error, asyncio.TimeoutError, TransferError)


class CacheClient:
    """Talks to the cachestore pool over ``nc``. Every call is bounded by a timeout.

    Reads degrade to misses when the pool is down, slow or answers garbage; a failed put raises
    ``CacheError`` (callers typically log it and go on: the cache is an optimisation).
    """

    def __init__(self, nc, *, timeout: float = 5.0):
        self.nc = nc
        self.timeout = timeout

    async def put_block(self, key: bytes, tensor: torch.Tensor, *, timeout: float | None = None) -> None:
        data = encode_block(key, tensor)
        timeout = timeout or self.timeout
        tid = f"{key.hex()}.{uuid.uuid4().hex[:8]}"
        try:
            await asyncio.wait_for(
                send_blob(self.nc, Subjects.CACHE_PUT, tid, data, meta=encode(CachePutMeta(key=key)), timeout=timeout),
                timeout,
            )
        except (*_NATS_ERRORS, msgspec.DecodeError, msgspec.ValidationError) as e:
            raise CacheError(f"cache put of {key.hex()} failed: {type(e).__name__}: {e}") from e

    async def get_blocks(self, keys: Sequence[bytes], *, timeout: float | None = None) -> dict[bytes, torch.Tensor]:
        """The blocks of ``keys`` that the pool has; anything missing, late or corrupt is absent."""
        if not keys:
            return {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.timeout)
        wanted = set(keys)
        arrived: set[bytes] = set()
        got: dict[bytes, torch.Tensor] = {}
        changed = asyncio.Event()

        def on_blob(transfer_id: str, meta: bytes, data: bytearray) -> None:
            try:
                key = bytes.fromhex(transfer_id)
            except ValueError:
                return
            if key not in wanted:
                return
            arrived.add(key)
            changed.set()
            try:
                got[key] = decode_block(data, expected_key=key)[1]
            except BlockCorrupt as e:
                log.warning("cache_block_corrupt", key=key.hex(), error=str(e))

        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(
            inbox, cb=BlobAssembler(self.nc, on_blob).handle, pending_bytes_limit=BULK_PENDING_BYTES
        )
        try:
            req = CacheGetRequest(keys=list(keys), reply_subject=inbox)
            resp = await self.nc.request(Subjects.CACHE_GET, encode(req), timeout=max(0.01, deadline - loop.time()))
            found = [k for k in decode(resp.data, CacheGetReply).found if k in wanted]
            # Blocks are streamed in the announced order, so once the last one is here the rest
            # have either arrived or failed.
            while found and found[-1] not in arrived:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    log.warning("cache_get_incomplete", announced=len(found), received=len(got))
                    break
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
        except (*_NATS_ERRORS, msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("cache_get_failed", error=f"{type(e).__name__}: {e}", keys=len(keys))
        finally:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass
        return got

    async def where(self, keys: Sequence[bytes], *, timeout: float | None = None) -> list[str]:
        """Tier of each key: "dram", "disk", or "" when absent (or when the pool does not answer)."""
        if not keys:
            return []
        try:
            resp = await self.nc.request(
                Subjects.CACHE_EXISTS, encode(CacheExistsRequest(keys=list(keys))), timeout=timeout or self.timeout
            )
            reply = decode(resp.data, CacheExistsReply)
        except (*_NATS_ERRORS, msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("cache_exists_failed", error=f"{type(e).__name__}: {e}", keys=len(keys))
            return [""] * len(keys)
        if len(reply.present) != len(keys):
            return [""] * len(keys)
        tiers = reply.tier if len(reply.tier) == len(keys) else ["?"] * len(keys)
        return [t if p else "" for p, t in zip(reply.present, tiers)]

    async def exists(self, keys: Sequence[bytes], *, timeout: float | None = None) -> list[bool]:
        return [bool(t) for t in await self.where(keys, timeout=timeout)]

    async def stats(self, *, timeout: float | None = None) -> CacheStats | None:
        try:
            resp = await self.nc.request(Subjects.CACHE_STATS, b"", timeout=timeout or self.timeout)
            return decode(resp.data, CacheStats)
        except (*_NATS_ERRORS, msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("cache_stats_failed", error=f"{type(e).__name__}: {e}")
            return None
