"""The cachestore service: a ``TieredStore`` (DRAM + LMDB) behind the ``yb.cache.*`` subjects.

Wiring only; the storage logic is in ``store.py`` and the block codec in ``libs/blocks.py``.
Store calls run in worker threads (``asyncio.to_thread``) because LMDB reads and writes block.
"""

from __future__ import annotations

import asyncio

import msgspec
from nats.aio.msg import Msg

from yuebing.libs.blocks import BlockCorrupt
from yuebing.libs.bus import BULK_PENDING_BYTES, BlobAssembler, TransferError, send_blob
from yuebing.libs.protocol import (
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
from yuebing.libs.service import Service

from .store import TieredStore

QUEUE = "cachestore"
_BAD_MESSAGE = (msgspec.DecodeError, msgspec.ValidationError)


class CacheStoreService(Service):
    kind = "cachestore"

    def __init__(self, settings):
        super().__init__(settings)
        self.store: TieredStore | None = None
        self._subs = []

    @property
    def data_dir(self):
        return self.settings.resolved_data_dir() / "cachestore" / self.instance_id

    async def setup(self) -> None:
        s = self.settings
        self.store = await asyncio.to_thread(TieredStore, s.dram_bytes, self.data_dir, s.disk_bytes)
        st = self.store.stats()
        self.log.info("cachestore_opened", path=str(self.data_dir), disk_blocks=st.disk_blocks, disk_bytes=st.disk_bytes)
        nc = self.nc
        # NOTE: a put is a chunked blob of several messages, and a queue group delivers each
        # message to any member, so with more than one instance the chunks of one block would be
        # split across instances. That is fine while there is a single cachestore; several
        # instances will need per-instance subjects (rendezvous sharding, DESIGN section 5).
        # Gets are single messages but only this instance's blocks are found, same caveat.
        self._subs = [
            await nc.subscribe(
                Subjects.CACHE_PUT,
                queue=QUEUE,
                cb=BlobAssembler(nc, self._on_put).handle,
                pending_bytes_limit=BULK_PENDING_BYTES,
            ),
            await nc.subscribe(Subjects.CACHE_GET, queue=QUEUE, cb=self._on_get),
            await nc.subscribe(Subjects.CACHE_EXISTS, queue=QUEUE, cb=self._on_exists),
            await nc.subscribe(Subjects.CACHE_STATS, queue=QUEUE, cb=self._on_stats),
        ]

    async def teardown(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as e:  # noqa: BLE001 - closing anyway
                self.log.warning("unsubscribe_failed", error=str(e))
        self._subs = []
        if self.store is not None:
            # Waits for any store call still running in a thread, then writes DRAM to disk.
            await asyncio.to_thread(self.store.close)
            self.store = None

    def load(self):
        return self.heartbeat()

    # ---- handlers: a malformed message is logged and dropped, never raised
    async def _on_put(self, transfer_id: str, meta: bytes, data: bytearray) -> str | None:
        """Store one block; an error string becomes the sender's negative ack."""
        try:
            key = decode(meta, CachePutMeta).key
            await asyncio.to_thread(self.store.put, key, bytes(data))
        except _BAD_MESSAGE as e:
            self.log.warning("cache_put_dropped", transfer_id=transfer_id, error=str(e))
            return f"bad put: {e}"
        except BlockCorrupt as e:
            self.log.warning("cache_put_corrupt", transfer_id=transfer_id, error=str(e))
            return f"corrupt block: {e}"
        except Exception as e:  # noqa: BLE001 - the service must keep running
            self.log.exception("cache_put_failed", transfer_id=transfer_id)
            return f"store failed: {e}"
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
            found = await asyncio.to_thread(self.store.get_many, req.keys)
            await msg.respond(encode(CacheGetReply(found=[k for k, _ in found])))
            for key, data in found:
                await send_blob(self.nc, req.reply_subject, transfer_id=key.hex(), data=data)
        except TransferError as e:
            self.log.warning("cache_get_aborted", error=str(e))  # the reader went away
        except Exception:  # noqa: BLE001
            self.log.exception("cache_get_failed")

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
