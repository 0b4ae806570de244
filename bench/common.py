"""What the benchmarks share: the trace and its scaling, the figures (percentiles, ms, ratios, medians),
how a benchmark runs (quiet logs, its data dir, its table and JSON line) and the client side of a
cluster it starts (requests of one token, the prefills' counters and logs, the pool probe).

The default trace is named once, here (``DEFAULT_TRACE``); help texts show it relative to the
repository (``shown``).
"""

from __future__ import annotations

import asyncio
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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from libs.stats import nearest_rank
from yuebing.tables import format_table

ROOT = Path(__file__).resolve().parents[1]  # the repository
DEFAULT_TRACE = Path(__file__).resolve().parent / "traces" / "conversation_trace.jsonl"  # shipped with bench
TRACE_BLOCK_TOKENS = 512  # tokens per hash id in the original trace
TOKEN_LO = 1000  # deterministic prompts use token ids in [TOKEN_LO, vocab): clear of special tokens


def shown(path: Path) -> str:
    """``path`` as a help text names it: relative to the repository."""
    return os.path.relpath(path, ROOT)


# ================================================================ the trace
def read_trace(path: Path, *, start: int = 0, limit: int | None = None) -> list[dict]:
    """The trace's requests (its non-empty lines) ``start`` .. ``start + limit`` (all the rest when
    ``limit`` is None)."""
    out: list[dict] = []
    if limit is not None and limit <= 0:
        return out
    seen = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            seen += 1
            if seen <= start:
                continue
            out.append(json.loads(line))
            if limit is not None and len(out) >= limit:
                break
    return out


def det_tokens(seed: int, n: int, vocab: int) -> list[int]:
    """``n`` token ids in [TOKEN_LO, vocab), the same for the same seed on every run."""
    rng = random.Random(seed)
    return [rng.randrange(TOKEN_LO, vocab) for _ in range(n)]


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



def trace_bound(requests: Sequence, block_tokens: int, block_size: int) -> dict:
    """Prompt tokens an unbounded cache could reuse on these requests (each with ``prompt`` and
    ``hash_ids``: the cache experiment's and the replay's alike), in this order.

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



# ================================================================ figures
def percentile(values: Sequence[float], q: int) -> float | None:
    """The ``q``-th percentile of ``values`` by nearest rank (``libs.stats``); None without values."""
    return nearest_rank(values, q) if values else None


def ms(x: float | None) -> float | None:
    """Seconds as milliseconds, two decimals."""
    return None if x is None else round(x * 1000.0, 2)


def ratio(a: float | None, b: float | None, nd: int = 3) -> float | None:
    """``a / b`` rounded to ``nd`` decimals; None when ``a`` is None or ``b`` is None or zero."""
    return round(a / b, nd) if a is not None and b else None


def median(xs: Iterable[float | None]) -> float | None:
    """The median of the values that are not None; None when there are none."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ================================================================ running a benchmark
def say(msg: str) -> None:
    """Progress for the reader, on stderr (stdout has the tables and the JSON line)."""
    print(msg, file=sys.stderr, flush=True)


def emit(title: str, rows: list[dict], cols: list[str], figures: dict, out: str | None) -> None:
    """The title, the table and, last, the figures as one JSON line (also written to ``out``)."""
    print(f"\n{title}")
    print(format_table(rows, cols))
    line = json.dumps(figures)
    print(line, flush=True)
    if out:
        Path(out).write_text(line + "\n")


def entry(body, args) -> int:
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
        say("interrupted")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def stop_proc(p: "subprocess.Popen | None", timeout: float = 15.0) -> None:
    """Stop a process the benchmark started: SIGTERM, then SIGKILL after ``timeout``."""
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def resolve_models_dir(args) -> Path:
    """``--models-dir``, or the shared model cache (whatever the data dir: a model is converted once)."""
    from libs.engine.modelpath import default_data_dir

    if getattr(args, "models_dir", None):
        return Path(args.models_dir).expanduser()
    return default_data_dir() / "models"


def make_data_dir(args, prefix: str) -> tuple[Path, str | None]:
    """The run's data dir: ``--data-dir`` or a fresh temporary one (returned second, to delete)."""
    if getattr(args, "data_dir", None):
        d = Path(args.data_dir).expanduser()
        d.mkdir(parents=True, exist_ok=True)
        return d, None
    own = tempfile.mkdtemp(prefix=prefix)
    return Path(own), own


def release_data_dir(own: str | None, clean: bool, logs: str) -> None:
    """Delete the run's own temporary data dir after a clean run; keep it (and say where) otherwise."""
    if own is None:
        return
    if clean:
        shutil.rmtree(own, ignore_errors=True)
    else:
        say(f"kept {own} ({logs})")


# ================================================================ the cluster's side
@dataclass
class Reply:
    """A request of one output token: its TTFT and usage."""

    ok: bool
    ttft: float | None = None
    request_id: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


async def model_name(session, base: str) -> str:
    """The first model the server lists."""
    from bench.sse import first_model

    return (await first_model(session, base))["id"]


def one_token_body(model: str, prompt: list[int], stream: bool) -> dict:
    """A completion of ``prompt`` (token ids), one output token, greedy; streamed with usage if asked."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def stream_body(model: str, prompt: list[int], max_tokens: int) -> dict:
    """A streaming completion of ``prompt`` (token ids) making exactly ``max_tokens`` tokens (EOS
    ignored), greedy, with the usage chunk."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def parse_prometheus(text: str) -> dict[str, dict[str, float]]:
    """``{sample name: {label string: value}}`` from the Prometheus text format; the label string
    is ``k="v"`` pairs sorted by name, without ``model_name`` (the same on every sample)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != "model_name")
            out.setdefault(s.name, {})[labels] = s.value
    return out


async def prefill_counters(session, url: str) -> dict[str, float]:
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

