"""KV events: every instance with a block cache publishes what it stores and removes.

The publisher numbers events gap-free within an epoch (one run of the instance) and answers
paged dump requests, so a receiver can rebuild its view of the instance at any time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterable, Sequence

import msgspec

from libs.log import get_logger
from libs.protocol import KVDump, KVDumpRequest, KVEvent, Subjects, decode, encode

log = get_logger("kvevents")

MAX_KEYS_PER_EVENT = 20000  # 16-byte keys: an event stays far below the 1 MiB payload limit


def net_changes(stored: Sequence[bytes], removed: Sequence[bytes], held: Callable[[], Iterable[bytes]]
                ) -> tuple[list[bytes], list[bytes]]:
    """``stored`` and ``removed`` made disjoint, as a receiver needs them: it applies an event's
    stored keys, then its removed ones (``PrefixIndex``). Changes reported together may name a key
    in both: evicted, then stored again (a prompt's blocks kept in order, one of its own later
    blocks the least recently used), or stored, then evicted. Such a key goes in the list that its
    current state says (``held``: the keys held now, asked only when a key is in both lists)."""
    both = set(stored).intersection(removed)
    if not both:
        return list(stored), list(removed)
    now = {k for k in held() if k in both}
    return ([k for k in stored if k not in both or k in now],
            [k for k in removed if k not in both or k not in now])


def new_epoch() -> str:
    """A run's epoch: its start time (nanoseconds, 16 hex digits) then 8 random hex digits, so the
    epochs of one instance order by when its runs began (``epoch_newer``)."""
    return f"{time.time_ns():016x}{uuid.uuid4().hex[:8]}"


def epoch_newer(a: str, b: str) -> bool:
    """Whether epoch ``a`` began after ``b``; False when either is not a ``new_epoch`` (unordered)."""
    return len(a) == len(b) == 24 and a > b


class KVEventPublisher:
    def __init__(self, nc, js, instance_id: str, source: str, keys: Callable[[], Sequence[bytes]]):
        self.nc = nc
        self.js = js
        self.instance_id = instance_id
        self.source = source
        self.epoch = new_epoch()
        self.seq = 0
        self._keys = keys  # the instance's current keys, for dumps
        self._lock = asyncio.Lock()
        self._sub = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(Subjects.kv_dump(self.instance_id), cb=self._on_dump)
        # An empty first event announces the epoch: receivers resync (dump) on a new epoch.
        await self.publish([], [])

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def publish(self, stored: Sequence[bytes], removed: Sequence[bytes]) -> None:
        """Publish one event (split if large). A failed publish leaves a gap that receivers repair.
        A key in both lists is published as what it is now (``net_changes``)."""
        async with self._lock:
            stored, removed = net_changes(stored, removed, self._keys)
            while True:
                s, stored = stored[:MAX_KEYS_PER_EVENT], stored[MAX_KEYS_PER_EVENT:]
                r, removed = removed[:MAX_KEYS_PER_EVENT], removed[MAX_KEYS_PER_EVENT:]
                self.seq += 1
                ev = KVEvent(instance_id=self.instance_id, source=self.source, epoch=self.epoch, seq=self.seq,
                             stored=s, removed=r)
                try:
                    await self.js.publish(Subjects.kv_events(self.instance_id), encode(ev), timeout=2.0)
                except Exception as e:  # noqa: BLE001 - the gap is repaired by a dump
                    log.warning("kv_event_publish_failed", seq=self.seq, error=str(e) or type(e).__name__)
                if not stored and not removed:
                    return

    async def _on_dump(self, msg) -> None:
        try:
            req = decode(msg.data, KVDumpRequest)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        keys = list(self._keys())
        limit = max(1, min(req.limit, MAX_KEYS_PER_EVENT))
        page = keys[req.offset : req.offset + limit]
        dump = KVDump(instance_id=self.instance_id, source=self.source, epoch=self.epoch, seq=self.seq,
                      keys=page, total=len(keys), offset=req.offset)
        if msg.reply:
            await msg.respond(encode(dump))
