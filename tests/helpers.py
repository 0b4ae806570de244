"""Small helpers for end-to-end tests: real HTTP against a real cluster, and its services' logs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import orjson


async def post(url: str, body, *, raw: bytes | None = None, headers: dict | None = None, timeout: float = 120):
    """POST and return (status, parsed JSON or None, headers)."""
    data = raw if raw is not None else orjson.dumps(body)
    h = {"Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.post(url, data=data, headers=h) as r:
            text = await r.read()
            try:
                parsed = orjson.loads(text)
            except orjson.JSONDecodeError:
                parsed = None
            return r.status, parsed, dict(r.headers)


async def stream_events(url: str, body, timeout: float = 120) -> list:
    """POST a streaming request and return the parsed SSE data events (``[DONE]`` as the string)."""
    events = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.post(url, json=body) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:]
                events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return events


async def get_json(url: str, headers: dict | None = None) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get(url, headers=headers) as r:
            return await r.json()


async def wait_until(predicate, timeout: float = 30.0, interval: float = 0.2):
    """Poll an async predicate until it is true; returns its last value (False on deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)


def log_events(path: Path, event: str | None = None) -> list[dict]:
    """The structured (JSON) lines of a service's log, those of one ``event`` when given."""
    records = [orjson.loads(line) for line in Path(path).read_text().splitlines() if line.startswith("{")]
    return [r for r in records if event is None or r.get("event") == event]


async def logged(path: Path, event: str, request_ids, count: int = 1) -> list[dict]:
    """The ``event`` lines of a service's log for ``request_ids``, once there are ``count`` of them
    (a log line may come a moment after the response)."""
    async def enough():
        return len([e for e in log_events(path, event) if e.get("request_id") in request_ids]) >= count

    assert await wait_until(enough, timeout=30, interval=0.1), f"fewer than {count} {event} lines for {request_ids}"
    return [e for e in log_events(path, event) if e.get("request_id") in request_ids]


async def wait_for_pool(nats_url: str, keys: list[bytes], timeout: float = 30.0,
                        cachestores: tuple[str, ...] = ("cachestore-0",)) -> bool:
    """Whether, within ``timeout``, the pool holds every one of ``keys`` and the conductor's index
    all the pool holds (its writes, and the KV events after them, are asynchronous)."""
    from bench.common import PoolProbe

    probe = await PoolProbe(nats_url, list(cachestores)).start()
    try:
        return await probe.settle(keys, timeout=timeout)
    finally:
        await probe.close()


def start_up(model_dir, data_dir, port, *flags, env=None):
    """`yuebing up` as a user runs it; returns the process, its output lines so far and an event set
    once it is ready. ``env``: the process's environment (default: this one)."""
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-m", "yuebing.cli", "up", "--model", str(model_dir), "--data-dir", str(data_dir),
         "--port", str(port), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines: list[str] = []
    ready = threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if "yuebing is ready" in line:
                ready.set()

    threading.Thread(target=reader, daemon=True).start()
    return proc, lines, ready


SERVICE_MODULES = ("services.gateway.service", "services.conductor.service", "services.prefill.service",
                   "services.decode.service", "services.cachestore.service")


def declared_metrics() -> dict[str, set[str]]:
    """Every ``yuebing:`` metric a service process declares, with the sample names a scrape shows
    of it: {name: {sample names}} (a counter's ``_total``, a histogram's ``_bucket``, ``_sum`` and
    ``_count``). Labelled metrics no request has touched yet count too."""
    import importlib

    from prometheus_client import REGISTRY

    for module in SERVICE_MODULES:
        importlib.import_module(module)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {f.name: {f.name + s for s in suffixes[f.type]} for f in REGISTRY.collect()
            if f.name.startswith("yuebing:")}


def prompt_keys(model_dir, prompt: list[int], block_size: int = 16) -> list[bytes]:
    """The block keys the gateway computes for ``prompt`` served from ``model_dir``."""
    from libs.engine.loading import model_identity, read_shape
    from libs.kv.keys import block_hashes, namespace_digest

    ns = namespace_digest(model_identity(model_dir), read_shape(model_dir).dtype_name, block_size)
    return block_hashes(prompt, block_size, ns)


async def run_prefill_tasks(nats_url: str, output_id: str, tasks: list, timeout: float = 60.0) -> tuple[list[int], int]:
    """Put PrefillTasks (``(instance, task)`` pairs, in order) straight on the instances' work
    queues, as the conductor would, and collect the token events of ``output_id`` until it
    finishes: its tokens and the first event's ``cached_tokens``. Fails on an error event."""
    from libs.bus import connect, synced
    from libs.protocol import Subjects, TokenEvent, decode, encode

    nc = await connect(nats_url, "test-prefill-tasks")
    events: list[TokenEvent] = []
    finished = asyncio.Event()

    async def on_event(msg):
        ev = decode(msg.data, TokenEvent)
        events.append(ev)
        if ev.finish_reason:
            finished.set()

    try:
        await nc.subscribe(Subjects.output(output_id), cb=on_event)
        await synced(nc)
        for instance, task in tasks:
            await nc.jetstream().publish(Subjects.prefill_task(instance), encode(task))
        await asyncio.wait_for(finished.wait(), timeout)
    finally:
        await nc.close()
    events.sort(key=lambda e: e.seq)
    assert not any(e.error for e in events), events
    return [t for e in events for t in e.token_ids], events[0].cached_tokens
