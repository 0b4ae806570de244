"""``yuebing bench sched``: the scheduling experiments (Mooncake's Fig. 5, Table 3 and goodput) on
real clusters, with the simulated engine at 8 prefill + 8 decode and with the real model at 2+1.

Every run starts a fresh cluster (NATS, conductor, cachestore, workers, gateway), replays the same
slice of the trace through the gateway's OpenAI API with the replay tool (``bench.replay``), and
stops it. Each run leaves its JSON and PNG in the output directory; the experiment prints one table
per experiment and a final JSON line of the named figures.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import replay as rp
from bench.common import TRACE_BLOCK_TOKENS, ratio, read_trace, resolve_models_dir, trace_bound
from libs.cpus import available_cores
from yuebing.tables import format_table

EXPERIMENTS = ("placement", "overload", "goodput", "real")
PLACEMENT_POLICIES = ("random", "least_loaded", "local_cache_aware", "global_cache_aware")
ADMISSIONS = ("none", "early", "predictive")


@dataclass
class Run:
    experiment: str
    name: str
    policy: str = "global_cache_aware"
    admission: str = "none"
    use_pool: bool = True  # False: each instance reuses only its own DRAM cache
    colocated: int = 0  # >0: that many colocated workers instead of prefill/decode instances
    prefill: int = 8
    decode: int = 8
    engine: str = "sim"
    load: float = 1.0  # arrival rate, as a multiple of the experiment's base rate
    repeat: int = 1  # which repetition of the same run (--repeats)
    summary: dict = field(default_factory=dict)


def _say(msg: str) -> None:
    """Progress on stdout, where the experiment's tables go (a long run's story reads in one place)."""
    print(msg, flush=True)


def plan(experiments: list[str], args) -> list[Run]:
    p, d = args.prefill, args.decode
    repeats = max(1, getattr(args, "repeats", 1) or 1)
    runs: list[Run] = []
    if "placement" in experiments:
        # as in the paper's comparison, only the global policy draws on the pool; the others place
        # requests without it and reuse what the chosen instance holds
        # with repeats, the policies run in turn in each repeat, so that a drift of the machine
        # over the runs falls on every policy alike
        chosen = getattr(args, "policies", None) or PLACEMENT_POLICIES
        runs += [Run("placement", f"placement-{pol}" + (f"-r{k}" if repeats > 1 else ""), policy=pol, prefill=p,
                     decode=d, use_pool=pol == "global_cache_aware", repeat=k)
                 for k in range(1, repeats + 1) for pol in PLACEMENT_POLICIES if pol in chosen]
    if "overload" in experiments:
        # repeats interleave the modes (none, early, predictive, none, ...) so that a drift of the
        # machine over the runs falls on every mode alike
        modes = getattr(args, "admissions", None) or list(ADMISSIONS)
        runs += [Run("overload", f"overload-{adm}" + (f"-r{k}" if repeats > 1 else ""), admission=adm, prefill=p,
                     decode=d, load=args.overload, repeat=k)
                 for k in range(1, repeats + 1) for adm in ADMISSIONS if adm in modes]
    if "goodput" in experiments:
        # this system as deployed (its admission control, default: the deployment's) against the
        # colocated baseline (by default a plain engine that admits everything), at each load
        # with repeats, each load's pair runs that many times, the two sides interleaved, as above
        loads = goodput_loads(args.goodput_load)
        for load in loads:
            for k in range(1, repeats + 1):
                at = ("" if len(loads) == 1 else f"-x{load:g}") + (f"-r{k}" if repeats > 1 else "")
                runs += [Run("goodput", f"goodput-disaggregated{at}", prefill=p, decode=d, load=load,
                             admission=args.goodput_admission, repeat=k),
                         Run("goodput", f"goodput-colocated{at}", policy="round_robin", colocated=p + d,
                             prefill=0, decode=0, load=load, use_pool=False,
                             admission=args.colocated_admission, repeat=k)]
    if "real" in experiments:
        # experiment 3 with the real model: the same two sides, admission as in the goodput runs
        rp_, rd = args.real_prefill, args.real_decode
        for k in range(1, repeats + 1):
            at = f"-r{k}" if repeats > 1 else ""
            runs += [Run("real", f"real-disaggregated{at}", prefill=rp_, decode=rd, engine="model",
                         admission=args.goodput_admission, repeat=k),
                     Run("real", f"real-colocated{at}", policy="round_robin", colocated=rp_ + rd, prefill=0,
                         decode=0, engine="model", use_pool=False, admission=args.colocated_admission, repeat=k)]
    return runs


def goodput_loads(value) -> list[float]:
    """``--goodput-load``: one load or a comma-separated sweep, as multiples of the base load."""
    loads = [float(v) for v in str(value).split(",") if v.strip()]
    if not loads or any(x <= 0 for x in loads):
        raise SystemExit(f"--goodput-load wants positive multiples of the base load, got {value!r}")
    return loads


def _slos(args, profile, requests: list[rp.PreparedRequest]) -> tuple[float, float]:
    """The objectives: as given, or Mooncake's rule of thumb from the calibrated costs: TTFT 10x and
    TBT 5x what a request of mean length sees alone."""
    mean_prompt = sum(len(r.prompt) for r in requests) / max(1, len(requests))
    ttft = args.ttft_slo or round(10 * profile.prefill_seconds(int(mean_prompt), 0), 2)
    tbt = args.tbt_slo or round(5 * profile.step_seconds(1, int(mean_prompt)), 3)
    return ttft, tbt


def run_one(run: Run, args, *, model_dir: Path, models_dir: Path, calibration: Path, rows: list[dict],
            out_dir: Path, slos: tuple[float, float], rate: float | None, time_scale: float) -> dict:
    from yuebing.cluster import LocalCluster
    from libs.config import from_env
    from libs.engine.loading import read_shape
    from libs.natsserver import free_port

    shape = read_shape(model_dir)
    ttft_slo, tbt_slo = slos
    # the cluster's files (NATS store, pool, logs) go to a scratch dir, kept only with --keep-data
    data_dir = Path(tempfile.mkdtemp(prefix=f"yuebing-{run.name}-"))
    settings = from_env(
        model=str(model_dir), data_dir=str(data_dir), models_dir=str(models_dir), port=free_port(),
        engine=run.engine, calibration=str(calibration), policy=run.policy, admission=run.admission,
        ttft_slo=ttft_slo, tbt_slo=tbt_slo, max_running=args.max_running, urgent_rows=args.urgent_rows,
        no_auth=True, use_pool=run.use_pool,
        threads=1 if run.engine == "sim" else None,
        prefill_cache_bytes=args.prefill_cache_mb << 20,
        pool_writes=getattr(args, "pool_writes", None) if run.use_pool else None,
        peer_fetch=False if getattr(args, "no_peer_fetch", False) else None,
        dram_bytes=None if args.pool_dram_mb is None else args.pool_dram_mb << 20,
        disk_bytes=None if args.pool_disk_mb is None else args.pool_disk_mb << 20,
    )
    cluster = LocalCluster(settings, prefill=run.prefill, decode=run.decode, cachestore=1, colocated=run.colocated)
    requests, dropped = rp.prepare(rows, token_scale=args.token_scale, time_scale=time_scale * run.load,
                                   rate=None if rate is None else rate * run.load, vocab=shape.vocab_size,
                                   max_context=shape.max_context, seed=0, start=args.start,
                                   output_scale=args.output_scale)
    t0 = time.perf_counter()
    try:
        cluster.start(ready_timeout=600)
        _say(f"[{run.name}] cluster up in {time.perf_counter() - t0:.0f}s ({run.engine} engine, "
             + (f"{run.colocated} colocated workers" if run.colocated else f"{run.prefill}P+{run.decode}D")
             + f", policy {run.policy}, pool {'on, writes ' + settings.pool_writes if run.use_pool else 'off'}, "
             + ("peer fetch, " if run.policy == "global_cache_aware" and settings.peer_fetch else "")
             + f"admission {run.admission}); "
             f"replaying {len(requests)} requests")
        before, started = cluster.usage(), time.perf_counter()
        result = asyncio.run(rp.replay(cluster.url, requests, ttft_slo=ttft_slo, tbt_slo=tbt_slo,
                                       progress=not args.no_progress))
        cpu = cpu_use(before, cluster.usage(), wall=time.perf_counter() - started, cores=len(available_cores()))
    finally:
        cluster.stop()
        arenas = arena_use(cluster.log_dir)
        if args.keep_data:
            _say(f"[{run.name}] cluster files and logs kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    result.dropped = dropped
    result.config = {"run": run.name, "experiment": run.experiment, "policy": run.policy, "use_pool": run.use_pool,
                     "admission": run.admission, "engine": run.engine, "prefill": run.prefill, "decode": run.decode,
                     "colocated": run.colocated, "token_scale": args.token_scale,
                     "output_scale": args.output_scale or args.token_scale,
                     "time_scale": time_scale * run.load, "rate": None if rate is None else rate * run.load,
                     "start": args.start, "requests": len(requests), "max_running": args.max_running,
                     "urgent_rows": settings.urgent_rows,
                     "prefill_cache_mb": args.prefill_cache_mb, "pool_writes": settings.pool_writes,
                     "peer_fetch": settings.peer_fetch,
                     "pool_dram_mb": settings.dram_bytes >> 20, "pool_disk_mb": settings.disk_bytes >> 20}
    summary = rp.summarize(result, ttft_slo, tbt_slo)
    summary.update(cpu)
    summary["kv_arena"] = arenas
    rp.write_json(result, summary, out_dir / f"{run.name}.json")
    rp.plot(result, summary, out_dir / f"{run.name}.png")
    _say(f"[{run.name}] mean TTFT {summary.get('ttft_mean_ms')} ms, attainment {summary['slo_attainment']}, "
         f"goodput {summary['goodput_rps']} req/s, rejected {summary['rejected']}, failed {summary['failed']}; "
         f"cores busy {summary['cpu_busy']:.0%}, CPU s by process (of which system): "
         + ", ".join(f"{k} {v:.0f} ({summary['cpu_system_seconds'].get(k, 0):.0f})"
                     for k, v in summary["cpu_seconds"].items())
         + f"; page faults {sum(summary['page_faults'].values()) / 1e6:.2f} M"
         + "".join(f"; {k} KV buffers {v['kept']} kept / {v['fresh']} fresh ({v['fresh_mb']:.0f} MB), "
                   f"{v['dropped_mb']:.0f} MB freed" for k, v in arenas.items()))
    return summary


def arena_use(log_dir: Path) -> dict[str, dict[str, float]]:
    """The KV arenas' use over a run, summed over the instances by arena name, from the
    ``kv_arena`` line each prefill and decode logs at stop: buffers the slab served and fresh
    ones (paged in on first touch, the slab being full), fresh MB, and MB of those freed."""
    out: dict[str, dict[str, float]] = {}
    for path in sorted(Path(log_dir).glob("*.log")):
        with open(path, "rb") as f:
            for line in f:
                if b'"kv_arena"' not in line:
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("event") != "kv_arena":
                    continue
                t = out.setdefault(ev.get("arena", "?"), {"kept": 0, "fresh": 0, "fresh_mb": 0.0, "dropped_mb": 0.0})
                t["kept"] += ev.get("reused", 0)
                t["fresh"] += ev.get("allocated", 0)
                t["fresh_mb"] = round(t["fresh_mb"] + ev.get("allocated_bytes", 0) / 2**20, 1)
                t["dropped_mb"] = round(t["dropped_mb"] + ev.get("dropped_bytes", 0) / 2**20, 1)
    return out


def cpu_use(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], *, wall: float,
            cores: int) -> dict:
    """What each kind of process used between two ``LocalCluster.usage`` snapshots (each figure
    most first), and the share of the host's cores kept busy over ``wall`` seconds. A run whose
    processes spend much of their time in the kernel, on each fault of a fresh page, measures its
    host more than its scheduling: on a virtual machine that hands freed memory back to its
    hypervisor, a fault has cost from a few to over 100 us."""
    out: dict = {}
    for name, now in after.items():
        was, nd = before.get(name, {}), 0 if name == "page_faults" else 1
        used = {k: round(max(0, v - was.get(k, 0)), nd) for k, v in now.items()}
        out[name] = dict(sorted(used.items(), key=lambda kv: -kv[1]))
    busy = sum(out.get("cpu_seconds", {}).values()) / (wall * cores) if wall > 0 and cores > 0 else 0.0
    out["cpu_busy"] = round(busy, 3)
    return out


COLS = ("run", "requests", "completed", "rejected", "failed", "ttft_mean_ms", "ttft_p90_ms", "tbt_p90_ms",
        "slo_attainment", "slo_attainment_admitted", "goodput_rps", "wasted_prefill_tokens", "prefix_hit_ratio")


def table(runs: list[Run]) -> str:
    return format_table([{"run": r.name, **r.summary} for r in runs], list(COLS))


OVERLOAD_FIGURES = (("rejected", "rejected"), ("wasted_prefill_tokens", "wasted_prefill_tokens"),
                    ("attainment_admitted", "slo_attainment_admitted"), ("goodput_rps", "goodput_rps"))


def overload_figures(runs: list[Run]) -> dict:
    """Per admission mode, its figures (the mean over repeats when there are several), and how many
    repeats had prediction-based rejection ahead of plain early rejection on each count: fewer
    rejected, less prefill wasted, no lower attainment of the admitted requests."""
    by: dict[int, dict[str, dict]] = {}
    for r in runs:
        if r.summary:
            by.setdefault(r.repeat, {})[r.admission] = r.summary
    out: dict = {}
    for adm in ADMISSIONS:
        done = [modes[adm] for modes in by.values() if adm in modes]
        for name, key in OVERLOAD_FIGURES:
            if done:
                values = [s[key] for s in done]
                mean = sum(values) / len(values)
                out[f"overload_{adm}_{name}"] = values[0] if len(values) == 1 else round(mean, 4)
    pairs = [(m["early"], m["predictive"]) for m in by.values() if "early" in m and "predictive" in m]
    if pairs:
        out["overload_repeats"] = len(pairs)
        out["overload_predictive_fewer_rejected_runs"] = sum(p["rejected"] < e["rejected"] for e, p in pairs)
        out["overload_predictive_less_waste_runs"] = sum(
            p["wasted_prefill_tokens"] < e["wasted_prefill_tokens"] for e, p in pairs)
        out["overload_predictive_attainment_not_lower_runs"] = sum(
            p["slo_attainment_admitted"] >= e["slo_attainment_admitted"] for e, p in pairs)
    return out


def _ordered(ttft: dict[str, float]) -> bool:
    """The paper's ordering of mean TTFT: global < local < least_loaded < random."""
    return (ttft["global_cache_aware"] < ttft["local_cache_aware"] < ttft["least_loaded"] < ttft["random"])


def placement_figures(runs: list[Run]) -> dict:
    """Each policy's mean TTFT (the mean over repeats when there are several), global's ratio to
    least_loaded on those means when both ran, and whether the ordering holds when all four ran;
    with several repeats also each repeat's ratio and in how many repeats the ordering held."""
    by: dict[int, dict[str, float]] = {}
    for r in runs:
        if r.summary.get("ttft_mean_ms") is not None:
            by.setdefault(r.repeat, {})[r.policy] = r.summary["ttft_mean_ms"]
    out: dict = {}
    means: dict[str, float] = {}
    for pol in PLACEMENT_POLICIES:
        values = [ttft[pol] for ttft in by.values() if pol in ttft]
        if values:
            means[pol] = values[0] if len(values) == 1 else round(sum(values) / len(values), 2)
            out[f"placement_ttft_mean_ms_{pol}"] = means[pol]
    pair = ("global_cache_aware", "least_loaded")
    if all(p in means for p in pair):
        out["placement_global_vs_least_loaded"] = ratio(means[pair[0]], means[pair[1]])
        both = [ttft for _, ttft in sorted(by.items()) if all(p in ttft for p in pair)]
        if len(both) > 1:
            out["placement_global_vs_least_loaded_runs"] = [ratio(t[pair[0]], t[pair[1]]) for t in both]
            out["placement_repeats"] = len(both)
    if len(means) == len(PLACEMENT_POLICIES):
        out["placement_ordering_holds"] = _ordered(means)
        full = [ttft for ttft in by.values() if len(ttft) == len(PLACEMENT_POLICIES)]
        if len(full) > 1:
            out["placement_ordering_holds_runs"] = sum(_ordered(t) for t in full)
    return out


def figures(runs: list[Run]) -> dict:
    out: dict = placement_figures([r for r in runs if r.experiment == "placement"])
    out.update(overload_figures([r for r in runs if r.experiment == "overload"]))
    out.update(goodput_figures([r for r in runs if r.experiment in ("goodput", "real")]))
    return out


def goodput_figures(runs: list[Run]) -> dict:
    """Per load of the goodput runs (and for the real-model pair), each side's goodput and their
    ratio, over the repeats in which both sides ran: the mean of each side and the ratio of the
    means, and with several repeats each repeat's ratio and how many there were. Keys carry the
    load (``goodput_x3_...``) when several loads ran."""
    pairs: dict[tuple[str, float], dict[int, dict[str, dict]]] = {}
    for r in runs:
        repeats = pairs.setdefault((r.experiment, r.load), {})
        if r.summary:
            repeats.setdefault(r.repeat, {})["colocated" if r.colocated else "disaggregated"] = r.summary
    loads = {exp: sum(1 for e, _ in pairs if e == exp) for exp, _ in pairs}
    out: dict = {}
    for (exp, load), repeats in pairs.items():
        done = [(m["disaggregated"]["goodput_rps"], m["colocated"]["goodput_rps"]) for _, m in sorted(repeats.items())
                if "disaggregated" in m and "colocated" in m]
        if not done:
            continue
        key = exp + ("" if loads[exp] == 1 else f"_x{load:g}".replace(".", "_"))
        dis = sum(d for d, _ in done) / len(done)
        col = sum(c for _, c in done) / len(done)
        out[f"{key}_disaggregated_rps"] = round(dis, 4)
        out[f"{key}_colocated_rps"] = round(col, 4)
        out[f"{key}_ratio"] = ratio(dis, col, 2)
        if len(done) > 1:
            out[f"{key}_ratios"] = [ratio(d, c, 2) for d, c in done]
            out[f"{key}_repeats"] = len(done)
    return out


def main(args) -> int:
    import orjson

    from libs.engine.calibrate import calibrate
    from libs.config import from_env
    from libs.engine.costs import CostProfile, profile_path
    from libs.log import configure
    from libs.engine.loading import DEFAULT_MODEL, default_data_dir, model_identity, resolve_model

    configure("bench", level="WARNING")
    experiments = [e.strip() for e in args.experiments.split(",") if e.strip()]
    unknown = set(experiments) - set(EXPERIMENTS)
    if unknown:
        raise SystemExit(f"unknown experiments {sorted(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    args.policies = [p.strip() for p in (args.policies or "").split(",") if p.strip()] or list(PLACEMENT_POLICIES)
    unknown = set(args.policies) - set(PLACEMENT_POLICIES)
    if unknown:
        raise SystemExit(f"unknown policies {sorted(unknown)}; choose from {', '.join(PLACEMENT_POLICIES)}")
    args.admissions = [a.strip() for a in (args.admissions or "").split(",") if a.strip()] or list(ADMISSIONS)
    unknown = set(args.admissions) - set(ADMISSIONS)
    if unknown:
        raise SystemExit(f"unknown admission modes {sorted(unknown)}; choose from {', '.join(ADMISSIONS)}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats wants at least 1, got {args.repeats}")
    args.goodput_admission = args.goodput_admission or from_env().admission
    out_dir = Path(args.out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    models_dir = resolve_models_dir(args)
    model_dir = resolve_model(args.model or DEFAULT_MODEL, models_dir)
    import torch

    calibration = Path(args.calibration) if args.calibration else profile_path(
        default_data_dir(), model_identity(model_dir), torch.get_num_threads())
    if not calibration.exists():
        _say(f"calibrating {model_dir.name} on this machine (once; {calibration})")
        calibrate(model_dir).save(calibration)
    profile = CostProfile.load(calibration)
    rows = read_trace(Path(args.trace), start=args.start, limit=args.requests)
    probe, _ = rp.prepare(rows, token_scale=args.token_scale, time_scale=1.0, max_context=None)
    slos = _slos(args, profile, probe)
    reuse = trace_bound(probe, TRACE_BLOCK_TOKENS // args.token_scale, from_env().block_size)
    _say(f"bench sched: {len(rows)} requests from line {args.start} of {args.trace}, token_scale "
         f"{args.token_scale}, time_scale {args.time_scale} (overload x{args.overload}), SLOs TTFT "
         f"{slos[0]}s / TBT {slos[1]}s, profile {calibration}; an unbounded cache could reuse "
         f"{reuse['bound_full_blocks']:.3f} of prompt tokens, {reuse['read_again_blocks']} of the "
         f"{reuse['distinct_blocks']} distinct blocks written are ever read again")
    runs = plan(experiments, args)
    for run in runs:
        if run.engine == "model":
            real_rows = rows[: args.real_requests]
            run.summary = run_one(run, args, model_dir=model_dir, models_dir=models_dir, calibration=calibration,
                                  rows=real_rows, out_dir=out_dir, slos=slos, rate=args.real_rate, time_scale=1.0)
        else:
            run.summary = run_one(run, args, model_dir=model_dir, models_dir=models_dir, calibration=calibration,
                                  rows=rows, out_dir=out_dir, slos=slos, rate=args.rate, time_scale=args.time_scale)
    for exp in experiments:
        mine = [r for r in runs if r.experiment == exp]
        if mine:
            _say(f"\n{exp}\n" + table(mine))
    figs = figures(runs)
    figs.update({"ttft_slo_s": slos[0], "tbt_slo_s": slos[1], "requests": len(rows), "token_scale": args.token_scale,
                 "output_scale": args.output_scale or args.token_scale, "time_scale": args.time_scale,
                 "max_running": args.max_running, "goodput_loads": goodput_loads(args.goodput_load),
                 "goodput_admission": args.goodput_admission, "colocated_admission": args.colocated_admission,
                 "reuse_bound": round(reuse["bound_full_blocks"], 4),
                 "distinct_blocks": reuse["distinct_blocks"], "blocks_read_again": reuse["read_again_blocks"]})
    (out_dir / "figures.json").write_bytes(orjson.dumps(figs, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(figs).decode(), flush=True)
    return 0
