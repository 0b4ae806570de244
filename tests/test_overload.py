"""Overload end to end: a burst far above capacity on a real cluster (simulated engine, real bus,
real KV bytes) gets 429s with Retry-After at arrival; every admitted request completes."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from libs.engine.costs import CostProfile

from conftest import start_cluster
from helpers import get_json, log_events, wait_until

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def overload_cluster(tiny_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("overload")
    # each prompt takes 0.4 s to prefill on the one prefill instance: a TTFT objective of 1.5 s
    # admits a handful of a burst and no more
    profile = CostProfile(model="test", threads=1, prefill=(0.4, 0.0, 0.0), decode=(0.01, 0.0, 0.0))
    path = profile.save(data / "profile.json")
    cluster = start_cluster(tiny_dir, data, engine="sim", calibration=str(path), admission="predictive",
                            ttft_slo=1.5, tbt_slo=1.0, slo_classes="batch=600:10")
    yield cluster
    cluster.stop()


async def _one(url: str, i: int, slo_class: str | None = None):
    body = {"model": "tiny-llama", "prompt": [1000 + i, 2000 + i, 3000 + i, 4000, 5000], "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if slo_class:
        body["slo_class"] = slo_class
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        async with s.post(url, json=body) as r:
            if r.status != 200:
                return r.status, (orjson.loads(await r.read()), dict(r.headers))
            events = []
            async for line in r.content:
                line = line.strip()
                if line.startswith(b"data: "):
                    events.append("[DONE]" if line[6:] == b"[DONE]" else orjson.loads(line[6:]))
            return 200, events


async def test_burst_gets_429_with_retry_after_and_admitted_requests_complete(overload_cluster):
    url = overload_cluster.url + "/v1/completions"
    burst = 40
    results = await asyncio.wait_for(asyncio.gather(*(_one(url, i) for i in range(burst))), 300)
    admitted = [r for s, r in results if s == 200]
    rejected = [r for s, r in results if s == 429]
    assert len(admitted) + len(rejected) == burst, [s for s, _ in results]
    assert rejected, "a burst of 40 at 0.4 s a prompt against a 1.5 s TTFT objective must be rejected in part"
    assert admitted, "the first requests of the burst fit within the objective"
    for err, headers in rejected:
        assert int(headers["Retry-After"]) >= 1
        assert err["error"]["code"] == "rate_limited" and "time to first token" in err["error"]["message"]
    # the dashboard counts them by reason, and the SLO attainment of the burst counts them as missed
    board = await get_json(overload_cluster.url + "/dashboard/data")
    assert [(r["reason"], r["window"]) for r in board["rejections"]] == [("ttft", len(rejected))]
    assert "time to first token" in board["rejections"][0]["last"]
    assert board["totals"]["rejected"] == len(rejected)
    assert board["totals"]["attainment"] <= len(admitted) / burst + 1e-9
    for events in admitted:
        assert events[-1] == "[DONE]"
        usage = [e for e in events[:-1] if e.get("usage")][-1]["usage"]
        assert usage["completion_tokens"] == MAX_TOKENS
        assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e.get("choices")][-1] == "length"
    # nothing left behind: the workers drain, and the next request after the Retry-After is served
    wait = max(int(h["Retry-After"]) for _, h in rejected)
    await asyncio.sleep(min(wait, 10))

    async def idle():
        h = await get_json(overload_cluster.url + "/health")
        return all(w["queued"] == 0 and w["running"] == 0 for w in h["workers"] if w["kind"] in ("prefill", "decode"))

    assert await wait_until(idle, timeout=60)
    status, events = await _one(url, 999)
    assert status == 200 and events[-1] == "[DONE]"


async def test_a_request_class_with_its_own_objectives(overload_cluster):
    url = overload_cluster.url + "/v1/completions"
    results = await asyncio.wait_for(asyncio.gather(
        *(_one(url, 100 + i) for i in range(20)), *(_one(url, 200 + i, "batch") for i in range(4))), 300)
    # the burst fills the prefill queue: default-class requests are turned away, while the
    # "batch" class (600 s to the first token) is admitted behind them
    assert any(s == 429 for s, _ in results[:20])
    assert all(s == 200 for s, _ in results[20:]), [s for s, _ in results[20:]]
    status, (err, _) = await _one(url, 300, "platinum")
    assert status == 400 and err["error"]["param"] == "slo_class"


def test_colocated_workers_prefill_and_decode_their_own_requests(tiny_dir, tmp_path):
    """The goodput baseline: `serve worker` runs prefill and decode on one engine, and the conductor
    decodes each request on the worker that prefilled it."""
    profile = CostProfile(model="test", threads=1, prefill=(0.05, 0.0, 0.0), decode=(0.01, 0.0, 0.0))
    cluster = start_cluster(tiny_dir, tmp_path, engine="sim", calibration=str(profile.save(tmp_path / "p.json")),
                            colocated=2, policy="round_robin")
    try:
        assert sorted(cluster.procs) == ["conductor-0", "gateway-0", "worker-0", "worker-1"]

        async def burst():
            return await asyncio.gather(*(_one(cluster.url + "/v1/completions", 400 + i) for i in range(6)))

        results = asyncio.run(burst())
        assert [s for s, _ in results] == [200] * 6
        placed = log_events(tmp_path / "logs" / "conductor-0.log", "scheduled")
        assert len(placed) == 6
        for rec in placed:
            assert rec["prefill"] == rec["decode"] and rec["prefill"].startswith("worker-")
        assert {rec["prefill"] for rec in placed} == {"worker-0", "worker-1"}
    finally:
        cluster.stop()


async def test_a_colocated_worker_decodes_between_the_chunks_of_a_long_prompt(tiny_dir, tmp_path):
    """Chunked prefill in the colocated baseline: while one worker prefills a long prompt in chunks,
    the sequence it is decoding goes on taking steps between them (a whole prompt in one go would
    stall it until the prompt is done)."""
    # a chunk of 16 tokens takes 0.05 + 16 x 4 ms; a decode step 0.03 s: 12 chunks of a 192-token prompt
    profile = CostProfile(model="test", threads=1, prefill=(0.05, 4e-3, 0.0), decode=(0.03, 0.0, 0.0))
    cluster = start_cluster(tiny_dir, tmp_path, engine="sim", calibration=str(profile.save(tmp_path / "p.json")),
                            colocated=1, prefill_chunk=16, admission="none", sim_noise=False)
    url = cluster.url + "/v1/completions"
    arrivals: dict[str, list[float]] = {"a": [], "b": []}
    loop = asyncio.get_running_loop()

    async def stream(name: str, prompt: list[int], max_tokens: int) -> int:
        body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0, "stream": True}
        got = 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            async with s.post(url, json=body) as r:
                assert r.status == 200, await r.read()
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        got += 1
                        arrivals[name].append(loop.time())
        return got

    try:
        a = asyncio.ensure_future(stream("a", [11, 12, 13, 14], 200))
        async def decoding():
            return len(arrivals["a"]) >= 3

        assert await wait_until(decoding, timeout=60, interval=0.01)
        sent = loop.time()
        b = await stream("b", [100 + i for i in range(192)], 2)
        assert b >= 2  # its tokens (and the chunk that ends the stream)
        during = [t for t in arrivals["a"] if sent < t < arrivals["b"][0]]
        # 12 chunks leave 11 gaps for A's steps (and the scheduling of B a few more); without chunks
        # A would get only the steps taken before B's prefill began
        assert len(during) >= 8, len(during)
        # two long prompts at once take turns, a chunk at a time: A steps between any two chunks
        # (about 23 times), not once per pair of chunks (about 11)
        arrivals.update(b1=[], b2=[])
        sent = loop.time()
        assert await asyncio.gather(*(stream(f"b{k}", [300 * k + i for i in range(192)], 2) for k in (1, 2))) >= [2, 2]
        during = [t for t in arrivals["a"] if sent < t < max(arrivals["b1"][0], arrivals["b2"][0])]
        assert len(during) >= 17, len(during)
        assert await a >= 200
    finally:
        cluster.stop()


async def test_decode_reports_how_long_a_sequence_waited_for_a_row(tiny_dir, tmp_path):
    """One row: a second sequence waits for the first to leave, and decode says so (the conductor
    learns the decode pace from the time in a row, and projects the wait first come, first served)."""
    from libs.bus import connect, synced
    from libs.protocol import DecodeReport, Subjects, decode

    profile = CostProfile(model="test", threads=1, prefill=(0.05, 0.0, 0.0), decode=(0.1, 0.0, 0.0))
    cluster = start_cluster(tiny_dir, tmp_path, engine="sim", calibration=str(profile.save(tmp_path / "p.json")),
                            max_running=1, admission="none")
    nc = await connect(cluster.nats.url, "test-reports")
    try:
        reports: list[DecodeReport] = []

        async def on_report(msg):
            reports.append(decode(msg.data, DecodeReport))

        await nc.subscribe(Subjects.DECODE_REPORT, cb=on_report)
        await synced(nc)
        results = await asyncio.gather(*(_one(cluster.url + "/v1/completions", 500 + i) for i in range(2)))
        assert [s for s, _ in results] == [200, 200]
        async def both():
            return len(reports) == 2

        assert await wait_until(both, timeout=30)
        first, second = sorted(reports, key=lambda r: r.waited_seconds)
        assert first.waited_seconds < first.seconds / 2  # it had the row at once: it spent its time decoding
        assert 0 < second.waited_seconds <= second.seconds
        assert second.waited_seconds > first.waited_seconds
        assert {r.output_tokens for r in reports} == {MAX_TOKENS - 1}  # the first token came from prefill
    finally:
        await nc.close()
        cluster.stop()
