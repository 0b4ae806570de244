"""``yuebing bench decisions``: the conductor's decisions alone, without the bus.

``bench conductor`` measures a conductor process end to end: what it costs there is its decisions
and everything around them (messages decoded and encoded, the NATS client, the event loop). This
benchmark takes the bus away to tell the two apart: the conductor's ``Scheduler`` (the plain logic
the service wraps) is fed, in this process, by the same synthetic cluster ``bench conductor`` runs
(``bench.conductor.SimCluster``: the same trace prompts, the same pre-loaded index, instances
paced the same way) on a virtual clock: requests arrive every ``1 / rate`` seconds of it, every
instance beats once a second of it, and the reports and KV events due by each arrival are handed
to the scheduler as the service would.

Measured with the thread's CPU clock: each ``Scheduler.schedule`` call (p50, p99, mean; the first
``--warm`` decisions left out) and everything else the scheduler is given (heartbeats, reports and
KV events, the prune each second), per request, by kind. One row per (instances, rate); the
synthetic cluster's own work is not counted.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.common import DEFAULT_TRACE, emit, entry, read_trace, say
from bench.conductor import MODEL_ID, SimCluster, TraceChains, parse_counts, quotas, sim_pace, warm_prompts

COLS = ["instances", "blocks", "rate", "decisions", "admitted", "decision_p50_ms", "decision_p99_ms",
        "decision_mean_ms", "background_ms_per_request", "heartbeat_ms_per_request", "kv_event_ms_per_request",
        "report_ms_per_request", "kv_events_per_request", "kv_keys_per_event", "in_decode_per_instance", "decisions_per_core_second"]


def run_point(args, chains: TraceChains, warm: list, offered: list, instances: int, blocks: int, rate: float) -> dict:
    from libs.config import Settings
    from libs.protocol import DecodeReport, KVEvent, PrefillDone, PrefillReport, SamplingParams, ScheduleRequest
    from services.conductor.scheduler import Scheduler

    settings = Settings(policy=args.policy, admission=args.admission, use_pool=args.pool, block_size=args.block_size,
                        heartbeat_interval=1.0)
    sched = Scheduler(settings)
    sim = SimCluster(instances, instances, args.pool, block_size=args.block_size, rows=args.rows, interval=1.0,
                     namespace=chains.namespace)
    prefill_q, pool_q = quotas(blocks, instances, args.pool, args.pool_share)
    sim.resize(prefill_q, pool_q)
    def apply(ev) -> None:
        """A KV event; an instance the index must resync (its first event, a gap) is sent its
        dump, as the service fetches it (``SimCluster.dump``, whole)."""
        if sched.index.apply(ev):
            dump = sim.dump(ev.instance_id, 0, 1 << 62)
            sched.index.load_dump(dump.instance_id, dump.source, dump.epoch, dump.seq, dump.keys)

    for _, ev in sim.announce():
        apply(ev)
    for ev in sim.preload(warm_prompts(chains, warm, blocks, sim.prefill_ids, args.pool), args.event_keys):
        apply(ev)
    held = sum(sched.index.count_of(iid) for iid in sim.holders)
    if held != sim.total_blocks():
        raise RuntimeError(f"the index holds {held} blocks after the pre-load, the instances {sim.total_blocks()}")
    mean_prompt = float(np.mean([p.tokens for p in offered]))
    mean_output = float(np.mean([p.max_tokens for p in offered]))
    per_token, step, _ = sim_pace(rate, instances, instances, mean_prompt, mean_output, args.rows,
                                  args.prefill_util, args.decode_occupancy, args.max_stay)
    sim.set_pace(per_token, step)
    spent: dict[str, float] = defaultdict(float)
    handlers = {KVEvent: ("kv_event", lambda m, now: apply(m)),
                PrefillReport: ("report", sched.prefill_report), PrefillDone: ("report", sched.prefill_done),
                DecodeReport: ("report", sched.decode_report)}

    def timed(kind: str, fn, *a) -> None:
        t = time.thread_time()
        fn(*a)
        spent[kind] += time.thread_time() - t

    now = next_beat = 0.0
    decisions: list[float] = []
    admitted = 0
    gc.collect()
    for k, p in enumerate(offered[: args.requests]):
        now += 1.0 / rate
        if now >= next_beat:
            for kind, iid in sim.instances():
                timed("heartbeat", sched.heartbeat, sim.heartbeat(kind, iid, now), now)
            timed("heartbeat", sched.prune, now)
            next_beat += 1.0
        for _, msg, _ in sim.advance(now):
            kind, fn = handlers[type(msg)]
            timed(kind, fn, msg, now)
        keys = chains.keys(p)
        req = ScheduleRequest(attempt_id=f"r{k}", prompt_token_ids=chains.tokens(p) if args.tokens else [0] * p.tokens,
                              sampling=SamplingParams(max_tokens=p.max_tokens, temperature=0.0, ignore_eos=True),
                              block_hashes=keys, ttft_slo=args.ttft_slo, tbt_slo=args.tbt_slo)
        t = time.thread_time()
        d = sched.schedule(req, now)
        took = time.thread_time() - t
        if k >= args.warm:
            decisions.append(took)
        if d.placement.admitted:
            admitted += 1
            sim.placed(req.attempt_id, p, keys, d.placement.prefill_id, d.placement.decode_id, now, now)
    n = min(args.requests, len(offered))
    ms = np.array(decisions) * 1e3
    background = sum(spent.values())
    per_request = float(ms.mean()) / 1e3 + background / n  # CPU seconds a request costs the scheduler
    return {"instances": instances, "blocks": blocks, "rate": rate, "decisions": n, "admitted": admitted,
            "decision_p50_ms": round(float(np.percentile(ms, 50)), 3),
            "decision_p99_ms": round(float(np.percentile(ms, 99)), 3), "decision_mean_ms": round(float(ms.mean()), 3),
            "background_ms_per_request": round(background / n * 1e3, 3),
            "heartbeat_ms_per_request": round(spent["heartbeat"] / n * 1e3, 3),
            "kv_event_ms_per_request": round(spent["kv_event"] / n * 1e3, 3),
            "report_ms_per_request": round(spent["report"] / n * 1e3, 3),
            "kv_events_per_request": round(sim.counts["kv_events"] / n, 2),
            "kv_keys_per_event": round(sim.counts["kv_keys"] / max(1, sim.counts["kv_events"])),
            "in_decode_per_instance": round(sim.in_decode() / instances, 1),
            # requests one core would place a second at this cost (decision and background together)
            "decisions_per_core_second": round(1.0 / per_request) if per_request > 0 else None}


def _bench(args) -> int:
    from libs.kv.keys import namespace_digest

    chains = TraceChains(args.token_scale, args.block_size, namespace_digest(MODEL_ID, "bfloat16", args.block_size),
                         seed=args.seed)
    rows = read_trace(Path(args.trace), start=args.start, limit=args.warm_requests + args.requests)
    prompts = [chains.prompt(r, args.start + i) for i, r in enumerate(rows)]
    for p in prompts:
        chains.key_records(p)  # every chain now, not while measuring
    warm, offered = prompts[: args.warm_requests], prompts[args.warm_requests :]
    points = []
    for n in parse_counts(args.instances, "--instances"):
        for blocks in parse_counts(args.blocks, "--blocks"):
            for rate in [float(r) for r in args.rates.split(",")]:
                point = run_point(args, chains, warm, offered, n, blocks, rate)
                say(f"  {n}+{n} instances, {blocks} blocks, {rate:g} req/s: decision p50 {point['decision_p50_ms']} ms, "
                    f"p99 {point['decision_p99_ms']} ms; background {point['background_ms_per_request']} ms a request")
                points.append(point)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    emit(f"the conductor's Scheduler fed by bench conductor's synthetic cluster in one process, no bus (thread CPU "
         f"time; token scale {args.token_scale}, admission {args.admission}, policy {args.policy})",
         points, COLS, {"bench": "decisions", "settings": settings, "points": points}, args.out)
    return 0 if all(p["admitted"] > 0 for p in points) else 1


def main(args) -> int:
    """``yuebing bench decisions``."""
    return entry(_bench, args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instances", default="8,32,128", help="prefill (and as many decode) instances, a list")
    p.add_argument("--blocks", default="1e6", help="index entries pre-loaded, a list")
    p.add_argument("--rates", default="100,1000", help="requests per second of the virtual clock, a list")
    p.add_argument("--requests", type=int, default=3000, help="requests placed per point")
    p.add_argument("--warm", type=int, default=200, help="first decisions of a point left out of its percentiles")
    p.add_argument("--tokens", action="store_true", help="requests carry the prompts' real token ids (the "
                   "scheduler only counts them; by default a list of zeros as long)")
    p.add_argument("--trace", default=str(DEFAULT_TRACE), help="Mooncake JSONL trace")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--warm-requests", type=int, default=1000,
                   help="trace requests whose blocks the index holds at the start (up to half of it)")
    p.add_argument("--token-scale", type=int, default=1)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-pool", dest="pool", action="store_false")
    p.add_argument("--pool-share", type=float, default=0.5)
    p.add_argument("--event-keys", type=int, default=512)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--prefill-util", type=float, default=0.7)
    p.add_argument("--decode-occupancy", type=float, default=0.75)
    p.add_argument("--max-stay", type=float, default=3.0)
    p.add_argument("--admission", choices=("none", "early", "predictive"), default="predictive")
    p.add_argument("--policy", default="global_cache_aware")
    p.add_argument("--ttft-slo", type=float, default=30.0)
    p.add_argument("--tbt-slo", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON figures here")
