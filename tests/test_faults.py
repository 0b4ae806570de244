"""Faults: an instance killed with SIGKILL costs time, not accepted requests."""

import asyncio
import signal

import nats.js.errors
import pytest

from conftest import reference_greedy, start_cluster
from helpers import get_json, log_events, post, wait_until

pytestmark = pytest.mark.slow


async def _stranded_tasks(js, instance: str) -> list[str]:
    """Attempt ids of the prefill tasks on ``instance``'s subject: the work-queue stream keeps a task
    until its instance acknowledges it, which it does only once the KV is handed to decode."""
    from libs.protocol import PrefillTask, Subjects, decode

    ids, seq = [], 1
    while True:
        try:
            m = await js.get_msg(Subjects.PREFILL_STREAM, seq=seq, subject=Subjects.prefill_task(instance), next=True)
        except nats.js.errors.NotFoundError:
            return ids
        ids.append(decode(m.data, PrefillTask).attempt_id)
        seq = m.seq + 1


async def test_kill_one_of_two_prefill_instances_under_load(tiny_dir, tiny_model, tmp_path):
    """prefill-1 is killed while it holds accepted tasks (one taken, unacknowledged, and more queued
    on it): the conductor moves every one of them to prefill-0, and every request completes."""
    from libs.bus import connect
    from libs.protocol import Subjects

    model, tok = tiny_model
    cluster = start_cluster(tiny_dir, tmp_path / "c", prefill=2, policy="least_loaded")
    nc = None
    try:
        nc = await connect(cluster.nats.url, "test-faults")
        js = nc.jetstream()
        prompts = [[(31 * r + 7 * i) % 40000 + 50 for i in range(600 + 13 * r)] for r in range(50)]

        async def one(p):
            return await post(cluster.url + "/v1/completions",
                              {"model": tiny_dir.name, "prompt": p, "max_tokens": 12, "temperature": 0},
                              timeout=120)

        async def busy():  # prefill-1 has taken a task it has not acknowledged, and has more queued
            info = await js.consumer_info(Subjects.PREFILL_STREAM, "prefill-1")
            return info.num_ack_pending >= 1 and info.num_pending >= 1

        tasks = [asyncio.create_task(one(p)) for p in prompts]
        assert await wait_until(busy, timeout=60, interval=0.05)
        await asyncio.to_thread(cluster.kill, "prefill-1", signal.SIGKILL)
        # what it held when it died: nothing acknowledges for it now, and the conductor moves these
        # only once it has missed three heartbeats
        held = await _stranded_tasks(js, "prefill-1")
        assert held, "prefill-1 held no accepted task when it was killed"
        results = await asyncio.gather(*tasks)
        assert [status for status, _, _ in results] == [200] * 50, [b for s, b, _ in results if s != 200][:3]
        by_id = {body["id"]: (p, body) for p, (_, body, _) in zip(prompts, results)}
        assert set(held) <= set(by_id)
        # the held requests were resumed on prefill-0, with the text of an undisturbed greedy run (the
        # conductor logs the move once it finds the lost instance's subject empty: maybe after the
        # moved tasks have finished)
        async def reassigned():
            return log_events(cluster.log_dir / "conductor-0.log", "prefill_tasks_reassigned")

        moves = await wait_until(reassigned, timeout=30, interval=0.1)
        assert [(e["instance"], e["failed"]) for e in moves] == [("prefill-1", 0)]
        assert moves[0]["moved"] >= len(held)
        redone = {e["request_id"] for e in log_events(cluster.log_dir / "prefill-0.log", "prefilled")}
        assert set(held) <= redone, set(held) - redone
        for rid in (held[:3] + [b["id"] for _, (_, b, _) in list(zip(prompts, results))[::25]]):
            p, body = by_id[rid]
            ref = reference_greedy(model, p, 12)
            assert body["choices"][0]["text"] == tok.decode(ref, skip_special_tokens=True,
                                                            clean_up_tokenization_spaces=False)

        async def named_down():  # the cluster still serves, and /health names what is down
            h = await get_json(cluster.url + "/health")
            return h["ready"] and [(d["kind"], d["id"]) for d in h["down"]] == [("prefill", "prefill-1")]

        assert await wait_until(named_down, timeout=30)
    finally:
        if nc is not None:
            await nc.close()
        cluster.stop()


async def _streams_survive(cluster, tiny_dir, tiny_model, disturb, max_tokens=400, n=8, under_way=5):
    """Run ``n`` greedy streams; once each has ``under_way`` tokens, ``disturb()``; every stream must
    complete with the text of an undisturbed greedy run: no token repeated, none skipped."""
    import aiohttp
    import orjson

    model, tok = tiny_model
    prompts = [[(37 * r + 11 * i) % 40000 + 60 for i in range(40 + 9 * r)] for r in range(n)]
    progress = [0] * len(prompts)

    async def stream(r, p):
        text, n = "", 0
        body = {"model": tiny_dir.name, "prompt": p, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=240)) as s:
            async with s.post(cluster.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                async for line in resp.content:
                    if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                        continue
                    ev = orjson.loads(line[6:])
                    assert "error" not in ev, ev
                    if ev["choices"]:
                        text += ev["choices"][0]["text"]
                        progress[r] += 1
                    else:
                        n = ev["usage"]["completion_tokens"]
        return text, n

    tasks = [asyncio.create_task(stream(r, p)) for r, p in enumerate(prompts)]
    while min(progress) < under_way:  # every stream is under way on one of the two decode instances
        await asyncio.sleep(0.05)
    await disturb()
    results = await asyncio.gather(*tasks)
    for p, (text, got) in zip(prompts, results):
        ref = reference_greedy(model, p, max_tokens)
        assert got == max_tokens
        assert text == tok.decode(ref, skip_special_tokens=True, clean_up_tokenization_spaces=False)


async def test_kill_one_of_two_decode_instances_mid_stream(tiny_dir, tiny_model, tmp_path):
    """Streams on the killed instance resume elsewhere: a prefill of the prompt and the tokens sent,
    which loads the blocks of both that the killed instance wrote to the pool and computes the rest."""
    cluster = start_cluster(tiny_dir, tmp_path / "c", decode=2)
    bs = cluster.settings.block_size
    try:
        await _streams_survive(cluster, tiny_dir, tiny_model,
                               lambda: asyncio.to_thread(cluster.kill, "decode-1", signal.SIGKILL),
                               under_way=3 * bs)
        prefilled = {e["request_id"]: e for e in log_events(cluster.log_dir / "prefill-0.log", "prefilled")}
        resumed = [(rid, e) for rid, e in prefilled.items() if rid.endswith(".a2")]
        assert resumed, "no stream was on the killed instance"
        placed = {e["request_id"]: e for e in log_events(cluster.log_dir / "conductor-0.log", "scheduled")}
        for rid, e in resumed:
            first = prefilled[rid.removesuffix(".a2")]
            pool = placed[rid]["pool_blocks"] * bs  # the pool's share of the resumed prompt, as placed
            # beyond the prompt's own blocks: the output's, which only decode wrote; all of it but
            # the last partial block, and a block or two whose write the kill cut short
            assert pool >= first["prompt_tokens"] // bs * bs + bs, (rid, placed[rid], first)
            assert e["prompt_tokens"] - pool <= 3 * bs, (rid, placed[rid])
            if placed[rid]["plan"] == "pool":  # loaded (unless recomputing the tiny model's blocks looked faster)
                assert e["local_tokens"] + e["pool_tokens"] == pool, (rid, e)
    finally:
        cluster.stop()


async def test_sigterm_drains_a_decode_instance(tiny_dir, tiny_model, tmp_path):
    """SIGTERM: the instance takes nothing new, finishes what it can within drain_seconds, hands
    the rest back (resumed elsewhere), and exits 0."""
    cluster = start_cluster(tiny_dir, tmp_path / "c", decode=2, drain_seconds=1.0)
    try:
        await _streams_survive(cluster, tiny_dir, tiny_model,
                               lambda: asyncio.to_thread(cluster.kill, "decode-1", signal.SIGTERM),
                               max_tokens=400, n=6)
        assert cluster.procs["decode-1"].returncode == 0
        # streams too long to finish within the drain were handed back and resumed elsewhere
        handed = log_events(cluster.log_dir / "decode-1.log", "drain_handed_back")
        assert handed and handed[0]["sequences"] >= 1
        # the rest stop on SIGTERM by themselves, each draining its connection (no subscription
        # left holding messages nothing will handle)
        assert cluster.stop() == []
        for name in cluster.procs:
            log = (cluster.log_dir / f"{name}.log").read_text()
            assert "connection_drain_incomplete" not in log, name
            assert "service_exited" in log, name
            if name.rsplit("-", 1)[0] in ("prefill", "decode", "cachestore"):
                assert '"kv_arena"' in log, name  # its arena's use, logged at stop
    finally:
        cluster.stop()


async def test_cachestore_kill9_and_restart_keeps_blocks(tiny_dir, tiny_model, tmp_path):
    from test_prefix_reuse import _complete, _pool_holds, _restart, _wait_ready
    from helpers import wait_until

    cluster = start_cluster(tiny_dir, tmp_path / "c")
    try:
        prompt = [(19 * i + 4) % 30000 + 500 for i in range(85)]  # 5 full blocks
        cold_text, _ = await _complete(cluster, tiny_dir.name, prompt)
        assert await wait_until(lambda: _pool_holds(cluster, 5), timeout=30)
        await _restart(cluster, "cachestore-0", signal.SIGKILL)
        await _restart(cluster, "prefill-0")  # its own DRAM copy is gone: the blocks must come from the pool
        await _wait_ready(cluster)
        text, usage = await _complete(cluster, tiny_dir.name, prompt)
        assert usage["prompt_tokens_details"]["cached_tokens"] == 80
        assert text == cold_text
    finally:
        cluster.stop()


async def test_nats_restart_during_load(tiny_dir, tiny_model, tmp_path):
    """Services reconnect by themselves; streams in flight finish (resumed after the gateway's
    reconnect, since token events sent meanwhile are lost), and later requests succeed."""
    cluster = start_cluster(tiny_dir, tmp_path / "c")

    async def restart_nats():
        await asyncio.to_thread(cluster.nats.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.nats.start)

    try:
        await asyncio.wait_for(_streams_survive(cluster, tiny_dir, tiny_model, restart_nats, max_tokens=300, n=6),
                               240)  # none hangs
        status, body, _ = await post(cluster.url + "/v1/completions",
                                     {"model": tiny_dir.name, "prompt": [5, 6, 7], "max_tokens": 8}, timeout=60)
        assert status == 200, body
    finally:
        cluster.stop()


async def test_a_task_jetstream_refuses_is_answered_503(tiny_dir, tmp_path):
    """The conductor has placed a request and its prefill task cannot be queued (the task stream
    is gone): the client gets a 503 with Retry-After at once, not a hang, and the conductor records
    the failed dispatch of the request it had scheduled."""
    import nats

    from libs.protocol import Subjects

    cluster = start_cluster(tiny_dir, tmp_path / "c")
    try:
        nc = await nats.connect(cluster.nats.url)
        try:
            await nc.jetstream().delete_stream(Subjects.PREFILL_STREAM)
        finally:
            await nc.close()
        status, body, headers = await post(cluster.url + "/v1/completions",
                                           {"model": tiny_dir.name, "prompt": [5, 6, 7], "max_tokens": 4},
                                           timeout=30)
        assert status == 503, body
        assert body["error"]["message"] == "task queue unavailable"
        assert body["error"]["code"] == "service_unavailable"
        assert int(headers["Retry-After"]) >= 1
        log = cluster.log_dir / "conductor-0.log"
        failed = log_events(log, "dispatch_failed")
        assert len(failed) == 1
        rid = failed[0]["request_id"]
        assert any(e.get("request_id") == rid for e in log_events(log, "scheduled"))
    finally:
        cluster.stop()
