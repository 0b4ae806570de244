"""``yuebing bench hotblocks``: pool load time of a prefix many prefill instances read at once, with
and without hot-block copies (``pool_hot_replicas``), in the same run.

A real nats-server and ``--shards`` cachestore instances, each in its own process, hold one shared
prefix of ``--prefix-tokens`` tokens in blocks of the default model's shape. ``--readers``
processes stand for as many prefill instances: each loads the prefix the way a prefill does on a
pool hit (``CacheClient.load_layers`` into a ``PrefillKV`` buffer allocated before the clock starts),
without the model's compute. A burst starts every reader's load at once; the next burst starts
when all have finished, after ``--gap`` seconds. Each run starts a fresh pool and fresh readers;
runs alternate between copies off (``pool_hot_replicas=0``) and on (the default settings), for
``--repeats`` runs of each. The first ``--warmup`` bursts of a run are not counted (copies form
there). It prints a table and a final JSON line (also written to ``--out``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import emit, entry, make_data_dir, percentile, ratio, release_data_dir, say, stop_proc
from bench.transfer import DEFAULT_BLOCK_SHAPE

GO = "yb.bench.hot.go"
DONE = "yb.bench.hot.done"
READY = "yb.bench.hot.ready"
TARGET_P90_RATIO = 0.5
BURST_TIMEOUT = 120.0


def prefix_keys(blocks: int) -> list[bytes]:
    return [hashlib.blake2b(f"bench-hot-{i}".encode(), digest_size=16).digest() for i in range(blocks)]


def _reader_main(argv: list[str]) -> int:
    """``python -m bench.hotblocks reader NATS_URL READER_ID BLOCKS``: loads the prefix on every GO."""
    import torch

    from libs.bus import connect
    from libs.engine.prefill_kv import PrefillKV
    from libs.kv.client import CacheClient

    url, rid, blocks = argv[0], argv[1], int(argv[2])
    layers, _, heads, bs, dim = DEFAULT_BLOCK_SHAPE
    keys = prefix_keys(blocks)

    async def run() -> None:
        nc = await connect(url, f"bench-hot-{rid}")
        cache = CacheClient(nc, timeout=BURST_TIMEOUT)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await cache.start()
        await cache.wait_for_pool(60)

        async def on_go(msg) -> None:
            burst = json.loads(msg.data)["burst"]
            dest = PrefillKV(torch.empty((layers, 2, heads, blocks * bs, dim)), blocks * bs, ready=False,
                             timeout=BURST_TIMEOUT)
            t0 = time.perf_counter()
            n = await cache.load_layers(keys, dest, 0, timeout=BURST_TIMEOUT)
            seconds = time.perf_counter() - t0
            await nc.publish(DONE, json.dumps({"reader": rid, "burst": burst, "seconds": seconds,
                                               "blocks": n}).encode())

        async def on_go_soon(msg) -> None:  # the next message is not held up by this load
            asyncio.ensure_future(on_go(msg))

        async def on_ready(msg) -> None:
            await msg.respond(b"ok")

        await nc.subscribe(GO, cb=on_go_soon)
        await nc.subscribe(f"{READY}.{rid}", cb=on_ready)
        await nc.flush()
        await stop.wait()
        await cache.close()
        await nc.close()

    asyncio.run(run())
    return 0


async def _drive(url: str, *, arm: str, shards: int, readers: int, blocks: int, bursts: int, gap: float
                 ) -> tuple[list[dict], dict]:
    """Put the prefix, then run the bursts; returns every load and what the pool holds after."""
    import torch

    from libs.bus import connect
    from libs.kv.client import CacheClient

    nc = await connect(url, "bench-hot-driver")
    cache = CacheClient(nc, timeout=BURST_TIMEOUT)
    loads: list[dict] = []
    try:
        await cache.start()
        deadline = time.monotonic() + 120
        while len(cache.live()) < shards:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(cache.live())} of {shards} cachestores announced themselves")
            await asyncio.sleep(0.2)
        gen = torch.Generator().manual_seed(11)
        keys = prefix_keys(blocks)
        await cache.put_blocks([(k, torch.randn(DEFAULT_BLOCK_SHAPE, generator=gen)) for k in keys], timeout=120)
        for i in range(readers):
            deadline = time.monotonic() + 120
            while True:
                try:
                    await nc.request(f"{READY}.r{i}", b"", timeout=1)
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"reader r{i} did not start within 120 s") from None
        await asyncio.sleep(1.0)  # the readers' clients have heard every shard's heartbeat
        done: asyncio.Queue = asyncio.Queue()
        async def on_done(msg) -> None:
            done.put_nowait(json.loads(msg.data))

        await nc.subscribe(DONE, cb=on_done)
        for b in range(bursts):
            await nc.publish(GO, json.dumps({"burst": b}).encode())
            for _ in range(readers):
                rec = await asyncio.wait_for(done.get(), BURST_TIMEOUT)
                loads.append(dict(rec, arm=arm))
            await asyncio.sleep(gap)
        stats = await cache.stats()
        held = sum(st.dram_blocks for st in stats)
        return loads, {"copies_per_block": round(held / blocks, 2), "shards_answering": len(stats)}
    finally:
        await cache.close()
        await nc.close()


def _run_arm(server_url: str, data_dir: Path, log_dir: Path, *, arm: str, run: int, shards: int, readers: int,
             blocks: int, bursts: int, gap: float) -> tuple[list[dict], dict]:
    from libs.proc import die_with_parent

    env = dict(os.environ)
    if arm == "off":
        env["YUEBING_POOL_HOT_REPLICAS"] = "0"
    procs: list[subprocess.Popen] = []
    try:
        for s in range(shards):
            iid = f"cachestore-{s}"
            with open(log_dir / f"{arm}{run}-{iid}.log", "ab") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "yuebing.cli", "serve", "cachestore", "--nats", server_url,
                     "--data-dir", str(data_dir / f"{arm}{run}"), "--instance-id", iid],
                    stdout=out, stderr=out, env=env, start_new_session=True, preexec_fn=die_with_parent))
        for i in range(readers):
            with open(log_dir / f"{arm}{run}-reader-{i}.log", "ab") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "bench.hotblocks", "reader", server_url, f"r{i}", str(blocks)],
                    stdout=out, stderr=out, start_new_session=True, preexec_fn=die_with_parent))
        return asyncio.run(_drive(server_url, arm=arm, shards=shards, readers=readers, blocks=blocks,
                                  bursts=bursts, gap=gap))
    finally:
        for p in procs:
            stop_proc(p)


def main(args) -> int:
    """``yuebing bench hotblocks``."""
    return entry(_hotblocks, args)


def _hotblocks(args) -> int:
    from libs.config import Settings
    from libs.natsserver import NatsServer

    shards, readers = int(args.shards), int(args.readers)
    bs = DEFAULT_BLOCK_SHAPE[3]
    blocks = max(1, int(args.prefix_tokens) // bs)
    bursts, warmup, repeats, gap = int(args.bursts), int(args.warmup), int(args.repeats), float(args.gap)
    defaults = Settings()
    block_bytes = 4
    for d in DEFAULT_BLOCK_SHAPE:
        block_bytes *= d
    say(f"bench hotblocks: a prefix of {blocks * bs} tokens ({blocks} blocks of {list(DEFAULT_BLOCK_SHAPE)} "
        f"float32, {blocks * block_bytes / 1e6:.1f} MB) on {shards} cachestores, loaded by {readers} readers at once, "
        f"{bursts} bursts a run ({warmup} not counted), {repeats} runs with copies off and on, alternating; "
        f"copies on: pool_hot_replicas={defaults.pool_hot_replicas}, "
        f"pool_hot_reads_per_second={defaults.pool_hot_reads_per_second}, "
        f"pool_hot_half_life_seconds={defaults.pool_hot_half_life_seconds}")
    data_dir, own = make_data_dir(args, "yuebing-bench-hot-")
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    server = NatsServer(data_dir / "nats", log_file=log_dir / "nats-server.log")
    loads: list[dict] = []
    pools: dict[str, list[dict]] = {"off": [], "on": []}
    started = time.perf_counter()
    clean = False
    try:
        server.start()
        for run in range(repeats):
            for arm in (("off", "on") if run % 2 == 0 else ("on", "off")):
                say(f"run {run + 1} of {repeats}: copies {arm}")
                got, pool = _run_arm(server.url, data_dir, log_dir, arm=arm, run=run, shards=shards,
                                     readers=readers, blocks=blocks, bursts=bursts, gap=gap)
                loads += [dict(r, run=run) for r in got]
                pools[arm].append(pool)
        clean = True
    finally:
        server.stop()
        release_data_dir(own, clean, f"logs in {log_dir}")

    rows, figures = [], {}
    for arm in ("off", "on"):
        counted = [r for r in loads if r["arm"] == arm and r["burst"] >= warmup]
        secs = [r["seconds"] for r in counted]
        whole = sum(r["blocks"] == blocks for r in counted)
        row = {"copies": arm, "loads": len(counted), "whole": whole,
               "p50 ms": round(1000 * percentile(secs, 50), 1) if secs else None,
               "p90 ms": round(1000 * percentile(secs, 90), 1) if secs else None,
               "max ms": round(1000 * max(secs), 1) if secs else None,
               "copies/block at end": [p["copies_per_block"] for p in pools[arm]]}
        rows.append(row)
        figures[f"{arm}_p50_ms"], figures[f"{arm}_p90_ms"] = row["p50 ms"], row["p90 ms"]
        figures[f"{arm}_loads"], figures[f"{arm}_whole_loads"] = len(counted), whole
        figures[f"{arm}_copies_per_block"] = row["copies/block at end"]
    p90_ratio = ratio(figures["on_p90_ms"], figures["off_p90_ms"])
    figures.update({
        "shards": shards, "readers": readers, "prefix_tokens": blocks * bs, "blocks": blocks, "bursts": bursts,
        "warmup_bursts": warmup, "repeats": repeats, "gap_s": gap, "pool_hot_replicas": defaults.pool_hot_replicas,
        "pool_hot_reads_per_second": defaults.pool_hot_reads_per_second,
        "pool_hot_half_life_seconds": defaults.pool_hot_half_life_seconds,
        "p90_on_vs_off": p90_ratio, "target_p90_on_vs_off": TARGET_P90_RATIO,
        "target_met": p90_ratio is not None and p90_ratio <= TARGET_P90_RATIO,
        "seconds": round(time.perf_counter() - started, 1),
    })
    emit(f"pool load time of a {blocks * bs}-token prefix, {readers} readers at once, {shards} cachestores "
         f"(p90 with copies / without: {p90_ratio}, target <= {TARGET_P90_RATIO})", rows,
         ["copies", "loads", "whole", "p50 ms", "p90 ms", "max ms", "copies/block at end"], figures,
         getattr(args, "out", None))
    return 0 if all(r["blocks"] == blocks for r in loads) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "reader":
        sys.exit(_reader_main(sys.argv[2:]))
    print("usage: python -m bench.hotblocks reader NATS_URL READER_ID BLOCKS (the benchmarks run via `yuebing bench`)",
          file=sys.stderr)
    sys.exit(2)
