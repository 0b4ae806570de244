"""The cachestore service: a ``TieredStore`` (DRAM + LMDB) behind per-instance ``yb.cache.<id>.*`` subjects.

Several instances form the pool; clients shard keys over the live ones by rendezvous hashing
(``libs.kv.client.CacheClient``), so each instance only serves its own subjects:

- ``put``: a chunked blob of one or more blocks (``CachePutMeta``), stored in one LMDB transaction
  and acked, or refused naming the blocks that failed their check;
- ``get``: ``CacheGetRequest`` -> ``CacheGetReply`` (the keys found, in order), then the found
  blocks streamed to the request's reply subject as chunked blobs (``CacheGetMeta``: the keys and
  sizes of the encoded blocks concatenated in the blob). Blocks are packed into blobs of at most
  one chunk and several blobs are in flight at once, so a batched get does not wait for one round
  trip per block. (One single blob for the whole get was measured slower: joining, and reassembling
  into, buffers of tens of MiB costs more than the acks it saves.)
  With ``by_layer`` the reply also carries each block's header and the data goes layer by layer
  instead (``LayerPiece``: one layer's slices of consecutive blocks), so a prefill can compute
  layer ``i`` while later layers are still arriving (``CacheClient.load_layers``).
- ``exists``: ``CacheExistsRequest`` -> ``CacheExistsReply`` (presence and tier per key);
- ``stats``: -> ``CacheStats``;
- ``pin``: ``CachePinRequest`` -> ``CachePinReply``: keep the keys (an operator's pinned prefix)
  until a time to live runs out, or end their pins; pins are bounded (``pool_max_pinned_blocks``)
  and live in memory (a restarted instance has none). A load leases the blocks it reads from disk.

Hot blocks: for the keys it is the primary of (the first of their rendezvous ranking), an instance
counts reads (``HotBlocks``); a block read often gets extra copies on the next instances of its
ranking (``CacheClient.copy_to``, after the get was served), and the get's reply tells readers how
many (``CacheGetReply.replicas``), so they spread their reads over them (``CacheClient``).

Blocks leave the instance by the disk tier's eviction policy (``pool_eviction``), which a put
feeds with each block's parent (``CachePutMeta.parents``); once the disk holds more than
``pool_evict_high`` of ``disk_bytes``, a maintenance step after the put (``_maintain``, in a worker
thread, after the put's ack) evicts down to ``pool_evict_low`` of it.

Every key that enters or leaves the instance is published as a KV event (``KVEventPublisher``,
source "cachestore"); the publisher also answers dump requests from the store's held-key set.
Wiring only; the storage logic is in ``store.py`` and the block codec in ``libs/kv/codec.py``.
Store calls run in worker threads (``asyncio.to_thread``) because LMDB reads and writes block.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from libs.kv.blobs import blob_groups, GET_BLOB_MAX_BLOCKS
from libs.kv.client import CacheClient
from libs.kv.sharding import rank
from libs.kv.codec import block_header, BlockCorrupt
from libs.kv.layers import serve_layers
from libs.bus import BULK_PENDING_BYTES, BlobAssembler, BlobData, TransferError, send_blob
from libs.kvevents import KVEventPublisher
from libs.engine.arena import KVArena
from libs.protocol import (
    CacheExistsReply,
    CacheExistsRequest,
    CacheGetMeta,
    CacheGetReply,
    CacheGetRequest,
    CachePinReply,
    CachePinRequest,
    CachePutMeta,
    CHUNK_DATA_BYTES,
    CacheStats,
    PoolEvents,
    Subjects,
    TierUsage,
    decode,
    encode,
)
from libs.service import Service

from services.cachestore.holds import PinLimit
from services.cachestore.hot import HotBlocks
from services.cachestore.store import EVICTION_REASONS, StoreStats, TieredStore

_BAD_MESSAGE = (msgspec.DecodeError, msgspec.ValidationError)
# A get streams whole blocks packed into blobs of at most one chunk (a larger block travels alone,
# over several chunks), GET_BLOBS_IN_FLIGHT blobs unacked at a time (see the module docstring).
GET_BLOB_TARGET_BYTES = CHUNK_DATA_BYTES
GET_BLOBS_IN_FLIGHT = 4
# Received put blobs are written into one slab, kept for the life of the process, beyond the DRAM
# tier's budget by this much for blobs still arriving (see ``CacheStoreService.setup``).
PUT_SLAB_HEADROOM = 64 << 20
PUT_SLAB_GRANULE = 256 << 10

# ---- metrics (label ``instance_id``: tests and local runs may host several instances per process)
POOL_BYTES = Gauge("yuebing:cache_pool_bytes", "Bytes of KV blocks held, per tier", ["instance_id", "tier"])
POOL_BLOCKS = Gauge("yuebing:cache_pool_blocks", "KV blocks held, per tier", ["instance_id", "tier"])
POOL_CAPACITY = Gauge("yuebing:cache_pool_capacity_bytes", "Bytes of KV blocks a tier holds at most (dram_bytes, "
                      "disk_bytes)", ["instance_id", "tier"])
EVICTIONS = Counter(
    "yuebing:cache_evictions",
    "Blocks evicted, per tier (dram: demoted to disk; disk: gone from the instance)",
    ["instance_id", "tier"],
)
EVICTION_CAUSES = Counter(
    "yuebing:cache_disk_evictions",
    "Blocks evicted from the disk tier (gone from the instance), per reason: watermark (down to the low "
    "watermark after puts), capacity (on a put's path, to stay within the bound), map_full, too_large",
    ["instance_id", "reason"],
)
GET_HITS = Counter("yuebing:cache_get_hit_blocks", "Blocks asked for by gets and found", ["instance_id"])
TIER_HITS = Counter("yuebing:cache_tier_hit_blocks", "Blocks gets found, per tier they were found in (a disk hit "
                    "is promoted to DRAM)", ["instance_id", "tier"])
PROMOTIONS = Counter("yuebing:cache_promotions", "Blocks read from the disk tier and copied back into DRAM",
                     ["instance_id"])
GET_MISSES = Counter("yuebing:cache_get_miss_blocks", "Blocks asked for by gets and not found", ["instance_id"])
PUTS = Counter("yuebing:cache_puts", "Blocks put (accepted), new or not", ["instance_id"])
PUTS_REFUSED = Counter("yuebing:cache_puts_refused", "Blocks (or malformed put blobs) refused", ["instance_id"])
PINNED = Gauge("yuebing:cache_pinned_blocks", "Blocks pinned by operators, by whether the instance holds them yet",
               ["instance_id", "state"])
HOT_COPIES = Counter("yuebing:cache_hot_copies", "Copies of hot blocks this instance (their primary) put on other "
                     "instances", ["instance_id"])
HOT_BLOCKS = Gauge("yuebing:cache_hot_blocks", "Blocks this instance is the primary of whose extra copies readers "
                   "are told of", ["instance_id"])
PIN_EXPIRY_SECONDS = 1.0  # how often expired pins are ended
HOT_COPY_TIMEOUT = 10.0


class CacheStoreService(Service):
    kind = "cachestore"
    # it serves without waiting for the conductor to create the KV-event stream: an event published
    # before then is a gap, which the conductor repairs with a dump of this store's keys

    def __init__(self, settings):
        super().__init__(settings)
        self.store: TieredStore | None = None
        self.events: KVEventPublisher | None = None
        self._events_live = False
        self._events_lock = asyncio.Lock()
        self._subs = []
        self._totals_seen: dict[tuple, int] = {}  # (counter, labels) -> the store's total counted
        self._last_stats: StoreStats | None = None  # what the heartbeat reports of the pool's events
        self._maintaining = False
        self.hot: HotBlocks | None = None
        self.peers: CacheClient | None = None  # the pool's membership, and copies of hot blocks

    @property
    def data_dir(self):
        return self.settings.resolved_data_dir() / "cachestore" / self.instance_id

    async def setup(self) -> None:
        s = self.settings
        self.store = await asyncio.to_thread(TieredStore, s.dram_bytes, self.data_dir, s.disk_bytes,
                                             eviction=s.pool_eviction, evict_high=s.pool_evict_high,
                                             evict_low=s.pool_evict_low, max_pins=s.pool_max_pinned_blocks)
        st = self.store.stats()
        POOL_CAPACITY.labels(self.instance_id, "dram").set(s.dram_bytes)
        POOL_CAPACITY.labels(self.instance_id, "disk").set(s.disk_bytes)
        self._update_metrics(st, prime=True)
        self.log.info("cachestore_opened", path=str(self.data_dir), disk_blocks=st.disk_blocks, disk_bytes=st.disk_bytes,
                      eviction=s.pool_eviction, evict_high=s.pool_evict_high, evict_low=s.pool_evict_low)
        # The DRAM tier keeps a received block as a view into the blob it came in, and blobs are
        # written into ranges of one slab, free again once none of their blocks is held: a block
        # is copied once on its way in (besides LMDB's own copy), into memory this process keeps
        # rather than pages taken anew from the kernel for every blob. The slab is paged in as
        # it is first used; past it, a blob's buffer is fresh memory.
        arena = KVArena(s.dram_bytes + PUT_SLAB_HEADROOM, granule=PUT_SLAB_GRANULE)
        self.track_arena("cachestore", arena)
        nc = self.nc
        sub = lambda op, **kw: nc.subscribe(Subjects.cache(self.instance_id, op), **kw)  # noqa: E731
        puts = BlobAssembler(nc, self._on_put, alloc=arena.take_bytes, alloc_single=True)
        self._subs = [
            await sub("put", cb=puts.handle, pending_bytes_limit=BULK_PENDING_BYTES),
            await sub("get", cb=self._on_get),
            await sub("exists", cb=self._on_exists),
            await sub("stats", cb=self._on_stats),
            await sub("pin", cb=self._on_pin),
        ]
        store = self.store
        self.events = KVEventPublisher(self.nc, self.js, self.instance_id, "cachestore", store.held_keys)
        await self.events.start()
        self._events_live = True
        await self._publish_changes()  # anything stored while the publisher was starting
        if s.disk_sync_seconds > 0:
            self.spawn(self._sync_loop(s.disk_sync_seconds))
        self.spawn(self._pin_expiry_loop())
        if s.pool_hot_replicas > 0:
            self.hot = HotBlocks(reads_per_replica=s.pool_hot_reads_per_second, max_replicas=s.pool_hot_replicas,
                                 half_life=s.pool_hot_half_life_seconds)
            self.peers = CacheClient(self.nc, timeout=HOT_COPY_TIMEOUT)
            await self.peers.start()

    async def _pin_expiry_loop(self) -> None:
        """End pins whose time to live has run out: their blocks are evictable again."""
        while not self.stopping:
            await asyncio.sleep(PIN_EXPIRY_SECONDS)
            store = self.store
            if store is not None and await asyncio.to_thread(store.expire_pins, time.monotonic()):
                self._update_metrics(store.stats())
                self._maintain_soon()  # a tier kept past its high watermark by pins may evict now

    async def _sync_loop(self, every: float) -> None:
        """Flush the disk tier to the device now and then, so a machine crash loses at most that
        much of the pool (a process crash loses nothing: commits are in the page cache)."""
        store = self.store
        while not self.stopping:
            await asyncio.sleep(every)
            try:
                await asyncio.to_thread(store.sync_disk)
            except Exception as e:  # noqa: BLE001 - the next round tries again
                self.log.warning("disk_sync_failed", error=repr(e))

    async def teardown(self) -> None:
        if self.peers is not None:
            await self.peers.close()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as e:  # noqa: BLE001 - closing anyway
                self.log.warning("unsubscribe_failed", error=str(e))
        self._subs = []
        if self.events is not None:
            await self._publish_changes()
            self._events_live = False
            try:
                await self.events.stop()
            except Exception as e:  # noqa: BLE001 - closing anyway
                self.log.warning("kv_events_stop_failed", error=str(e))
        if self.store is not None:
            # Waits for any store call still running in a thread, then writes DRAM to disk.
            await asyncio.to_thread(self.store.close)
            self.store = None

    def load(self):
        usage = self.store.usage() if self.store is not None else {}
        hot = self.hot.hot_blocks(time.monotonic()) if self.hot is not None else 0
        events = None
        if (st := self._last_stats) is not None:  # as of the last put, get or maintenance: no lock taken
            events = PoolEvents(promoted=st.promotions, demoted=st.evictions_dram, evicted=st.evictions_by_reason,
                                corrupt=st.corrupt, pinned=st.pinned, pinned_held=st.pinned_held)
        return self.heartbeat(tiers={tier: TierUsage(bytes=b, capacity_bytes=cap, blocks=n, hit_blocks=hits)
                                     for tier, (b, cap, n, hits) in usage.items()}, hot_blocks=hot,
                              pool_events=events)

    # ---- KV events and metrics
    async def _publish_changes(self) -> None:
        """Publish what entered and left the store since the last call, as one KV event.

        Draining inside the lock keeps events in the order of the changes; a caller whose changes
        were drained by another call still returns only once they are published.
        """
        if not self._events_live or self.store is None:
            return
        async with self._events_lock:
            changes = self.store.drain_changes()
            if changes:
                await self.events.publish(changes.stored, changes.removed)

    def _update_metrics(self, st: StoreStats, prime: bool = False) -> None:
        """The metrics as of ``st``; the store keeps running totals, which the counters follow
        (``prime``: only note them, as of the store's opening)."""
        self._last_stats = st
        iid = self.instance_id
        totals = [(EVICTIONS, (iid, "dram"), st.evictions_dram), (EVICTIONS, (iid, "disk"), st.evictions_disk),
                  (PROMOTIONS, (iid,), st.promotions)]
        totals += [(EVICTION_CAUSES, (iid, reason), st.evictions_by_reason.get(reason, 0)) for reason in EVICTION_REASONS]
        totals += [(TIER_HITS, (iid, tier), n) for tier, n in st.hits.items()]
        for counter, labels, total in totals:
            seen = self._totals_seen.get((counter, labels), 0)
            if total > seen and not prime:
                counter.labels(*labels).inc(total - seen)
            self._totals_seen[(counter, labels)] = total
        for tier, nbytes, blocks in (("dram", st.dram_bytes, st.dram_blocks), ("disk", st.disk_bytes, st.disk_blocks)):
            POOL_BYTES.labels(iid, tier).set(nbytes)
            POOL_BLOCKS.labels(iid, tier).set(blocks)
        PINNED.labels(iid, "held").set(st.pinned_held)
        PINNED.labels(iid, "awaited").set(st.pinned - st.pinned_held)

    def _maintain_soon(self) -> None:
        """Start the eviction down to the low watermark if it is due and not running."""
        if not self._maintaining and self.store is not None and self.store.needs_maintenance():
            self._maintaining = True
            self.spawn(self._maintain())

    async def _maintain(self) -> None:
        """Evict down to the low watermark (in a worker thread, so puts and loads go on), publish
        what left, again while puts keep taking the disk past the high one."""
        try:
            store = self.store
            while store is not None and not self.stopping and store.needs_maintenance():
                await asyncio.to_thread(store.maintain)
                self._update_metrics(store.stats())
                await self._publish_changes()
        except Exception:  # noqa: BLE001 - the next put tries again; a put never exceeds the bound
            self.log.exception("cache_maintenance_failed")
        finally:
            self._maintaining = False

    def _put_sync(self, items: list[tuple[bytes, memoryview]], parents: dict[bytes, bytes]
                  ) -> tuple[dict[bytes, str], StoreStats]:
        _, refused = self.store.put_many(items, parents)
        return refused, self.store.stats()

    def _get_sync(self, keys: list[bytes]) -> tuple[list[tuple[bytes, bytes]], StoreStats]:
        return self.store.get_many(keys), self.store.stats()

    # ---- handlers: a malformed message is logged and dropped, never raised
    async def _on_put(self, transfer_id: str, meta: bytes, data: BlobData) -> str | None:
        """Store a blob of blocks (one LMDB transaction); an error string becomes the sender's
        negative ack. Valid blocks are kept even when others in the blob are refused."""
        try:
            put = decode(meta, CachePutMeta)
            items = put.pieces(data)
            refused, st = await asyncio.to_thread(self._put_sync, items, put.parent_map())
        except (*_BAD_MESSAGE, ValueError) as e:
            self.log.warning("cache_put_dropped", transfer_id=transfer_id, error=str(e))
            PUTS_REFUSED.labels(self.instance_id).inc()
            return f"bad put: {e}"
        except Exception as e:  # noqa: BLE001 - the service must keep running
            self.log.exception("cache_put_failed", transfer_id=transfer_id)
            return f"store failed: {e}"
        PUTS.labels(self.instance_id).inc(len(items) - len(refused))
        self._update_metrics(st)
        # Acked only once its event is out, so whoever saw the put succeed can find the event.
        await self._publish_changes()
        self._maintain_soon()
        if refused:
            self.log.warning("cache_put_corrupt", transfer_id=transfer_id, refused=len(refused),
                             stored=len(items) - len(refused))
            PUTS_REFUSED.labels(self.instance_id).inc(len(refused))
            return "corrupt block: " + "; ".join(f"{k.hex()}: {why}" for k, why in list(refused.items())[:4])
        return None

    async def _on_get(self, msg: Msg) -> None:
        try:
            req = decode(msg.data, CacheGetRequest)
        except _BAD_MESSAGE as e:
            self.log.warning("cache_get_dropped", error=str(e))
            return
        if not msg.reply or not req.reply_subject:
            self.log.warning("cache_get_dropped", error="no reply subject")
            return
        # Streaming may take a while; do not hold up the next request.
        self.spawn(self._serve_get(msg, req))

    async def _serve_get(self, msg: Msg, req: CacheGetRequest) -> None:
        try:
            found, st = await asyncio.to_thread(self._get_sync, req.keys)
            GET_HITS.labels(self.instance_id).inc(len(found))
            GET_MISSES.labels(self.instance_id).inc(len(set(req.keys)) - len(found))
            self._update_metrics(st)
            replicas = self._count_reads(found)
            if req.by_layer:
                await self._stream_layers(msg, req.reply_subject, found, replicas)
            else:
                await msg.respond(encode(CacheGetReply(found=[k for k, _ in found],
                                                       replicas=[replicas.get(k, 0) for k, _ in found])))
                await self._stream_blocks(req.reply_subject, found)
        except TransferError as e:
            self.log.warning("cache_get_aborted", error=str(e))  # the reader went away
        except Exception:  # noqa: BLE001
            self.log.exception("cache_get_failed")
        finally:
            # A get can promote blocks (pushing others out) or find corrupt ones.
            await self._publish_changes()

    # ---- hot blocks
    def _count_reads(self, found: list[tuple[bytes, bytes]]) -> dict[bytes, int]:
        """Count the reads of the found blocks this instance is the primary of, start copying those
        that became hot, and return the extra copies to advertise for each (none: not hot)."""
        hot, peers = self.hot, self.peers
        if hot is None or peers is None or not found:
            return {}
        live = peers.live()
        if len(live) < 2:
            return {}
        now = time.monotonic()
        mine = [(k, v) for k, v in found if rank(k, live)[0] == self.instance_id]
        due = dict(hot.read([k for k, _ in mine], now))
        if due:
            copies = [(k, bytes(v), due[k]) for k, v in mine if k in due]  # its own bytes: the block may leave
            for k, _, _ in copies:
                hot.making(k)
            self.spawn(self._copy_hot(copies, live))
        advertised = {k: n for k, _ in mine if (n := hot.advertised(k, now))}
        HOT_BLOCKS.labels(self.instance_id).set(hot.hot_blocks(now))
        return advertised

    async def _copy_hot(self, copies: list[tuple[bytes, bytes, int]], live: list[str]) -> None:
        """Put each block on the next ``want`` instances of its ranking; then advertise the leading
        run of them that took it."""
        hot = self.hot
        targets = {k: rank(k, live)[1 : 1 + want] for k, _, want in copies}
        by_target: dict[str, list[tuple[bytes, bytes]]] = {}
        for k, data, _ in copies:
            for iid in targets[k]:
                by_target.setdefault(iid, []).append((k, data))
        taken: dict[str, set[bytes]] = {}
        try:
            results = await asyncio.gather(*(self.peers.copy_to(iid, blocks) for iid, blocks in by_target.items()))
            taken = dict(zip(by_target, results))
        finally:
            for k, _, _ in copies:
                n = 0
                for iid in targets[k]:
                    if k not in taken.get(iid, ()):
                        break
                    n += 1
                hot.made(k, n)
        HOT_COPIES.labels(self.instance_id).inc(sum(len(t) for t in taken.values()))
        HOT_BLOCKS.labels(self.instance_id).set(hot.hot_blocks(time.monotonic()))
        self.log.info("cache_hot_copies", blocks=len(copies), copies=sum(len(t) for t in taken.values()),
                      instances=len(by_target))

    async def _stream_blocks(self, subject: str, found: list[tuple[bytes, bytes]]) -> None:
        """Send ``found`` as blobs of whole blocks, ``GET_BLOBS_IN_FLIGHT`` of them unacked at a time."""
        runs = blob_groups([len(v) for _, v in found], GET_BLOB_MAX_BLOCKS, GET_BLOB_TARGET_BYTES)
        groups = [found[start:end] for start, end in runs]
        tid = uuid.uuid4().hex[:12]
        todo = iter(enumerate(groups))

        async def sender() -> None:
            for n, group in todo:  # shared: each sender takes the next blob
                meta = CacheGetMeta(keys=[k for k, _ in group], sizes=[len(v) for _, v in group])
                data = group[0][1] if len(group) == 1 else b"".join(v for _, v in group)
                # each block carries its checksum, checked by the reader: no second checksum of the blob
                await send_blob(self.nc, subject, f"{tid}.{n}", data, meta=encode(meta), checksum=False)

        tasks = [asyncio.ensure_future(sender()) for _ in range(min(GET_BLOBS_IN_FLIGHT, len(groups)))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    async def _stream_layers(self, msg: Msg, subject: str, found: list[tuple[bytes, bytes]],
                             replicas: dict[bytes, int]) -> None:
        """A layered get: the found blocks' headers, then their data layer by layer (``serve_layers``).
        A block whose header does not decode is left out."""
        views = []
        for k, v in found:
            try:
                views.append((k, block_header(v)))
            except BlockCorrupt:
                continue
        await serve_layers(msg, self.nc, subject, views, replicas)

    async def _on_exists(self, msg: Msg) -> None:
        try:
            req = decode(msg.data, CacheExistsRequest)
            if not msg.reply:
                return
            tiers = await asyncio.to_thread(self.store.where_many, req.keys)
            reply = CacheExistsReply(present=[t is not None for t in tiers], tier=[t or "" for t in tiers])
            await msg.respond(encode(reply))
        except _BAD_MESSAGE as e:
            self.log.warning("cache_exists_dropped", error=str(e))
        except Exception:  # noqa: BLE001
            self.log.exception("cache_exists_failed")

    async def _on_stats(self, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            st = await asyncio.to_thread(self.store.stats)
            self._update_metrics(st)
            reply = CacheStats(
                instance_id=self.instance_id,
                dram_bytes=st.dram_bytes,
                dram_blocks=st.dram_blocks,
                disk_bytes=st.disk_bytes,
                disk_blocks=st.disk_blocks,
                evictions_dram=st.evictions_dram,
                evictions_disk=st.evictions_disk,
            )
            await msg.respond(encode(reply))
        except Exception:  # noqa: BLE001
            self.log.exception("cache_stats_failed")

    async def _on_pin(self, msg: Msg) -> None:
        try:
            req = decode(msg.data, CachePinRequest)
        except _BAD_MESSAGE as e:
            self.log.warning("cache_pin_dropped", error=str(e))
            return
        store, error, held = self.store, "", 0
        try:
            if req.unpin:
                await asyncio.to_thread(store.unpin, req.keys)
            else:
                held = await asyncio.to_thread(store.pin, req.keys, time.monotonic() + req.ttl_seconds)
        except PinLimit as e:
            error = str(e)
        st = store.stats()
        self._update_metrics(st)
        self.log.info("cache_pin", keys=len(req.keys), unpin=req.unpin, ttl_s=req.ttl_seconds, held=held,
                      pinned=st.pinned, error=error or None)
        if msg.reply:
            await msg.respond(encode(CachePinReply(instance_id=self.instance_id, held=held, pinned=st.pinned,
                                                   error=error)))
