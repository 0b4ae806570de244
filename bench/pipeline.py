"""``yuebing bench pipeline``: time to first token of long prompts split over several prefill
instances (chunked pipeline parallelism) against one instance computing them alone.

Per configuration a fresh cluster (``LocalCluster``: the prefill instances, one decode, one
cachestore) is started with ``pipeline_max_stages`` set to the configuration's stage count (1: no
split) and admission off, one short warm-up request tells the conductor the model's layer count,
then ``--prompts`` prompts of ``--prompt-tokens`` token ids (distinct from their first token, so
nothing is reused) are sent one after the other as streaming completions of ``--output-tokens``
tokens. TTFT is measured at the client from the request's send to its first token. The conductor's
log says over how many instances each prompt actually ran (the split is its decision, from its cost
model: the calibrated profile ``--calibration``).

Two engines:

- ``--engine real``: the model itself. One configuration per count in ``--instances`` (default
  1,2,4): that many prefill instances, at most that many stages. The local cluster splits the
  host's cores between its model workers as ``yuebing up`` does (``--threads N``: N torch threads
  each instead); on a machine with fewer cores than instances the stages share the cores, which
  bounds what splitting can gain. Each run's line says how the cores were shared.
- ``--engine sim``: the simulated engine (compute replaced by sleeping the calibrated cost, real KV
  bytes on the bus), ``--sim-prefill`` (default 8) prefill instances in every configuration, at
  most ``--instances`` stages.

It prints a table (a row per configuration: TTFT mean, p50 and max, the stages used, the speed-up
over one stage) and a final JSON line (also written to ``--out``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import det_tokens, emit, entry, median, percentile, ratio, resolve_models_dir, say, stream_body

WARMUP_TOKENS = 64


def _stages_used(log_file: Path) -> dict[str, int]:
    """Request id -> the prefill instances its prompt ran on, from the conductor's "scheduled" lines."""
    used: dict[str, int] = {}
    if not log_file.exists():
        return used
    for line in log_file.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "scheduled":
            used[rec.get("request_id", "")] = len(rec.get("stages") or []) or 1
    return used


async def _send(url: str, model: str, prompts: list[list[int]], output_tokens: int) -> list:
    import aiohttp

    from bench.sse import stream_completion

    from bench.common import model_name

    out = []
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        model = model or await model_name(s, url)
        for p in prompts:
            out.append(await stream_completion(s, url + "/v1/completions", stream_body(model, p, output_tokens)))
    return out


def run_config(args, *, engine: str, prefill: int, stages: int, prompts: list[list[int]], warmup: list[int],
               model_dir: Path, models_dir: Path, calibration: Path) -> dict:
    from libs.config import from_env
    from libs.natsserver import free_port
    from yuebing.cluster import LocalCluster

    data_dir = Path(tempfile.mkdtemp(prefix=f"yuebing-pipeline-{engine}-{stages}-"))
    settings = from_env(
        model=str(model_dir), data_dir=str(data_dir), models_dir=str(models_dir), port=free_port(),
        engine="model" if engine == "real" else "sim",
        calibration=str(calibration), admission="none", no_auth=True, pipeline_max_stages=stages,
        pipeline_min_tokens=args.min_tokens, threads=1 if engine == "sim" else args.threads,
        dtype=args.dtype if engine == "real" else None)
    cluster = LocalCluster(settings, prefill=prefill, decode=1, cachestore=1)
    label = f"{engine}, {prefill} prefill, at most {stages} stage{'s' if stages > 1 else ''}"
    cores = ""
    try:
        t0 = time.perf_counter()
        cluster.start(ready_timeout=600)
        cores = cluster.describe_cores()
        say(f"[{label}] cluster up in {time.perf_counter() - t0:.0f}s; {cores}")
        asyncio.run(_send(cluster.url, "", [warmup], 2))
        results = asyncio.run(_send(cluster.url, "", prompts, args.output_tokens))
    finally:
        cluster.stop()
        used = _stages_used(cluster.log_dir / "conductor-0.log")
        if args.keep_data:
            say(f"[{label}] cluster files and logs kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    ttfts = [r.token_times[0] - r.sent for r in results if r.ok and r.token_times]
    errors = [r.error for r in results if not r.ok]
    ran_on = [used.get(r.request_id, 0) for r in results if r.ok]
    say(f"[{label}] TTFT " + ", ".join(f"{t:.2f}s" for t in ttfts) + f"; stages {ran_on}"
        + (f"; errors {errors}" if errors else ""))
    return {"engine": engine, "prefill": prefill, "max_stages": stages, "dtype": settings.dtype, "cores": cores,
            "ttft_s": [round(t, 4) for t in ttfts], "stages_used": ran_on,
            "ttft_mean_s": round(sum(ttfts) / len(ttfts), 4) if ttfts else None,
            "ttft_p50_s": round(median(ttfts), 4) if ttfts else None,
            "ttft_max_s": round(max(ttfts), 4) if ttfts else None,
            "errors": len(errors), "error_samples": errors[:3]}


def main(args) -> int:
    return entry(_main, args)


def _main(args) -> int:
    import os

    import torch

    from libs.config import DEFAULT_MODEL, default_data_dir
    from libs.engine.calibrate import calibrate
    from libs.engine.costs import profile_path
    from libs.engine.modelpath import resolve_model
    from libs.engine.loading import model_identity, read_shape

    counts = sorted({int(x) for x in str(args.instances).split(",") if x.strip()})
    if not counts or counts[0] < 1:
        raise SystemExit(f"--instances wants counts of at least 1, got {args.instances!r}")
    engines = ["real", "sim"] if args.engine == "both" else [args.engine]
    models_dir = resolve_models_dir(args)
    model_dir = resolve_model(args.model or DEFAULT_MODEL, models_dir)
    shape = read_shape(model_dir)
    if args.prompt_tokens + args.output_tokens > shape.max_context:
        raise SystemExit(f"--prompt-tokens {args.prompt_tokens} + --output-tokens {args.output_tokens} exceed the "
                         f"model's context of {shape.max_context}")
    calibration = Path(args.calibration) if args.calibration else profile_path(
        default_data_dir(), model_identity(model_dir), torch.get_num_threads())
    if not calibration.exists():
        say(f"calibrating {model_dir.name} on this machine (once; {calibration})")
        calibrate(model_dir).save(calibration)
    prompts = [det_tokens(1000 + i, args.prompt_tokens, shape.vocab_size) for i in range(args.prompts)]
    warmup = det_tokens(999, WARMUP_TOKENS, shape.vocab_size)
    cores = len(os.sched_getaffinity(0))
    say(f"bench pipeline: {args.prompts} prompts of {args.prompt_tokens} tokens, {args.output_tokens} output tokens, "
        f"one at a time; engines {', '.join(engines)}; at most {', '.join(map(str, counts))} stages; "
        f"split from {args.min_tokens} tokens; profile {calibration}; {cores} cores")
    rows: list[dict] = []
    for engine in engines:
        for n in counts:
            prefill = args.sim_prefill if engine == "sim" else n
            if engine == "sim" and n > prefill:
                raise SystemExit(f"--instances {n} is more than --sim-prefill {prefill}")
            rows.append(run_config(args, engine=engine, prefill=prefill, stages=n, prompts=prompts, warmup=warmup,
                                   model_dir=model_dir, models_dir=models_dir, calibration=calibration))
    for r in rows:
        base = next(b for b in rows if b["engine"] == r["engine"] and b["max_stages"] == counts[0])
        r["speedup_vs_fewest"] = ratio(base["ttft_mean_s"], r["ttft_mean_s"])
    table = [{"engine": r["engine"], "prefill": r["prefill"], "max stages": r["max_stages"],
              "stages used": ",".join(map(str, r["stages_used"])),
              "TTFT mean s": r["ttft_mean_s"], "p50 s": r["ttft_p50_s"], "max s": r["ttft_max_s"],
              "speed-up": r["speedup_vs_fewest"], "errors": r["errors"]} for r in rows]
    figures = {"bench": "pipeline", "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
               "prompts": args.prompts, "min_tokens": args.min_tokens, "cores": cores,
               "calibration": str(calibration), "model": model_dir.name, "runs": rows,
               "ttft_p90_s": {f"{r['engine']}-{r['max_stages']}": percentile(r["ttft_s"], 90) for r in rows}}
    emit(f"TTFT of {args.prompt_tokens}-token prompts, one at a time, by the most stages a prompt may be split into",
         table, list(table[0]), figures, args.out)
    return 0 if all(r["errors"] == 0 for r in rows) else 1
