"""Lifecycle shared by every service: connect, heartbeat, metrics, signals, clean shutdown."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
import uuid

import structlog
from prometheus_client import start_http_server

from libs.bus import connect, ensure_streams, wait_for_streams
from libs.config import Settings
from libs.heap import keep_freed_heap
from libs.log import configure, get_logger
from libs.metrics import EXPORTED, KV_ARENAS, RESTARTS, set_model_name
from libs.protocol import Heartbeat, Subjects, encode


class Service:
    """Base of the five services. Subclasses implement ``setup`` and may override ``load``."""

    kind = "service"
    # JetStream streams: only the conductor creates them (``manages_streams``); another service
    # waits at start for those it uses (``streams``)
    manages_streams = False
    streams: tuple[str, ...] = ()

    def __init__(self, settings: Settings):
        self.settings = settings.with_instance(self.kind)
        self.instance_id = self.settings.instance_id
        self.incarnation = uuid.uuid4().hex[:12]  # this process, in its heartbeats
        set_model_name(self.settings.served_name())  # the model_name label of this process's metrics
        self.log = get_logger(self.kind).bind(instance=self.instance_id)
        self.nc = None
        self.js = None
        self._stopping = asyncio.Event()
        self.failed = asyncio.Event()  # an essential task died: the process must go (see spawn)
        self._tasks: set[asyncio.Task] = set()
        self.arenas: dict = {}  # name -> KVArena, see track_arena

    def track_arena(self, name: str, arena) -> None:
        """Export a ``KVArena``'s use on /metrics (``yuebing:kv_arena_*``) and log it at stop."""
        self.arenas[name] = arena
        KV_ARENAS.add(name, arena)

    # ---- hooks
    async def setup(self) -> None:  # subscribe, load models, ...
        pass

    async def drain(self) -> None:
        """On stop, before teardown: finish or hand back work in flight (heartbeats go on, marked
        draining, so nothing new is placed here)."""

    async def teardown(self) -> None:  # called once on stop, before the connection drains
        pass

    def on_reconnected(self) -> None:
        """Called after the connection to NATS came back (messages may have been lost meanwhile)."""

    def load(self) -> Heartbeat | None:
        """The heartbeat to publish, or None for services that are not placed by the conductor."""
        return None

    # ---- lifecycle
    def spawn(self, coro, essential: bool = False) -> asyncio.Task:
        """Run ``coro`` for the service's lifetime. An ``essential`` task (a worker's engine or task
        loop) that dies of an exception takes the process down: an instance that heartbeats on with
        its loop gone would hold its requests until their clients time out, while one that exits is
        declared lost and its requests are resumed elsewhere."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._essential_done if essential else self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> bool:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("task_failed", error=repr(task.exception()), exc_info=task.exception())
            return True
        return False

    def _essential_done(self, task: asyncio.Task) -> None:
        if self._task_done(task) and not self.stopping:
            self.log.error("essential_task_failed", task=task.get_coro().__qualname__)
            self.failed.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def start(self) -> None:
        # a colocated worker's two halves share its id and its bus user: the kind "worker"
        colocated = self.settings.colocated and self.kind in ("prefill", "decode")
        self.nc = await connect(self.settings.nats_url, f"{self.kind}:{self.instance_id}",
                                on_reconnect=self.on_reconnected,
                                inbox_prefix=Subjects.inbox_prefix("worker" if colocated else self.kind, self.instance_id))
        self.js = self.nc.jetstream()
        RESTARTS.labels(kind=self.kind, instance=self.instance_id).set(self.settings.restarts)
        if self.manages_streams:
            await ensure_streams(self.js, self.settings.stream_replicas)
        elif self.streams:
            await wait_for_streams(self.js, self.streams, log_as=self.kind)
        await self.setup()
        # what is loaded by now (modules, the model, the tokenizer: hundreds of thousands of objects)
        # lives as long as the process: out of the collector's sight, a full collection scans only
        # what requests leave behind, instead of stalling the event loop for a tenth of a second
        # (seconds, on a loaded host) while every stream waits
        gc.collect()
        gc.freeze()
        # essential: an instance whose heartbeat loop died (its load() raised) would serve on unseen,
        # its work moved elsewhere as if it were lost; exiting gets it restarted
        self.spawn(self._heartbeat_loop(), essential=True)
        self.log.info("service_started", nats=self.settings.nats_url.rpartition("@")[2])

    async def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.log.info("service_stopping")
        try:
            try:
                await asyncio.wait_for(self.drain(), self.settings.drain_seconds + 5)
            except Exception as e:  # noqa: BLE001 - stop anyway
                self.log.warning("drain_incomplete", error=repr(e))
            await self.teardown()
            for name, arena in self.arenas.items():
                self.log.info("kv_arena", arena=name, max_bytes=arena.max_bytes, **arena.stats())
        finally:
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.nc is not None and not self.nc.is_closed:
                try:
                    await asyncio.wait_for(self.nc.drain(), 5)
                except Exception as e:  # noqa: BLE001 - closing anyway
                    self.log.warning("connection_drain_incomplete", error=repr(e))
                    await self.nc.close()

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_interval
        while True:
            hb = self.load()
            if hb is not None and self.nc.is_connected:
                try:
                    await self.nc.publish(Subjects.heartbeat(self.kind, self.instance_id), encode(hb))
                except Exception as e:  # noqa: BLE001 - a missed beat is tolerated
                    self.log.warning("heartbeat_failed", error=str(e))
            await asyncio.sleep(interval)

    def heartbeat(self, **load) -> Heartbeat:
        return Heartbeat(
            kind=self.kind,
            instance_id=self.instance_id,
            interval=self.settings.heartbeat_interval,
            model=self.settings.model,
            draining=self.stopping,
            restarts=self.settings.restarts,
            incarnation=self.incarnation,
            **self.identity(),
            **load,
        )

    def identity(self) -> dict:
        """What the instance's heartbeats say about what it runs (a model worker: its KV namespace,
        device and dtype)."""
        return {}

    async def serve_forever(self) -> None:
        await serve_all([self])


async def serve_all(services: list[Service]) -> bool:
    """Start the services, run until SIGINT or SIGTERM or until one of them has failed (an
    essential task died), stop them all (one process, one loop). Returns whether one failed."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    for svc in services:
        await svc.start()
    waits = [asyncio.ensure_future(e.wait()) for e in [done] + [svc.failed for svc in services]]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    await asyncio.gather(*(svc.stop() for svc in services))
    return any(svc.failed.is_set() for svc in services)


def run(service_classes: type[Service] | list[type[Service]], settings: Settings, name: str | None = None) -> None:
    """Entry point of ``yuebing serve KIND``: logs, metrics endpoint, event loop. Several classes
    run side by side in one process (a colocated worker: prefill and decode on one engine)."""
    classes = service_classes if isinstance(service_classes, list) else [service_classes]
    name = name or classes[0].kind
    configure(name)
    structlog.contextvars.bind_contextvars(pid=__import__("os").getpid())
    kept = keep_freed_heap(settings.heap_keep_bytes)
    get_logger(name).info("heap", keep_bytes=settings.heap_keep_bytes if kept else 0)
    if settings.metrics_port and name != "gateway":
        set_model_name(settings.served_name())  # from the first scrape on
        start_http_server(settings.metrics_port, addr=settings.host, registry=EXPORTED)
    started = time.monotonic()

    async def main() -> bool:
        return await serve_all([cls(settings) for cls in classes])

    failed = asyncio.run(main())
    get_logger(name).info("service_exited", uptime_s=round(time.monotonic() - started, 1), failed=failed)
    if failed:
        raise SystemExit(1)
