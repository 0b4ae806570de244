"""The cachestore client: puts, gets, layer-wise loads and lookups against the pool over NATS."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Mapping, Sequence
from functools import partial

import msgspec
import nats
import torch

from libs.bus import BULK_PENDING_BYTES, BlobAssembler, BlobData, TransferError, send_blob
from libs.kv.blobs import PUT_BLOB_MAX_BLOCKS, PUT_BLOB_MAX_BYTES, blob_groups
from libs.kv.codec import BlockCorrupt, decode_block, encode_blocks
from libs.kv.layers import LayeredLoad
from libs.kv.sharding import owners, rank
from libs.log import get_logger
from libs.protocol import (
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
)

log = get_logger("blocks")


class CacheError(RuntimeError):
    """A cache operation that must not be silently skipped (a put) failed."""


# Chunks of a put blob sent ahead of the store's ack. Many prefills put to one instance at once:
# what they have in flight together must stay well under the NATS server's per-client pending
# limit (64 MiB), or the server cuts the cachestore off as a slow consumer.
PUT_WINDOW_CHUNKS = 2
MISSED_BEATS = 3  # an instance is gone after missing this many heartbeats
DISCOVERY_WAIT = 2.0  # a client used without start() waits this long (at most) for the first heartbeat
# A primary's word that a block has extra copies holds this long; then the next read asks the primary again.
HOT_ADVICE_SECONDS = 5.0
HOT_ADVICE_MAX_KEYS = 65536

_NATS_ERRORS = (nats.errors.Error, asyncio.TimeoutError, TransferError)
_BAD_REPLY = (msgspec.DecodeError, msgspec.ValidationError)


def _no_responders(e: BaseException) -> bool:
    return isinstance(e, nats.errors.NoRespondersError) or isinstance(e.__cause__, nats.errors.NoRespondersError)


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
        self._hot: dict[bytes, tuple[int, float]] = {}  # key -> (extra copies, advice good until)

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

    # ---- hot blocks: reads spread over the copies a block's primary advertises
    def _learn(self, iid: str, keys: Sequence[bytes], replicas: Sequence[int], live: list[str]) -> None:
        """Take a reply's ``replicas`` advice for the keys ``iid`` is the primary of."""
        if len(replicas) != len(keys) or not live:
            return
        until = asyncio.get_running_loop().time() + HOT_ADVICE_SECONDS
        for k, n in zip(keys, replicas):
            if (n > 0 or k in self._hot) and owners(k, live, 1)[0] == iid:
                if n > 0:
                    self._hot[k] = (n, until)
                else:
                    del self._hot[k]
        if len(self._hot) > HOT_ADVICE_MAX_KEYS:
            now = asyncio.get_running_loop().time()
            self._hot = {k: v for k, v in self._hot.items() if v[1] > now}

    def _read_order(self, key: bytes, live: list[str], n: int) -> list[str]:
        """Whom to ask for ``key``, in order: its ``n`` owners, after one of its advertised copies
        (or the primary) drawn at random when the block is hot."""
        ranking = rank(key, live)
        hot = self._hot.get(key)
        if hot is None or hot[1] <= asyncio.get_running_loop().time() or len(ranking) < 2:
            return ranking[:n]
        first = ranking[random.randint(0, min(hot[0], len(ranking) - 1))]
        return [first] + [iid for iid in ranking[:n] if iid != first]

    async def _rounds(self, keys: list[bytes], live: list[str], deadline: float, ask, merge) -> None:
        """Ask each key's owners, in rank order, until it is found: round ``r`` sends every key still
        missing to its ``r``-th owner, one request per instance, all instances in parallel.

        ``ask(instance, keys, budget)`` returns a reply or None (unreachable); ``merge(indices, reply)``
        records it and returns the indices still missing.
        """
        ranks = [self._read_order(k, live, self.replicas) for k in keys]
        pending = list(range(len(keys)))
        for r in range(max(map(len, ranks), default=0)):
            groups: dict[str, list[int]] = {}
            for i in pending:
                if len(ranks[i]) > r:
                    groups.setdefault(ranks[i][r], []).append(i)
            if not groups or self._left(deadline) <= 0:
                return
            budget = self._left(deadline) / max(1, self.replicas - r)  # leave time for the later rounds
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

    async def put_blocks(self, blocks: Sequence[tuple[bytes, torch.Tensor]], *,
                         parents: Mapping[bytes, bytes] | None = None, timeout: float | None = None) -> None:
        """Store blocks on their ``replicas`` owners: each owner gets its blocks as a few blobs of
        many blocks (``PUT_BLOB_MAX_BYTES``), stored by one LMDB transaction each, all owners in
        parallel. Raises ``CacheError`` unless every block was taken by at least one owner (the
        ones that were are kept either way).

        ``parents``: key -> the key of the block before it in its prompt (a prompt's first block
        has none), sent with each block for the stores' eviction (``CachePutMeta.parents``)."""
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
            self._put_to(iid, [blocks[i] for i in idxs], deadline, parents) for iid, idxs in by_owner.items()
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

    async def copy_to(self, iid: str, blocks: Sequence[tuple[bytes, bytes]], *, timeout: float | None = None
                      ) -> set[bytes]:
        """Store blocks already encoded (as a store holds them) on the instance ``iid``, whoever
        owns them: a hot block's extra copies. Returns the keys it took."""
        taken, error = await self._put_to(iid, list(blocks), self._deadline(timeout))
        if error:
            log.warning("cache_copy_failed", instance=iid, blocks=len(blocks), taken=len(taken), error=error)
        return taken

    async def _put_to(self, iid: str, blocks: list[tuple[bytes, "torch.Tensor | bytes"]], deadline: float,
                      parents: Mapping[bytes, bytes] | None = None) -> tuple[set[bytes], str]:
        """Send one owner its blocks (tensors, or blocks already encoded), blob after blob (each
        encoded only when its turn comes); returns the keys it took and the error that stopped it, if any."""
        taken: set[bytes] = set()
        nbytes = [len(t) if isinstance(t, (bytes, bytearray, memoryview)) else t.nbytes for _, t in blocks]
        for start, end in blob_groups(nbytes, PUT_BLOB_MAX_BLOCKS, PUT_BLOB_MAX_BYTES):
            group = blocks[start:end]
            if isinstance(group[0][1], torch.Tensor):
                blob, sizes = encode_blocks(group)
            else:
                blob, sizes = b"".join(v for _, v in group), [len(v) for _, v in group]
            keys = [k for k, _ in blocks[start:end]]
            meta = CachePutMeta(keys=keys, sizes=sizes, parents=[parents.get(k, b"") for k in keys] if parents else [])
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
            return await self._get_one(iid, ks, budget, deadline, live)

        def merge(idxs, reply):
            got.update(reply)
            return [i for i in idxs if keys[i] not in reply]

        await self._rounds(keys, live, deadline, ask, merge)
        return {k: got[k] for k in keys if k in got}

    async def _get_one(self, iid: str, keys: list[bytes], budget: float, deadline: float, live: list[str]):
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
            reply = decode(resp.data, CacheGetReply)
            found = [k for k in reply.found if k in wanted]
            self._heard_from(iid)
            self._learn(iid, reply.found, reply.replicas, live)
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

        ``dest`` is a ``libs.engine.prefill_kv.PrefillKV``: block ``j`` goes to positions
        ``start + j * block_size`` of ``dest.kv``; ``dest.layer_ready(n)`` is called as layers
        complete; the last layer is released only once every block's checksum has matched. Returns the
        number of leading blocks that arrived whole and verified; when that is fewer than
        ``len(keys)`` (a block missing, corrupt or late, an instance gone), ``dest.fail`` was called
        and the caller recomputes past that point. Each key is asked of its first owner only, or,
        when the block is hot, of one of its advertised copies (then of the first owner if that
        copy no longer has it).

        With ``peer`` (a prefill instance's id) every key is asked of that instance instead, which
        holds them in its own DRAM cache (``Subjects.prefill_blocks``), not of the pool.
        """
        keys = list(keys)
        if not keys:
            return 0
        deadline = self._deadline(timeout)
        load = LayeredLoad(keys, dest, start)
        groups: dict[str, list[int]] = {}
        live: list[str] = []
        primary: dict[int, str] = {}  # a key asked of a copy -> its first owner
        if peer:
            groups[peer] = list(range(len(keys)))
        else:
            live = await self._pool(deadline)
            if not live:
                dest.fail("no cache pool instance is live")
                return 0
            for i, k in enumerate(keys):
                order = self._read_order(k, live, 1)
                groups.setdefault(order[0], []).append(i)
                if len(order) > 1:
                    primary[i] = order[1]
        subs = []
        try:
            await asyncio.gather(*(
                self._ask_layers(iid, Subjects.prefill_blocks(iid) if peer else Subjects.cache(iid, "get"), keys,
                                 idxs, load, deadline, subs, live, primary)
                for iid, idxs in groups.items()))
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

    async def load_live(self, keys: Sequence[bytes], dest, start: int, *, peer: str, attempt: str,
                        timeout: float, on_reply=None) -> tuple[int, int]:
        """Stream the blocks of ``keys`` from the pipeline stage computing them (task ``attempt`` on
        the prefill instance ``peer``) into ``dest`` layer by layer, each layer as that stage
        computes it (``serve_live_layers``); the stage may not have started yet, so ``timeout``
        covers its wait in its own queue and its compute. Returns the leading blocks that arrived
        whole and checked, and how many of the positions sent that stage reused from a cache rather
        than computed. Fewer blocks than asked: ``dest.fail`` was called and the caller computes past
        the good ones. ``on_reply(reused)``, when the stage has answered (before its layers come):
        how many of the positions it will send came from a cache (0 when it holds none of them)."""
        keys = list(keys)
        if not keys:
            return 0, 0
        deadline = self._deadline(timeout)
        load = LayeredLoad(keys, dest, start)
        sub = await self.nc.subscribe(self.nc.new_inbox(), cb=partial(load.on_piece, self.nc),
                                      pending_bytes_limit=BULK_PENDING_BYTES)
        try:
            req = CacheGetRequest(keys=keys, reply_subject=sub.subject, by_layer=True, live=attempt)
            reply = await self._ask(peer, "get", req, CacheGetReply, self._left(deadline), "live_get",
                                    subject=Subjects.prefill_blocks(peer), keys=len(keys))
            if reply is not None and reply.live:
                load.expect(reply, keys, list(range(len(keys))))
            else:
                load.missing([i for i in range(len(keys)) if reply is None or keys[i] not in reply.found])
            load.announced()
            if on_reply is not None:
                on_reply(load.reused_tokens if not load.failed else 0)
            try:
                await asyncio.wait_for(load.done.wait(), self._left(deadline))
            except asyncio.TimeoutError:
                load.give_up("the stage's layers did not all arrive in time")
        finally:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass
        return load.finish(), load.reused_tokens

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

    async def _ask_layers(self, iid: str, subject: str, all_keys: list[bytes], idxs: list[int], load: "LayeredLoad",
                          deadline: float, subs: list, live: list[str], primary: Mapping[int, str]) -> None:
        """Ask ``iid`` for the blocks ``idxs`` of ``all_keys``, streamed into ``load``; those it does
        not have that were asked of a copy are asked of their ``primary`` next."""
        keys = [all_keys[i] for i in idxs]
        inbox = self.nc.new_inbox()
        subs.append(await self.nc.subscribe(inbox, cb=partial(load.on_piece, self.nc),
                                            pending_bytes_limit=BULK_PENDING_BYTES))
        req = CacheGetRequest(keys=keys, reply_subject=inbox, by_layer=True)
        reply = await self._ask(iid, "get", req, CacheGetReply, self._left(deadline), "layered_get", subject=subject,
                                keys=len(keys))
        found = set() if reply is None else set(reply.found)
        retry: dict[str, list[int]] = {}
        for k, i in zip(keys, idxs):
            if k not in found and primary.get(i, iid) != iid:
                retry.setdefault(primary[i], []).append(i)
        if reply is not None:
            self._learn(iid, reply.found, reply.replicas, live)
            load.expect(reply, [k for k in keys if k in found], [i for k, i in zip(keys, idxs) if k in found])
        again = {i for group in retry.values() for i in group}
        load.missing([i for k, i in zip(keys, idxs) if k not in found and i not in again])
        await asyncio.gather(*(self._ask_layers(p, Subjects.cache(p, "get"), all_keys, group, load, deadline, subs,
                                                live, {}) for p, group in retry.items()))

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
