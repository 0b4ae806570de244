"""``yuebing bench trace`` without ``--url``: the prefix hit ratio the KV-cache pool reaches on the
conversation trace, against local-only caches of the same total size, an ideal LRU cache of that
size, and the bound of an unbounded cache on the same requests.

``bench trace``: replay the first ``--requests`` requests of the Mooncake conversation trace, scaled as
its README says (every hash id -> a deterministic block of ``512 / token_scale`` token ids; a request's
input = its hash-id blocks, truncated to ``input_length / token_scale`` tokens), ``max_tokens`` 1,
timestamps not honoured: requests go in trace order with at most ``--concurrency`` in flight (default 1:
sequential), and each one is "settled" before its slot is freed: with the pool, the pool holds its last
full block (the prefill writes a prompt's blocks in order, after answering) and the conductor's index
has caught up; without it, the prefill instance has kept the prompt's blocks in its own cache and the
conductor's index lists as many blocks for that instance as it holds. Compressing an hour into a minute
would otherwise send the next turn of a conversation while the previous turn's blocks are still being
written, a race real traffic (turns seconds to minutes apart) does not have; ``--no-settle`` replays
without it. On a tiny model (the real tokenizer, a context raised to 32,768) against fresh clusters of
two prefill instances, one decode and one cachestore, for each size in ``--pool-fractions`` (default
100, 50, 25 and 10 % of the working set: the distinct full KV blocks of the replayed requests):

* ``global_<pct>pct``: global_cache_aware, a pool of that many blocks (the cachestore's LMDB tier
  sized so that its high watermark is exactly that many: past it, the pool evicts down to its low
  watermark, by its eviction policy, ``pool_eviction``; no DRAM tier in front of it, so the pool
  holds no more than its size but for a put in progress) and no cache of their own on the prefill
  instances: every block reused comes from the pool;
* ``local_<pct>pct``: local_cache_aware, pool off, each prefill instance's own DRAM cache holding
  that many blocks divided by the number of instances: the caches add up to the pool's size.

``--configs`` picks rows by name or by kind (``global``, ``local``). Figures: hit ratio =
sum(cached_tokens) / sum(prompt_tokens); next to it the hit ratio an ideal LRU cache of the row's
capacity in blocks reaches on the same requests in the same order (``bench.ideal_lru``, computed
here offline) and measured / ideal; and the bound an unbounded cache reaches, computed from the
trace itself. From the conductor's and prefills' logs, the tokens of the bound each configuration did
not reuse are split into: not available to the plan (neither the chosen instance's cache nor the pool
index had them), recomputed by choice (the kvcache-balancing threshold predicted recomputing faster
than loading) and planned but not loaded; failures of the cache path found in the logs are counted
too, and so are the requests each prefill instance served.

It prints a table and a final JSON line of named figures (also written to ``--out``).

``bench trace FILE --url URL`` is another tool: an open-loop replay of the trace against a running
OpenAI-compatible server, under SLOs (``bench.replay``); ``bench.cli.trace_main`` dispatches between the two.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (DEFAULT_TRACE, TRACE_BLOCK_TOKENS, PoolProbe, Reply, TraceTokens, emit, entry,
                          make_data_dir, model_name, one_token_body, prefill_counters, prefill_log_records,
                          ratio, read_trace, release_data_dir, resolve_models_dir, say, trace_bound)

TINY_CONTEXT = 32768
DEFAULT_FRACTIONS = "1,0.5,0.25,0.1"  # pool sizes, as fractions of the working set


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


def prompt_chains(requests: list[TraceRequest], block_size: int, namespace: bytes) -> tuple[list[list[bytes]], list[int]]:
    """Per request, the keys of its full KV blocks (as the cluster names them) and how many of them
    it may reuse (the system computes at least one prompt token): the ideal LRU's input."""
    from libs.kv.keys import block_hashes

    chains = [block_hashes(r.prompt, block_size, namespace) for r in requests]
    return chains, [max(0, (len(r.prompt) - 1) // block_size) for r in requests]


def ideal_lru_tokens(chains: list[list[bytes]], reusable: list[int], capacity_blocks: int, block_size: int) -> int:
    """Prompt tokens an ideal LRU cache of ``capacity_blocks`` reuses on these requests, in order."""
    from bench.ideal_lru import lru_prefix_hits

    return block_size * sum(lru_prefix_hits(chains, capacity_blocks, reusable))


@dataclass(frozen=True)
class BlockBytes:
    """What one KV block counts against each cache's byte bound."""

    encoded: int  # an encoded block (libs.kv.codec): the pool's DRAM tier and the working set count these
    on_disk: int  # its footprint in the pool's LMDB tier (values past half a page take whole pages)
    local: int  # its KV tensor: a prefill instance's own cache holds capacity // this blocks


@dataclass
class TraceConfig:
    name: str
    kind: str  # "global" (the pool) or "local" (the instances' own caches, no pool)
    fraction: float  # of the working set
    policy: str
    use_pool: bool
    capacity_blocks: int  # blocks the caches under test hold together: the pool's, or the own caches' sum
    dram_bytes: int
    disk_bytes: int
    prefill_cache_bytes: int  # each prefill instance's own cache
    prefill_cache_blocks: int


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
    per_prefill: dict = field(default_factory=dict)  # prefill instance -> requests it served
    pool_held: int | None = None  # blocks the pool held at the end (global rows)

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


def pool_disk_bytes(blocks: int, on_disk: int, high: float) -> int:
    """The bound of an LMDB tier whose high watermark (``high`` of the bound) is ``blocks`` blocks
    of ``on_disk`` bytes: the pool holds that many before it evicts."""
    want = blocks * on_disk
    n = -(-want * 10**6 // round(high * 10**6))
    while int(n * high) < want:  # as the store computes its watermark
        n += 1
    return n


def trace_configs(distinct_blocks: int, fractions: list[float], sizes: BlockBytes, prefills: int = 2,
                  names: list[str] | None = None, evict_high: float = 1.0) -> list[TraceConfig]:
    """Per fraction of the working set (``distinct_blocks`` full KV blocks), the global row and the
    local-only row of that size, sized in blocks: the pool holds ``round(fraction * distinct_blocks)``
    (its LMDB tier sized so that its high watermark, ``evict_high`` of its bound, is that many; no
    DRAM tier, whose blocks would add to the disk's; the prefill instances keep none of their own),
    and without the pool each of the ``prefills`` instances' own caches holds that many divided
    among them. ``names``: the rows to keep, by name (``global_50pct``) or by kind (``global``, ``local``)."""
    out = []
    for f in fractions:
        if f <= 0:
            raise SystemExit(f"--pool-fractions: {f} is not a positive fraction of the working set")
        pct = f"{round(f * 100)}pct"
        n = max(prefills, round(f * distinct_blocks))
        per = n // prefills
        out.append(TraceConfig(f"global_{pct}", "global", f, "global_cache_aware", True, n, 0,
                               pool_disk_bytes(n, sizes.on_disk, evict_high), 0, 0))
        out.append(TraceConfig(f"local_{pct}", "local", f, "local_cache_aware", False, per * prefills, 0,
                               sizes.on_disk, per * sizes.local, per))
    if names:
        unknown = set(names) - {c.name for c in out} - {"global", "local"}
        if unknown:
            raise SystemExit(f"--configs: no row named {', '.join(sorted(unknown))} (rows: "
                             f"{', '.join(c.name for c in out)}, or a kind: global, local)")
        out = [c for c in out if c.name in names or c.kind in names]
    return out


class PoolSettle:
    """A request is settled when the pool holds its last full block (``keys``: per request, that key
    or None) and the conductor's index has caught up with the pool (``PoolProbe.settle``)."""

    def __init__(self, cluster, keys: list[bytes | None]):
        self.cluster = cluster
        self.keys = keys
        self.probe: PoolProbe | None = None

    async def start(self) -> "PoolSettle":
        stores = sorted(n for n in self.cluster.procs if n.startswith("cachestore-"))
        self.probe = await PoolProbe(self.cluster.nats.url, stores).start()
        return self

    async def settled(self, i: int, reply: Reply, timeout: float) -> bool:
        key = self.keys[i]
        return key is None or await self.probe.settle([key], timeout, poll=0.005)

    async def close(self) -> None:
        if self.probe is not None:
            await self.probe.close()


class LocalSettle:
    """Without the pool: a request is settled when the prefill instance that served it has reported
    the task done (it does so after keeping the prompt's blocks in its own cache and publishing
    that) and the conductor's index lists as many blocks for that instance as the instance says it
    holds (its key dump's total)."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.nc = None
        self.done: dict[str, str] = {}  # attempt id -> the prefill instance that reported it done

    async def start(self) -> "LocalSettle":
        from libs.bus import connect
        from libs.protocol import PrefillDone, Subjects, decode

        self.nc = await connect(self.cluster.nats.url, "bench-probe-local")

        async def on_done(msg) -> None:
            try:
                d = decode(msg.data, PrefillDone)
            except Exception:  # noqa: BLE001 - not ours to judge
                return
            self.done[d.attempt_id] = d.instance_id

        await self.nc.subscribe(Subjects.PREFILL_DONE, cb=on_done)
        await self.nc.flush()
        return self

    async def _counts(self, iid: str) -> tuple[int, int]:
        """(blocks the conductor's index lists for ``iid``, blocks ``iid`` holds)."""
        from libs.protocol import IndexSummary, KVDump, KVDumpRequest, Subjects, decode, encode

        raw = await self.nc.request(Subjects.CONDUCTOR_STATE, b"", timeout=10)
        index = decode(raw.data, IndexSummary).blocks.get(iid, 0)
        raw = await self.nc.request(Subjects.kv_dump(iid), encode(KVDumpRequest(limit=1)), timeout=10)
        return index, decode(raw.data, KVDump).total

    async def settled(self, i: int, reply: Reply, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while reply.request_id not in self.done:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.002)
        iid = self.done.pop(reply.request_id)
        while True:
            try:
                index, held = await self._counts(iid)
                if index == held:
                    return True
            except Exception:  # noqa: BLE001 - busy: ask again
                pass
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


async def send_in_order(cluster, requests: list[TraceRequest], concurrency: int, progress: bool = True,
                        desc: str = "replay", settler: PoolSettle | LocalSettle | None = None,
                        settle_timeout: float = 5.0, settle_give_up: int = 3) -> tuple[list[Reply], float, dict]:
    """Send ``requests`` in order, at most ``concurrency`` in flight. With a ``settler`` each request's
    slot is held until it is settled (``PoolSettle``, ``LocalSettle``; see ``bench trace --no-settle``).
    A cluster that stops keeping blocks would make every settle time out: after ``settle_give_up``
    timeouts in a row the rest of the replay goes without settling. Returns the replies, the wall
    time and ``{"timeouts": n, "stopped_at": request index or None}``."""
    import aiohttp
    from tqdm import tqdm

    url = cluster.url + "/v1/completions"
    timeout = aiohttp.ClientTimeout(total=None, sock_read=900)
    if settler is not None:
        await settler.start()
    settle = {"timeouts": 0, "stopped_at": None}
    in_a_row = 0
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            name = await model_name(session, cluster.url)
            sem = asyncio.Semaphore(concurrency)
            bar = tqdm(total=len(requests), desc=desc, unit="req", file=sys.stderr, disable=not progress,
                       dynamic_ncols=True)

            async def one(i: int, r: TraceRequest) -> Reply:
                nonlocal in_a_row
                async with sem:
                    rep = await _complete(session, url, one_token_body(name, r.prompt, stream=False))
                    if rep.ok and settler is not None and settle["stopped_at"] is None:
                        if await settler.settled(i, rep, settle_timeout):
                            in_a_row = 0
                        else:
                            settle["timeouts"] += 1
                            in_a_row += 1
                            if in_a_row >= settle_give_up:
                                settle["stopped_at"] = i
                                say(f"[{desc}] {in_a_row} settles in a row timed out (the cluster does not keep "
                                    f"the blocks): no more settling from request {i} on")
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
        if settler is not None:
            await settler.close()


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
                c = await prefill_counters(session, u)
                local += c["local"]
                pool += c["pool"]
    return local, pool


async def _pool_held(cluster) -> int:
    """Blocks the pool holds (its cachestores' totals)."""
    stores = sorted(n for n in cluster.procs if n.startswith("cachestore-"))
    probe = await PoolProbe(cluster.nats.url, stores).start()
    try:
        return await probe.pool_total()
    finally:
        await probe.close()


def requests_per_prefill(log_dir: Path) -> dict[str, int]:
    """How many requests each prefill instance served (none too), from their ``prefilled`` log lines."""
    out = {f.stem: 0 for f in Path(log_dir).glob("prefill-*.log")}
    for rec in prefill_log_records(log_dir).values():
        out[rec["file"]] = out.get(rec["file"], 0) + 1
    return dict(sorted(out.items()))


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


def main(args) -> int:
    """``yuebing bench trace`` without ``--url``: the cache experiment on clusters it starts (the trace:
    ``FILE`` or ``--trace``)."""
    return entry(_trace, args)


PREFILLS = 2  # prefill instances per cluster


def _trace(args) -> int:
    import torch

    from yuebing.cluster import LocalCluster
    from libs.kv.codec import encode_block
    from libs.kv.keys import namespace_digest
    from libs.config import from_env
    from libs.engine.dtypechoice import placement_for
    from libs.engine.modelpath import DEFAULT_MODEL, resolve_model
    from libs.engine.loading import model_identity, read_shape
    from libs.natsserver import free_port
    from services.cachestore.store import _footprint as lmdb_footprint

    trace_path = Path(getattr(args, "trace", None) or getattr(args, "file", None) or DEFAULT_TRACE)
    n_requests = int(getattr(args, "requests", None) or 1000)
    token_scale = int(getattr(args, "token_scale", 32))
    concurrency = max(1, int(getattr(args, "concurrency", 1)))
    fractions = _parse_floats(getattr(args, "pool_fractions", None) or DEFAULT_FRACTIONS)
    names = [x for x in str(getattr(args, "configs", "") or "").replace(" ", "").split(",") if x] or None
    progress = bool(getattr(args, "progress", True))
    settle = bool(getattr(args, "settle", True))
    threads = getattr(args, "threads", None) or 1
    max_context = int(getattr(args, "max_context", None) or TINY_CONTEXT)
    models_dir = resolve_models_dir(args)
    data_dir, own = make_data_dir(args, "yuebing-bench-trace-")
    started = time.perf_counter()
    results: list[TraceResult] = []
    clean = False
    try:
        if getattr(args, "model", None):
            model_dir = resolve_model(args.model, models_dir)
        else:
            model_dir = make_trace_model(data_dir / "models" / f"tiny-llama-ctx{max_context}",
                                         resolve_model(DEFAULT_MODEL, models_dir), max_context)
        base = from_env()
        block_size = int(getattr(args, "block_size", None) or base.block_size)
        # the device and dtype every cluster runs in, resolved once (the KV blocks' size and keys depend on them)
        placement = placement_for(model_dir, base.device, base.dtype, data_dir, threads, base.load_format, announce=say)
        shape = read_shape(model_dir, placement.dtype)
        reqs = read_trace(trace_path, limit=n_requests)
        requests, skipped = build_trace_requests(reqs, token_scale, shape.vocab_size, shape.max_context)
        bt = TRACE_BLOCK_TOKENS // token_scale
        bound = trace_bound(requests, bt, block_size)
        kv_shape = (shape.num_layers, 2, shape.num_kv_heads, block_size, shape.head_dim)
        block_bytes = len(encode_block(b"\0" * 16, torch.zeros(kv_shape, dtype=shape.dtype)))
        sizes = BlockBytes(encoded=block_bytes, on_disk=lmdb_footprint(block_bytes),
                           local=shape.kv_bytes_per_token() * block_size)
        working_set = bound["distinct_blocks"] * block_bytes
        configs = trace_configs(bound["distinct_blocks"], fractions, sizes, PREFILLS, names, base.pool_evict_high)
        ns = namespace_digest(model_identity(model_dir), placement.dtype_name, block_size)
        chains, reusable = prompt_chains(requests, block_size, ns)
        ideal = {c.capacity_blocks: ideal_lru_tokens(chains, reusable, c.capacity_blocks, block_size) for c in configs}
        settle_keys = [(c or [None])[-1] for c in chains]
        say(f"bench trace: {len(requests)} of the first {len(reqs)} requests of {trace_path.name} (skipped "
            f"{skipped} longer than the context {shape.max_context}), token_scale {token_scale} ({bt} tokens per "
            f"hash id), {bound['prompt_tokens']} prompt tokens, {bound['distinct_blocks']} distinct blocks of "
            f"{block_bytes} B = working set {working_set / 1e6:.1f} MB; model {model_dir} ({placement.describe()}); "
            f"concurrency {concurrency}{', each settled before the next' if settle else ''}; unbounded-cache "
            f"bound {bound['bound']:.4f} (full blocks only {bound['bound_full_blocks']:.4f})")
        for cfg in configs:
            settings = from_env(model=str(model_dir), data_dir=str(data_dir / cfg.name), models_dir=str(models_dir),
                                port=free_port(), block_size=block_size, threads=threads, policy=cfg.policy,
                                use_pool=cfg.use_pool, dram_bytes=cfg.dram_bytes, disk_bytes=cfg.disk_bytes,
                                prefill_cache_bytes=cfg.prefill_cache_bytes, device=placement.device_name,
                                dtype=placement.dtype_name, no_auth=True)
            cluster = LocalCluster(settings, prefill=PREFILLS, decode=1, cachestore=1)
            res = TraceResult(cfg)
            try:
                t0 = time.perf_counter()
                cluster.start(ready_timeout=300)
                res.startup = time.perf_counter() - t0
                say(f"[{cfg.name}] cluster ready in {res.startup:.1f}s: policy {cfg.policy}, "
                    + (f"pool of {cfg.capacity_blocks} blocks (disk {cfg.disk_bytes / 1e6:.1f} MB, no DRAM tier; "
                       f"eviction {settings.pool_eviction}, from {settings.pool_evict_high:g} down to "
                       f"{settings.pool_evict_low:g} of the disk), "
                       "no own caches" if cfg.use_pool else
                       f"pool off, own caches of {cfg.prefill_cache_blocks} blocks "
                       f"({cfg.prefill_cache_bytes / 1e6:.1f} MB) each"))
                settler = None
                if settle:
                    settler = PoolSettle(cluster, settle_keys) if cfg.use_pool else LocalSettle(cluster)
                res.replies, res.wall, res.settle = asyncio.run(
                    send_in_order(cluster, requests, concurrency, progress, cfg.name, settler))
                res.local_tokens, res.pool_tokens = asyncio.run(_hit_counters(cluster))
                if cfg.use_pool:
                    res.pool_held = asyncio.run(_pool_held(cluster))
            finally:
                cluster.stop()
            res.misses = miss_breakdown(cluster.log_dir, res.replies, bound["per_request"], block_size)
            res.log_problems = log_problems(cluster.log_dir)
            res.per_prefill = requests_per_prefill(cluster.log_dir)
            results.append(res)
            say(f"[{cfg.name}] hit ratio {res.hit}, ideal LRU {ideal[cfg.capacity_blocks] / bound['prompt_tokens']:.4f}, "
                f"errors {res.errors}, {res.wall:.1f}s; requests per prefill {res.per_prefill}; tokens of the bound "
                f"missed: {res.misses}" + (f"; settling: {res.settle}" if settle else "")
                + f"; problems in the logs: {res.log_problems}")
            for r in res.replies:
                if not r.ok:
                    say(f"[{cfg.name}] failed request: {r.error}")
                    break
        clean = not any(r.errors or any(r.log_problems.values()) for r in results)
    finally:
        release_data_dir(own, clean, "cluster logs under it")
    for res in results:
        bad = {k: v for k, v in res.log_problems.items() if v}
        if bad:
            say(f"PROBLEM: [{res.config.name}] failures in the cluster's logs (under {data_dir / res.config.name}/logs): "
                f"{bad}")

    total = bound["prompt_tokens"]
    b = bound["bound"]
    rows = [{"config": "unbounded bound", "hit ratio": round(b, 4), "vs bound": 1.0,
             "prompt tok": total, "reused tok": bound["bound_tokens"]},
            {"config": "bound, full blocks", "hit ratio": round(bound["bound_full_blocks"], 4),
             "vs bound": ratio(bound["bound_full_blocks"], b), "prompt tok": total,
             "reused tok": bound["bound_full_blocks_tokens"]}]
    figures: dict = {
        "trace": trace_path.name, "requests": len(requests), "skipped": skipped, "token_scale": token_scale,
        "block_size": block_size, "concurrency": concurrency, "settle": settle, "max_context": shape.max_context,
        "device": placement.device_name, "dtype": placement.dtype_name, "prefills": PREFILLS,
        "prompt_tokens": total, "distinct_blocks": bound["distinct_blocks"],
        "block_bytes": block_bytes, "working_set_bytes": working_set,
        "bound": round(b, 4), "bound_full_blocks": round(bound["bound_full_blocks"], 4),
        "bound_tokens": bound["bound_tokens"], "bound_full_blocks_tokens": bound["bound_full_blocks_tokens"],
        "pool_fractions": fractions, "configs": [c.name for c in configs],
        "pool_eviction": base.pool_eviction, "pool_evict_high": base.pool_evict_high,
        "pool_evict_low": base.pool_evict_low,
    }
    by_name = {}
    for res in results:
        c = res.config
        hit = res.hit
        ideal_hit = ideal[c.capacity_blocks] / total if total else None
        by_name[c.name] = hit
        rows.append({"config": c.name, "policy": c.policy, "pool": "on" if c.use_pool else "off",
                     "blocks": c.capacity_blocks, "own/inst": c.prefill_cache_blocks,
                     "hit ratio": None if hit is None else round(hit, 4), "vs bound": ratio(hit, b),
                     "ideal LRU": None if ideal_hit is None else round(ideal_hit, 4),
                     "vs ideal": ratio(hit, ideal_hit),
                     "reused tok": sum(r.cached_tokens for r in res.ok),
                     "local tok": int(res.local_tokens), "pool tok": int(res.pool_tokens),
                     "req/prefill": "/".join(str(v) for v in res.per_prefill.values()),
                     "pool held": res.pool_held,
                     "miss unavail": res.misses.get("unavailable"), "miss recomp": res.misses.get("recomputed"),
                     "miss load": res.misses.get("not_loaded"),
                     "errors": res.errors, "req/s": round(len(res.replies) / res.wall, 1) if res.wall else None})
        key = c.name
        figures[f"{key}_hit"] = None if hit is None else round(hit, 4)
        figures[f"{key}_vs_bound"] = ratio(hit, b)
        figures[f"{key}_ideal_lru"] = None if ideal_hit is None else round(ideal_hit, 4)
        figures[f"{key}_ideal_lru_tokens"] = ideal[c.capacity_blocks]
        figures[f"{key}_vs_ideal"] = ratio(hit, ideal_hit)
        figures[f"{key}_capacity_blocks"] = c.capacity_blocks
        figures[f"{key}_own_cache_blocks"] = c.prefill_cache_blocks
        figures[f"{key}_reused_tokens"] = sum(r.cached_tokens for r in res.ok)
        figures[f"{key}_local_tokens"] = int(res.local_tokens)
        figures[f"{key}_pool_tokens"] = int(res.pool_tokens)
        figures[f"{key}_requests_per_prefill"] = res.per_prefill
        figures[f"{key}_pool_held_blocks"] = res.pool_held
        figures[f"{key}_errors"] = res.errors
        figures[f"{key}_seconds"] = round(res.wall, 1)
        for m, v in res.misses.items():
            figures[f"{key}_missed_{m}"] = v
        if settle:
            figures[f"{key}_settle_timeouts"] = res.settle.get("timeouts", 0)
            figures[f"{key}_settle_stopped_at"] = res.settle.get("stopped_at")
        figures[f"{key}_pool_put_failures"] = res.log_problems.get("cache_put_failed", 0)
        figures[f"{key}_pool_write_failures"] = res.log_problems.get("block_store_failed", 0)
    # global against local-only at each size both ran; the headline figures at the largest such size
    both = [c for c in configs if c.kind == "global" and c.name in by_name
            and c.name.replace("global_", "local_", 1) in by_name]
    for c in both:
        pct = c.name.removeprefix("global_")
        figures[f"global_vs_local_{pct}"] = ratio(by_name[c.name], by_name[f"local_{pct}"])
    if both:
        top = max(both, key=lambda c: c.fraction)
        figures["headline_config"] = top.name
        figures["global_vs_bound"] = figures[f"{top.name}_vs_bound"]
        figures["global_vs_local"] = figures[f"global_vs_local_{top.name.removeprefix('global_')}"]
    figures["seconds"] = round(time.perf_counter() - started, 1)
    cols = ["config", "policy", "pool", "blocks", "own/inst", "hit ratio", "vs bound", "ideal LRU", "vs ideal",
            "reused tok", "local tok", "pool tok", "req/prefill", "pool held", "miss unavail", "miss recomp",
            "miss load", "errors", "req/s"]
    emit(f"trace {trace_path.name}: {len(requests)} requests (skipped {skipped}), token_scale {token_scale}, "
         f"max_tokens 1, {'sequential' if concurrency == 1 else f'{concurrency} in flight'}"
         f"{' (each request settled: its blocks kept and indexed before the next is sent)' if settle else ' (no settling)'}, "
         f"timestamps not honoured; {PREFILLS} prefill, 1 decode, 1 cachestore per config; working set "
         f"{bound['distinct_blocks']} blocks; blocks = capacity of the caches under test (the pool, or the own "
         f"caches together; own/inst: each instance's); ideal LRU = one LRU cache of that many blocks on the same "
         f"requests; pool held = blocks in the pool at the end; miss = tokens of the bound not reused: "
         f"unavail(able to the plan), recomp(uted by choice), (not) load(ed)", rows, cols, figures,
         getattr(args, "out", None))
    return 0 if clean else 1
