"""``yuebing bench trace`` without ``--url``: the prefix hit ratio the KV-cache pool reaches on the
conversation trace, against the bound of an unbounded cache on the same requests.

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


async def send_in_order(cluster, requests: list[TraceRequest], concurrency: int, progress: bool = True,
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
            name = await model_name(session, cluster.url)
            sem = asyncio.Semaphore(concurrency)
            bar = tqdm(total=len(requests), desc=desc, unit="req", file=sys.stderr, disable=not progress,
                       dynamic_ncols=True)

            async def one(i: int, r: TraceRequest) -> Reply:
                nonlocal in_a_row
                async with sem:
                    rep = await _complete(session, url, one_token_body(name, r.prompt, stream=False))
                    key = settle_keys[i] if settle_keys is not None else None
                    if rep.ok and probe is not None and key is not None and settle["stopped_at"] is None:
                        if await probe.settle([key], settle_timeout, poll=0.005):
                            in_a_row = 0
                        else:
                            settle["timeouts"] += 1
                            in_a_row += 1
                            if in_a_row >= settle_give_up:
                                settle["stopped_at"] = i
                                say(f"[{desc}] {in_a_row} settles in a row timed out (the pool does not get the "
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
                c = await prefill_counters(session, u)
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


def main(args) -> int:
    """``yuebing bench trace`` without ``--url``: the cache experiment on clusters it starts (the trace:
    ``FILE`` or ``--trace``)."""
    return entry(_trace, args)


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
        shape = read_shape(model_dir)
        block_size = int(getattr(args, "block_size", None) or from_env().block_size)
        reqs = read_trace(trace_path, limit=n_requests)
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
        say(f"bench trace: {len(requests)} of the first {len(reqs)} requests of {trace_path.name} (skipped "
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
                say(f"[{cfg.name}] cluster ready in {res.startup:.1f}s: policy {cfg.policy}, pool "
                     f"{'on' if cfg.use_pool else 'off'}, cachestore dram {cfg.dram_bytes / 1e6:.1f} MB / disk "
                     f"{cfg.disk_bytes / 1e6:.1f} MB, prefill cache {cfg.prefill_cache_bytes / 1e6:.1f} MB each")
                res.replies, res.wall, res.settle = asyncio.run(
                    send_in_order(cluster, requests, concurrency, progress, cfg.name, settle_keys))
                res.local_tokens, res.pool_tokens = asyncio.run(_hit_counters(cluster))
            finally:
                cluster.stop()
            res.misses = miss_breakdown(cluster.log_dir, res.replies, bound["per_request"], block_size)
            res.log_problems = log_problems(cluster.log_dir)
            results.append(res)
            say(f"[{cfg.name}] hit ratio {res.hit}, errors {res.errors}, {res.wall:.1f}s; tokens of the bound "
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

    b = bound["bound"]
    rows = [{"config": "unbounded bound", "hit ratio": round(b, 4), "vs bound": 1.0,
             "prompt tok": bound["prompt_tokens"], "reused tok": bound["bound_tokens"]},
            {"config": "bound, full blocks", "hit ratio": round(bound["bound_full_blocks"], 4),
             "vs bound": ratio(bound["bound_full_blocks"], b), "prompt tok": bound["prompt_tokens"],
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
                     "hit ratio": None if hit is None else round(hit, 4), "vs bound": ratio(hit, b),
                     "prompt tok": sum(r.prompt_tokens for r in res.ok),
                     "reused tok": sum(r.cached_tokens for r in res.ok),
                     "local tok": int(res.local_tokens), "pool tok": int(res.pool_tokens),
                     "miss unavail": res.misses.get("unavailable"), "miss recomp": res.misses.get("recomputed"),
                     "miss load": res.misses.get("not_loaded"),
                     "errors": res.errors, "req/s": round(len(res.replies) / res.wall, 1) if res.wall else None})
        key = {"global": "global", "local": "local"}.get(c.name, c.name)
        figures[f"{key}_hit"] = None if hit is None else round(hit, 4)
        figures[f"{key}_vs_bound"] = ratio(hit, b)
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
        figures["global_vs_local"] = ratio(by_name["global"], by_name["local"])
    figures["seconds"] = round(time.perf_counter() - started, 1)
    cols = ["config", "policy", "pool", "dram MB", "disk MB", "prefill MB", "hit ratio", "vs bound", "prompt tok",
            "reused tok", "local tok", "pool tok", "miss unavail", "miss recomp", "miss load", "errors", "req/s"]
    emit(f"trace {trace_path.name}: {len(requests)} requests (skipped {skipped}), token_scale {token_scale}, "
          f"max_tokens 1, {'sequential' if concurrency == 1 else f'{concurrency} in flight'}"
          f"{' (each request settled: its pool writes done before the next is sent)' if settle else ' (no settling)'}, "
          f"timestamps not honoured; 2 prefill, 1 decode, 1 cachestore per config; miss = tokens of the bound not "
          f"reused: unavail(able to the plan), recomp(uted by choice), (not) load(ed)", rows, cols, figures, getattr(args, "out", None))
    return 0 if clean else 1
