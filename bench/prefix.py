"""``yuebing bench prefix``: what the KV-cache pool buys a prompt whose prefix it holds, against a
cold prompt in the same run.

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

It prints a table and a final JSON line of named figures (also written to ``--out``).
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (PoolProbe, Reply, det_tokens, emit, entry, make_data_dir, median, model_name, ms,
                          one_token_body, prefill_counters, prefill_log_records, ratio, release_data_dir,
                          resolve_models_dir, say)


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
            name = await model_name(session, cluster.url)

            async def send(kind: str, rep: int, prompt: list[int]) -> PrefixMeasure:
                before = {p: await prefill_counters(session, cluster.metrics_urls[p]) for p in prefills}
                reply = await _stream(session, url, one_token_body(name, prompt, stream=True))
                m = PrefixMeasure(kind, rep, reply)
                if reply.ok:
                    # idle before the next measurement: every full block in the pool, the index caught up
                    m.settled = await probe.settle(block_hashes(prompt, bs, ns))
                    if not m.settled:
                        problems.append(f"{kind} {rep}: the pool did not get all {len(prompt) // bs} blocks "
                                        f"of the prompt within the timeout")
                    after = {p: await prefill_counters(session, cluster.metrics_urls[p]) for p in prefills}
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


def main(args) -> int:
    """``yuebing bench prefix``."""
    return entry(_prefix, args)


def _prefix(args) -> int:
    from yuebing.cluster import LocalCluster
    from libs.config import from_env
    from libs.engine.modelpath import DEFAULT_MODEL, resolve_model
    from libs.natsserver import free_port

    prompt_tokens = int(getattr(args, "prompt_tokens", 2048))
    shared_tokens = int(getattr(args, "shared_tokens", 1984))
    cold = int(getattr(args, "cold", 3))
    repeats = int(getattr(args, "repeats", 3))
    progress = bool(getattr(args, "progress", True))
    if not 0 < shared_tokens < prompt_tokens:
        raise SystemExit("--shared-tokens must be between 0 and --prompt-tokens")
    spec = getattr(args, "model", None) or DEFAULT_MODEL
    models_dir = resolve_models_dir(args)
    model_dir = resolve_model(spec, models_dir)
    data_dir, own = make_data_dir(args, "yuebing-bench-prefix-")
    settings = from_env(model=str(model_dir), data_dir=str(data_dir), models_dir=str(models_dir), port=free_port(),
                        block_size=getattr(args, "block_size", None), threads=getattr(args, "threads", None) or None,
                        device=getattr(args, "device", None), dtype=getattr(args, "dtype", None),
                        load_format=getattr(args, "load_format", None),
                        policy="round_robin", use_pool=True, no_auth=True)  # a private loopback cluster
    if shared_tokens % settings.block_size:
        raise SystemExit(f"--shared-tokens must be a multiple of the block size ({settings.block_size})")
    cluster = LocalCluster(settings, prefill=2, decode=1, cachestore=1)
    say(f"bench prefix: model {model_dir}, prompts of {prompt_tokens} tokens ({shared_tokens} shared), "
         f"{cold} cold, {repeats} hits; cluster logs in {cluster.log_dir}")
    started = time.perf_counter()
    clean = False
    try:
        try:
            t0 = time.perf_counter()
            cluster.start(ready_timeout=300)
            say(f"cluster ready in {time.perf_counter() - t0:.1f}s at {cluster.url} (2 prefill round robin, "
                 f"1 decode, 1 cachestore; cores: {cluster.describe_cores()})")
            measures, problems = asyncio.run(run_prefix(
                cluster, model_dir, prompt_tokens=prompt_tokens, shared_tokens=shared_tokens, cold=cold,
                repeats=repeats, progress=progress))
        finally:
            say("stopping the cluster...")
            cluster.stop()
        clean = not problems
    finally:
        release_data_dir(own, clean, f"cluster logs in {cluster.log_dir}")

    rows = []
    for m in measures:
        if m.kind == "warm":
            continue
        rows.append({"request": f"{m.kind} {m.rep}", "instance": m.instance,
                     "TTFT ms": ms(m.reply.ttft), "cached": m.reply.cached_tokens if m.reply.ok else None,
                     "pool hit": int(m.pool_hit), "local hit": int(m.local_hit),
                     "load ms": ms(m.load_s), "compute ms": ms(m.compute_s),
                     "ok": "yes" if m.reply.ok and m.settled else "NO"})
    colds = [m for m in measures if m.kind == "cold" and m.reply.ok]
    hits = [m for m in measures if m.kind == "hit" and m.reply.ok]
    cold_ttft = median([m.reply.ttft for m in colds])
    hit_ttft = median([m.reply.ttft for m in hits])
    rows.append({"request": "median cold", "TTFT ms": ms(cold_ttft), "compute ms": ms(median([m.compute_s for m in colds]))})
    rows.append({"request": "median hit", "TTFT ms": ms(hit_ttft), "cached": median([m.reply.cached_tokens for m in hits]),
                 "pool hit": median([m.pool_hit for m in hits]), "load ms": ms(median([m.load_s for m in hits])),
                 "compute ms": ms(median([m.compute_s for m in hits]))})
    figures = {
        "model": DEFAULT_MODEL if spec == DEFAULT_MODEL else model_dir.name,
        "prompt_tokens": prompt_tokens,
        "shared_tokens": shared_tokens,
        "cold_runs": len(colds),
        "hit_runs": len(hits),
        "cold_ttft_ms": ms(cold_ttft),
        "hit_ttft_ms": ms(hit_ttft),
        "hit_vs_cold_ttft": ratio(hit_ttft, cold_ttft),
        "cached_tokens": min((m.reply.cached_tokens for m in hits), default=None),
        "pool_hit_tokens": int(min((m.pool_hit for m in hits), default=0)),
        "hit_pool_load_ms": ms(median([m.load_s for m in hits])),
        "hit_compute_ms": ms(median([m.compute_s for m in hits])),
        "cold_compute_ms": ms(median([m.compute_s for m in colds])),
        "cold_ttfts_ms": [ms(m.reply.ttft) for m in colds],
        "hit_ttfts_ms": [ms(m.reply.ttft) for m in hits],
        "problems": len(problems),
        "seconds": round(time.perf_counter() - started, 1),
    }
    for p in problems:
        say(f"PROBLEM: {p}")
    cols = ["request", "instance", "TTFT ms", "cached", "pool hit", "local hit", "load ms", "compute ms", "ok"]
    emit(f"model {figures['model']}: {prompt_tokens}-token prompts, max_tokens 1; hit = {shared_tokens} tokens in "
          f"the pool, not on the serving instance; load/compute from the prefill's log", rows, cols, figures,
          getattr(args, "out", None))
    return 1 if problems else 0
