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
holds the raw tensor bytes and ``checksum`` their XXH3-64 (``libs/checksum.py``). The same bytes are used on the bus, in
DRAM and in LMDB; a block that fails any check decodes to ``BlockCorrupt``, never to a tensor.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
import uuid
import warnings
from collections.abc import Iterable, Sequence
from functools import partial

import msgspec
import nats
import numpy as np
import torch

from . import checksum as sums
from .bus import BULK_PENDING_BYTES, BlobAssembler, BlobData, TransferError, send_blob, send_windowed
from .log import get_logger
from .protocol import (
    CHUNK_DATA_BYTES,
    BlockHeader,
    ChunkAck,
    LayerPiece,
    CacheExistsReply,
    CacheExistsRequest,
    CacheGetMeta,
    CacheGetReply,
    CacheGetRequest,
    CachePutMeta,
    CacheStats,
    Heartbeat,
    Subjects,
    decode,
    encode,
    encode_with_data,
)

log = get_logger("blocks")

KEY_BYTES = 16
BLOCK_FORMAT_VERSION = 2  # 2: the checksum is XXH3-64 (1: CRC32)
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
    checksum: int  # XXH3-64 of data
    data: bytes  # the tensor's raw bytes, C-contiguous, little-endian


class _KVBlockView(msgspec.Struct, kw_only=True):
    """``KVBlock`` as decoded for reading: ``data`` is a view into the decoded buffer, not a copy."""

    v: int = BLOCK_FORMAT_VERSION
    key: bytes
    shape: list[int]
    dtype: str
    checksum: int
    data: memoryview


_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "int8", "uint8")
}
_block_encoder = msgspec.msgpack.Encoder()
_block_decoder = msgspec.msgpack.Decoder(_KVBlockView)


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported KV dtype {dtype}")
    return name


def _check_shape(shape: Sequence[int]) -> None:
    if len(shape) != 5 or shape[1] != 2 or any(d <= 0 for d in shape):
        raise ValueError(f"KV block shape must be [layers, 2, kv_heads, block_size, head_dim], got {list(shape)}")


def _kv_block(key: bytes, tensor: torch.Tensor) -> KVBlock:
    _check_shape(tensor.shape)
    t = tensor.detach().to("cpu").contiguous()
    raw = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # no copy: encoded straight from the tensor
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


def blob_groups(sizes: Sequence[int], max_blocks: int, max_bytes: int) -> list[tuple[int, int]]:
    """Consecutive runs ``[start, end)`` of blocks of ``sizes`` to send as one blob each: at most
    ``max_blocks`` blocks and ``max_bytes`` bytes per run, a larger block alone."""
    runs: list[tuple[int, int]] = []
    size = 0
    for i, n in enumerate(sizes):
        if runs and runs[-1][1] - runs[-1][0] < max_blocks and size + n <= max_bytes:
            runs[-1] = (runs[-1][0], i + 1)
            size += n
        else:
            runs.append((i, i + 1))
            size = n
    return runs


def block_header(buf: bytes | bytearray | memoryview) -> _KVBlockView:
    """Parse a stored block's header without checking its data (the reader of a layered get checks
    the checksum end to end); raises ``BlockCorrupt`` when it is not a block at all."""
    try:
        return _block_decoder.decode(buf)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise BlockCorrupt(f"not a KV block: {e}") from e


def verify_block(buf: bytes | bytearray | memoryview, expected_key: bytes | None = None) -> _KVBlockView:
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


def decode_block(
    buf: bytes | bytearray | memoryview, expected_key: bytes | None = None, *, copy: bool = True
) -> tuple[bytes, torch.Tensor]:
    """Decode ``encode_block`` output to ``(key, tensor)``, bit-identical; raises ``BlockCorrupt``.

    With ``copy=False`` and a writable ``buf`` (a bytearray, or a writable memoryview) the
    tensor shares ``buf``'s memory instead of owning a copy (unless its data is not aligned for the
    dtype, then it is copied anyway). A read-only ``buf`` is always copied.
    """
    blk = verify_block(buf, expected_key)
    dtype = _DTYPES[blk.dtype]
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


# ---------------------------------------------------------------- sharding
def _hrw_score(key: bytes, instance_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(instance_id.encode() + b"\x00" + key, digest_size=8).digest(), "big")


def rank(key: bytes, instance_ids: Iterable[str]) -> list[str]:
    """Every instance in rendezvous (highest random weight) order for ``key``; deterministic."""
    return sorted(set(instance_ids), key=lambda iid: (_hrw_score(key, iid), iid), reverse=True)


def owners(key: bytes, instance_ids: Iterable[str], replicas: int = 1) -> list[str]:
    """The ``replicas`` instances that hold ``key``: the top of its rendezvous ranking.

    Removing an instance only moves the keys it owned (each to its next-ranked instance); adding
    one only moves keys to the new instance. Keys spread evenly over the instances.
    """
    return rank(key, instance_ids)[: max(0, replicas)]


# ---------------------------------------------------------------- client
class CacheError(RuntimeError):
    """A cache operation that must not be silently skipped (a put) failed."""


# Blocks per get or put blob: bounds the meta (it travels in chunk 0's header room) and the sender's buffer.
GET_BLOB_MAX_BLOCKS = PUT_BLOB_MAX_BLOCKS = 64
# Bytes per put blob: a prompt's new blocks for one owner go in a few blobs, one transaction each.
PUT_BLOB_MAX_BYTES = 8 << 20
# Chunks of a put blob sent ahead of the store's ack. Many prefills put to one instance at once:
# what they have in flight together must stay well under the NATS server's per-client pending
# limit (64 MiB), or the server cuts the cachestore off as a slow consumer.
PUT_WINDOW_CHUNKS = 2
MISSED_BEATS = 3  # an instance is gone after missing this many heartbeats
DISCOVERY_WAIT = 2.0  # a client used without start() waits this long (at most) for the first heartbeat

_NATS_ERRORS = (nats.errors.Error, asyncio.TimeoutError, TransferError)
_BAD_REPLY = (msgspec.DecodeError, msgspec.ValidationError)


def _no_responders(e: BaseException) -> bool:
    return isinstance(e, nats.errors.NoRespondersError) or isinstance(e.__cause__, nats.errors.NoRespondersError)


_NUMPY_DTYPES = (torch.float32, torch.float16, torch.float64)


# A layered get sends pieces of at most one chunk, and waits for the reader's ack every
# LAYER_PIECES_IN_FLIGHT of them.
LAYER_PIECE_TARGET_BYTES = CHUNK_DATA_BYTES
LAYER_PIECES_IN_FLIGHT = 16


async def serve_layers(msg, nc, subject: str, found: Sequence[tuple[bytes, "KVBlock | _KVBlockView"]]) -> list[bytes]:
    """The sending end of a layered get (``CacheClient.load_layers``), for whoever holds the blocks:
    answer ``msg`` with the blocks' headers, then send layer 0 of every block, layer 1 of every
    block, ... to ``subject`` as ``LayerPiece`` messages of at most one chunk, acked in windows.
    Only blocks shaped like the first one are sent (one namespace, one shape); returns their keys.
    The blocks' memory must stay as it is until this returns."""
    views, keys = [], []
    for k, view in found:
        if views and (view.shape != views[0].shape or view.dtype != views[0].dtype):
            continue
        views.append(view)
        keys.append(k)
    tid = uuid.uuid4().hex[:12]
    await msg.respond(encode(CacheGetReply(
        found=keys, transfer_id=tid,
        headers=[BlockHeader(shape=list(v.shape), dtype=v.dtype, checksum=v.checksum) for v in views])))
    if not views:
        return keys
    layers = views[0].shape[0]
    per = len(views[0].data) // layers
    run = max(1, LAYER_PIECE_TARGET_BYTES // per)

    def pieces():
        for layer in range(layers):
            lo, hi = layer * per, (layer + 1) * per
            for first in range(0, len(views), run):
                group = views[first : first + run]
                yield encode_with_data(LayerPiece(transfer_id=tid, layer=layer, first=first, count=len(group),
                                                  data=b""), [v.data[lo:hi] for v in group])

    await send_windowed(nc, subject, tid, pieces(), window=LAYER_PIECES_IN_FLIGHT)
    return keys


class _LayeredLoad:
    """The receiving end of ``CacheClient.load_layers``: places each ``LayerPiece`` in the buffer,
    keeps a running checksum per block, and releases layers to the model as they complete."""

    def __init__(self, keys: list[bytes], dest, start: int):
        self.dest = dest
        self.kv: torch.Tensor = dest.kv
        self.start = start
        self.n = len(keys)
        self.layers, _, self.heads, _, self.dim = self.kv.shape
        self.block_size = 0
        self.expected_shape: list[int] | None = None
        self.bad: set[int] = set()  # blocks missing, refused, corrupt or out of order
        self.sums = [sums.Running() for _ in range(self.n)]
        self.checksum = [0] * self.n
        self.next_layer = [0] * self.n  # per block: the layer whose slice comes next
        self.per_layer = [0] * self.layers  # per layer: blocks whose slice is in
        self.senders: dict[str, list[int]] = {}  # transfer id -> global index of its found blocks
        self.pending = 0  # announced block-layer slices not yet in
        self.ready = 0
        self.all_announced = False
        self.failed = ""
        self.done = asyncio.Event()
        self.early: dict[str, list[LayerPiece]] = {}  # pieces that came before their sender's reply
        self.kv_np = self.kv.numpy() if self.kv.dtype in _NUMPY_DTYPES else None  # same memory
        self.finished = False  # past ``finish`` the buffer is its owner's again: nothing more lands in it

    # ---- bookkeeping of what will come
    def missing(self, idxs: Sequence[int]) -> None:
        self.bad.update(idxs)

    def expect(self, reply: CacheGetReply, keys: list[bytes], idxs: list[int]) -> None:
        """A sender's announcement. Its pieces number blocks by their place in ``found``, so an
        announcement with any block this load cannot take (unknown key, other shape) is refused
        whole: its blocks count as missing and its pieces are turned away."""
        where = {k: i for k, i in zip(keys, idxs)}
        got = [where.get(k) for k in reply.found]
        usable = (bool(reply.transfer_id) and len(reply.headers) == len(got) and None not in got
                  and all(self._shape_ok(h) for h in reply.headers))
        if not usable:
            got = []
        for i, h in zip(got, reply.headers):
            self.checksum[i] = h.checksum
        self.bad.update(set(idxs) - set(got))
        early = self.early.pop(reply.transfer_id, [])
        if not got:
            return
        self.senders[reply.transfer_id] = got
        self.pending += len(got) * self.layers
        for piece in early:
            try:
                self._place(piece)
            except (ValueError, RuntimeError) as e:
                log.warning("cache_layer_piece_dropped", error=f"bad layer piece: {e}")
                self._abandon(reply.transfer_id)
                break

    def _shape_ok(self, h) -> bool:
        """[layers, 2, heads, block_size, dim] of this buffer, the same block size for every block."""
        if len(h.shape) != 5 or _DTYPES.get(h.dtype) != self.kv.dtype or h.shape[3] <= 0:
            return False
        if self.expected_shape is None:
            self.expected_shape, self.block_size = [self.layers, 2, self.heads, h.shape[3], self.dim], h.shape[3]
        return h.shape == self.expected_shape

    def announced(self) -> None:
        self.all_announced = True
        if self.bad:
            # the past cannot be whole: let the model stop waiting; the good prefix is kept
            self._fail(f"{len(self.bad)} of {self.n} blocks are not held where they were asked for")
        self._check_done()

    # ---- pieces
    async def on_piece(self, nc, msg) -> None:
        error = ""
        piece = None
        try:
            piece = decode(msg.data, LayerPiece)
            if self.finished:
                raise ValueError("piece after the load ended")
            if piece.transfer_id in self.senders:
                self._place(piece)
            elif not self.all_announced:  # its sender's reply is still on the way
                self.early.setdefault(piece.transfer_id, []).append(piece)
            else:
                raise ValueError(f"piece of an unknown transfer {piece.transfer_id}")
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RuntimeError) as e:
            error = f"bad layer piece: {e}"
            log.warning("cache_layer_piece_dropped", error=error)
            if piece is not None:
                self._abandon(piece.transfer_id)  # the negative ack stops its sender
        if msg.reply:
            # A load that failed still takes the rest: the blocks before the failure point must
            # arrive whole to be reused. Only a piece that makes no sense stops its sender.
            await nc.publish(msg.reply, encode(ChunkAck(transfer_id="", received=0, ok=not error, error=error)))

    def _place(self, p: LayerPiece) -> None:
        idxs = self.senders[p.transfer_id]
        if not 0 <= p.layer < self.layers or p.first < 0 or p.first + p.count > len(idxs):
            raise ValueError(f"unexpected piece {p.transfer_id} layer {p.layer} blocks {p.first}+{p.count}")
        bs = self.block_size
        per = 2 * self.heads * bs * self.dim * self.kv.element_size()
        if len(p.data) != p.count * per:
            raise ValueError(f"piece of {len(p.data)} bytes for {p.count} block slices of {per}")
        src = self._source(p.data, p.count)
        run_start = 0
        for j in range(p.count + 1):  # copy runs of blocks that are adjacent in the buffer too
            if j < p.count:
                gi = idxs[p.first + j]
                if self.next_layer[gi] != p.layer:
                    self.bad.add(gi)  # out of order: its checksum cannot be trusted
                    self._fail(f"block {gi}: layer {p.layer} came out of order")
                self.sums[gi].update(p.data[j * per : (j + 1) * per])
                self.next_layer[gi] = p.layer + 1
            if j == p.count or (j > run_start and idxs[p.first + j] != idxs[p.first + j - 1] + 1):
                first_gi, count = idxs[p.first + run_start], j - run_start
                pos = self.start + first_gi * bs
                self._copy(p.layer, pos, count, src, run_start, j)
                run_start = j
        self.per_layer[p.layer] += p.count
        self.pending -= p.count
        self._release()
        self._check_done()

    def _source(self, data: memoryview, count: int):
        shape = (count, 2, self.heads, self.block_size, self.dim)
        if self.kv_np is not None:
            return np.frombuffer(data, dtype=self.kv_np.dtype).reshape(shape)
        with warnings.catch_warnings():  # read only, as the message's bytes are: the copy only reads it
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(data, dtype=self.kv.dtype).view(shape)

    def _copy(self, layer: int, pos: int, count: int, src, lo: int, hi: int) -> None:
        """Blocks ``lo..hi-1`` of a piece (``[blocks, 2, H, bs, D]``) into the buffer's layer at ``pos``.

        With numpy on this (event loop) thread: a torch copy would start an OpenMP team, which
        stalls when the model thread and the other processes hold the cores."""
        bs = self.block_size
        if self.kv_np is not None:
            dst = self.kv_np[layer, :, :, pos : pos + count * bs]
            dst.shape = (2, self.heads, count, bs, self.dim)  # a view (raises rather than copy)
            np.copyto(dst, src[lo:hi].transpose(1, 2, 0, 3, 4))
        else:
            dst = self.kv[layer, :, :, pos : pos + count * bs].view(2, self.heads, count, bs, self.dim)
            dst.copy_(src[lo:hi].permute(1, 2, 0, 3, 4))

    def _abandon(self, tid: str) -> None:
        """A sender that will send no more: what it still owed will not come."""
        idxs = self.senders.pop(tid, [])
        self.early.pop(tid, None)
        owed = [i for i in idxs if self.next_layer[i] < self.layers]
        self.pending -= sum(self.layers - self.next_layer[i] for i in owed)
        if owed:
            self.bad.update(owed)
            self._fail(f"{len(owed)} blocks stopped arriving")
        self._check_done()

    def _release(self) -> None:
        """Tell the model which layers are complete; the last one only once every checksum matched."""
        if self.failed or not self.all_announced or self.bad:
            return
        ready = self.ready
        while ready < self.layers - 1 and self.per_layer[ready] == self.n:
            ready += 1
        if ready == self.layers - 1 and self.per_layer[ready] == self.n:
            wrong = self._corrupt(range(self.n))
            if wrong:
                self.bad.update(wrong)
                log.warning("cache_block_corrupt", blocks=len(wrong), first=min(wrong))
                self._fail(f"checksum mismatch in {len(wrong)} block(s)")
                return
            ready = self.layers
        if ready > self.ready:
            self.ready = ready
            self.dest.layer_ready(ready)

    def _corrupt(self, blocks: Iterable[int]) -> list[int]:
        """Of ``blocks`` (all their layers in), those whose data does not match their stored checksum."""
        return [i for i in blocks if self.sums[i].intdigest() != self.checksum[i]]

    def _check_done(self) -> None:
        if self.all_announced and self.pending <= 0:
            self._release()
            self.done.set()

    def _fail(self, reason: str) -> None:
        if not self.failed:
            self.failed = reason
            self.dest.fail(reason)

    def give_up(self, reason: str) -> None:
        self.bad.update(i for i in range(self.n) if self.next_layer[i] < self.layers)
        self._fail(reason)

    def finish(self) -> int:
        """Blocks in front of the first bad or incomplete one (all of them when the load succeeded)."""
        self.finished = True
        if self.ready == self.layers and not self.failed:
            return self.n
        incomplete = [i for i in range(self.n) if self.next_layer[i] < self.layers]
        wrong = self._corrupt(i for i in range(self.n) if self.next_layer[i] == self.layers)
        good = min([*self.bad, *incomplete, *wrong], default=self.n)
        if good < self.n:
            self._fail(self.failed or "the past did not arrive whole")
        return good


class CacheClient:
    """Talks to the cachestore pool over ``nc``: keys are sharded by rendezvous hashing over the
    live instances (known from their heartbeats), each put going to ``replicas`` of them.

    Call ``start()`` (then optionally ``wait_for_pool()``) before use and ``close()`` after; a
    client used without ``start()`` starts itself and waits up to ``DISCOVERY_WAIT`` for the pool
    on its first call. Every call is bounded by its timeout. Reads degrade to misses when the pool
    is down, slow or answers garbage; a failed put raises ``CacheError`` (callers typically log it
    and go on: the cache is an optimisation).
    """

    def __init__(self, nc, *, timeout: float = 5.0, replicas: int = 1):
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.nc = nc
        self.timeout = timeout
        self.replicas = replicas
        self._beats: dict[str, tuple[float, float]] = {}  # instance -> (last beat, its interval)
        self._hb_sub = None
        self._pool_changed: asyncio.Event | None = None
        self._starting: asyncio.Task | None = None
        self._closed = False

    # ---- pool membership
    async def start(self) -> None:
        """Subscribe to the cachestore heartbeats. Idempotent."""
        if self._hb_sub is not None:
            return
        if self._pool_changed is None:
            self._pool_changed = asyncio.Event()
        self._hb_sub = await self.nc.subscribe(Subjects.heartbeat("cachestore", "*"), cb=self._on_heartbeat)

    async def close(self) -> None:
        """Stop tracking the pool; later calls find no instance (misses, failed puts)."""
        self._closed = True
        sub, self._hb_sub = self._hb_sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass
        self._beats.clear()

    async def _on_heartbeat(self, msg) -> None:
        try:
            hb = decode(msg.data, Heartbeat)
        except _BAD_REPLY:
            return
        if hb.kind != "cachestore" or not hb.instance_id:
            return
        self._beats[hb.instance_id] = (asyncio.get_running_loop().time(), max(hb.interval, 0.01))
        self._pool_changed.set()

    def live(self) -> list[str]:
        """The cachestore instances heard from within their last ``MISSED_BEATS`` intervals."""
        now = asyncio.get_running_loop().time()
        return sorted(iid for iid, (seen, interval) in self._beats.items() if now - seen <= MISSED_BEATS * interval)

    def _heard_from(self, instance_id: str) -> None:
        """A reply is as good as a heartbeat (which may queue behind bulk data on a busy client)."""
        beat = self._beats.get(instance_id)
        if beat is not None:
            self._beats[instance_id] = (asyncio.get_running_loop().time(), beat[1])

    def _gone(self, instance_id: str) -> None:
        """Nothing listens on the instance's subjects: forget it until its next heartbeat."""
        if self._beats.pop(instance_id, None) is not None:
            log.info("cache_instance_gone", instance=instance_id)

    async def wait_for_pool(self, timeout: float) -> bool:
        """Wait until at least one live instance is known; False on timeout."""
        await self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.live():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._pool_changed.clear()
            try:
                await asyncio.wait_for(self._pool_changed.wait(), remaining)
            except asyncio.TimeoutError:
                return bool(self.live())
        return True

    async def _pool(self, deadline: float) -> list[str]:
        """The live instances; starts a client that was not started, waiting briefly for the pool."""
        if self._closed:
            return []
        if self._hb_sub is None:
            if self._starting is None:
                self._starting = asyncio.ensure_future(self._auto_start())
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(asyncio.shield(self._starting), max(0.0, remaining))
            except (asyncio.TimeoutError, *_NATS_ERRORS):
                pass
        return self.live()

    async def _auto_start(self) -> None:
        try:
            await self.start()
            await self.wait_for_pool(DISCOVERY_WAIT)
        except _NATS_ERRORS as e:
            log.warning("cache_client_start_failed", error=f"{type(e).__name__}: {e}")
            self._starting = None  # try again on the next call

    def _deadline(self, timeout: float | None) -> float:
        return asyncio.get_running_loop().time() + (timeout or self.timeout)

    def _left(self, deadline: float) -> float:
        return max(0.0, deadline - asyncio.get_running_loop().time())

    async def _rounds(self, keys: list[bytes], live: list[str], deadline: float, ask, merge) -> None:
        """Ask each key's owners, in rank order, until it is found: round ``r`` sends every key still
        missing to its ``r``-th owner, one request per instance, all instances in parallel.

        ``ask(instance, keys, budget)`` returns a reply or None (unreachable); ``merge(indices, reply)``
        records it and returns the indices still missing.
        """
        ranks = [owners(k, live, self.replicas) for k in keys]
        pending = list(range(len(keys)))
        for r in range(self.replicas):
            groups: dict[str, list[int]] = {}
            for i in pending:
                if len(ranks[i]) > r:
                    groups.setdefault(ranks[i][r], []).append(i)
            if not groups or self._left(deadline) <= 0:
                return
            budget = self._left(deadline) / (self.replicas - r)  # leave time for the later rounds
            replies = await asyncio.gather(
                *(ask(iid, [keys[i] for i in idxs], budget) for iid, idxs in groups.items())
            )
            pending = []
            for idxs, reply in zip(groups.values(), replies):
                pending += idxs if reply is None else merge(idxs, reply)
            pending.sort()
            if not pending:
                return

    # ---- operations
    async def put_block(self, key: bytes, tensor: torch.Tensor, *, timeout: float | None = None) -> None:
        """Store a block on its ``replicas`` owners; raises ``CacheError`` unless at least one took it."""
        await self.put_blocks([(key, tensor)], timeout=timeout)

    async def put_blocks(self, blocks: Sequence[tuple[bytes, torch.Tensor]], *, timeout: float | None = None) -> None:
        """Store blocks on their ``replicas`` owners: each owner gets its blocks as a few blobs of
        many blocks (``PUT_BLOB_MAX_BYTES``), stored by one LMDB transaction each, all owners in
        parallel. Raises ``CacheError`` unless every block was taken by at least one owner (the
        ones that were are kept either way)."""
        blocks = list(dict(blocks).items())
        if not blocks:
            return
        deadline = self._deadline(timeout)
        live = await self._pool(deadline)
        if not live:
            raise CacheError(f"cache put of {len(blocks)} blocks failed: no live cachestore instance")
        by_owner: dict[str, list[int]] = {}
        for i, (key, _) in enumerate(blocks):
            for iid in owners(key, live, self.replicas):
                by_owner.setdefault(iid, []).append(i)
        results = await asyncio.gather(*(
            self._put_to(iid, [blocks[i] for i in idxs], deadline) for iid, idxs in by_owner.items()
        ))
        stored: set[bytes] = set()
        errors = []
        for taken, error in results:
            stored |= taken
            if error:
                errors.append(error)
        lost = [k for k, _ in blocks if k not in stored]
        if lost:
            raise CacheError(f"cache put of {len(lost)} of {len(blocks)} blocks failed: {'; '.join(errors)}")
        if errors:
            log.warning("cache_put_partial", blocks=len(blocks), errors=errors)

    async def _put_to(self, iid: str, blocks: list[tuple[bytes, torch.Tensor]], deadline: float
                      ) -> tuple[set[bytes], str]:
        """Send one owner its blocks, blob after blob (each encoded only when its turn comes);
        returns the keys it took and the error that stopped it, if any."""
        taken: set[bytes] = set()
        for start, end in blob_groups([t.nbytes for _, t in blocks], PUT_BLOB_MAX_BLOCKS, PUT_BLOB_MAX_BYTES):
            blob, sizes = encode_blocks(blocks[start:end])
            meta = CachePutMeta(keys=[k for k, _ in blocks[start:end]], sizes=sizes)
            tid = f"{meta.keys[0].hex()}.{uuid.uuid4().hex[:8]}"
            remaining = self._left(deadline)
            try:
                await asyncio.wait_for(
                    # the store checks each block's own checksum (and key) before it keeps it
                    send_blob(self.nc, Subjects.cache(iid, "put"), tid, blob, meta=encode(meta),
                              window=PUT_WINDOW_CHUNKS, timeout=max(0.01, remaining), checksum=False),
                    remaining,
                )
            except (*_NATS_ERRORS, *_BAD_REPLY) as e:
                if _no_responders(e):
                    self._gone(iid)
                return taken, f"{iid}: {type(e).__name__}: {e}"
            self._heard_from(iid)
            taken.update(meta.keys)
        return taken, ""

    async def get_blocks(self, keys: Sequence[bytes], *, timeout: float | None = None) -> dict[bytes, torch.Tensor]:
        """The blocks of ``keys`` that the pool has; anything missing, late or corrupt is absent.

        Every block is checked (checksum, key) on arrival. Large blocks are not copied out of the
        receive buffer: each tensor owns its own buffer, a few header bytes larger than the tensor.
        """
        keys = list(dict.fromkeys(keys))
        if not keys:
            return {}
        deadline = self._deadline(timeout)
        live = await self._pool(deadline)
        got: dict[bytes, torch.Tensor] = {}
        if not live:
            return got

        async def ask(iid, ks, budget):
            return await self._get_one(iid, ks, budget, deadline)

        def merge(idxs, reply):
            got.update(reply)
            return [i for i in idxs if keys[i] not in reply]

        await self._rounds(keys, live, deadline, ask, merge)
        return {k: got[k] for k in keys if k in got}

    async def _get_one(self, iid: str, keys: list[bytes], budget: float, deadline: float):
        """Blocks of ``keys`` held by ``iid`` (a dict), or None when it does not answer.

        The instance answers which keys it found, then streams them as a few large chunked blobs
        (``CacheGetMeta``) to a private inbox; ``budget`` bounds the answer, ``deadline`` the stream.
        """
        loop = asyncio.get_running_loop()
        wanted = set(keys)
        arrived: set[bytes] = set()
        got: dict[bytes, torch.Tensor] = {}
        changed = asyncio.Event()

        def on_blob(transfer_id: str, meta: bytes, data: BlobData) -> str | None:
            try:
                pieces = decode(meta, CacheGetMeta).pieces(data)
            except _BAD_REPLY as e:
                return f"bad get meta: {e}"
            except ValueError as e:
                return str(e)
            # A blob holding one block (the usual case for real models' blocks) is the tensor's
            # memory: no copy. Small blocks packed together are copied, so that keeping one of
            # them does not keep the whole blob alive.
            share = len(pieces) == 1
            for k, piece in pieces:
                if k not in wanted:
                    continue
                arrived.add(k)
                try:
                    got[k] = decode_block(piece, expected_key=k, copy=not share)[1]
                except BlockCorrupt as e:
                    log.warning("cache_block_corrupt", key=k.hex(), instance=iid, error=str(e))
            changed.set()
            self._heard_from(iid)
            return None

        sub = None
        try:
            inbox = self.nc.new_inbox()
            sub = await self.nc.subscribe(
                inbox, cb=BlobAssembler(self.nc, on_blob).handle, pending_bytes_limit=BULK_PENDING_BYTES
            )
            req = CacheGetRequest(keys=keys, reply_subject=inbox)
            resp = await self.nc.request(Subjects.cache(iid, "get"), encode(req), timeout=max(0.01, budget))
            found = [k for k in decode(resp.data, CacheGetReply).found if k in wanted]
            self._heard_from(iid)
            while not arrived.issuperset(found):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    log.warning("cache_get_incomplete", instance=iid, announced=len(found), received=len(arrived))
                    break
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
        except (*_NATS_ERRORS, *_BAD_REPLY) as e:
            if _no_responders(e):
                self._gone(iid)
            log.warning("cache_get_failed", instance=iid, error=f"{type(e).__name__}: {e}", keys=len(keys))
            if not got:
                return None
        finally:
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except nats.errors.Error:
                    pass
        return got

    async def load_layers(self, keys: Sequence[bytes], dest, start: int, *, timeout: float | None = None,
                          peer: str = "") -> int:
        """Stream the blocks of ``keys`` (a prefix chain, in order) from the pool into ``dest``
        layer by layer, so that the prompt's layer ``i`` can run as soon as its past is in.

        ``dest`` is a ``libs.model.PrefillKV``: block ``j`` goes to positions
        ``start + j * block_size`` of ``dest.kv``; ``dest.layer_ready(n)`` is called as layers
        complete; the last layer is released only once every block's checksum has matched. Returns the
        number of leading blocks that arrived whole and verified; when that is fewer than
        ``len(keys)`` (a block missing, corrupt or late, an instance gone), ``dest.fail`` was called
        and the caller recomputes past that point. Each key is asked of its first owner only.

        With ``peer`` (a prefill instance's id) every key is asked of that instance instead, which
        holds them in its own DRAM cache (``Subjects.prefill_blocks``), not of the pool.
        """
        keys = list(keys)
        if not keys:
            return 0
        deadline = self._deadline(timeout)
        load = _LayeredLoad(keys, dest, start)
        groups: dict[str, list[int]] = {}
        if peer:
            groups[peer] = list(range(len(keys)))
        else:
            live = await self._pool(deadline)
            if not live:
                dest.fail("no cache pool instance is live")
                return 0
            for i, k in enumerate(keys):
                groups.setdefault(owners(k, live, 1)[0], []).append(i)
        subs = []
        try:
            asks = []
            for iid, idxs in groups.items():
                inbox = self.nc.new_inbox()
                subs.append(await self.nc.subscribe(inbox, cb=partial(load.on_piece, self.nc),
                                                    pending_bytes_limit=BULK_PENDING_BYTES))
                subject = Subjects.prefill_blocks(iid) if peer else Subjects.cache(iid, "get")
                asks.append(self._ask_layers(iid, subject, [keys[i] for i in idxs], idxs, inbox, load, deadline))
            await asyncio.gather(*asks)
            load.announced()
            try:
                await asyncio.wait_for(load.done.wait(), self._left(deadline))
            except asyncio.TimeoutError:
                load.give_up("the pool's layers did not all arrive in time")
        finally:
            for sub in subs:
                try:
                    await sub.unsubscribe()
                except nats.errors.Error:
                    pass
        return load.finish()

    async def _ask(self, iid: str, op: str, msg, reply_type, budget: float, what: str, *, subject: str = "",
                   **log_fields):
        """One request to an instance (``msg`` None: an empty body; ``subject``: other than its
        cachestore subject for ``op``): its decoded reply, or None (logged, with ``log_fields``)
        when it does not answer."""
        try:
            body = b"" if msg is None else encode(msg)
            resp = await self.nc.request(subject or Subjects.cache(iid, op), body, timeout=max(0.01, budget))
            reply = decode(resp.data, reply_type)
        except (*_NATS_ERRORS, *_BAD_REPLY) as e:
            if _no_responders(e):
                self._gone(iid)
            log.warning(f"cache_{what}_failed", instance=iid, error=f"{type(e).__name__}: {e}", **log_fields)
            return None
        self._heard_from(iid)
        return reply

    async def _ask_layers(self, iid: str, subject: str, keys: list[bytes], idxs: list[int], inbox: str,
                          load: "_LayeredLoad", deadline: float) -> None:
        req = CacheGetRequest(keys=keys, reply_subject=inbox, by_layer=True)
        reply = await self._ask(iid, "get", req, CacheGetReply, self._left(deadline), "layered_get", subject=subject,
                                keys=len(keys))
        if reply is None:
            load.missing(idxs)
        else:
            load.expect(reply, keys, idxs)

    async def where(self, keys: Sequence[bytes], *, timeout: float | None = None) -> list[str]:
        """Tier of each key: "dram", "disk", or "" when absent (or when no owner answers)."""
        keys = list(keys)
        result = [""] * len(keys)
        if not keys:
            return result
        deadline = self._deadline(timeout)
        live = await self._pool(deadline)
        if not live:
            return result

        def merge(idxs, tiers):
            for i, t in zip(idxs, tiers):
                result[i] = t
            return [i for i in idxs if not result[i]]

        await self._rounds(keys, live, deadline, self._exists_one, merge)
        return result

    async def _exists_one(self, iid: str, keys: list[bytes], budget: float) -> list[str] | None:
        reply = await self._ask(iid, "exists", CacheExistsRequest(keys=keys), CacheExistsReply, budget, "exists",
                                keys=len(keys))
        if reply is None or len(reply.present) != len(keys):
            return None
        tiers = reply.tier if len(reply.tier) == len(keys) else ["?"] * len(keys)
        return [(t or "?") if p else "" for p, t in zip(reply.present, tiers)]

    async def exists(self, keys: Sequence[bytes], *, timeout: float | None = None) -> list[bool]:
        return [bool(t) for t in await self.where(keys, timeout=timeout)]

    async def lookup(self, keys: Sequence[bytes], *, timeout: float | None = None) -> int:
        """How many leading ``keys`` (a hash chain) the pool holds."""
        n = 0
        for tier in await self.where(keys, timeout=timeout):
            if not tier:
                break
            n += 1
        return n

    async def stats(self, *, timeout: float | None = None) -> list[CacheStats]:
        """The stats of every live instance that answers, by instance id."""
        deadline = self._deadline(timeout)
        live = await self._pool(deadline)

        asks = (self._ask(iid, "stats", None, CacheStats, self._left(deadline), "stats") for iid in live)
        return [st for st in await asyncio.gather(*asks) if st is not None]
