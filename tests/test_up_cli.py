"""`yuebing up` starts everything, serves, restarts a service that dies, and Ctrl-C (SIGINT) leaves
no process behind."""

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from helpers import get_json, log_events, post, start_up, wait_until
from libs.natsserver import free_port


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(l for l in (d / "status").read_text().splitlines() if l.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if text in cmd and "zombie" not in state:
            pids.append(int(d.name))
    return pids


async def test_up_serves_and_sigint_stops_everything(tiny_dir, tmp_path):
    data_dir = tmp_path / "up-data"
    port = free_port()
    proc, lines, ready = start_up(tiny_dir, data_dir, port, "--prefill", "2")
    try:
        assert ready.wait(180), "".join(lines[-30:])
        assert any(f"http://127.0.0.1:{port}/v1" in line for line in lines)
        key = next(line.split("API key: ")[1].split()[0] for line in lines if "API key: " in line)
        assert (data_dir / "api_key").read_text().strip() == key
        children = _processes_mentioning(str(data_dir))
        assert len(children) >= 7  # nats-server, cachestore, conductor, 2 prefill, decode, gateway
        request = {"model": tiny_dir.name, "prompt": "hello", "max_tokens": 4}
        status, body, _ = await post(f"http://127.0.0.1:{port}/v1/completions", request)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"  # auth is on by default
        status, body, _ = await post(f"http://127.0.0.1:{port}/v1/completions", request,
                                     headers={"Authorization": f"Bearer {key}"})
        assert status == 200, body
        # the dashboard's address, with the key for its data; the data lists the instances
        board = next(line.split("dashboard: ")[1].split()[0] for line in lines if "dashboard: " in line)
        assert board == f"http://127.0.0.1:{port}/dashboard?key={key}"
        doc = await get_json(f"http://127.0.0.1:{port}/dashboard/data", headers={"Authorization": f"Bearer {key}"})
        assert len(doc["instances"]["prefill"]) == 2 and doc["requests"][0]["status"] == "done"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, "".join(lines[-30:])
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(data_dir)) == []


@pytest.mark.parametrize("victim, flags, busy_event", [
    ("prefill-1", ("--prefill", "2"), "prefilled"),  # one of two: its tasks are placed again
    ("decode-1", ("--decode", "2"), "decoded"),  # one of two: its streams resume on the other
    ("cachestore-0", (), "cachestore_opened"),  # the pool: prefill recomputes while it is down
    # one of two: the other places its share of the instances and the requests it had not answered
    ("conductor-0", ("--conductor", "2"), "scheduled"),
])
async def test_up_restarts_a_killed_service_and_loses_no_request(tiny_dir, tmp_path, victim, flags, busy_event):
    """kill -9 of a service under load: every request completes, and `up` starts the service again
    (it does not stop the cluster), which then reports one restart."""
    data_dir = tmp_path / "up-restart"
    port = free_port()
    proc, lines, ready = start_up(tiny_dir, data_dir, port, *flags, "--no-auth")
    url = f"http://127.0.0.1:{port}"
    kind = victim.rsplit("-", 1)[0]
    try:
        assert ready.wait(180), "".join(lines[-30:])
        prompts = [[(31 * r + 7 * i) % 40000 + 50 for i in range(600 + 13 * r)] for r in range(50)]

        async def one(p):
            return await post(url + "/v1/completions", {"model": tiny_dir.name, "prompt": p, "max_tokens": 24,
                                                        "temperature": 0, "ignore_eos": True}, timeout=180)

        tasks = []
        sending = asyncio.Event()
        sending.set()

        async def send_all():  # arriving over a second and a half: some come while the service is down
            for p in prompts:
                await sending.wait()
                tasks.append(asyncio.create_task(one(p)))
                await asyncio.sleep(0.03)

        sender = asyncio.create_task(send_all())
        log = data_dir / "logs" / f"{victim}.log"
        assert await wait_until(lambda: _async(bool(log_events(log, busy_event))), timeout=60)
        assert not sender.done() or not all(t.done() for t in tasks)  # killed while requests are in flight
        [pid] = [p for p in _processes_mentioning(str(data_dir)) if _mentions(p, f"--instance-id {victim}")]
        sending.clear()  # what is sent from here on is sent once the service is gone
        os.kill(pid, signal.SIGKILL)
        assert await wait_until(lambda: _async(not (Path("/proc") / str(pid)).exists()), timeout=10)
        await asyncio.sleep(0.2)  # and the NATS server has seen its connection close
        sending.set()
        await sender
        results = await asyncio.gather(*tasks)
        failed = [(i, body) for i, (status, body, _) in enumerate(results) if status != 200]
        assert failed == [], failed[:3]
        if victim.startswith("conductor"):
            # with one prefill and one decode instance both were the victim's (conductor-1 had no
            # share and placed nothing): the survivor took them over and placed requests
            assert log_events(data_dir / "logs" / "conductor-1.log", "scheduled")
        assert all(body["usage"]["completion_tokens"] == 24 for status, body, _ in results if status == 200)
        # the service is back: `up` said so, and the gateway hears from it again, restarted once
        assert await wait_until(lambda: _async(any(f"{victim} restarted" in line for line in lines)), timeout=60), \
            "".join(lines[-20:])

        async def back():
            workers = (await get_json(url + "/health"))["workers"]
            return {w["id"]: w["restarts"] for w in workers if w["kind"] == kind}.get(victim) == 1

        assert await wait_until(back, timeout=60)
        assert proc.poll() is None
        status, body, _ = await post(url + "/v1/completions",
                                     {"model": tiny_dir.name, "prompt": prompts[0], "max_tokens": 4})
        assert status == 200, body
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, "".join(lines[-30:])


async def test_up_restarts_a_killed_gateway(tiny_dir, tmp_path):
    """kill -9 of the gateway: the requests in flight on it may fail with a connection error; `up`
    starts it again on the same port and the next request succeeds."""
    data_dir = tmp_path / "up-gateway"
    port = free_port()
    proc, lines, ready = start_up(tiny_dir, data_dir, port, "--no-auth")
    url = f"http://127.0.0.1:{port}"
    try:
        assert ready.wait(180), "".join(lines[-30:])
        request = {"model": tiny_dir.name, "prompt": "hello", "max_tokens": 4}
        assert (await post(url + "/v1/completions", request))[0] == 200
        [pid] = [p for p in _processes_mentioning(str(data_dir)) if _mentions(p, "--instance-id gateway-0")]
        os.kill(pid, signal.SIGKILL)
        assert await wait_until(lambda: _async(any("gateway-0 restarted" in line for line in lines)), timeout=60), \
            "".join(lines[-20:])

        async def serving():
            try:
                return (await post(url + "/v1/completions", request))[0] == 200
            except (OSError, aiohttp.ClientError):
                return False

        assert await wait_until(serving, timeout=60)
        assert (await get_json(url + "/health"))["gateway"] == {"id": "gateway-0", "restarts": 1}
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, "".join(lines[-30:])


async def _async(value):
    return value


def _mentions(pid: int, text: str) -> bool:
    try:
        return text in (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False


async def test_sigint_during_startup_stops_at_once(tiny_dir, tmp_path):
    """Ctrl-C while `up` is still starting the services (before it is ready) stops everything."""
    data_dir = tmp_path / "up-early"
    proc, lines, ready = start_up(tiny_dir, data_dir, free_port(), "--no-auth")
    try:
        # the services are being started, and the cluster is not ready yet
        assert await wait_until(lambda: _async((data_dir / "logs" / "conductor-0.log").exists()), timeout=60)
        assert not ready.is_set()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, "".join(lines[-30:])
    assert not ready.is_set()
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(data_dir)) == []
