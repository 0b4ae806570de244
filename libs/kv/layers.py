"""Layer-wise loads: blocks stream into a prompt's KV buffer layer by layer while the model runs.

``serve_layers`` is the sending end (a cachestore, or a prefill instance serving its own DRAM
cache to a peer); ``LayeredLoad`` the receiving end that ``CacheClient.load_layers`` drives.
``serve_live_layers`` sends the blocks of a prompt still being computed (a pipeline stage's), each
layer once the model has computed it; each of its pieces carries its own checksum, and the reader
checks every piece as it lands instead of each block once its last layer is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence

import msgspec
import numpy as np
import torch

from libs import checksum as sums
from libs.bus import TransferError, send_windowed
from libs.kv.codec import KV_DTYPES, KVBlock, KVBlockView
from libs.log import get_logger
from libs.protocol import CHUNK_DATA_BYTES, BlockHeader, CacheGetReply, ChunkAck, LayerPiece, decode, encode, encode_with_data

log = get_logger("blocks")

_NUMPY_DTYPES = (torch.float32, torch.float16, torch.float64)


# A layered get sends pieces of at most one chunk, and waits for the reader's ack every
# LAYER_PIECES_IN_FLIGHT of them.
LAYER_PIECE_TARGET_BYTES = CHUNK_DATA_BYTES
LAYER_PIECES_IN_FLIGHT = 16


async def serve_layers(msg, nc, subject: str, found: Sequence[tuple[bytes, "KVBlock | KVBlockView"]],
                       replicas: "Mapping[bytes, int] | None" = None) -> list[bytes]:
    """The sending end of a layered get (``CacheClient.load_layers``), for whoever holds the blocks:
    answer ``msg`` with the blocks' headers, then send layer 0 of every block, layer 1 of every
    block, ... to ``subject`` as ``LayerPiece`` messages of at most one chunk, acked in windows.
    Only blocks shaped like the first one are sent (one namespace, one shape); returns their keys.
    ``replicas``: key -> the extra copies readers may use (``CacheGetReply.replicas``).
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
        headers=[BlockHeader(shape=list(v.shape), dtype=v.dtype, checksum=v.checksum) for v in views],
        replicas=[replicas.get(k, 0) for k in keys] if replicas else [])))
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


async def serve_live_layers(msg, nc, subject: str, keys: Sequence[bytes], buf, start: int, block_size: int,
                            dtype: str, reused_tokens: int, timeout: float = 60.0) -> None:
    """The sending end of a live get: answer ``msg``, then send layer ``i`` of the blocks of
    ``keys`` (positions ``start ..`` of ``buf``, a ``PrefillKV`` being computed) as soon as the
    model has computed layer ``i``. Raises TransferError when the buffer fails, a layer is not
    computed within ``timeout`` or the reader stops acking."""
    layers, _, heads, _, dim = buf.kv.shape
    n = len(keys)
    tid = uuid.uuid4().hex[:12]
    shape = [layers, 2, heads, block_size, dim]
    await msg.respond(encode(CacheGetReply(
        found=list(keys), transfer_id=tid, headers=[BlockHeader(shape=shape, dtype=dtype, checksum=0)] * n,
        live=True, reused_tokens=reused_tokens)))
    if not n:
        return
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def wake() -> None:  # on the model thread, or the loop's own
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(changed.set)

    buf.watch(wake)
    per = 2 * heads * block_size * dim * buf.kv.element_size()
    run = max(1, LAYER_PIECE_TARGET_BYTES // per)

    def layer_bytes(layer: int) -> memoryview:
        """The layer's slices of the blocks, block after block (each ``[2, H, bs, D]``): one copy."""
        x = buf.kv[layer, :, :, start : start + n * block_size]
        flat = x.reshape(2, heads, n, block_size, dim).permute(2, 0, 1, 3, 4).contiguous().view(-1)
        return memoryview(flat.view(torch.uint8).numpy())

    async def send_layer(layer: int) -> None:
        deadline = loop.time() + timeout
        while buf.computed_layers() <= layer:
            if buf.failed is not None:
                raise TransferError(f"the stage's KV was not computed: {buf.failed}")
            changed.clear()
            if buf.computed_layers() > layer:
                break
            try:
                await asyncio.wait_for(changed.wait(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError as e:
                raise TransferError(f"layer {layer} of the stage was not computed within {timeout}s") from e
        data = await asyncio.to_thread(layer_bytes, layer)  # the copy off the loop (MBs for a long prompt)
        pieces = []
        for first in range(0, n, run):
            part = data[first * per : min(n, first + run) * per]
            pieces.append(encode_with_data(LayerPiece(transfer_id=tid, layer=layer, first=first,
                                                      count=min(run, n - first), checksum=sums.checksum(part),
                                                      data=b""), [part]))
        await send_windowed(nc, subject, tid, pieces, window=LAYER_PIECES_IN_FLIGHT)

    try:
        for layer in range(layers):
            await send_layer(layer)
    except BaseException:
        # the reader stops waiting now (and computes what did not come) rather than at its deadline
        with contextlib.suppress(Exception):
            await nc.publish(subject, encode_with_data(LayerPiece(transfer_id=tid, layer=0, first=0, count=0,
                                                                  data=b""), []))
        raise


class LayeredLoad:
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
        self.live = False  # a live get: every piece carries its checksum, checked as it lands
        self.reused_tokens = 0  # a live get: positions its sender reused rather than computed

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
        if got and reply.live:
            self.live = True
            self.reused_tokens = reply.reused_tokens
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
        if len(h.shape) != 5 or KV_DTYPES.get(h.dtype) != self.kv.dtype or h.shape[3] <= 0:
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
        if p.count == 0:  # the sender's abort: what it still owed will not come
            log.warning("cache_layer_transfer_aborted", transfer=p.transfer_id)
            self._abandon(p.transfer_id)
            return
        idxs = self.senders[p.transfer_id]
        if not 0 <= p.layer < self.layers or p.first < 0 or p.first + p.count > len(idxs):
            raise ValueError(f"unexpected piece {p.transfer_id} layer {p.layer} blocks {p.first}+{p.count}")
        bs = self.block_size
        per = 2 * self.heads * bs * self.dim * self.kv.element_size()
        if len(p.data) != p.count * per:
            raise ValueError(f"piece of {len(p.data)} bytes for {p.count} block slices of {per}")
        if self.live and (p.checksum is None or sums.checksum(p.data) != p.checksum):
            raise ValueError(f"layer {p.layer} piece of blocks {p.first}+{p.count} does not match its checksum")
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
        """Of ``blocks`` (all their layers in), those whose data does not match their stored checksum
        (none in a live get: its pieces were checked as they landed)."""
        if self.live:
            return []
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
