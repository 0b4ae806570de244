"""`yuebing up` starts everything, serves, and Ctrl-C (SIGINT) leaves no process behind."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from helpers import post
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
    proc = subprocess.Popen(
        [sys.executable, "-m", "yuebing.cli", "up", "--model", str(tiny_dir), "--data-dir", str(data_dir),
         "--port", str(port), "--prefill", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if "yuebing is ready" in line:
                ready.set()

    threading.Thread(target=reader, daemon=True).start()
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
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, "".join(lines[-30:])
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(data_dir)) == []
