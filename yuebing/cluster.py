"""The local cluster: a nats-server and the five services as child processes, stopped together."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import psutil

from libs.config import Settings
from libs.cpus import CorePlan, available_cores
from libs.log import get_logger
from libs.engine.modelpath import resolve_model
from libs.natsserver import NatsServer, free_port
from libs.proc import die_with_parent
from yuebing.supervisor import RestartPolicy, Restarts

log = get_logger("cluster")

SERVICE_ORDER = ("cachestore", "conductor", "prefill", "decode", "worker", "gateway")
# settings every service process receives (as YUEBING_* variables)
FORWARDED = ("block_size", "threads", "max_running", "urgent_rows", "dram_bytes", "disk_bytes", "prefill_chunk",
             "max_body_bytes", "request_timeout", "heartbeat_interval", "policy", "use_pool", "prefill_cache_bytes",
             "cache_replicas", "drain_seconds", "no_auth", "engine", "sim_noise", "sim_seed", "calibration", "colocated", "admission",
             "ttft_slo", "tbt_slo", "slo_classes", "pool_write_backlog_bytes", "disk_sync_seconds", "pool_writes",
             "peer_fetch", "prefill_kv_arena_bytes", "decode_kv_arena_bytes", "device", "dtype", "load_format", "stream_replicas",
             "task_ack_wait", "pool_eviction", "pool_evict_high", "pool_evict_low", "pool_max_pinned_blocks",
             "pool_hot_replicas", "pool_hot_reads_per_second", "pool_hot_half_life_seconds",
             "pipeline_min_tokens", "pipeline_max_stages", "pipeline_stage_timeout",
             "decode_write_back", "session_ttl_seconds", "session_max_blocks", "heap_keep_bytes",
             "served_model_name")  # the gateway's, and every service's metrics' model_name label
# settings each process gets its own way (its command line, or only the service that uses them):
# with FORWARDED, every setting (tests/test_units.py checks that a new one is in one or the other)
PER_SERVICE = ("model", "data_dir", "models_dir", "host", "port", "metrics_port", "nats_url", "instance_id",
               "restarts", "cpus", "api_keys", "dashboard")


# the share of the host's available memory (at start) that the KV arenas of a local cluster's
# instances may page in together; the rest is for the model and runtime of each process, the pool
# and the page cache
ARENA_HOST_SHARE = 0.4
MIN_ARENA_BYTES = 64 << 20


def fit_arenas(prefill_bytes: int, decode_bytes: int, prefills: int, decodes: int, budget: int,
               floor: int = MIN_ARENA_BYTES) -> tuple[int, int]:
    """The KV arena sizes of ``prefills`` instances that prefill and ``decodes`` that decode (a
    colocated worker counts as both) on one host: as configured when all of them fit in ``budget``
    bytes, else both scaled by the same factor to fit (not below ``floor``; an arena configured
    off, 0, stays off)."""
    want = prefills * prefill_bytes + decodes * decode_bytes
    if want <= budget or want <= 0:
        return prefill_bytes, decode_bytes
    scale = budget / want
    return tuple(max(min(b, floor), int(b * scale)) if b else 0 for b in (prefill_bytes, decode_bytes))


@dataclass
class LocalCluster:
    settings: Settings
    prefill: int = 1
    decode: int = 1
    cachestore: int = 1
    conductor: int = 1  # several share the instances (services/conductor/partition.py)
    colocated: int = 0  # workers that prefill and decode their own requests (instead of prefill/decode)
    nats_port: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    nats: NatsServer | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    metrics_urls: dict[str, str] = field(default_factory=dict)  # worker name -> Prometheus URL
    pin_cores: bool = False  # pin each model worker to its own cores (when there are enough)
    cores: CorePlan | None = None  # how the model workers share this host's cores (None: as configured)
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)  # for services that exit once up

    def __post_init__(self) -> None:
        # set (from a signal handler) to stop: start() stops at its next safe point; while it
        # converts the model or calibrates (``interruptible``) the handler may interrupt at once
        self.stop_requested = False
        self.interruptible = False
        self.restarts = Restarts(self.restart_policy)
        self.started_at: dict[str, float] = {}  # service -> when its current process started
        self._due: dict[str, float] = {}  # service -> when to restart it
        self._ports: dict[str, int] = {}  # a worker's metrics port, kept across its restarts

    @property
    def data_dir(self) -> Path:
        return self.settings.resolved_data_dir()

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def api_key(self) -> str | None:
        """The first API key clients must send, or None when the gateway runs with --no-auth."""
        keys = self.settings.api_key_list()
        return keys[0] if keys else None

    def _ensure_api_key(self) -> None:
        """Auth is on unless explicitly off: without keys, make one (kept in DATA_DIR/api_key)."""
        if self.settings.no_auth or self.api_key:
            return
        path = self.data_dir / "api_key"
        if not path.exists():
            path.write_text("yb-" + secrets.token_urlsafe(24) + "\n")
            path.chmod(0o600)
        self.settings = msgspec.structs.replace(self.settings, api_keys=path.read_text().strip())

    def start(self, ready_timeout: float = 300.0) -> "LocalCluster":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._ensure_api_key()
        # Convert the model once, here, so the services find it ready.
        self.interruptible = True
        try:
            path = resolve_model(self.settings.model, self.settings.resolved_models_dir())
            self._plan_cores()
            self._resolve_placement(path)
            self._size_arenas()
            self._ensure_calibration(path)
        finally:
            self.interruptible = False
        self._stop_point()
        if self.colocated:
            self.settings = msgspec.structs.replace(self.settings, colocated=True, use_pool=False)
        self.nats = NatsServer(self.data_dir / "nats", port=self.nats_port, log_file=self.log_dir / "nats-server.log",
                               auth=True)
        for kind in SERVICE_ORDER:  # a bus user per instance (one added later is loaded then)
            for i in range(self.count(kind)):
                self.nats.add_user(kind, f"{kind}-{i}")
        self.nats.start()
        try:
            for kind in SERVICE_ORDER:
                for i in range(self.count(kind)):
                    self._stop_point()
                    self.start_service(kind, i)
            self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _stop_point(self) -> None:
        """A safe point to stop starting: raises KeyboardInterrupt once a stop was requested."""
        if self.stop_requested:
            raise KeyboardInterrupt

    def _plan_cores(self) -> None:
        """Split the host's cores between the model workers (see ``libs.cpus``; pinned with
        ``pin_cores``), unless threads or cores were configured; simulated workers do not compute
        and keep what was configured."""
        s = self.settings
        if s.engine == "sim" or s.threads or s.cpus:
            self.cores = None
            return
        self.cores = CorePlan(available_cores(), len(self._model_workers()), pin=self.pin_cores)

    def _resolve_placement(self, path: Path) -> None:
        """Resolve ``auto`` device and dtype once, here (measuring bfloat16 against float32 on this
        CPU the first time), so every instance runs the same and the gateway hashes prompts in
        their KV namespace from the start; a device or dtype this machine cannot run stops the
        start before any service does."""
        from libs.engine.device import resolve
        from libs.engine.dtypechoice import placement_for
        from libs.engine.loading import check_load_format

        s = self.settings
        check_load_format(path, s.load_format)
        if s.engine == "sim":
            self.placement = resolve("cpu", s.dtype)
        else:
            self.placement = placement_for(path, s.device, s.dtype, self.data_dir, self._worker_threads(), s.load_format,
                                           announce=lambda text: print(text + "...", flush=True))
        print(f"engine: {self.placement.describe()}", flush=True)
        self.settings = msgspec.structs.replace(s, device=self.placement.device_name, dtype=self.placement.dtype_name)

    def _size_arenas(self) -> None:
        """Every prefill and decode instance pages its KV arena's slab in at start, so instances
        started together on one host must fit together: 16 colocated workers at the defaults
        would page in 12 GB. Above ``ARENA_HOST_SHARE`` of the memory available now, the arenas
        are scaled down alike (``fit_arenas``) and the sizes logged."""
        s = self.settings
        workers = self.count("worker")
        prefills, decodes = self.count("prefill") + workers, self.count("decode") + workers
        budget = int(psutil.virtual_memory().available * ARENA_HOST_SHARE)
        p, d = fit_arenas(s.prefill_kv_arena_bytes, s.decode_kv_arena_bytes, prefills, decodes, budget)
        if (p, d) != (s.prefill_kv_arena_bytes, s.decode_kv_arena_bytes):
            log.warning("kv_arenas_scaled", prefill_mb=p >> 20, decode_mb=d >> 20, arenas=prefills + decodes,
                        budget_mb=budget >> 20, configured_prefill_mb=s.prefill_kv_arena_bytes >> 20,
                        configured_decode_mb=s.decode_kv_arena_bytes >> 20)
            self.settings = msgspec.structs.replace(self.settings, prefill_kv_arena_bytes=p, decode_kv_arena_bytes=d)

    def _model_workers(self) -> list[str]:
        """The model workers in core-plan order: prefills, then decodes, then colocated workers."""
        return [f"{k}-{i}" for k in ("prefill", "decode", "worker") for i in range(self.count(k))]

    def describe_cores(self) -> str:
        """One line on how the model workers share the cores, for people."""
        s = self.settings
        if self.cores is None:
            return (f"as configured ({s.threads or 'default'} torch threads per model worker"
                    + (f", cpus {s.cpus}" if s.cpus else "") + ")")
        names = self._model_workers()
        if self.cores.pinned:
            return ", ".join(f"{n} on {self.cores.cpus(w)}" for w, n in enumerate(names))
        threads = sorted({self.cores.threads(w) for w in range(len(names))})
        return (f"{len(names)} model workers share {len(self.cores.cores)} cores: "
                f"{'/'.join(map(str, threads))} torch thread(s) each, unpinned")

    def _worker_threads(self) -> int:
        """Torch threads of the (first) model worker, for the calibration profile that matches it."""
        import torch

        if self.cores is not None and self.cores.workers:
            return self.cores.threads(0)
        return self.settings.threads or torch.get_num_threads()

    def _ensure_calibration(self, path: Path) -> None:
        """The cost profile the conductor starts from (and the simulated engine runs on): the one
        given, else the model's in the data dir; the simulated engine calibrates one if missing."""
        s = self.settings
        if s.calibration:
            return
        from libs.engine.costs import profile_path
        from libs.engine.loading import model_identity

        threads = self._worker_threads()
        profile = profile_path(self.data_dir, model_identity(path, s.load_format), threads, s.dtype, s.device)
        if not profile.exists() and s.engine == "sim":
            from libs.engine.calibrate import calibrate

            print(f"calibrating the cost model of {path.name} for the simulated engine (once)...", flush=True)
            calibrate(path, threads, dtype=self.placement.dtype, load_format=s.load_format).save(profile)
        if profile.exists():
            self.settings = msgspec.structs.replace(s, calibration=str(profile))

    def count(self, kind: str) -> int:
        if self.colocated and kind in ("prefill", "decode", "cachestore"):
            return 0
        return {"prefill": self.prefill, "decode": self.decode, "cachestore": self.cachestore,
                "worker": self.colocated, "conductor": self.conductor}.get(kind, 1)

    def start_service(self, kind: str, index: int) -> subprocess.Popen:
        name = f"{kind}-{index}"
        s = self.settings
        cmd = [
            sys.executable, "-m", "yuebing.cli", "serve", kind,
            "--instance-id", name,
            "--model", s.model,
            "--data-dir", str(self.data_dir),
            "--models-dir", str(self.settings.resolved_models_dir()),
        ]
        if kind == "gateway":
            cmd += ["--host", s.host, "--port", str(s.port)]
            self.metrics_urls[name] = f"{self.url}/metrics"
        else:
            if name not in self._ports:
                self._ports[name] = free_port(s.host)
            port = self._ports[name]
            cmd += ["--host", s.host, "--metrics-port", str(port)]
            self.metrics_urls[name] = f"http://{s.host}:{port}/metrics"
        env = dict(os.environ, **self.extra_env)
        # a bus user of its own (least privilege: libs/natsserver.py permissions)
        env["YUEBING_NATS_URL"] = self.nats.url_for(self.nats.add_user(kind, name))  # in the environment: a password
        if kind in ("prefill", "decode", "worker") and s.engine != "sim":
            # Model workers share the cores: an idle OpenMP thread sleeps instead of spinning, so a
            # decode step is not slowed by the other process's threads waiting for work.
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        for f in FORWARDED:
            env[f"YUEBING_{f.upper()}"] = str(getattr(s, f))
        if kind in ("prefill", "decode", "worker") and self.cores is not None:
            planned = self._model_workers()
            if name in planned:
                w = planned.index(name)
                env["YUEBING_THREADS"], env["YUEBING_CPUS"] = str(self.cores.threads(w)), self.cores.cpus(w)
            else:  # an instance beyond the plan (added later): one thread, anywhere
                env["YUEBING_THREADS"], env["YUEBING_CPUS"] = "1", ""
        env["YUEBING_RESTARTS"] = str(self.restarts.restarts(name))  # in its heartbeat and metrics
        if kind == "gateway":
            env["YUEBING_API_KEYS"] = s.api_keys  # only the gateway needs them
            env["YUEBING_DASHBOARD"] = s.dashboard
        out = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env, start_new_session=True,
                                preexec_fn=die_with_parent)
        self.procs[name] = proc
        self.started_at[name] = time.monotonic()
        log.info("service_spawned", name=name, pid=proc.pid)
        return proc

    def supervise(self, now: float) -> list[str]:
        """Restart the services that exited, with backoff (``yuebing.supervisor``); give up on one
        in a crash loop while the rest keeps serving. Returns what happened, a line each."""
        said = []
        for name, proc in list(self.procs.items()):
            if proc.poll() is None or name in self._due or self.restarts.given_up(name):
                continue
            when = self.restarts.exited(name, self.started_at.get(name, now), now)
            tail = " | ".join(self.last_lines(name))
            if when is None:
                log.error("service_given_up", name=name, returncode=proc.returncode,
                          exits=self.restarts.recent_exits(name), last_lines=tail)
                said.append(f"{name} exited with {proc.returncode} {self.restarts.recent_exits(name)} times within "
                            f"{self.restart_policy.window:.0f}s: given up on, the rest keeps serving; "
                            f"its last lines: {tail}")
                continue
            self._due[name] = when
            log.warning("service_exited", name=name, returncode=proc.returncode, restart_in=round(when - now, 2),
                        last_lines=tail)
            said.append(f"{name} exited with {proc.returncode}; restarting in {when - now:.1f}s "
                        f"(restart {self.restarts.restarts(name)}); its last lines: {tail}")
        for name, when in list(self._due.items()):
            if when <= now:
                del self._due[name]
                kind, index = name.rsplit("-", 1)
                self.start_service(kind, int(index))
                log.info("service_restarted", name=name, restarts=self.restarts.restarts(name))
                said.append(f"{name} restarted")
        return said

    def last_lines(self, name: str, n: int = 3) -> list[str]:
        """The last ``n`` lines of a service's log (its exit's why, usually)."""
        try:
            with open(self.log_dir / f"{name}.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return []
        return [line.strip()[:300] for line in lines[-n:] if line.strip()]

    def health(self) -> dict | None:
        """The gateway's /health body (200 when ready, 503 when not: the same body), or None when
        the gateway does not answer."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                return json.loads(e.read())
            except ValueError:
                return None
        except (OSError, ValueError):
            return None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        want = {"prefill": self.count("prefill") + self.colocated, "decode": self.count("decode") + self.colocated,
                "conductor": self.count("conductor"), "cachestore": self.count("cachestore")}
        while True:
            self._stop_point()
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}; see {self.log_dir / (name + '.log')}")
            h = self.health()
            if h and all(h["instances"].get(k, 0) >= n for k, n in want.items()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ready after {timeout}s: {h}")
            time.sleep(0.25)

    def stop(self, timeout: float = 15.0) -> list[str]:
        """SIGTERM every service, SIGKILL those still running after ``timeout`` seconds, then stop
        NATS. Returns the names of the services that had to be killed."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        killed = []
        for name, p in self.procs.items():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("service_killed", name=name)
                killed.append(name)
                p.kill()
                p.wait()
        if self.nats is not None:
            self.nats.stop()
        return killed

    def _pids(self) -> list[tuple[str, int]]:
        """(kind, pid) of every process: the services by kind ("prefill", "decode", ...) and "nats-server"."""
        pids = [(name.rsplit("-", 1)[0], p.pid) for name, p in self.procs.items()]
        if self.nats is not None and self.nats.proc is not None:
            pids.append(("nats-server", self.nats.proc.pid))
        return pids

    def usage(self) -> dict[str, dict[str, float]]:
        """What each kind of process has used so far: ``cpu_seconds`` (user + system),
        ``cpu_system_seconds`` (the kernel's part) and ``page_faults`` (minor and major: every page
        a service takes anew from the kernel; from /proc, none where there is no /proc). A process
        that has exited counts nothing."""
        use: dict[str, dict[str, float]] = {"cpu_seconds": {}, "cpu_system_seconds": {}, "page_faults": {}}
        for kind, pid in self._pids():
            try:
                t = psutil.Process(pid).cpu_times()
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            figures = {"cpu_seconds": t.user + t.system, "cpu_system_seconds": t.system}
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                figures["page_faults"] = int(fields[7]) + int(fields[9])  # minflt, majflt
            except OSError:
                pass
            for name, value in figures.items():
                use[name][kind] = use[name].get(kind, 0) + value
        return use

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) each kind of process has used so far."""
        return self.usage()["cpu_seconds"]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.procs[name].send_signal(sig)
        self.procs[name].wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
