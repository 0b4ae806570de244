"""``yuebing bench transfer``: how fast the KV-cache pool moves blocks, against raw NATS in the same run.

``bench transfer``: KV block bytes/s from the pool to a client over NATS (``CacheClient.get_blocks`` of
N blocks of the default model's block shape, against a real nats-server and a ``CacheStoreService`` in
its own process) against raw nats-py pub/sub of the same bytes in the same run: one publisher (also in
its own process, like the store), one subscriber (this process), messages the size of the pool's
chunks, timed from the request that starts the burst until the subscriber has every byte (the
publisher ends with a core NATS flush). Rounds of the two alternate; medians are reported.

Blocks are also loaded layer by layer into a KV buffer (what a prefill does on a pool hit) and new
blocks are put one per call and a prompt's worth per call. It prints a table and a final JSON line of
named figures (also written to ``--out``).
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
from dataclasses import dataclass
from functools import partial

from bench.common import emit, entry, make_data_dir, median, ms, ratio, release_data_dir, say, stop_proc

DEFAULT_BLOCK_SHAPE = (30, 2, 3, 16, 64)  # SmolLM2-135M: layers, K/V, kv heads, block size, head dim
RAW_GO = "yb.bench.raw.go"
RAW_DATA = "yb.bench.raw.data"


def _raw_publisher_main(argv: list[str]) -> int:
    """``python -m bench.transfer raw-publisher NATS_URL``: publishes bursts on request."""
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


def main(args) -> int:
    """``yuebing bench transfer``."""
    return entry(_transfer, args)


def _parse_shape(spec) -> tuple[int, ...]:
    if isinstance(spec, (list, tuple)):
        shape = tuple(int(x) for x in spec)
    else:
        shape = tuple(int(x) for x in str(spec).replace(" ", "").split(",") if x)
    if len(shape) != 5 or shape[1] != 2 or min(shape) <= 0:
        raise SystemExit(f"--block-shape must be layers,2,kv_heads,block_size,head_dim, not {spec!r}")
    return shape


def _transfer(args) -> int:
    from libs.natsserver import NatsServer
    from libs.proc import die_with_parent

    blocks = int(getattr(args, "blocks", 124))
    repeats = int(getattr(args, "repeats", 5))
    put_batch = max(1, int(getattr(args, "put_batch", 16)))
    shape = _parse_shape(getattr(args, "block_shape", None) or DEFAULT_BLOCK_SHAPE)
    progress = bool(getattr(args, "progress", True))
    data_dir, own = make_data_dir(args, "yuebing-bench-transfer-")
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    block_bytes = 4
    for d in shape:
        block_bytes *= d
    total = block_bytes * blocks
    say(f"bench transfer: {blocks} blocks of {list(shape)} float32 ({block_bytes / 1024:.0f} KiB each, "
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
                    [sys.executable, "-m", "bench.transfer", "raw-publisher", server.url],
                    stdout=out, stderr=out, start_new_session=True, preexec_fn=die_with_parent)
            rounds, info = asyncio.run(run_transfer(server.url, blocks=blocks, shape=shape, repeats=repeats,
                                                    put_batch=put_batch, progress=progress))
        finally:
            stop_proc(pub)
            stop_proc(store)
            server.stop()
        clean = all(r.ok for r in rounds)
    finally:
        release_data_dir(own, clean, f"logs in {log_dir}")

    layers = [r for r in rounds if r.kind == "layers"]
    pool = [r for r in rounds if r.kind == "pool"]
    raw = [r for r in rounds if r.kind == "raw"]
    layers_mb = median([r.mb_s for r in layers])
    pool_mb = median([r.mb_s for r in pool])
    raw_mb = median([r.mb_s for r in raw])
    put1 = [r for r in rounds if r.kind == "put"]
    putn = [r for r in rounds if r.kind == "put_many"]
    put1_mb = median([r.mb_s for r in put1])
    putn_mb = median([r.mb_s for r in putn])
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
                     "MB/s p50": median(mbs), "MB/s min": min(mbs, default=None), "MB/s max": max(mbs, default=None),
                     "ms p50": ms(median([r.seconds for r in ok]))})
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
        "pool_vs_raw": ratio(pool_mb, raw_mb),
        "layers_mb_s": round(layers_mb, 1) if layers_mb else None,
        "layers_vs_raw": ratio(layers_mb, raw_mb),
        "pool_round_ms": [ms(r.seconds) for r in pool],
        "layers_round_ms": [ms(r.seconds) for r in layers],
        "raw_round_ms": [ms(r.seconds) for r in raw],
        # writes of new blocks into the pool (DRAM and LMDB), a block per call vs put_batch per call
        "put_batch": put_batch,
        "put_one_mb_s": round(put1_mb, 1) if put1_mb else None,
        "put_many_mb_s": round(putn_mb, 1) if putn_mb else None,
        "put_many_vs_one": ratio(putn_mb, put1_mb),
        "errors": sum(not r.ok for r in rounds),
        "seconds": round(time.perf_counter() - started, 1),
    }
    for r in rounds:
        if not r.ok:
            say(f"PROBLEM: {r.kind} round: {r.error}")
    cols = ["path", "rounds", "errors", "MB/s p50", "MB/s min", "MB/s max", "ms p50", "what"]
    emit(f"{info['total_bytes'] / 1e6:.1f} MB per round (MB = 10^6 bytes of KV); cachestore and raw publisher each "
          f"in their own process, this process receives", rows, cols, figures, getattr(args, "out", None))
    return 0 if clean else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "raw-publisher":
        sys.exit(_raw_publisher_main(sys.argv[2:]))
    print("usage: python -m bench.transfer raw-publisher NATS_URL (the benchmarks run via `yuebing bench`)",
          file=sys.stderr)
    sys.exit(2)
