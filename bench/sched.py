"""``yuebing bench sched``: the scheduling experiments (Mooncake's Fig. 5, Table 3 and its capacity
claim) as curves over offered load, on real clusters of the simulated engine (8 prefill + 8 decode
by default), and the architectures with the real model at one rate.

First the capacity: the reference system (disaggregated, global_cache_aware, no admission control)
is sent the first slice of the trace all at once, and its completed requests per second are the
unit of load. Then every experiment sweeps offered loads (multiples of that capacity, the trace's
own arrival pattern compressed to that mean rate) over disjoint slices of the trace, repeated;
repeats are outermost, so each repeat is a full set of curves and a drift of the machine over the
hours falls on every series and load alike. Every run starts a fresh cluster (NATS, conductor,
cachestore, workers, gateway), replays its slice through the gateway's OpenAI API with the replay
tool (``bench.replay``), and stops it.

- placement: the four policies (only global_cache_aware draws on the pool); mean and p90 TTFT per
  load, global/least_loaded at each load, each policy's capacity (p90 TTFT within the SLO);
- architecture: disaggregated against the colocated baseline a user would run instead (chunked
  prefill between its decode steps, its own prefix cache, the best cache match and load), the same
  instances, prefix-cache memory, SLOs and admission on both sides (each of ``--arch-admissions``);
  capacity at 90 % of requests meeting both SLOs; goodput over the trace's duration at that load;
- overload: the three admission modes at heavy loads; the figures where early rejection refuses 20 %
  or more: rejected, prefill wasted on requests that then missed, goodput;
- real: the architectures on the real model (2P+1D against 3 colocated) at one fixed rate.

Output in ``--out-dir``: ``runs/<run>.json`` (each run's conditions and summary; ``--resume`` skips
those that exist), ``capacity.json``, ``curves.json`` (the figures and every point), a PNG per
experiment; a table per experiment and a final JSON line of the figures on stdout.
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
from bench import sched_curves as sc
from bench.common import TRACE_BLOCK_TOKENS, ratio, read_trace, resolve_models_dir, trace_bound
from libs.config import from_env
from libs.cpus import available_cores
from yuebing.tables import format_table

EXPERIMENTS = ("placement", "architecture", "overload", "real")
PLACEMENT_POLICIES = ("random", "least_loaded", "local_cache_aware", "global_cache_aware")
ADMISSIONS = ("none", "early", "predictive")
ARCHITECTURES = ("disaggregated", "colocated")


@dataclass
class Run:
    experiment: str
    series: str  # the line this run is a point of: a policy, architecture/admission, an admission mode
    policy: str = "global_cache_aware"
    admission: str = "none"
    use_pool: bool = True  # False: each instance reuses only its own DRAM cache
    colocated: int = 0  # >0: that many colocated workers instead of prefill/decode instances
    prefill: int = 8
    decode: int = 8
    engine: str = "sim"
    load: float = 1.0  # offered load, as a multiple of the measured capacity (of the base rate: real)
    slice: int = 1  # which disjoint slice of the trace (1 = the first --requests from --start)
    repeat: int = 1
    prefill_cache_mb: int = 0  # each instance's own block cache (0: --prefill-cache-mb)
    prefill_chunk: int = 0  # tokens of a prefill chunk (0: the deployment's)
    rate: float | None = None  # fixed arrival rate instead of the load's (the capacity probe, real)
    summary: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        series = self.series.replace("/", "-")
        return f"{self.experiment}-{series}-x{self.load:g}-s{self.slice}-r{self.repeat}"


def _say(msg: str) -> None:
    """Progress on stdout, where the experiment's tables go (a long run's story reads in one place)."""
    print(msg, flush=True)


def parse_loads(value, what: str) -> list[float]:
    """A comma-separated list of positive multiples of the capacity."""
    loads = sorted({float(v) for v in str(value).split(",") if v.strip()})
    if not loads or any(x <= 0 for x in loads):
        raise SystemExit(f"{what} wants positive multiples of the capacity, got {value!r}")
    return loads


def colocated_run(experiment: str, admission: str, args, **kw) -> Run:
    """The baseline a user would run instead: as many workers as the disaggregated side has
    instances, each prefilling its requests in chunks between its own decode steps (a colocated
    worker's prefill gives the model thread back after every chunk) with its own prefix cache,
    placed where the cache match and the load are best (local_cache_aware); the prefix caches add
    up to the disaggregated side's prefill caches and pool DRAM together."""
    p, d = kw.pop("prefill", args.prefill), kw.pop("decode", args.decode)
    pool_mb = args.pool_dram_mb if args.pool_dram_mb is not None else from_env().dram_bytes >> 20
    cache = (p * args.prefill_cache_mb + pool_mb) // (p + d)
    return Run(experiment, f"colocated/{admission}", policy="local_cache_aware", colocated=p + d, prefill=0,
               decode=0, use_pool=False, admission=admission, prefill_cache_mb=cache,
               prefill_chunk=args.colocated_chunk, **kw)


def colocated_chunk(profile, tbt_slo: float, block: int, mean_prompt: float, rows: int = 8) -> int:
    """The colocated baseline's prefill chunk: the most whole blocks whose prefill and one decode step
    of ``rows`` rows of a mean prompt's context fit the TBT objective together (Sarathi-Serve's rule
    for the token budget of a step), at least one block."""
    step = profile.step_seconds(rows, int(rows * mean_prompt))
    n = block
    while profile.prefill_seconds(n + block, 0) + step <= tbt_slo:
        n += block
    return n


def plan(experiments: list[str], args) -> list[Run]:
    """Every run, repeats outermost (a full curve per repeat, so that a drift of the machine over
    the hours falls on every series and load alike), then slices, loads and series."""
    p, d = args.prefill, args.decode
    runs: list[Run] = []
    for k in range(1, args.repeats + 1):
        for sl in range(1, args.slices + 1):
            if "placement" in experiments:
                # as in the paper's comparison, only the global policy draws on the pool; the others
                # place requests without it and reuse what the chosen instance holds
                for load in args.loads:
                    runs += [Run("placement", pol, policy=pol, prefill=p, decode=d, use_pool=pol == "global_cache_aware",
                                 load=load, slice=sl, repeat=k) for pol in args.policies]
            if "architecture" in experiments:
                for load in args.loads:
                    for adm in args.arch_admissions:
                        runs.append(Run("architecture", f"disaggregated/{adm}", prefill=p, decode=d, load=load,
                                        admission=adm, slice=sl, repeat=k))
                        runs.append(colocated_run("architecture", adm, args, load=load, slice=sl, repeat=k))
    for k in range(1, args.overload_repeats + 1):
        for sl in range(1, args.slices + 1):
            if "overload" in experiments:
                for load in args.overload_loads:
                    runs += [Run("overload", adm, admission=adm, prefill=p, decode=d, load=load, slice=sl, repeat=k)
                             for adm in args.admissions]
    if "real" in experiments:
        # the architectures with the real model, at one fixed rate: 2P+1D against 3 colocated workers
        rp_, rd = args.real_prefill, args.real_decode
        for k in range(1, args.repeats + 1):
            runs += [Run("real", f"disaggregated/{args.real_admission}", prefill=rp_, decode=rd, engine="model",
                         admission=args.real_admission, rate=args.real_rate, repeat=k),
                     colocated_run("real", args.real_admission, args, prefill=rp_, decode=rd, engine="model",
                                   rate=args.real_rate, repeat=k)]
    return runs


def slices(rows: list[dict], count: int, size: int) -> list[list[dict]]:
    """``count`` disjoint consecutive slices of ``size`` requests (fewer when the rows run out)."""
    return [rows[i * size:(i + 1) * size] for i in range(count) if rows[i * size:(i + 1) * size]]


def native_rate(rows: list[dict]) -> float:
    """The trace's own arrival rate over ``rows`` (requests per second of its timestamps)."""
    stamps = [float(r.get("timestamp", 0)) for r in rows]
    span = (max(stamps) - min(stamps)) / 1000.0 if stamps else 0.0
    if span <= 0:
        raise SystemExit("the trace slice has no arrival span: its requests share one timestamp")
    return (len(rows) - 1) / span


def _slos(args, profile, requests: list[rp.PreparedRequest]) -> tuple[float, float]:
    """The objectives: as given, or Mooncake's rule of thumb from the calibrated costs: TTFT 10x and
    TBT 5x what a request of mean length sees alone."""
    mean_prompt = sum(len(r.prompt) for r in requests) / max(1, len(requests))
    ttft = args.ttft_slo or round(10 * profile.prefill_seconds(int(mean_prompt), 0), 2)
    tbt = args.tbt_slo or round(5 * profile.step_seconds(1, int(mean_prompt)), 3)
    return ttft, tbt


def run_one(run: Run, args, *, model_dir: Path, models_dir: Path, calibration: Path, rows: list[dict],
            out_dir: Path, slos: tuple[float, float], capacity: float | None) -> dict:
    """Start a fresh cluster for ``run``, replay ``rows`` (its slice) at the run's offered rate
    (``run.load`` x ``capacity`` on the trace's own arrival pattern, or ``run.rate`` evenly spaced),
    stop it; the summary (also in ``out_dir/runs/<name>.json``)."""
    from yuebing.cluster import LocalCluster
    from libs.engine.loading import read_shape
    from libs.natsserver import free_port

    shape = read_shape(model_dir)
    ttft_slo, tbt_slo = slos
    # the cluster's files (NATS store, pool, logs) go to a scratch dir, kept only with --keep-data
    data_dir = Path(tempfile.mkdtemp(prefix=f"yuebing-{run.name}-"))
    cache_mb = run.prefill_cache_mb or args.prefill_cache_mb
    settings = from_env(
        model=str(model_dir), data_dir=str(data_dir), models_dir=str(models_dir), port=free_port(),
        engine=run.engine, calibration=str(calibration), policy=run.policy, admission=run.admission,
        ttft_slo=ttft_slo, tbt_slo=tbt_slo, max_running=args.max_running, urgent_rows=args.urgent_rows,
        no_auth=True, use_pool=run.use_pool, sim_seed=args.seed,
        threads=1 if run.engine == "sim" else None,
        prefill_cache_bytes=cache_mb << 20, prefill_chunk=run.prefill_chunk or None,
        pool_writes=getattr(args, "pool_writes", None) if run.use_pool else None,
        peer_fetch=False if getattr(args, "no_peer_fetch", False) else None,
        dram_bytes=None if args.pool_dram_mb is None else args.pool_dram_mb << 20,
        disk_bytes=None if args.pool_disk_mb is None else args.pool_disk_mb << 20,
    )
    cluster = LocalCluster(settings, prefill=run.prefill, decode=run.decode, cachestore=1, colocated=run.colocated)
    if run.rate is not None:
        time_scale, rate = 1.0, run.rate
    else:
        time_scale, rate = run.load * capacity / native_rate(rows), None
    first = args.start + (run.slice - 1) * args.requests
    requests, dropped = rp.prepare(rows, token_scale=args.token_scale, time_scale=time_scale, rate=rate,
                                   vocab=shape.vocab_size, max_context=shape.max_context, seed=0, start=first,
                                   output_scale=args.output_scale)
    span = max((r.send_at for r in requests), default=0.0)
    t0 = time.perf_counter()
    try:
        cluster.start(ready_timeout=600)
        _say(f"[{run.name}] cluster up in {time.perf_counter() - t0:.0f}s ({run.engine} engine, "
             + (f"{run.colocated} colocated workers" if run.colocated else f"{run.prefill}P+{run.decode}D")
             + f", policy {run.policy}, pool {'on, writes ' + settings.pool_writes if run.use_pool else 'off'}, "
             + ("peer fetch, " if run.policy == "global_cache_aware" and settings.peer_fetch else "")
             + f"own cache {cache_mb} MB, prefill chunk {settings.prefill_chunk}, admission {run.admission}); replaying {len(requests)} requests "
             f"from trace line {first} over {span:.0f} s")
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
    result.config = {"run": run.name, "experiment": run.experiment, "series": run.series, "load": run.load,
                     "slice": run.slice, "repeat": run.repeat, "policy": run.policy, "use_pool": run.use_pool,
                     "admission": run.admission, "engine": run.engine, "prefill": run.prefill, "decode": run.decode,
                     "colocated": run.colocated, "token_scale": args.token_scale,
                     "output_scale": args.output_scale or args.token_scale,
                     "time_scale": round(time_scale, 4), "rate": rate, "capacity_rps": capacity,
                     "first_line": first, "requests": len(requests), "max_running": settings.max_running,
                     "urgent_rows": settings.urgent_rows, "prefill_cache_mb": cache_mb,
                     "prefill_chunk": settings.prefill_chunk,
                     "pool_writes": settings.pool_writes, "peer_fetch": settings.peer_fetch,
                     "pool_dram_mb": settings.dram_bytes >> 20, "pool_disk_mb": settings.disk_bytes >> 20,
                     "sim_noise": settings.sim_noise, "sim_seed": settings.sim_seed}
    summary = rp.summarize(result, ttft_slo, tbt_slo)
    # goodput over the trace's duration at this load: a fixed denominator (the time to the last
    # completion would reward a slow drain), and the load that was offered
    summary["goodput_fixed_rps"] = ratio(summary["slo_ok"], span, 4)
    summary["offered_rps"] = ratio(len(requests), span, 4)
    summary["rejected_share"] = ratio(summary["rejected"], len(requests), 4)
    summary.update(cpu)
    summary["kv_arena"] = arenas
    write_run(out_dir, run, result.config, summary)
    if args.keep_records:
        rp.write_json(result, summary, out_dir / "records" / f"{run.name}.json")
        rp.plot(result, summary, out_dir / "records" / f"{run.name}.png")
    _say(f"[{run.name}] mean TTFT {summary.get('ttft_mean_ms')} ms, p90 {summary.get('ttft_p90_ms')} ms, "
         f"attainment {summary['slo_attainment']}, goodput {summary['goodput_fixed_rps']} req/s over the trace, "
         f"rejected {summary['rejected']}, failed {summary['failed']}, prefix hits {summary['prefix_hit_ratio']}; "
         f"cores busy {summary['cpu_busy']:.0%}, CPU s by process: "
         + ", ".join(f"{k} {v:.0f}" for k, v in summary["cpu_seconds"].items()))
    return summary


def write_run(out_dir: Path, run: Run, config: dict, summary: dict) -> Path:
    import orjson

    path = out_dir / "runs" / f"{run.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps({"config": config, "summary": summary}, option=orjson.OPT_INDENT_2))
    return path


def read_run(out_dir: Path, run: Run) -> dict | None:
    """A finished run's summary from an earlier invocation (``--resume``), if there is one."""
    path = out_dir / "runs" / f"{run.name}.json"
    try:
        return json.loads(path.read_text())["summary"]
    except (OSError, ValueError, KeyError):
        return None


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


COLS = ("series", "load", "n", "offered_rps", "ttft_mean_ms", "ttft_p90_ms", "tbt_p90_ms", "slo_attainment",
        "goodput_fixed_rps", "rejected_share", "wasted_prefill_tokens", "prefix_hit_ratio", "failed")


def points(runs: list[Run]) -> list[dict]:
    return [sc.point(r.experiment, r.series, r.load, r.slice, r.repeat, r.summary) for r in runs if r.summary]


def table(pts: list[dict]) -> str:
    """A row per series and load: each metric's mean over the slices and repeats, with its range."""
    rows: list[dict] = []
    curves = {m: sc.curve(pts, m) for m in COLS[3:]}
    keys = sorted({(p["series"], p["load"]) for p in pts})
    for series, load in keys:
        row: dict = {"series": series, "load": f"{load:g}"}
        for m in COLS[3:]:
            v = curves[m].get(series, {}).get(load)
            if v is None:
                continue
            row["n"] = v["n"]
            digits = 3 if v["mean"] < 10 else 0
            row[m] = f"{v['mean']:.{digits}f}" + (f" [{v['min']:.{digits}f}-{v['max']:.{digits}f}]" if v["n"] > 1 else "")
        rows.append(row)
    return format_table(rows, list(COLS))


def _means(curves: dict[str, dict[float, dict]], digits: int = 4) -> dict[str, dict[str, float]]:
    return {s: {f"{load:g}": round(v["mean"], digits) for load, v in by.items()} for s, by in curves.items()}


def _keyed(d: dict[float, object]) -> dict[str, object]:
    return {f"{load:g}": v for load, v in d.items()}


OVERLOAD_METRICS = ("rejected", "rejected_share", "wasted_prefill_tokens", "goodput_fixed_rps", "slo_attainment_admitted")
HEAVY_REJECTION = 0.2  # the overload figures are read where early rejection refuses this share or more
ARCH_ATTAINMENT = 0.9  # an architecture's capacity: the load up to which this share meets both SLOs


def figures(runs: list[Run], *, ttft_slo: float) -> dict:
    """The named figures of every curve that ran (keys of loads are their multiples, as text)."""
    pts = points(runs)
    out: dict = {}
    pl = [p for p in pts if p["experiment"] == "placement"]
    if pl:
        mean, p90 = sc.curve(pl, "ttft_mean_ms"), sc.curve(pl, "ttft_p90_ms")
        out["placement_ttft_mean_ms"] = _means(mean, 1)
        out["placement_ttft_p90_ms"] = _means(p90, 1)
        out["placement_prefix_hit_ratio"] = _means(sc.curve(pl, "prefix_hit_ratio"))
        out["placement_global_vs_least_loaded_mean"] = _keyed(sc.ratios(mean, "global_cache_aware", "least_loaded"))
        out["placement_global_vs_least_loaded_p90"] = _keyed(sc.ratios(p90, "global_cache_aware", "least_loaded"))
        # a policy's capacity: up to which load its p90 TTFT meets the SLO
        out["placement_capacity"] = {s: sc.threshold_capacity(by, ttft_slo * 1000, below=True) for s, by in p90.items()}
    ar = [p for p in pts if p["experiment"] == "architecture"]
    if ar:
        att = sc.curve(ar, "slo_attainment")
        out["architecture_attainment"] = _means(att)
        out["architecture_goodput_rps"] = _means(sc.curve(ar, "goodput_fixed_rps"))
        caps = {s: sc.threshold_capacity(by, ARCH_ATTAINMENT, below=False) for s, by in att.items()}
        out["architecture_capacity"] = caps
        for adm in sorted({s.split("/", 1)[1] for s in caps}):
            dis, col = caps.get(f"disaggregated/{adm}"), caps.get(f"colocated/{adm}")
            if dis and col:
                out[f"architecture_capacity_ratio_{adm}"] = ratio(dis["crossing"], col["crossing"], 3)
    ov = [p for p in pts if p["experiment"] == "overload"]
    if ov:
        rej = sc.curve(ov, "rejected_share")
        heavy = [load for load, v in rej.get("early", {}).items() if v["mean"] >= HEAVY_REJECTION]
        out["overload_rejected_share"] = _means(rej)
        out["overload_heavy_loads"] = [f"{x:g}" for x in heavy]
        out["overload"] = {
            m: {s: {f"{load:g}": {k: round(v, 4) for k, v in stats.items()} for load, stats in by.items() if load in heavy}
                for s, by in sc.curve(ov, m).items()}
            for m in OVERLOAD_METRICS}
    real = [p for p in pts if p["experiment"] == "real"]
    if real:
        g = sc.curve(real, "goodput_fixed_rps")
        out["real_goodput_rps"] = {s: round(by[min(by)]["mean"], 4) for s, by in g.items()}
        out["real_attainment"] = {s: round(by[min(by)]["mean"], 4) for s, by in sc.curve(real, "slo_attainment").items()}
    return out


def measure_capacity(args, out_dir: Path, run_kw: dict) -> float:
    """The reference system's throughput (completed requests per second) when the first slice
    arrives all at once: the disaggregated cluster with the global policy and no admission control.
    Loads are multiples of it. Kept in ``out_dir/capacity.json`` (and read back with ``--resume``)."""
    path = out_dir / "capacity.json"
    if args.capacity:
        return args.capacity
    if args.resume and path.exists():
        return json.loads(path.read_text())["capacity_rps"]
    probe = Run("capacity", "global_cache_aware", prefill=args.prefill, decode=args.decode,
                rate=args.capacity_rate, load=0, slice=1, repeat=1)
    _say(f"measuring the capacity: the first slice sent at {args.capacity_rate:g} req/s")
    summary = run_one(probe, args, capacity=None, **run_kw)
    cap = summary["completed_rps"]
    if not cap or summary["completed"] < summary["requests"]:
        raise SystemExit(f"the capacity probe completed {summary['completed']} of {summary['requests']} requests")
    path.write_text(json.dumps({"capacity_rps": cap, "summary": summary}, indent=2))
    return cap


def _names(value: str | None, allowed: tuple[str, ...], what: str) -> list[str]:
    chosen = [v.strip() for v in (value or "").split(",") if v.strip()] or list(allowed)
    unknown = set(chosen) - set(allowed)
    if unknown:
        raise SystemExit(f"unknown {what} {sorted(unknown)}; choose from {', '.join(allowed)}")
    return [v for v in allowed if v in chosen]


def main(args) -> int:
    import orjson

    from libs.engine.calibrate import calibrate
    from libs.engine.costs import CostProfile, profile_path
    from libs.log import configure
    from libs.engine.modelpath import DEFAULT_MODEL, default_data_dir, resolve_model
    from libs.engine.loading import model_identity

    configure("bench", level="WARNING")
    experiments = _names(args.experiments, EXPERIMENTS, "experiments")
    args.policies = _names(args.policies, PLACEMENT_POLICIES, "policies")
    args.admissions = _names(args.admissions, ADMISSIONS, "admission modes")
    args.arch_admissions = _names(args.arch_admissions, ADMISSIONS, "admission modes")
    args.loads = parse_loads(args.loads, "--loads")
    args.overload_loads = parse_loads(args.overload_loads, "--overload-loads")
    for name in ("repeats", "overload_repeats", "slices", "requests"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} wants at least 1, got {getattr(args, name)}")
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
    rows = read_trace(Path(args.trace), start=args.start, limit=args.requests * args.slices)
    parts = slices(rows, args.slices, args.requests)
    if len(parts) < args.slices or len(parts[-1]) < args.requests:
        raise SystemExit(f"the trace has {len(rows)} requests from line {args.start}: not {args.slices} slices "
                         f"of {args.requests}")
    probe, _ = rp.prepare(rows, token_scale=args.token_scale, time_scale=1.0, max_context=None)
    slos = _slos(args, profile, probe)
    reuse = [trace_bound(rp.prepare(part, token_scale=args.token_scale, time_scale=1.0, max_context=None)[0],
                         TRACE_BLOCK_TOKENS // args.token_scale, from_env().block_size) for part in parts]
    _say(f"bench sched: {args.slices} slices of {args.requests} requests from line {args.start} of {args.trace}, "
         f"token_scale {args.token_scale}; loads {args.loads} (overload {args.overload_loads}) x the capacity; "
         f"{args.repeats} repeats ({args.overload_repeats} of overload); SLOs TTFT {slos[0]}s / TBT {slos[1]}s; "
         f"profile {calibration}; an unbounded cache could reuse "
         + ", ".join(f"{r['bound_full_blocks']:.3f}" for r in reuse) + " of prompt tokens (by slice)")
    mean_prompt = sum(len(r.prompt) for r in probe) / max(1, len(probe))
    block = from_env().block_size
    args.colocated_chunk = args.colocated_chunk or colocated_chunk(profile, slos[1], block, mean_prompt)
    _say(f"the colocated baseline prefills in chunks of {args.colocated_chunk} tokens between its decode steps")
    run_kw = dict(model_dir=model_dir, models_dir=models_dir, calibration=calibration, rows=parts[0],
                  out_dir=out_dir, slos=slos)
    sim = [e for e in experiments if e != "real"]
    capacity = measure_capacity(args, out_dir, run_kw) if sim else None
    if capacity:
        _say(f"capacity: {capacity:.3f} req/s (the trace's own rate: {native_rate(parts[0]):.3f} req/s)")
    runs = plan(experiments, args)
    conditions = {"requests_per_slice": args.requests, "slices": args.slices, "start": args.start,
                  "loads": args.loads, "overload_loads": args.overload_loads, "repeats": args.repeats,
                  "overload_repeats": args.overload_repeats, "capacity_rps": capacity, "ttft_slo_s": slos[0],
                  "tbt_slo_s": slos[1], "token_scale": args.token_scale,
                  "output_scale": args.output_scale or args.token_scale, "prefill": args.prefill,
                  "decode": args.decode, "seed": args.seed, "colocated_chunk": args.colocated_chunk,
                  "reuse_bound_by_slice": [round(r["bound_full_blocks"], 4) for r in reuse]}

    def save() -> dict:
        figs = {**conditions, **figures(runs, ttft_slo=slos[0])}
        doc = {"figures": figs, "points": points(runs)}
        (out_dir / "curves.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        return figs

    for i, run in enumerate(runs, 1):
        done = read_run(out_dir, run) if args.resume else None
        if done is not None:
            run.summary = done
            continue
        _say(f"run {i} of {len(runs)}")
        if run.engine == "model":
            run.summary = run_one(run, args, capacity=None, **{**run_kw, "rows": rows[: args.real_requests]})
        else:
            run.summary = run_one(run, args, capacity=capacity, **{**run_kw, "rows": parts[run.slice - 1]})
        save()
    figs = save()
    for exp in experiments:
        pts = [p for p in points(runs) if p["experiment"] == exp]
        if not pts:
            continue
        _say(f"\n{exp}\n" + table(pts))
        if exp in sc.PANELS:
            sc.plot(exp, pts, out_dir / f"{exp}.png", capacity_rps=capacity,
                    title=f"{exp}: {args.slices} slices x {args.repeats if exp != 'overload' else args.overload_repeats} "
                    f"repeats of {args.requests} requests, {args.prefill}P+{args.decode}D (sim engine)")
    print(orjson.dumps(figs).decode(), flush=True)
    return 0
