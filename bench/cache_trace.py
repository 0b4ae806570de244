"""``yuebing bench prefix|transfer|trace``: what the KV-cache pool buys, each against a baseline in the same run.

``bench prefix`` (default model SmolLM2-135M): time to first token of a 2,048-token prompt whose first
1,984 tokens are in the pool but not on the prefill instance that serves it, against the cold TTFT of
2,048-token prompts nothing has seen. A cluster with two prefill instances placed round robin (so
consecutive requests alternate), one decode, one cachestore. A "seed" request (the shared prefix and
other 64 tokens) lands on instance A and leaves its blocks in the pool; the next request (the shared
prefix and 64 new tokens) lands on instance B, which must load the 124 blocks from the pool (checked:
``cached_tokens`` and B's ``prefix_cache_hits_total{source="pool"}``). After every request the
benchmark waits until the pool holds all its full blocks and the conductor's index has caught up, so
each measurement starts on an idle cluster. Requests are streaming ``/v1/completions`` with token-id
prompts and ``max_tokens`` 1; TTFT is send -> first SSE event.

``bench transfer``: KV block bytes/s from the pool to a client over NATS (``CacheClient.get_blocks`` of
N blocks of the default model's block shape, against a real nats-server and a ``CacheStoreService`` in
its own process) against raw nats-py pub/sub of the same bytes in the same run: one publisher (also in
its own process, like the store), one subscriber (this process), messages the size of the pool's
chunks, timed from the request that starts the burst until the subscriber has every byte (the
publisher ends with a core NATS flush). Rounds of the two alternate; medians are reported.

``bench trace``: replay the first ``--requests`` requests of the Mooncake conversation trace, scaled as
its README says (every hash id -> a deterministic block of ``512 / token_scale`` token ids; a request's
input = its hash-id blocks, truncated to ``input_length / token_scale`` tokens), ``max_tokens`` 1,
timestamps not honoured: requests go in trace order with at most ``--concurrency`` in flight (default 1:
sequential), and each one is "settled" before its slot is freed: the pool holds its last full block (the
prefill writes a prompt's blocks in order, after answering) and the conductor's index has caught up.
Compressing an hour into a minute would otherwise send the next turn of a conversation while the previous
turn's blocks are still being written, a race real traffic (turns seconds to minutes apart) does not have;
``--no-settle`` replays without it. On a tiny model (the real tokenizer, a context raised to 32,768) against fresh clusters of
two prefill instances: global (global_cache_aware with a pool larger than the working set), local-only
(round robin, no pool, each instance's own cache as large as that pool) and global with smaller pools.
Figure: hit ratio = sum(cached_tokens) / sum(prompt_tokens), next to the bound an unbounded cache
reaches on the same requests, computed from the trace itself. From the conductor's and prefills' logs,
the tokens of the bound each configuration did not reuse are split into: not available to the plan
(neither the chosen instance's cache nor the pool index had them), recomputed by choice (the
kvcache-balancing threshold predicted recomputing faster than loading) and planned but not loaded;
failures of the cache path found in the logs are counted too.

Each prints a table and a final JSON line of named figures (also written to ``--out``).

``bench trace FILE --url URL`` is another tool: an open-loop replay of the trace against a running
OpenAI-compatible server, under SLOs (``bench.replay``); ``trace_main`` dispatches to it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from yuebing.tables import format_table

DEFAULT_TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "conversation_trace.jsonl"
TRACE_BLOCK_TOKENS = 512  # tokens per hash id in the original trace
TOKEN_LO = 1000  # deterministic prompts use token ids in [TOKEN_LO, vocab): clear of special tokens
DEFAULT_BLOCK_SHAPE = (30, 2, 3, 16, 64)  # SmolLM2-135M: layers, K/V, kv heads, block size, head dim
TINY_CONTEXT = 32768

RAW_GO = "yb.bench.raw.go"
RAW_DATA = "yb.bench.raw.data"


# ================================================================ shared pieces
def _emit(title: str, rows: list[dict], cols: list[str], figures: dict, out: str | None) -> None:
    print(f"\n{title}")
    print(format_table(rows, cols))
    line = json.dumps(figures)
    print(line, flush=True)
    if out:
        Path(out).write_text(line + "\n")


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 2)


def _ratio(a, b, nd: int = 3):
    return round(a / b, nd) if a is not None and b else None


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _entry(body, args) -> int:
    """Logging quiet, SIGTERM unwinds like Ctrl-C (through the finally blocks that stop the cluster)."""
    from libs.log import configure

    configure("bench", level="WARNING")
    previous = None
    try:
        def on_term(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        pass
    try:
        return body(args)
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _models_dir(args) -> Path:
    from libs.engine.loading import default_data_dir

    if getattr(args, "models_dir", None):
        return Path(args.models_dir).expanduser()
    return default_data_dir() / "models"


def _release_data_dir(own: str | None, clean: bool, logs: str) -> None:
    """Delete the run's own temporary data dir after a clean run; keep it (and say where) otherwise."""
    if own is None:
        return
    if clean:
        shutil.rmtree(own, ignore_errors=True)
    else:
        _say(f"kept {own} ({logs})")


def _data_dir(args, prefix: str) -> tuple[Path, str | None]:
    """The run's data dir: ``--data-dir`` or a fresh temporary one (returned second, to delete)."""
    if getattr(args, "data_dir", None):
        d = Path(args.data_dir).expanduser()
        d.mkdir(parents=True, exist_ok=True)
        return d, None
    own = tempfile.mkdtemp(prefix=prefix)
    return Path(own), own


def det_tokens(seed: int, n: int, vocab: int) -> list[int]:
    """``n`` token ids in [TOKEN_LO, vocab), the same for the same seed on every run."""
    rng = random.Random(seed)
    return [rng.randrange(TOKEN_LO, vocab) for _ in range(n)]


# ---------------------------------------------------------------- HTTP
@dataclass
class Reply:
    ok: bool
    ttft: float | None = None
    request_id: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


async def _model_name(session, base: str) -> str:
    from bench.sse import first_model

    return (await first_model(session, base))["id"]


def _body(model_name: str, prompt: list[int], stream: bool) -> dict:
    body = {"model": model_name, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


async def _stream(session, url: str, body: dict) -> Reply:
    """One streaming request (``bench.sse``); TTFT = send -> first SSE event (with max_tokens 1 the
    first token is sent at once, even when its text is empty and only the finishing chunk carries it)."""
    from bench.sse import stream_completion

    s = await stream_completion(session, url, body)
    res = Reply(ok=False, request_id=s.request_id, error=s.error)
    if s.first_event is not None:
        res.ttft = s.first_event - s.sent
    if not s.ok:
        return res
    if s.usage is None:
        res.error = "no usage chunk in the stream"
        return res
    res.prompt_tokens = s.prompt_tokens or 0
    res.cached_tokens = s.cached_tokens or 0
    res.ok = True
    return res


async def _complete(session, url: str, body: dict) -> Reply:
    """One non-streaming request: its usage."""
    res = Reply(ok=False)
    sent = time.perf_counter()
    try:
        async with session.post(url, json=body) as r:
            text = await r.read()
            if r.status != 200:
                res.error = f"HTTP {r.status}: {text[:300]!r}"
                return res
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001
        res.error = repr(e)
        return res
    res.ttft = time.perf_counter() - sent
    usage = data.get("usage") or {}
    res.request_id = data.get("id", "")
    res.prompt_tokens = int(usage.get("prompt_tokens", 0))
    res.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    res.ok = True
    return res


# ---------------------------------------------------------------- metrics and logs
def parse_prometheus(text: str) -> dict[str, dict[str, float]]:
    """``{metric name: {label string: value}}`` from the Prometheus text format."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        try:
            head, value = line.rsplit(" ", 1)
            v = float(value)
        except ValueError:
            continue
        name, _, labels = head.partition("{")
        out.setdefault(name, {})[labels.rstrip("}")] = v
    return out


async def _prefill_counters(session, url: str) -> dict[str, float]:
    """A prefill instance's prefix-cache counters: prompt tokens queried, hit locally, hit in the pool."""
    async with session.get(url) as r:
        m = parse_prometheus(await r.text())
    hits = m.get("yuebing:prefix_cache_hits_total", {})
    return {
        "queries": sum(m.get("yuebing:prefix_cache_queries_total", {}).values()),
        "local": hits.get('source="local"', 0.0),
        "pool": hits.get('source="pool"', 0.0),
    }


def prefill_log_records(log_dir: Path) -> dict[str, dict]:
    """The prefill instances' ``prefilled`` log lines by request id (load and compute seconds)."""
    out: dict[str, dict] = {}
    for f in sorted(Path(log_dir).glob("prefill-*.log")):
        for line in f.read_text(errors="replace").splitlines():
            if '"prefilled"' not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "prefilled" and rec.get("request_id"):
                rec["file"] = f.stem
                out[rec["request_id"]] = rec
    return out


class PoolProbe:
    """Asks the pool (``CacheClient.lookup``) and the conductor (its index summary) whether the
    cluster has finished writing a request's blocks: the way to make sure it is idle."""

    def __init__(self, nats_url: str, cachestore_ids: list[str]):
        self.url = nats_url
        self.cachestore_ids = cachestore_ids
        self.nc = None
        self.cache = None

    async def start(self) -> "PoolProbe":
        from libs.kv.client import CacheClient
        from libs.bus import connect

        self.nc = await connect(self.url, "bench-probe")
        self.cache = CacheClient(self.nc, timeout=10.0)
        await self.cache.start()
        if not await self.cache.wait_for_pool(30):
            raise RuntimeError("no cachestore instance heard from within 30 s")
        return self

    async def close(self) -> None:
        if self.cache is not None:
            await self.cache.close()
        if self.nc is not None:
            await self.nc.close()

    async def pool_total(self) -> int:
        from libs.protocol import KVDump, KVDumpRequest, Subjects, decode, encode

        total = 0
        for iid in self.cachestore_ids:
            raw = await self.nc.request(Subjects.kv_dump(iid), encode(KVDumpRequest(limit=1)), timeout=10)
            total += decode(raw.data, KVDump).total
        return total

    async def index_pool_blocks(self) -> int:
        from libs.protocol import IndexSummary, Subjects, decode

        raw = await self.nc.request(Subjects.CONDUCTOR_STATE, b"", timeout=10)
        return decode(raw.data, IndexSummary).pool_blocks

    async def settle(self, keys: list[bytes], timeout: float = 300.0, poll: float = 0.1) -> bool:
        """Wait until the pool holds every key and the conductor's index holds all the pool has."""
        deadline = time.monotonic() + timeout
        while await self.cache.lookup(keys) < len(keys):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(poll)
        while True:
            try:
                if await self.index_pool_blocks() >= await self.pool_total():
                    return True
            except Exception:  # noqa: BLE001 - busy or restarting: ask again
                pass
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(poll)


# ================================================================ bench prefix
@dataclass
class PrefixMeasure:
    kind: str  # warm | cold | seed | hit
    rep: int
    reply: Reply
    instance: str | None = None
    local_hit: float = 0.0
    pool_hit: float = 0.0
    settled: bool = True
    load_s: float | None = None
    compute_s: float | None = None


async def run_prefix(cluster, model_dir: Path, *, prompt_tokens: int, shared_tokens: int, cold: int, repeats: int,
                     seed: int = 20240, progress: bool = True) -> tuple[list[PrefixMeasure], list[str]]:
    """The measured requests (see the module docstring) and the problems seen (empty when clean)."""
    import aiohttp
    from tqdm import tqdm

    from libs.kv.keys import block_hashes, namespace_digest
    from libs.engine.loading import model_identity, read_shape

    shape = read_shape(model_dir)
    bs = cluster.settings.block_size
    ns = namespace_digest(model_identity(model_dir), shape.dtype_name, bs)
    vocab = shape.vocab_size
    tail = prompt_tokens - shared_tokens
    prefills = sorted(n for n in cluster.metrics_urls if n.startswith("prefill-"))
    stores = sorted(n for n in cluster.procs if n.startswith("cachestore-"))
    problems: list[str] = []
    measures: list[PrefixMeasure] = []
    url = cluster.url + "/v1/completions"
    probe = await PoolProbe(cluster.nats.url, stores).start()
    total = 2 + 2 + 2 + cold + 2 * repeats
    bar = tqdm(total=total, desc="bench prefix", unit="req", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=900)) as session:
            name = await _model_name(session, cluster.url)

            async def send(kind: str, rep: int, prompt: list[int]) -> PrefixMeasure:
                before = {p: await _prefill_counters(session, cluster.metrics_urls[p]) for p in prefills}
                reply = await _stream(session, url, _body(name, prompt, stream=True))
                m = PrefixMeasure(kind, rep, reply)
                if reply.ok:
                    # idle before the next measurement: every full block in the pool, the index caught up
                    m.settled = await probe.settle(block_hashes(prompt, bs, ns))
                    if not m.settled:
                        problems.append(f"{kind} {rep}: the pool did not get all {len(prompt) // bs} blocks "
                                        f"of the prompt within the timeout")
                    after = {p: await _prefill_counters(session, cluster.metrics_urls[p]) for p in prefills}
                    landed = [p for p in prefills if after[p]["queries"] > before[p]["queries"]]
                    m.instance = landed[0] if len(landed) == 1 else None
                    if m.instance:
                        m.local_hit = after[m.instance]["local"] - before[m.instance]["local"]
                        m.pool_hit = after[m.instance]["pool"] - before[m.instance]["pool"]
                else:
                    problems.append(f"{kind} {rep}: request failed: {reply.error}")
                measures.append(m)
                bar.update(1)
                return m

            # warm-up, not measured: a short prompt and a long cold one on each instance, one seed/hit pair
            for i in range(2):
                await send("warm", i, det_tokens(seed + 900 + i, 64, vocab))
            for i in range(2):
                await send("warm", 2 + i, det_tokens(seed + 910 + i, prompt_tokens, vocab))
            pre = det_tokens(seed + 920, shared_tokens, vocab)
            await send("warm", 4, pre + det_tokens(seed + 921, tail, vocab))
            await send("warm", 5, pre + det_tokens(seed + 922, tail, vocab))
            # Cold and hit measurements alternate, so a drift in the machine's load touches both alike.
            want = (shared_tokens // bs) * bs
            for r in range(max(cold, repeats)):
                # (a) cold: a unique prompt
                if r < cold:
                    m = await send("cold", r, det_tokens(seed + 1000 + r, prompt_tokens, vocab))
                    if m.reply.ok and m.reply.cached_tokens:
                        problems.append(f"cold {r}: cached_tokens {m.reply.cached_tokens}, expected 0")
                if r >= repeats:
                    continue
                # (b) hit: the seed (on A) writes the shared prefix to the pool; the next request lands on B
                shared = det_tokens(seed + 2000 + r, shared_tokens, vocab)
                s = await send("seed", r, shared + det_tokens(seed + 3000 + r, tail, vocab))
                h = await send("hit", r, shared + det_tokens(seed + 4000 + r, tail, vocab))
                if not (s.reply.ok and h.reply.ok):
                    continue
                if s.instance is None or h.instance is None or s.instance == h.instance:
                    problems.append(f"hit {r}: seed on {s.instance}, hit on {h.instance}: expected two different "
                                    f"instances (round robin)")
                if h.reply.cached_tokens != want:
                    problems.append(f"hit {r} (request {h.reply.request_id} on {h.instance}): cached_tokens "
                                    f"{h.reply.cached_tokens}, expected {want}")
                if h.pool_hit != want:
                    problems.append(f"hit {r} (request {h.reply.request_id} on {h.instance}): pool hit tokens "
                                    f"{h.pool_hit:.0f} (local {h.local_hit:.0f}), expected {want} from the pool")
    finally:
        bar.close()
        await probe.close()
    logs = prefill_log_records(cluster.log_dir)
    for m in measures:
        rec = logs.get(m.reply.request_id)
        if rec:
            m.load_s, m.compute_s = rec.get("load_s"), rec.get("compute_s")
    return measures, problems


def prefix_main(args) -> int:
    return _entry(_prefix, args)


def _prefix(args) -> int:
    from yuebing.cluster import LocalCluster
    from libs.config import from_env
    from libs.engine.loading import DEFAULT_MODEL, resolve_model
    from libs.natsserver import free_port

    prompt_tokens = int(getattr(args, "prompt_tokens", 2048))
    shared_tokens = int(getattr(args, "shared_tokens", 1984))
    cold = int(getattr(args, "cold", 3))
    repeats = int(getattr(args, "repeats", 3))
    progress = bool(getattr(args, "progress", True))
    if not 0 < shared_tokens < prompt_tokens:
        raise SystemExit("--shared-tokens must be between 0 and --prompt-tokens")
    spec = getattr(args, "model", None) or DEFAULT_MODEL
    models_dir = _models_dir(args)
    model_dir = resolve_model(spec, models_dir)
    data_dir, own = _data_dir(args, "yuebing-bench-prefix-")
    settings = from_env(model=str(model_dir), data_dir=str(data_dir), models_dir=str(models_dir), port=free_port(),
                        block_size=getattr(args, "block_size", None), threads=getattr(args, "threads", None) or None,
                        policy="round_robin", use_pool=True, no_auth=True)  # a private loopback cluster
    if shared_tokens % settings.block_size:
        raise SystemExit(f"--shared-tokens must be a multiple of the block size ({settings.block_size})")
    cluster = LocalCluster(settings, prefill=2, decode=1, cachestore=1)
    _say(f"bench prefix: model {model_dir}, prompts of {prompt_tokens} tokens ({shared_tokens} shared), "
         f"{cold} cold, {repeats} hits; cluster logs in {cluster.log_dir}")
    started = time.perf_counter()
    clean = False
    try:
        try:
            t0 = time.perf_counter()
            cluster.start(ready_timeout=300)
            _say(f"cluster ready in {time.perf_counter() - t0:.1f}s at {cluster.url} (2 prefill round robin, "
                 f"1 decode, 1 cachestore; cores: {cluster.describe_cores()})")
            measures, problems = asyncio.run(run_prefix(
                cluster, model_dir, prompt_tokens=prompt_tokens, shared_tokens=shared_tokens, cold=cold,
                repeats=repeats, progress=progress))
        finally:
            _say("stopping the cluster...")
            cluster.stop()
        clean = not problems
    finally:
        _release_data_dir(own, clean, f"cluster logs in {cluster.log_dir}")

    rows = []
    for m in measures:
        if m.kind == "warm":
            continue
        rows.append({"request": f"{m.kind} {m.rep}", "instance": m.instance,
                     "TTFT ms": _ms(m.reply.ttft), "cached": m.reply.cached_tokens if m.reply.ok else None,
                     "pool hit": int(m.pool_hit), "local hit": int(m.local_hit),
                     "load ms": _ms(m.load_s), "compute ms": _ms(m.compute_s),
                     "ok": "yes" if m.reply.ok and m.settled else "NO"})
    colds = [m for m in measures if m.kind == "cold" and m.reply.ok]
    hits = [m for m in measures if m.kind == "hit" and m.reply.ok]
    cold_ttft = _median([m.reply.ttft for m in colds])
    hit_ttft = _median([m.reply.ttft for m in hits])
    rows.append({"request": "median cold", "TTFT ms": _ms(cold_ttft), "compute ms": _ms(_median([m.compute_s for m in colds]))})
    rows.append({"request": "median hit", "TTFT ms": _ms(hit_ttft), "cached": _median([m.reply.cached_tokens for m in hits]),
                 "pool hit": _median([m.pool_hit for m in hits]), "load ms": _ms(_median([m.load_s for m in hits])),
                 "compute ms": _ms(_median([m.compute_s for m in hits]))})
    figures = {
        "model": DEFAULT_MODEL if spec == DEFAULT_MODEL else model_dir.name,
        "prompt_tokens": prompt_tokens,
        "shared_tokens": shared_tokens,
        "cold_runs": len(colds),
        "hit_runs": len(hits),
        "cold_ttft_ms": _ms(cold_ttft),
        "hit_ttft_ms": _ms(hit_ttft),
        "hit_vs_cold_ttft": _ratio(hit_ttft, cold_ttft),
        "cached_tokens": min((m.reply.cached_tokens for m in hits), default=None),
        "pool_hit_tokens": int(min((m.pool_hit for m in hits), default=0)),
        "hit_pool_load_ms": _ms(_median([m.load_s for m in hits])),
        "hit_compute_ms": _ms(_median([m.compute_s for m in hits])),
        "cold_compute_ms": _ms(_median([m.compute_s for m in colds])),
        "cold_ttfts_ms": [_ms(m.reply.ttft) for m in colds],
        "hit_ttfts_ms": [_ms(m.reply.ttft) for m in hits],
        "problems": len(problems),
        "seconds": round(time.perf_counter() - started, 1),
    }
    for p in problems:
        _say(f"PROBLEM: {p}")
    cols = ["request", "instance", "TTFT ms", "cached", "pool hit", "local hit", "load ms", "compute ms", "ok"]
    _emit(f"model {figures['model']}: {prompt_tokens}-token prompts, max_tokens 1; hit = {shared_tokens} tokens in "
          f"the pool, not on the serving instance; load/compute from the prefill's log", rows, cols, figures,
          getattr(args, "out", None))
    return 1 if problems else 0


# ================================================================ bench transfer
def _raw_publisher_main(argv: list[str]) -> int:
    """``python -m bench.cache_trace raw-publisher NATS_URL``: publishes bursts on request."""
    import nats

    from libs.bus import synced

    url = argv[0]

    async def run() -> None:
        nc = await nats.connect(url, name="bench-raw-publisher", max_reconnect_attempts=-1)
        buffers: dict[int, bytes] = {}
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        async def on_go(msg) -> None:
            spec = json.loads(msg.data)
            total, size = int(spec["bytes"]), int(spec["msg_bytes"])
            if total > 0:
                buf = buffers.get(size)
                if buf is None:
                    buf = buffers[size] = os.urandom(size)
                sent = 0
                while sent < total:
                    n = min(size, total - sent)
                    await nc.publish(RAW_DATA, buf if n == size else buf[:n])
                    sent += n
                await nc.flush(timeout=120)
            await msg.respond(b"done")

        await nc.subscribe(RAW_GO, cb=on_go)
        await synced(nc)
        await stop.wait()
        await nc.close()

    asyncio.run(run())
    return 0


@dataclass
class TransferRound:
    kind: str  # pool | layers | raw | put | put_many
    seconds: float
    nbytes: int
    ok: bool = True
    error: str = ""

    @property
    def mb_s(self) -> float | None:
        return self.nbytes / self.seconds / 1e6 if self.ok and self.seconds > 0 else None


async def run_transfer(nats_url: str, *, blocks: int, shape: tuple[int, ...], repeats: int, put_batch: int = 16,
                       progress: bool = True) -> tuple[list[TransferRound], dict]:
    import torch
    from tqdm import tqdm

    from libs.kv.client import CacheClient
    from libs.kv.codec import encode_block
    from libs.bus import BULK_PENDING_BYTES, connect, synced
    from libs.protocol import CHUNK_DATA_BYTES

    nc = await connect(nats_url, "bench-transfer")
    cache = CacheClient(nc, timeout=120.0)
    rounds: list[TransferRound] = []
    try:
        await cache.start()
        if not await cache.wait_for_pool(60):
            raise RuntimeError("the cachestore did not announce itself within 60 s")
        gen = torch.Generator().manual_seed(7)
        keys = [hashlib.blake2b(f"bench-transfer-{i}".encode(), digest_size=16).digest() for i in range(blocks)]
        tensors = [torch.randn(shape, generator=gen, dtype=torch.float32) for _ in range(blocks)]
        block_bytes = tensors[0].numel() * tensors[0].element_size()
        total = block_bytes * blocks
        encoded = len(encode_block(keys[0], tensors[0]))
        msg_bytes = min(encoded, CHUNK_DATA_BYTES)  # what the pool sends per chunk
        bar = tqdm(total=blocks, desc="put blocks", unit="block", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True)
        try:
            for k, t in zip(keys, tensors):
                await cache.put_block(k, t, timeout=60)
                bar.update(1)
        finally:
            bar.close()
        if await cache.lookup(keys) != blocks:
            raise RuntimeError("the pool does not hold every block just put")

        # the raw subscriber: counts bytes, sets `done` once it has the whole burst
        state = {"bytes": 0, "want": 0}
        done = asyncio.Event()

        async def on_data(msg) -> None:
            state["bytes"] += len(msg.data)
            if state["bytes"] >= state["want"]:
                done.set()

        await nc.subscribe(RAW_DATA, cb=on_data, pending_bytes_limit=BULK_PENDING_BYTES, pending_msgs_limit=1 << 20)
        await synced(nc)
        deadline = time.monotonic() + 60
        while True:  # the publisher is up when it answers an empty burst
            try:
                await nc.request(RAW_GO, json.dumps({"bytes": 0, "msg_bytes": msg_bytes}).encode(), timeout=2)
                break
            except Exception:  # noqa: BLE001 - not subscribed yet
                if time.monotonic() > deadline:
                    raise RuntimeError("the raw publisher did not answer within 60 s") from None
                await asyncio.sleep(0.2)

        async def pool_round() -> TransferRound:
            t0 = time.perf_counter()
            got = await cache.get_blocks(keys, timeout=120)
            dt = time.perf_counter() - t0
            if len(got) != blocks:
                return TransferRound("pool", dt, total, False, f"got {len(got)} of {blocks} blocks")
            for i in (0, blocks - 1):  # bit-identical (outside the timing)
                if not torch.equal(got[keys[i]], tensors[i]):
                    return TransferRound("pool", dt, total, False, f"block {i} differs from what was put")
            return TransferRound("pool", dt, sum(t.numel() * t.element_size() for t in got.values()))

        from libs.engine.prefill_kv import PrefillKV

        bs = shape[3]

        async def layers_round() -> TransferRound:
            # what a prefill does on a pool hit: stream every block, layer by layer, into the
            # request's preallocated KV buffer (allocated before the clock starts, as there)
            dest = PrefillKV(torch.empty((shape[0], 2, shape[2], blocks * bs, shape[4])), blocks * bs,
                             ready=False, timeout=120)
            t0 = time.perf_counter()
            n = await cache.load_layers(keys, dest, 0, timeout=120)
            dt = time.perf_counter() - t0
            if n != blocks:
                return TransferRound("layers", dt, total, False, f"loaded {n} of {blocks} blocks: {dest.failed}")
            for i in (0, blocks - 1):  # bit-identical (outside the timing)
                if not torch.equal(dest.kv[:, :, :, i * bs : (i + 1) * bs], tensors[i]):
                    return TransferRound("layers", dt, total, False, f"block {i} differs from what was put")
            return TransferRound("layers", dt, total)

        async def raw_round() -> TransferRound:
            state["bytes"], state["want"] = 0, total
            done.clear()
            t0 = time.perf_counter()
            req = asyncio.ensure_future(nc.request(
                RAW_GO, json.dumps({"bytes": total, "msg_bytes": msg_bytes}).encode(), timeout=120))
            try:
                await asyncio.wait_for(done.wait(), 120)
                dt = time.perf_counter() - t0
                await req
            except asyncio.TimeoutError:
                req.cancel()
                return TransferRound("raw", time.perf_counter() - t0, total, False,
                                     f"subscriber got {state['bytes']} of {total} bytes")
            return TransferRound("raw", dt, state["bytes"])

        fresh = iter(range(1, 1 << 30))

        async def put_round(batch: int) -> TransferRound:
            # new keys every round, so the store writes every block (DRAM and LMDB) as for a new
            # prompt; ``batch`` blocks per call: 1 is a put per block, more is what a prefill
            # sends for one prompt (one blob, one transaction)
            r = next(fresh)
            ks = [hashlib.blake2b(f"bench-put-{r}-{i}".encode(), digest_size=16).digest() for i in range(blocks)]
            kind = "put" if batch == 1 else "put_many"
            t0 = time.perf_counter()
            try:
                for i in range(0, blocks, batch):
                    await cache.put_blocks(list(zip(ks[i : i + batch], tensors[i : i + batch])), timeout=60)
            except Exception as e:  # noqa: BLE001 - a failed round is reported, not fatal
                return TransferRound(kind, time.perf_counter() - t0, total, False, repr(e))
            dt = time.perf_counter() - t0
            if await cache.lookup(ks) != blocks:
                return TransferRound(kind, dt, total, False, "the pool does not hold every block just put")
            return TransferRound(kind, dt, total)

        put_one = partial(put_round, 1)
        put_many = partial(put_round, put_batch)
        await pool_round()  # warm-up, not counted
        await layers_round()
        await raw_round()
        kinds = (layers_round, pool_round, raw_round, put_one, put_many)
        bar = tqdm(total=len(kinds) * repeats, desc="transfer rounds", unit="round", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        try:
            for _ in range(repeats):
                for fn in kinds:
                    rounds.append(await fn())
                    bar.update(1)
        finally:
            bar.close()
        info = {"block_bytes": block_bytes, "encoded_block_bytes": encoded, "msg_bytes": msg_bytes,
                "total_bytes": total, "messages": -(-total // msg_bytes)}
        return rounds, info
    finally:
        await cache.close()
        await nc.close()


def transfer_main(args) -> int:
    return _entry(_transfer, args)


def _parse_shape(spec) -> tuple[int, ...]:
    if isinstance(spec, (list, tuple)):
        shape = tuple(int(x) for x in spec)
    else:
        shape = tuple(int(x) for x in str(spec).replace(" ", "").split(",") if x)
    if len(shape) != 5 or shape[1] != 2 or min(shape) <= 0:
        raise SystemExit(f"--block-shape must be layers,2,kv_heads,block_size,head_dim, not {spec!r}")
    return shape


def _stop_proc(p: subprocess.Popen | None, timeout: float = 15.0) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _transfer(args) -> int:
    from libs.natsserver import NatsServer
    from libs.proc import die_with_parent

    blocks = int(getattr(args, "blocks", 124))
    repeats = int(getattr(args, "repeats", 5))
    put_batch = max(1, int(getattr(args, "put_batch", 16)))
    shape = _parse_shape(getattr(args, "block_shape", None) or DEFAULT_BLOCK_SHAPE)
    progress = bool(getattr(args, "progress", True))
    data_dir, own = _data_dir(args, "yuebing-bench-transfer-")
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    block_bytes = 4
    for d in shape:
        block_bytes *= d
    total = block_bytes * blocks
    _say(f"bench transfer: {blocks} blocks of {list(shape)} float32 ({block_bytes / 1024:.0f} KiB each, "
         f"{total / 1e6:.1f} MB a round), {repeats} rounds each; logs in {log_dir}")
    server = NatsServer(data_dir / "nats", log_file=log_dir / "nats-server.log")
    store = pub = None
    rounds: list[TransferRound] = []
    started = time.perf_counter()
    clean = False
    try:
        try:
            server.start()
            # the put rounds write 2 * repeats rounds of new blocks: the disk keeps them all
            env = dict(os.environ, YUEBING_DRAM_BYTES=str(max(1 << 30, 2 * total)),
                       YUEBING_DISK_BYTES=str(max(1 << 30, (2 * repeats + 2) * total)))
            with open(log_dir / "cachestore-0.log", "ab") as out:
                store = subprocess.Popen(
                    [sys.executable, "-m", "yuebing.cli", "serve", "cachestore", "--nats", server.url,
                     "--data-dir", str(data_dir), "--instance-id", "cachestore-0"],
                    stdout=out, stderr=out, env=env, start_new_session=True, preexec_fn=die_with_parent)
            with open(log_dir / "raw-publisher.log", "ab") as out:
                pub = subprocess.Popen(
                    [sys.executable, "-m", "bench.cache_trace", "raw-publisher", server.url],
                    stdout=out, stderr=out, start_new_session=True, preexec_fn=die_with_parent)
            rounds, info = asyncio.run(run_transfer(server.url, blocks=blocks, shape=shape, repeats=repeats,
                                                    put_batch=put_batch, progress=progress))
        finally:
            _stop_proc(pub)
            _stop_proc(store)
            server.stop()
        clean = all(r.ok for r in rounds)
    finally:
        _release_data_dir(own, clean, f"logs in {log_dir}")

    layers = [r for r in rounds if r.kind == "layers"]
    pool = [r for r in rounds if r.kind == "pool"]
    raw = [r for r in rounds if r.kind == "raw"]
    layers_mb = _median([r.mb_s for r in layers])
    pool_mb = _median([r.mb_s for r in pool])
    raw_mb = _median([r.mb_s for r in raw])
    put1 = [r for r in rounds if r.kind == "put"]
    putn = [r for r in rounds if r.kind == "put_many"]
    put1_mb = _median([r.mb_s for r in put1])
    putn_mb = _median([r.mb_s for r in putn])
    rows = []
    for kind, rs, what in (("pool get_blocks", pool, f"{blocks} blocks, chunked blobs, acked windows"),
                           ("pool load_layers", layers, f"{blocks} blocks layer by layer into a KV buffer"),
                           ("raw nats pub/sub", raw, f"{info['messages']} msgs of {info['msg_bytes']} B"),
                           ("pool put, 1 per call", put1, f"{blocks} new blocks, a blob and a transaction each"),
                           (f"pool put, {put_batch} per call", putn, f"{blocks} new blocks, one blob and "
                                                                     f"transaction per {put_batch}")):
        ok = [r for r in rs if r.ok]
        mbs = [round(r.mb_s, 1) for r in ok]
        rows.append({"path": kind, "what": what, "rounds": len(rs), "errors": len(rs) - len(ok),
                     "MB/s p50": _median(mbs), "MB/s min": min(mbs, default=None), "MB/s max": max(mbs, default=None),
                     "ms p50": _ms(_median([r.seconds for r in ok]))})
    figures = {
        "blocks": blocks,
        "block_shape": list(shape),
        "block_bytes": info["block_bytes"],
        "bytes_per_round": info["total_bytes"],
        "raw_msg_bytes": info["msg_bytes"],
        "rounds": repeats,
        # pool_*: the batched get (blocks as tensors); layers_*: the layer-wise load a prefill runs
        # under its compute, which also places every block into the request's KV buffer
        "pool_mb_s": round(pool_mb, 1) if pool_mb else None,
        "raw_nats_mb_s": round(raw_mb, 1) if raw_mb else None,
        "pool_vs_raw": _ratio(pool_mb, raw_mb),
        "layers_mb_s": round(layers_mb, 1) if layers_mb else None,
        "layers_vs_raw": _ratio(layers_mb, raw_mb),
        "pool_round_ms": [_ms(r.seconds) for r in pool],
        "layers_round_ms": [_ms(r.seconds) for r in layers],
        "raw_round_ms": [_ms(r.seconds) for r in raw],
        # writes of new blocks into the pool (DRAM and LMDB), a block per call vs put_batch per call
        "put_batch": put_batch,
        "put_one_mb_s": round(put1_mb, 1) if put1_mb else None,
        "put_many_mb_s": round(putn_mb, 1) if putn_mb else None,
        "put_many_vs_one": _ratio(putn_mb, put1_mb),
        "errors": sum(not r.ok for r in rounds),
        "seconds": round(time.perf_counter() - started, 1),
    }
    for r in rounds:
        if not r.ok:
            _say(f"PROBLEM: {r.kind} round: {r.error}")
    cols = ["path", "rounds", "errors", "MB/s p50", "MB/s min", "MB/s max", "ms p50", "what"]
    _emit(f"{info['total_bytes'] / 1e6:.1f} MB per round (MB = 10^6 bytes of KV); cachestore and raw publisher each "
          f"in their own process, this process receives", rows, cols, figures, getattr(args, "out", None))
    return 0 if clean else 1


# ================================================================ bench trace
def load_trace(path: Path, n: int) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
                if len(out) >= n:
                    break
    return out


class TraceTokens:
    """Hash id -> its deterministic block of ``block_tokens`` token ids (same id, same tokens)."""

    def __init__(self, block_tokens: int, vocab: int, seed: int = 0):
        self.block_tokens = block_tokens
        self.vocab = vocab
        self.seed = seed
        self._cache: dict[int, list[int]] = {}

    def block(self, hash_id: int) -> list[int]:
        ids = self._cache.get(hash_id)
        if ids is None:
            ids = self._cache[hash_id] = det_tokens(self.seed * 1_000_003 + int(hash_id), self.block_tokens, self.vocab)
        return ids

    def prompt(self, req: dict, token_scale: int) -> tuple[list[int], list[int]]:
        """A request's scaled prompt and the hash ids it uses (its last block may be partial)."""
        n = max(1, int(req["input_length"]) // token_scale)
        used = req["hash_ids"][: -(-n // self.block_tokens)]
        ids: list[int] = []
        for h in used:
            ids.extend(self.block(h))
        return ids[:n], used


@dataclass
class TraceRequest:
    index: int  # line in the trace
    prompt: list[int]
    hash_ids: list[int]


def build_trace_requests(reqs: list[dict], token_scale: int, vocab: int, max_context: int,
                         seed: int = 0) -> tuple[list[TraceRequest], int]:
    """The scaled prompts that fit the context (room for one output token), and how many did not."""
    if TRACE_BLOCK_TOKENS % token_scale:
        raise SystemExit(f"--token-scale must divide {TRACE_BLOCK_TOKENS}")
    tokens = TraceTokens(TRACE_BLOCK_TOKENS // token_scale, vocab, seed)
    out, skipped = [], 0
    for i, r in enumerate(reqs):
        prompt, used = tokens.prompt(r, token_scale)
        if len(prompt) + 1 > max_context:
            skipped += 1
            continue
        out.append(TraceRequest(i, prompt, used))
    return out, skipped


def trace_bound(requests: list[TraceRequest], block_tokens: int, block_size: int) -> dict:
    """Prompt tokens an unbounded cache could reuse on these requests, in this order.

    ``bound`` (the trace README's definition): per request, the longest run of leading hash ids all
    seen in earlier requests, times the tokens of a hash block. ``bound_full_blocks``: the same run,
    counting of each hash block only the tokens that earlier requests stored as whole KV blocks (a
    request stores only its full blocks: the partial tail of a prompt never enters a cache). Both are
    capped like the system's reuse: whole KV blocks, and at least one prompt token computed.
    ``read_again_blocks``: how many of the ``distinct_blocks`` (every block a pool that keeps all
    would be written) a later request reuses at least once under that bound.
    """
    seen: set[int] = set()
    stored: dict[int, int] = {}  # hash id -> tokens of it held as whole KV blocks by earlier requests
    total = hit = hit_full = 0
    per_request: list[int] = []
    distinct_blocks: set[tuple[int, int]] = set()
    read: set[tuple[int, int]] = set()  # blocks reused: each one an earlier request stored, so among the distinct

    def name(r, b: int) -> tuple[int, int]:  # a KV block, named by where it ends: (hash id, offset)
        t = (b + 1) * block_size - 1
        return r.hash_ids[t // block_tokens], t % block_tokens

    for r in requests:
        n_tok = len(r.prompt)
        cap = ((n_tok - 1) // block_size) * block_size
        run = 0
        for h in r.hash_ids:
            if h not in seen:
                break
            run += 1
        per_request.append(min(run * block_tokens, cap))
        hit += per_request[-1]
        covered = 0
        for i, h in enumerate(r.hash_ids):
            mine = min(block_tokens, n_tok - i * block_tokens)
            have = stored.get(h, 0)
            covered += min(have, mine)
            if have < mine:
                break
        reused = min((covered // block_size) * block_size, cap)
        hit_full += reused
        read.update(name(r, b) for b in range(reused // block_size))
        total += n_tok
        full = (n_tok // block_size) * block_size  # what this request stores
        for i, h in enumerate(r.hash_ids):
            seen.add(h)
            held = max(0, min(block_tokens, full - i * block_tokens))
            if held > stored.get(h, 0):
                stored[h] = held
        distinct_blocks.update(name(r, b) for b in range(full // block_size))
    return {"prompt_tokens": total, "bound_tokens": hit, "bound_full_blocks_tokens": hit_full,
            "bound": hit / total if total else 0.0, "bound_full_blocks": hit_full / total if total else 0.0,
            "distinct_blocks": len(distinct_blocks), "read_again_blocks": len(read),
            "per_request": per_request}


@dataclass
class TraceConfig:
    name: str
    policy: str
    use_pool: bool
    dram_bytes: int
    disk_bytes: int
    prefill_cache_bytes: int


@dataclass
class TraceResult:
    config: TraceConfig
    replies: list[Reply] = field(default_factory=list)
    wall: float = 0.0
    local_tokens: float = 0.0
    pool_tokens: float = 0.0
    startup: float = 0.0
    settle: dict = field(default_factory=dict)
    misses: dict = field(default_factory=dict)
    log_problems: dict = field(default_factory=dict)

    @property
    def ok(self) -> list[Reply]:
        return [r for r in self.replies if r.ok]

    @property
    def errors(self) -> int:
        return len(self.replies) - len(self.ok)

    @property
    def hit(self) -> float | None:
        p = sum(r.prompt_tokens for r in self.ok)
        return sum(r.cached_tokens for r in self.ok) / p if p else None


def trace_configs(working_set: int, pool_fractions: list[float], names: list[str] | None = None) -> list[TraceConfig]:
    """The configurations of the replay, sized from the working set (bytes of its distinct blocks)."""
    mib = 1 << 20
    big = max(64 * mib, -(-2 * working_set // mib) * mib)  # the generous pool: twice the working set
    out = [
        TraceConfig("global", "global_cache_aware", True, big, big, max(4 * mib, working_set // 4)),
        TraceConfig("local", "round_robin", False, big, big, big),
    ]
    for f in pool_fractions:
        disk = max(mib, int(working_set * f))
        out.append(TraceConfig(f"pool_{round(f * 100)}pct", "global_cache_aware", True, max(mib // 2, disk // 2), disk,
                               max(mib // 2, working_set // 20)))
    if names:
        out = [c for c in out if c.name in names or (c.name.startswith("pool_") and "pool" in names)]
    return out


async def replay(cluster, requests: list[TraceRequest], concurrency: int, progress: bool = True,
                 desc: str = "replay", settle_keys: list[bytes | None] | None = None,
                 settle_timeout: float = 5.0, settle_give_up: int = 3) -> tuple[list[Reply], float, dict]:
    """Send ``requests`` in order, at most ``concurrency`` in flight. With ``settle_keys`` (per request,
    the key of its last full block, or None) each request's slot is held until the pool holds that
    block and the conductor's index has caught up: the prefill writes a prompt's blocks in order,
    so by then the request's writes are done (see ``bench trace --no-settle``). A pool that stops
    taking blocks would make every settle time out: after ``settle_give_up`` timeouts in a row the
    rest of the replay goes without settling. Returns the replies, the wall time and
    ``{"timeouts": n, "stopped_at": request index or None}``."""
    import aiohttp
    from tqdm import tqdm

    url = cluster.url + "/v1/completions"
    timeout = aiohttp.ClientTimeout(total=None, sock_read=900)
    probe = None
    if settle_keys is not None:
        stores = sorted(n for n in cluster.procs if n.startswith("cachestore-"))
        probe = await PoolProbe(cluster.nats.url, stores).start()
    settle = {"timeouts": 0, "stopped_at": None}
    in_a_row = 0
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            name = await _model_name(session, cluster.url)
            sem = asyncio.Semaphore(concurrency)
            bar = tqdm(total=len(requests), desc=desc, unit="req", file=sys.stderr, disable=not progress,
                       dynamic_ncols=True)

            async def one(i: int, r: TraceRequest) -> Reply:
                nonlocal in_a_row
                async with sem:
                    rep = await _complete(session, url, _body(name, r.prompt, stream=False))
                    key = settle_keys[i] if settle_keys is not None else None
                    if rep.ok and probe is not None and key is not None and settle["stopped_at"] is None:
                        if await probe.settle([key], settle_timeout, poll=0.005):
                            in_a_row = 0
                        else:
                            settle["timeouts"] += 1
                            in_a_row += 1
                            if in_a_row >= settle_give_up:
                                settle["stopped_at"] = i
                                _say(f"[{desc}] {in_a_row} settles in a row timed out (the pool does not get the "
                                     f"blocks): no more settling from request {i} on")
                bar.update(1)
                return rep

            t0 = time.perf_counter()
            try:
                if concurrency == 1:
                    replies = [await one(i, r) for i, r in enumerate(requests)]
                else:
                    replies = list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))
            finally:
                bar.close()
            return replies, time.perf_counter() - t0, settle
    finally:
        if probe is not None:
            await probe.close()


def miss_breakdown(log_dir: Path, replies: list[Reply], bounds: list[int], block_size: int) -> dict[str, int]:
    """Where the tokens the bound reuses and the run did not went, from the conductor's and the
    prefills' logs: ``unavailable`` (at scheduling time neither the chosen instance's own cache nor
    the conductor's pool index held them), ``recomputed`` (the index held them but the plan reused
    fewer: recomputing was predicted faster than loading), ``not_loaded`` (planned, but the prefill
    reused fewer), ``failed`` (the request failed)."""
    sched: dict[str, dict] = {}
    for line in (Path(log_dir) / "conductor-0.log").read_text(errors="replace").splitlines():
        if '"scheduled"' in line:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            sched[rec.get("request_id", "")] = rec
    pre = prefill_log_records(log_dir)
    out = {"unavailable": 0, "recomputed": 0, "not_loaded": 0, "failed": 0}
    for rep, bound in zip(replies, bounds):
        if not rep.ok:
            out["failed"] += bound
            continue
        miss = bound - rep.cached_tokens
        if miss <= 0:
            continue
        plan, p = sched.get(rep.request_id), pre.get(rep.request_id)
        if plan is None or p is None:
            out["failed"] += miss
            continue
        want = bound // block_size
        visible = max(int(plan.get("pool_blocks", 0)), int(plan.get("cached_blocks", 0)))
        if int(plan.get("cached_blocks", 0)) >= want:
            out["not_loaded"] += miss
        elif visible < want:
            # what the plan could see covers part of the miss; the rest of it was a decision
            unseen = min(miss, (want - visible) * block_size)
            out["unavailable"] += unseen
            out["recomputed"] += miss - unseen
        else:
            out["recomputed"] += miss
    return out


LOG_PROBLEMS = ("cache_put_failed", "block_store_failed", "pool_load_failed", "cache_get_failed", "prefill_failed")


def log_problems(log_dir: Path) -> dict[str, int]:
    """How many times each known cache-path failure appears in the cluster's logs."""
    counts = dict.fromkeys(LOG_PROBLEMS, 0)
    for f in Path(log_dir).glob("*.log"):
        for line in f.read_text(errors="replace").splitlines():
            for ev in LOG_PROBLEMS:
                if f'"event": "{ev}"' in line:
                    counts[ev] += 1
    return counts


async def _hit_counters(cluster) -> tuple[float, float]:
    import aiohttp

    local = pool = 0.0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for n, u in cluster.metrics_urls.items():
            if n.startswith("prefill-"):
                c = await _prefill_counters(session, u)
                local += c["local"]
                pool += c["pool"]
    return local, pool


def make_trace_model(out: Path, tokenizer_src: Path, max_context: int) -> Path:
    """The tiny random Llama of the tests, with its context raised so the scaled prompts fit."""
    from bench.models import random_llama

    cfg_path = out / "config.json"
    if cfg_path.exists() and json.loads(cfg_path.read_text()).get("max_position_embeddings") == max_context:
        return out
    shutil.rmtree(out, ignore_errors=True)
    return random_llama(out, tokenizer_src, max_context=max_context)


def _parse_floats(spec) -> list[float]:
    if isinstance(spec, (list, tuple)):
        return [float(x) for x in spec]
    return [float(x) for x in str(spec or "").replace(" ", "").split(",") if x]


def trace_main(args) -> int:
    """``yuebing bench trace``: with ``--url``, replay the trace against that server (``bench.replay``);
    without, the cache experiment of this module on clusters it starts (the trace: ``FILE`` or ``--trace``)."""
    if getattr(args, "url", None):
        from bench import replay

        return replay.main(args)
    return _entry(_trace, args)


def _trace(args) -> int:
    import torch

    from yuebing.cluster import LocalCluster
    from libs.kv.codec import encode_block
    from libs.kv.keys import block_hashes, namespace_digest
    from libs.config import from_env
    from libs.engine.loading import DEFAULT_MODEL, model_identity, read_shape, resolve_model
    from libs.natsserver import free_port

    trace_path = Path(getattr(args, "trace", None) or getattr(args, "file", None) or DEFAULT_TRACE)
    n_requests = int(getattr(args, "requests", None) or 1000)
    token_scale = int(getattr(args, "token_scale", 32))
    concurrency = max(1, int(getattr(args, "concurrency", 1)))
    fractions = _parse_floats(getattr(args, "pool_fractions", "0.5,0.25,0.1"))
    names = [x for x in str(getattr(args, "configs", "") or "").replace(" ", "").split(",") if x] or None
    progress = bool(getattr(args, "progress", True))
    settle = bool(getattr(args, "settle", True))
    threads = getattr(args, "threads", None) or 1
    max_context = int(getattr(args, "max_context", None) or TINY_CONTEXT)
    models_dir = _models_dir(args)
    data_dir, own = _data_dir(args, "yuebing-bench-trace-")
    started = time.perf_counter()
    results: list[TraceResult] = []
    clean = False
    try:
        if getattr(args, "model", None):
            model_dir = resolve_model(args.model, models_dir)
        else:
            model_dir = make_trace_model(data_dir / "models" / f"tiny-llama-ctx{max_context}",
                                         resolve_model(DEFAULT_MODEL, models_dir), max_context)
        shape = read_shape(model_dir)
        block_size = int(getattr(args, "block_size", None) or from_env().block_size)
        reqs = load_trace(trace_path, n_requests)
        requests, skipped = build_trace_requests(reqs, token_scale, shape.vocab_size, shape.max_context)
        bt = TRACE_BLOCK_TOKENS // token_scale
        bound = trace_bound(requests, bt, block_size)
        kv_shape = (shape.num_layers, 2, shape.num_kv_heads, block_size, shape.head_dim)
        block_bytes = len(encode_block(b"\0" * 16, torch.zeros(kv_shape, dtype=shape.dtype)))
        working_set = bound["distinct_blocks"] * block_bytes
        configs = trace_configs(working_set, fractions, names)
        settle_keys = None
        if settle:
            ns = namespace_digest(model_identity(model_dir), shape.dtype_name, block_size)
            settle_keys = [(block_hashes(r.prompt, block_size, ns) or [None])[-1] for r in requests]
        _say(f"bench trace: {len(requests)} of the first {len(reqs)} requests of {trace_path.name} (skipped "
             f"{skipped} longer than the context {shape.max_context}), token_scale {token_scale} ({bt} tokens per "
             f"hash id), {bound['prompt_tokens']} prompt tokens, {bound['distinct_blocks']} distinct blocks of "
             f"{block_bytes} B = working set {working_set / 1e6:.1f} MB; model {model_dir}; concurrency "
             f"{concurrency}{', each settled (its pool writes done) before the next' if settle else ''}; unbounded-cache bound {bound['bound']:.4f} (full blocks only {bound['bound_full_blocks']:.4f})")
        for cfg in configs:
            settings = from_env(model=str(model_dir), data_dir=str(data_dir / cfg.name), models_dir=str(models_dir),
                                port=free_port(), block_size=block_size, threads=threads, policy=cfg.policy,
                                use_pool=cfg.use_pool, dram_bytes=cfg.dram_bytes, disk_bytes=cfg.disk_bytes,
                                prefill_cache_bytes=cfg.prefill_cache_bytes, no_auth=True)
            cluster = LocalCluster(settings, prefill=2, decode=1, cachestore=1)
            res = TraceResult(cfg)
            try:
                t0 = time.perf_counter()
                cluster.start(ready_timeout=300)
                res.startup = time.perf_counter() - t0
                _say(f"[{cfg.name}] cluster ready in {res.startup:.1f}s: policy {cfg.policy}, pool "
                     f"{'on' if cfg.use_pool else 'off'}, cachestore dram {cfg.dram_bytes / 1e6:.1f} MB / disk "
                     f"{cfg.disk_bytes / 1e6:.1f} MB, prefill cache {cfg.prefill_cache_bytes / 1e6:.1f} MB each")
                res.replies, res.wall, res.settle = asyncio.run(
                    replay(cluster, requests, concurrency, progress, cfg.name, settle_keys))
                res.local_tokens, res.pool_tokens = asyncio.run(_hit_counters(cluster))
            finally:
                cluster.stop()
            res.misses = miss_breakdown(cluster.log_dir, res.replies, bound["per_request"], block_size)
            res.log_problems = log_problems(cluster.log_dir)
            results.append(res)
            _say(f"[{cfg.name}] hit ratio {res.hit}, errors {res.errors}, {res.wall:.1f}s; tokens of the bound "
                 f"missed: {res.misses}" + (f"; settling: {res.settle}" if settle else "")
                 + f"; problems in the logs: {res.log_problems}")
            for r in res.replies:
                if not r.ok:
                    _say(f"[{cfg.name}] failed request: {r.error}")
                    break
        clean = not any(r.errors or any(r.log_problems.values()) for r in results)
    finally:
        _release_data_dir(own, clean, "cluster logs under it")
    for res in results:
        bad = {k: v for k, v in res.log_problems.items() if v}
        if bad:
            _say(f"PROBLEM: [{res.config.name}] failures in the cluster's logs (under {data_dir / res.config.name}/logs): "
                 f"{bad}")

    b = bound["bound"]
    rows = [{"config": "unbounded bound", "hit ratio": round(b, 4), "vs bound": 1.0,
             "prompt tok": bound["prompt_tokens"], "reused tok": bound["bound_tokens"]},
            {"config": "bound, full blocks", "hit ratio": round(bound["bound_full_blocks"], 4),
             "vs bound": _ratio(bound["bound_full_blocks"], b), "prompt tok": bound["prompt_tokens"],
             "reused tok": bound["bound_full_blocks_tokens"]}]
    figures: dict = {
        "trace": trace_path.name, "requests": len(requests), "skipped": skipped, "token_scale": token_scale,
        "block_size": block_size, "concurrency": concurrency, "settle": settle, "max_context": shape.max_context,
        "prompt_tokens": bound["prompt_tokens"], "distinct_blocks": bound["distinct_blocks"],
        "block_bytes": block_bytes, "working_set_bytes": working_set,
        "bound": round(b, 4), "bound_full_blocks": round(bound["bound_full_blocks"], 4),
    }
    by_name = {}
    for res in results:
        c = res.config
        hit = res.hit
        by_name[c.name] = hit
        rows.append({"config": c.name, "policy": c.policy, "pool": "on" if c.use_pool else "off",
                     "dram MB": round(c.dram_bytes / 1e6, 1), "disk MB": round(c.disk_bytes / 1e6, 1),
                     "prefill MB": round(c.prefill_cache_bytes / 1e6, 1),
                     "hit ratio": None if hit is None else round(hit, 4), "vs bound": _ratio(hit, b),
                     "prompt tok": sum(r.prompt_tokens for r in res.ok),
                     "reused tok": sum(r.cached_tokens for r in res.ok),
                     "local tok": int(res.local_tokens), "pool tok": int(res.pool_tokens),
                     "miss unavail": res.misses.get("unavailable"), "miss recomp": res.misses.get("recomputed"),
                     "miss load": res.misses.get("not_loaded"),
                     "errors": res.errors, "req/s": round(len(res.replies) / res.wall, 1) if res.wall else None})
        key = {"global": "global", "local": "local"}.get(c.name, c.name)
        figures[f"{key}_hit"] = None if hit is None else round(hit, 4)
        figures[f"{key}_vs_bound"] = _ratio(hit, b)
        figures[f"{key}_errors"] = res.errors
        figures[f"{key}_seconds"] = round(res.wall, 1)
        for m, v in res.misses.items():
            figures[f"{key}_missed_{m}"] = v
        if settle:
            figures[f"{key}_settle_timeouts"] = res.settle.get("timeouts", 0)
            figures[f"{key}_settle_stopped_at"] = res.settle.get("stopped_at")
        figures[f"{key}_pool_put_failures"] = res.log_problems.get("cache_put_failed", 0)
        figures[f"{key}_pool_write_failures"] = res.log_problems.get("block_store_failed", 0)
    if "global" in by_name and "local" in by_name:
        figures["global_vs_local"] = _ratio(by_name["global"], by_name["local"])
    figures["seconds"] = round(time.perf_counter() - started, 1)
    cols = ["config", "policy", "pool", "dram MB", "disk MB", "prefill MB", "hit ratio", "vs bound", "prompt tok",
            "reused tok", "local tok", "pool tok", "miss unavail", "miss recomp", "miss load", "errors", "req/s"]
    _emit(f"trace {trace_path.name}: {len(requests)} requests (skipped {skipped}), token_scale {token_scale}, "
          f"max_tokens 1, {'sequential' if concurrency == 1 else f'{concurrency} in flight'}"
          f"{' (each request settled: its pool writes done before the next is sent)' if settle else ' (no settling)'}, "
          f"timestamps not honoured; 2 prefill, 1 decode, 1 cachestore per config; miss = tokens of the bound not "
          f"reused: unavail(able to the plan), recomp(uted by choice), (not) load(ed)", rows, cols, figures, getattr(args, "out", None))
    return 0 if clean else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "raw-publisher":
        sys.exit(_raw_publisher_main(sys.argv[2:]))
    print("usage: python -m bench.cache_trace raw-publisher NATS_URL (the benchmarks run via `yuebing bench`)",
          file=sys.stderr)
    sys.exit(2)
