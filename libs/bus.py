"""NATS plumbing shared by every service: connecting, JetStream work queues, chunked blobs.

Binary blobs (a request's KV, a cache block) travel as ``Chunk`` messages of at most
``CHUNK_DATA_BYTES`` on core subjects, with acked windows as flow control: the sender publishes
``window - 1`` chunks and sends the window's last chunk as a request, waiting for the receiver's
``ChunkAck`` before it goes on. A receiver that falls behind therefore slows the sender down
instead of being cut off as a slow consumer.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable

import msgspec
import nats
import numpy as np
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from libs.log import get_logger
from libs import checksum as sums
from libs.protocol import CHUNK_DATA_BYTES, NO_BLOB_CHECKSUM, Chunk, ChunkAck, Subjects, decode, encode

log = get_logger("bus")

# Subscriptions that carry bulk data may buffer this much before nats-py drops messages.
BULK_PENDING_BYTES = 512 * 1024 * 1024


class TransferError(RuntimeError):
    pass


async def connect(url: str, name: str, *, connect_timeout: float = 30.0,
                  on_reconnect: Callable[[], None] | None = None, inbox_prefix: str | None = None) -> NATS:
    """Connect to NATS, retrying until ``connect_timeout``; reconnects forever afterwards.
    ``inbox_prefix``: where replies to this connection arrive (``Subjects.inbox_prefix``); a
    connection that is no service's (a tool, a benchmark, a test) gets one of the kind ``tool``."""
    if inbox_prefix is None:
        inbox_prefix = Subjects.inbox_prefix("tool", secrets.token_hex(6))

    async def on_error(e: Exception) -> None:
        log.warning("nats_error", error=str(e), client=name)

    async def on_disconnect() -> None:
        log.warning("nats_disconnected", client=name)

    async def reconnected() -> None:
        log.info("nats_reconnected", client=name)
        if on_reconnect is not None:
            on_reconnect()

    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            return await nats.connect(
                url,
                name=name,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=2,
                ping_interval=5,
                max_outstanding_pings=3,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=reconnected,
                inbox_prefix=inbox_prefix,
            )
        except Exception as e:  # noqa: BLE001 - nats raises several unrelated types here
            if time.monotonic() > deadline:
                raise
            log.info("nats_connect_retry", url=url.rpartition("@")[2], error=str(e) or type(e).__name__)
            await asyncio.sleep(0.5)


def taking_turns(handler: Callable[[Msg], Awaitable[None]], budget: float = 0.002) -> Callable[[Msg], Awaitable[None]]:
    """``handler`` as a subscription callback that gives the other subscriptions a turn once it
    has run ``budget`` seconds since it last did. nats-py runs a subscription's queued messages
    back to back without returning to the event loop, so a burst on one subject (every instance's
    heartbeat within a second, a replay of KV events) held a message of another subject (a
    schedule request) for the whole burst. A turn after every message instead starved a busy
    subscription: at overload, heartbeats taken one per round of decisions fell behind their
    arrivals until every instance looked lost."""
    ran = 0.0  # handler seconds since the last turn given
    last_end = 0.0

    async def cb(msg: Msg) -> None:
        nonlocal ran, last_end
        start = time.monotonic()
        if start - last_end > budget:
            ran = 0.0  # the loop ran other work since (its queue was empty): a fresh turn
        await handler(msg)
        last_end = time.monotonic()
        ran += last_end - start
        if ran >= budget:
            ran = 0.0
            await asyncio.sleep(0)

    return cb


async def synced(nc: NATS, timeout: float = 10.0) -> None:
    """Return once the server has processed every command sent on ``nc`` so far (a subscription
    made, a message published), so that another connection may act on it.

    ``nc.flush()`` alone is not that barrier: nats-py writes its PING straight to the socket, ahead
    of commands still waiting for its flusher task, so the PONG can come back before a fresh SUB
    reaches the server. By the time a first round trip is back the flusher has written them; a
    second PING then goes out behind them.
    """
    await nc.flush(timeout=timeout)
    await nc.flush(timeout=timeout)


async def ensure_streams(js, replicas: int = 1) -> None:
    """Create (or update) the JetStream work-queue streams for prefill and decode tasks and the
    KV-event stream, each kept on ``replicas`` servers of a NATS cluster."""
    for name, subjects in (
        (Subjects.PREFILL_STREAM, ["yb.task.prefill.>"]),
        (Subjects.DECODE_STREAM, ["yb.task.decode.>"]),
    ):
        cfg = StreamConfig(
            name=name,
            subjects=subjects,
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_age=3600.0,
            num_replicas=replicas,
        )
        try:
            await js.add_stream(cfg)
        except BadRequestError:
            await js.update_stream(cfg)
    await ensure_event_stream(js, replicas)


async def wait_for_streams(js, names: Iterable[str], log_as: str = "") -> None:
    """Wait until the conductor has created the streams ``names`` (only it may)."""
    from nats.js.errors import NotFoundError

    said = False
    for name in names:
        while True:
            try:
                await js.stream_info(name)
                break
            except (NotFoundError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
                if not said:
                    log.info("waiting_for_streams", streams=list(names), client=log_as,
                             why="the conductor creates them")
                    said = True
                await asyncio.sleep(0.5)


async def ensure_event_stream(js, replicas: int = 1) -> None:
    """The KV-event stream: kept by age and size, replayed by the conductor after a restart."""
    cfg = StreamConfig(
        name=Subjects.KV_EVENTS_STREAM,
        subjects=["yb.kvev.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=24 * 3600.0,
        max_bytes=1 << 30,
        num_replicas=replicas,
    )
    try:
        await js.add_stream(cfg)
    except BadRequestError:
        await js.update_stream(cfg)


async def work_subscription(js, stream: str, subject: str, durable: str, ack_wait: float = 60.0):
    """A durable pull consumer on one instance's task subject of a work-queue stream."""
    cfg = ConsumerConfig(
        durable_name=durable,
        ack_wait=ack_wait,
        max_deliver=-1,
        filter_subject=subject,
    )
    return await js.pull_subscribe(subject, durable=durable, stream=stream, config=cfg)


async def keep_in_progress(msg: Msg, every: float) -> None:
    """Tell JetStream every ``every`` seconds that ``msg`` is still being worked on, so its ack wait
    starts again and it is not redelivered (to any puller) while the work goes on; until cancelled."""
    while True:
        await asyncio.sleep(every)
        try:
            await msg.in_progress()
        except Exception as e:  # noqa: BLE001 - the connection is down: the ack wait decides
            log.warning("task_progress_failed", error=str(e) or type(e).__name__)


ASIDE_SUM_BYTES = 8 << 20  # smaller sums take about as long as a thread hand-off


async def _checksum_aside(data) -> int:
    return sums.checksum(data) if len(data) < ASIDE_SUM_BYTES else await asyncio.to_thread(sums.checksum, data)


async def _send_chunk(nc: NATS, subject: str, transfer_id: str, payload: bytes, ask: bool, timeout: float) -> None:
    """Publish one chunk; ``ask``: as a request, and wait for the receiver's positive ``ChunkAck``."""
    if not ask:
        await nc.publish(subject, payload)
        return
    try:
        resp = await nc.request(subject, payload, timeout=timeout)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as e:
        raise TransferError(f"no ack from {subject} for {transfer_id}: {type(e).__name__}") from e
    ack = decode(resp.data, ChunkAck)
    if not ack.ok:
        raise TransferError(f"{subject} refused {transfer_id}: {ack.error}")


async def send_windowed(nc: NATS, subject: str, transfer_id: str, payloads: Iterable[bytes], *, window: int = 16,
                        timeout: float = 10.0) -> None:
    """Publish ``payloads`` to ``subject`` as acked windows: every ``window``-th payload and the
    last one go as requests, and the next window waits for the receiver's ``ChunkAck``."""
    it = iter(payloads)
    payload = next(it, None)
    i = 0
    while payload is not None:
        following = next(it, None)
        await _send_chunk(nc, subject, transfer_id, payload, (i + 1) % window == 0 or following is None, timeout)
        payload, i = following, i + 1


async def send_blob(
    nc: NATS,
    subject: str,
    transfer_id: str,
    data: bytes | memoryview,
    meta: bytes = b"",
    *,
    window: int = 16,
    timeout: float = 10.0,
    chunk_bytes: int = CHUNK_DATA_BYTES,
    checksum: bool = True,
    available: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    """Send ``data`` to ``subject`` as acked windows of chunks; raises TransferError on failure.

    ``checksum=False`` for data that carries its own checksum (an encoded KV block).
    ``available(end)``, for data still being produced while it is sent (a prompt's KV, layer by
    layer): awaited before each chunk, it returns once bytes ``[0, end)`` are final (or raises to
    abandon the transfer). The checksum of such a blob is then taken chunk by chunk as they go and
    carried by its last chunk, whose value is the one the receiver checks."""
    view = memoryview(data).cast("B")
    total = len(view)
    count = max(1, -(-total // chunk_bytes))
    streamed = available is not None
    whole = sums.checksum(view) if checksum and not streamed else NO_BLOB_CHECKSUM
    running = sums.Running()
    for i in range(count):
        lo, hi = i * chunk_bytes, min(total, (i + 1) * chunk_bytes)
        last = i == count - 1
        if streamed:
            await available(hi)
            if checksum:
                running.update(view[lo:hi])
                if last:
                    whole = running.intdigest()
        payload = encode(Chunk(transfer_id=transfer_id, index=i, count=count, offset=lo, total_bytes=total,
                               checksum=whole, data=view[lo:hi], meta=meta if i == 0 else b""))
        await _send_chunk(nc, subject, transfer_id, payload, (i + 1) % window == 0 or last, timeout)


def uninitialized(n: int) -> memoryview:
    """A writable buffer of ``n`` bytes, not zero-filled: a blob's chunks overwrite all of it.

    ``bytearray(n)`` zero-fills while holding the GIL (about 90 ms for a 69 MB hand-off on this
    machine, far more on a busy one), which stalls every thread of the receiving process, a decode
    instance's steps included; unzeroed memory costs only the page faults, spread over the chunks."""
    return memoryview(np.empty(n, dtype=np.uint8)).cast("B")


class _Partial:
    __slots__ = ("buf", "whole", "count", "next_index", "checksum", "meta", "seen")

    def __init__(self, first: Chunk, alloc: Callable[[int], memoryview], alloc_single: bool):
        self.whole = first.count == 1 and not alloc_single  # a blob in one chunk, copied as it is
        self.buf = bytearray(first.data) if self.whole else alloc(first.total_bytes)
        self.count = first.count
        self.next_index = 0
        self.checksum = first.checksum
        self.meta = bytes(first.meta)
        self.seen = time.monotonic()  # when its latest chunk came


# A reassembled blob as handlers get it: writable, its own memory (a one-chunk blob's copy, or the
# unzeroed buffer the chunks were written into).
BlobData = bytearray | memoryview
# Returns None to accept the blob, or an error string that the sender receives as a negative ack.
BlobHandler = Callable[[str, bytes, BlobData], Awaitable[str | None] | str | None]


class BlobAssembler:
    """Reassembles chunked blobs arriving on one subscription.

    ``on_blob(transfer_id, meta, data)`` is called once per complete, checksum-verified blob.
    A missing chunk, a checksum mismatch, or an error returned or raised by ``on_blob`` fails the
    transfer: the sender gets a negative ack.

    ``alloc(n)`` gives the writable buffer a blob of more than one chunk is written into (default:
    fresh memory each time); a receiver that recycles its buffers passes its own, and with
    ``alloc_single`` has a blob of one chunk written into one too (else it is a ``bytearray``).
    """

    def __init__(self, nc: NATS, on_blob: BlobHandler, *, stale_after: float = 60.0,
                 alloc: Callable[[int], memoryview] = uninitialized, alloc_single: bool = False):
        self._nc = nc
        self._on_blob = on_blob
        self._alloc = alloc
        self._alloc_single = alloc_single
        self._partials: dict[str, _Partial] = {}
        self._failed: dict[str, str] = {}
        self._stale_after = stale_after
        self._gc_at = 0.0
        self.completed = 0
        self.failed = 0

    async def handle(self, msg: Msg) -> None:
        try:
            chunk = decode(msg.data, Chunk)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("chunk_dropped", subject=msg.subject, error=str(e))
            return
        tid = chunk.transfer_id
        error = self._failed.get(tid, "")
        if not error:
            error = self._accept(chunk)
        if error:
            self._failed[tid] = error
            self._partials.pop(tid, None)
        part = self._partials.get(tid)
        done = part is not None and part.next_index == part.count
        if done:
            del self._partials[tid]
            # in a worker thread (the sum lets go of the GIL): tens of megabytes would hold the event
            # loop, and with it a decode instance's next step, for as long as the sum takes
            if part.checksum != NO_BLOB_CHECKSUM and await _checksum_aside(part.buf) != part.checksum:
                error = "checksum mismatch"
                self._failed[tid] = error
            else:
                try:
                    res = self._on_blob(tid, part.meta, part.buf)
                    if asyncio.iscoroutine(res):
                        res = await res
                except Exception as e:  # noqa: BLE001 - the sender must hear about it
                    log.exception("blob_handler_failed", transfer_id=tid)
                    res = f"receiver failed: {e}"
                if res:
                    error = str(res)
                else:
                    self.completed += 1
        if error:
            self.failed += 1
        if msg.reply:
            ack = ChunkAck(transfer_id=tid, received=chunk.index + 1, ok=not error, error=error)
            await self._nc.publish(msg.reply, encode(ack))
        if chunk.index == chunk.count - 1:
            self._failed.pop(tid, None)
        self._gc()

    def _accept(self, chunk: Chunk) -> str:
        part = self._partials.get(chunk.transfer_id)
        if part is None:
            if chunk.index != 0:
                return f"chunk {chunk.index} arrived before chunk 0"
            part = self._partials[chunk.transfer_id] = _Partial(chunk, self._alloc, self._alloc_single)
        if chunk.index != part.next_index:
            return f"expected chunk {part.next_index}, got {chunk.index}"
        start = chunk.offset
        end = start + len(chunk.data)
        if end > len(part.buf) or (chunk.count == 1 and (start, end) != (0, chunk.total_bytes)):
            return "chunk overruns the announced size"
        if not part.whole:
            part.buf[start:end] = chunk.data
        part.checksum = chunk.checksum  # the last chunk's value is checked (a streamed blob knows it only then)
        part.next_index += 1
        part.seen = time.monotonic()
        return ""

    def _gc(self) -> None:
        """Forget blobs whose sender stopped sending (abandoned, or it died) ``stale_after`` ago;
        looked for at most once a second."""
        now = time.monotonic()
        if not self._partials or now - self._gc_at < 1.0:
            return
        self._gc_at = now
        for tid in [t for t, p in self._partials.items() if now - p.seen > self._stale_after]:
            del self._partials[tid]
            log.warning("transfer_abandoned", transfer_id=tid)
