"""``yuebing bench peer``: the cluster against ``transformers serve --continuous-batching``, the server a
user would otherwise pick, on the same converted weights, on the same machine, one after the other.

Installing the peer (once; its own virtualenv, so that its serving dependencies -- fastapi, uvicorn,
openai, accelerate -- never enter the product's ``.venv``)::

    bench/peer_env.sh                 # creates .venv-peer at the repository root
    bench/peer_env.sh /some/dir       # elsewhere; then pass --peer-venv /some/dir

It pins what ``.venv`` runs: ``torch==2.13.0`` (the CPU build pip finds on PyPI) and the same
``transformers`` version as ``.venv``, with its ``serving`` extras, and checks that
``transformers serve --help`` runs.

Running it::

    # the run docs/benchmarks.md cites: best dtypes, 64 output tokens, closed loops of 1, 4 and 16
    # streams and open loops at 0.1, 0.2 and 0.4 requests/s; about 30 minutes on the idle 2-core machine
    .venv/bin/yuebing bench peer --dtypes best --concurrency 1,4,16 --output-tokens 64 --rate 0.1,0.2,0.4

    # the full sweep (the defaults spelt out): 2 dtype configurations x 2 output lengths x 5 loads, 416
    # requests per server and configuration: several hours on the 2-core machine (the 256-token
    # outputs and 64 streams are most of it)
    .venv/bin/yuebing bench peer --concurrency 1,4,16,64 --output-tokens 64,256 --rate 0.5 \\
        --dtypes best,same:float32 --out peer.json

What it does:

1. Resolve the model once (``libs.engine.modelpath.resolve_model``: the local Hugging Face directory the
   cluster serves), fix the workload and print it: per point (an output length and a load) a list of
   prompt lengths drawn log-uniformly from 100 to 2,000 tokens (seeded), each prompt a chat message
   (an index at its start, so no two requests share more than the chat template's system prompt)
   whose chat-formatted length is that many tokens; closed-loop points send ``--requests`` requests
   (default ``max(8, 2*C)``) with at most C in flight; open-loop points send them at Poisson arrivals
   of ``--rate`` requests/s (seeded; the same schedule for both servers).
2. For each dtype configuration (``--dtypes``): start the cluster cold (``LocalCluster``: one prefill,
   one decode, one cachestore, on a fresh data directory, as ``bench serve`` does), wait until it is
   ready, send one warm-up request, run every point, stop it. Then start the peer cold (its own
   process group), wait for ``/health``, send one warm-up request (which also sets up its continuous
   batching), run the same points with the same prompts, stop it. Never both at once.
3. Both servers get the same streaming ``/v1/chat/completions`` requests (the same messages, greedy,
   ``max_tokens``), read by ``bench.sse``. Output is forced to ``max_tokens`` on both: ``ignore_eos``
   for the cluster; the peer rejects unknown fields, so it gets its own per-request
   ``generation_config`` (the model's, with ``eos_token_id: -1``: no end token). Output tokens are
   counted from what each server streams (``usage.completion_tokens``), never assumed.
4. Per point and server: output tokens/s (completion tokens / from the first arrival to the last
   response's end), TTFT p50/p90 from each request's ARRIVAL (its send time in a closed loop, its
   scheduled time in an open loop, so a late client counts against the server), TPOT p50/p90 (per
   request: last token - first token over tokens - 1), errors, rejections, short outputs; percentiles
   by nearest rank over the requests that succeeded.
5. Print a table per dtype configuration and output length, a row per load with both servers side by
   side and the ratios, then one JSON line with every figure and the two targets, evaluated on the
   ``best`` configuration: output tokens/s at 16 streams >= 2.0x the peer's, and TTFT p90 from arrival
   <= 0.5x the peer's at the same offered load (the open-loop points). Met or not met, with the figures.

``--dtypes``: a comma list of ``best`` (each server in its best dtype: the cluster ``auto``, which it
resolves itself, the peer ``bfloat16``), ``same:DTYPE`` (both in DTYPE; ``same`` alone is float32) or
``YUEBING/PEER`` (e.g. ``auto/float32``). ``--dtype X`` without ``--dtypes`` means ``same:X``.

How the peer is run: ``transformers serve MODEL_DIR --continuous-batching --device D --dtype X --host
127.0.0.1 --port P --cb-num-blocks N --cb-max-batch-tokens M`` with ``HF_HUB_OFFLINE=1``. Its own KV
sizing on a CPU takes 90% of the free host memory (14 GB here), so N is sized to the workload instead:
the KV blocks (256 tokens) of the largest requests that can be in flight at once (printed);
``--peer-cb-num-blocks 0`` leaves it to the peer. M is 2,048 (``--peer-cb-max-batch-tokens``; 0: the
peer's default, 8,192). ``--peer-args`` appends anything else. The request's ``model`` must be the
directory exactly as the command names it (the peer is pinned to it). The cluster runs with admission
control off by default (``--admission none``: the peer has none, so both serve every request);
``--admission predictive`` runs the product's default and counts rejections (HTTP 429) separately.

What limits the comparison (transformers 5.23.0): the peer takes no ``ignore_eos`` (it answers 422 to
fields it does not know) and ignores ``stream_options`` (it sends usage with its last event anyway);
its continuous batching takes the sampling settings of the first request for all (the warm-up
request has the same ones); on a CPU its continuous batching costs several times its own plain
``generate`` per token at one stream (about 200 ms against 25 ms per token seen here), so
``--peer-args=--no-continuous-batching`` (requests one at a time, no batching) is worth a run beside
it; ``--dtype`` is honoured as given (``auto``: the dtype of the weights, float32 here).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from bench.common import (ROOT, entry, make_data_dir, median, ms, percentile, ratio, release_data_dir,
                          resolve_models_dir, say)
from yuebing.tables import format_table

DEFAULT_CONCURRENCY = "1,4,16,64"
DEFAULT_OUTPUT_TOKENS = "64,256"
DEFAULT_RATE = "0.5"
DEFAULT_DTYPES = "best,same:float32"
DEFAULT_PEER_VENV = ROOT / ".venv-peer"
PROMPT_MIN_TOKENS = 100
PROMPT_MAX_TOKENS = 2000
SEED = 20261207
OPEN_LOOP_REQUESTS = 32  # per open-loop point when --requests is not given
WARMUP_TOKENS = 4
DTYPES = ("auto", "float32", "bfloat16", "float16")
BEST = {"yuebing": "auto", "peer": "bfloat16"}  # each server's best dtype
PEER_PAGE_TOKENS = 256  # tokens per KV block of the peer's continuous batching (its default page size)
PEER_MAX_BATCH_TOKENS = 2048

# The targets, evaluated on the ``best`` configuration (never tuned: they are reported met or not).
TARGET_STREAMS = 16
TARGET_TOK_S_RATIO = 2.0
TARGET_TTFT_P90_RATIO = 0.5
TARGET_TOK_S = f"output tokens/s at {TARGET_STREAMS} streams >= {TARGET_TOK_S_RATIO}x the peer's"
TARGET_TTFT = f"TTFT p90 from arrival <= {TARGET_TTFT_P90_RATIO}x the peer's at the same offered load"
SERVERS = ("yuebing", "peer")


# ================================================================ the conditions
@dataclass(frozen=True)
class DtypeConfig:
    """What each server runs in: ``name`` as given (``best``, ``same:float32``, ``auto/bfloat16``)."""

    name: str
    yuebing: str
    peer: str


def parse_dtypes(spec: str | None, dtype: str | None = None) -> list[DtypeConfig]:
    """``--dtypes`` (see the module doc); with none given, ``--dtype X`` means ``same:X``."""
    if spec is None:
        spec = f"same:{dtype}" if dtype else DEFAULT_DTYPES
    elif dtype:
        raise ValueError("give --dtypes or --dtype, not both")
    out: list[DtypeConfig] = []
    for item in (x.strip() for x in str(spec).split(",")):
        if not item:
            continue
        if item == "best":
            cfg = DtypeConfig("best", BEST["yuebing"], BEST["peer"])
        elif item == "same" or item.startswith("same:"):
            d = item.partition(":")[2] or "float32"
            if d == "auto":
                raise ValueError("same:auto is not the same dtype (the cluster measures, the peer reads the weights)")
            cfg = DtypeConfig(f"same:{d}", d, d)
        elif "/" in item:
            y, _, p = item.partition("/")
            cfg = DtypeConfig(item, y.strip(), p.strip())
        else:
            raise ValueError(f"--dtypes: {item!r} is none of best, same[:DTYPE], YUEBING/PEER")
        for d in (cfg.yuebing, cfg.peer):
            if d not in DTYPES:
                raise ValueError(f"--dtypes: {d!r} is not one of {', '.join(DTYPES)}")
        if cfg.name in {c.name for c in out}:
            raise ValueError(f"--dtypes: {cfg.name} given twice")
        out.append(cfg)
    if not out:
        raise ValueError("--dtypes names no configuration")
    return out


def parse_ints(spec, flag: str, least: int = 1) -> list[int]:
    values = [int(x) for x in str(spec).replace(" ", "").split(",") if x]
    if any(v < least for v in values):
        raise ValueError(f"{flag} must be a comma list of integers >= {least}, not {spec!r}")
    return values


def parse_rates(spec) -> list[float]:
    """``--rate``: a comma list of arrival rates (requests/s); empty or 0 for no open-loop points."""
    values = [float(x) for x in str(spec or "").replace(" ", "").split(",") if x]
    if any(v < 0 for v in values):
        raise ValueError(f"--rate must be a comma list of rates >= 0, not {spec!r}")
    return [v for v in values if v > 0]


@dataclass(frozen=True)
class Load:
    """A closed loop of ``value`` streams, or open-loop arrivals at ``value`` requests/s."""

    kind: str  # "closed" | "open"
    value: float

    @property
    def label(self) -> str:
        return f"c={int(self.value)}" if self.kind == "closed" else f"rate={self.value:g}/s"

    @property
    def key(self) -> str:
        return f"c{int(self.value)}" if self.kind == "closed" else f"rate{self.value:g}"


def loads_of(concurrency: Sequence[int], rates: Sequence[float]) -> list[Load]:
    return [Load("closed", c) for c in concurrency] + [Load("open", r) for r in rates]


def requests_for(load: Load, requests: int | None) -> int:
    """Requests of a point: ``--requests``, else ``max(8, 2*C)`` closed, ``OPEN_LOOP_REQUESTS`` open."""
    if requests:
        return int(requests)
    return max(8, 2 * int(load.value)) if load.kind == "closed" else OPEN_LOOP_REQUESTS


def prompt_lengths(n: int, seed: int, lo: int = PROMPT_MIN_TOKENS, hi: int = PROMPT_MAX_TOKENS) -> list[int]:
    """``n`` prompt lengths (tokens, chat template included) drawn log-uniformly from [lo, hi], seeded."""
    rng = random.Random(seed)
    a, b = math.log(lo), math.log(hi)
    return [min(hi, max(lo, round(math.exp(rng.uniform(a, b))))) for _ in range(n)]


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which ``n`` requests arrive: a Poisson process of ``rate`` per second
    (exponential gaps, seeded), the first at 0."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        out.append(t)
    return out


@dataclass
class Point:
    """One measured point: an output length and a load, its prompts (chat message contents and their
    chat-formatted token counts) and, open loop, its arrival offsets."""

    index: int
    output_tokens: int
    load: Load
    contents: list[str] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    offsets: list[float] | None = None

    @property
    def key(self) -> str:
        return f"out{self.output_tokens}_{self.load.key}"

    @property
    def requests(self) -> int:
        return len(self.prompt_tokens)

    @property
    def in_flight(self) -> int:
        """Requests that can be in flight at once: C closed loop, all of them open loop."""
        return min(self.requests, int(self.load.value)) if self.load.kind == "closed" else self.requests


def plan_points(output_tokens: Sequence[int], loads: Sequence[Load], requests: int | None,
                seed: int = SEED) -> list[Point]:
    """Every point's output length, load, prompt lengths (``prompt_tokens``, the targets; the contents
    are filled by :func:`fill_prompts`) and open-loop schedule, from the seed alone."""
    points = []
    for out in output_tokens:
        for load in loads:
            i = len(points)
            n = requests_for(load, requests)
            p = Point(i, int(out), load, prompt_tokens=prompt_lengths(n, seed + 1000 * i))
            if load.kind == "open":
                p.offsets = arrival_offsets(n, load.value, seed + 1000 * i + 1)
            points.append(p)
    return points


def word_stream(n: int, seed: int) -> list[str]:
    """At least ``n`` words of the fixed source texts, sentence order shuffled by the seed."""
    from bench.serve import TEXTS

    rng = random.Random(seed)
    words: list[str] = []
    while len(words) < n:
        order = list(TEXTS)
        rng.shuffle(order)
        for t in order:
            words.extend(t.split())
    return words


def fit_content(count: Callable[[str], int], target: int, head: str, words: Sequence[str]) -> tuple[str, int]:
    """The longest ``head`` + a prefix of ``words`` whose ``count`` (chat-formatted tokens) is at most
    ``target`` (just ``head`` if even that is longer), and its count."""
    def text(k: int) -> str:
        return head if k == 0 else head + "\n\n" + " ".join(words[:k])

    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(text(mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    content = text(lo)
    return content, count(content)


def fill_prompts(points: list[Point], count: Callable[[str], int], seed: int = SEED) -> None:
    """Each point's chat contents, one per prompt length, its index first (unique across the run), its
    ``prompt_tokens`` replaced by the counts the contents have."""
    from bench.serve import QUESTIONS

    for p in points:
        contents, counts = [], []
        for k, target in enumerate(p.prompt_tokens):
            head = f"[{p.index}-{k}] {QUESTIONS[k % len(QUESTIONS)]}"
            words = word_stream(target + 16, seed + 7919 * p.index + k)
            c, n = fit_content(count, target, head, words)
            contents.append(c)
            counts.append(n)
        p.contents, p.prompt_tokens = contents, counts


def peer_num_blocks(points: Sequence[Point], page: int = PEER_PAGE_TOKENS) -> int:
    """KV blocks the peer needs to hold, at every point, its largest requests that can be in flight at
    once (each request whole blocks of prompt + output, plus one), and 16 spare."""
    need = 0
    for p in points:
        sizes = sorted((-(-(n + p.output_tokens) // page) + 1 for n in p.prompt_tokens), reverse=True)
        need = max(need, sum(sizes[: p.in_flight]))
    return need + 16


# ================================================================ per-request records and figures
@dataclass
class Rec:
    """One request as the client saw it (``time.perf_counter`` readings)."""

    arrival: float  # send time (closed loop) or scheduled time (open loop)
    first_token: float | None = None
    last_token: float | None = None
    ended: float | None = None
    tokens: int = 0  # output tokens the server reports (usage), else the tokens counted in the stream
    prompt_tokens: int | None = None
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @classmethod
    def from_stream(cls, s, arrival: float) -> "Rec":
        """From a ``bench.sse.StreamResult``."""
        last = s.token_times[-1] if s.token_times else None
        if last is not None and s.finish_time is not None:
            last = max(last, s.finish_time)  # tokens credited with the finishing event arrive with it
        tokens = s.completion_tokens if s.completion_tokens is not None else len(s.token_times)
        return cls(arrival=arrival, first_token=s.token_times[0] if s.token_times else None, last_token=last,
                   ended=s.ended, tokens=tokens, prompt_tokens=s.prompt_tokens, status=s.status, error=s.error)


def figures(recs: Sequence[Rec], start: float, max_tokens: int) -> dict:
    """A point's figures from its requests: output tokens/s over the time from ``start`` (the first
    arrival) to the last response's end; TTFT from arrival and TPOT ((last - first token) / (tokens -
    1), per request) p50/p90 over the requests that succeeded; failures, rejections (HTTP 429) and
    successes with fewer than ``max_tokens`` tokens counted."""
    ok = [r for r in recs if r.ok]
    ends = [r.ended for r in recs if r.ended is not None]
    wall = (max(ends) - start) if ends else None
    tokens = sum(r.tokens for r in ok)
    ttfts = [r.first_token - r.arrival for r in ok if r.first_token is not None]
    tpots = [(r.last_token - r.first_token) / (r.tokens - 1) for r in ok
             if r.tokens > 1 and r.first_token is not None and r.last_token is not None]
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    errors = [r for r in recs if not r.ok]
    return {
        "requests": len(recs),
        "errors": len(errors),
        "rejected": sum(r.status == 429 for r in recs),
        "short": sum(r.tokens < max_tokens for r in ok),
        "tokens": tokens,
        "wall_s": None if wall is None else round(wall, 3),
        "tok_s": round(tokens / wall, 2) if wall else None,
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p90_ms": ms(percentile(ttfts, 90)),
        "tpot_p50_ms": ms(percentile(tpots, 50)),
        "tpot_p90_ms": ms(percentile(tpots, 90)),
        "prompt_tokens_mean": round(sum(prompts) / len(prompts), 1) if prompts else None,
        "first_error": next((r.error or f"HTTP {r.status}" for r in errors), None),
    }


def compare(yb: dict | None, peer: dict | None) -> dict:
    """The ratios yuebing / peer of a point's tokens/s and TTFT p90."""
    yb, peer = yb or {}, peer or {}
    return {"ratio_tok_s": ratio(yb.get("tok_s"), peer.get("tok_s")),
            "ratio_ttft_p90": ratio(yb.get("ttft_p90_ms"), peer.get("ttft_p90_ms"))}


def _check(base: dict, r: dict, value: float | None, ok: Callable[[float], bool]) -> dict:
    yb, peer = r.get("yuebing") or {}, r.get("peer") or {}
    notes = []
    if yb.get("errors"):
        notes.append(f"{yb['errors']} yuebing requests failed or were rejected")
    if peer.get("errors"):
        notes.append(f"{peer['errors']} peer requests failed: its figures cover only the rest")
    met = None if value is None else bool(ok(value) and not yb.get("errors"))
    out = {**base, "met": met}
    if notes:
        out["note"] = "; ".join(notes)
    return out


def evaluate_targets(results: Sequence[dict], config: str = "best") -> list[dict]:
    """The two targets on the points of the ``config`` dtype configuration (``results``: one dict per
    point with ``dtypes``, ``output_tokens``, ``load``, ``concurrency``/``rate``, ``yuebing`` and
    ``peer`` figures and the ratios). Each target: its checks (one per output length, and per rate for
    TTFT), ``met`` (every check met; None when nothing could be checked) and ``status`` in words."""
    mine = [r for r in results if r["dtypes"] == config]
    tok_checks, ttft_checks = [], []
    for r in mine:
        yb, peer = r.get("yuebing") or {}, r.get("peer") or {}
        if r["load"] == "closed" and r["concurrency"] == TARGET_STREAMS:
            base = {"output_tokens": r["output_tokens"], "yuebing_tok_s": yb.get("tok_s"),
                    "peer_tok_s": peer.get("tok_s"), "ratio": r["ratio_tok_s"]}
            tok_checks.append(_check(base, r, r["ratio_tok_s"], lambda x: x >= TARGET_TOK_S_RATIO))
        if r["load"] == "open":
            base = {"output_tokens": r["output_tokens"], "rate": r["rate"],
                    "yuebing_ttft_p90_ms": yb.get("ttft_p90_ms"), "peer_ttft_p90_ms": peer.get("ttft_p90_ms"),
                    "ratio": r["ratio_ttft_p90"]}
            ttft_checks.append(_check(base, r, r["ratio_ttft_p90"], lambda x: x <= TARGET_TTFT_P90_RATIO))
    out = []
    for name, checks, why in ((TARGET_TOK_S, tok_checks, f"no closed-loop point at {TARGET_STREAMS} streams"),
                              (TARGET_TTFT, ttft_checks, "no open-loop point (--rate)")):
        verdicts = [c["met"] for c in checks]
        met = False if False in verdicts else (True if verdicts and None not in verdicts else None)
        if not any(r["dtypes"] == config for r in results):
            status = f"not evaluated: the {config} dtype configuration was not run"
        elif not checks:
            status = f"not evaluated: {why}"
        else:
            status = {True: "met", False: "not met", None: "not evaluated: a figure is missing"}[met]
        out.append({"target": name, "dtypes": config, "met": met, "status": status, "checks": checks})
    return out


# ================================================================ the requests
def chat_body(model: str, content: str, max_tokens: int, server: str, peer_generation: str | None = None) -> dict:
    """A streaming chat completion of one user message, greedy, ``max_tokens`` forced (see the module
    doc): ``ignore_eos`` and usage for the cluster; the peer's own ``generation_config`` for it."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    if server == "yuebing":
        body.update(ignore_eos=True, stream_options={"include_usage": True})
    elif peer_generation is not None:
        body["generation_config"] = peer_generation  # it sends usage with its last event unasked
    return body


def peer_generation_config(model_dir: Path) -> str:
    """The model's generation config with no end token and greedy decoding, as the JSON string the
    peer's ``generation_config`` request field takes."""
    path = Path(model_dir) / "generation_config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    for k in ("transformers_version", "_from_model_config"):
        cfg.pop(k, None)
    cfg.update(eos_token_id=-1, do_sample=False)
    return json.dumps(cfg)


async def run_points(base: str, server: str, model: str, points: Sequence[Point], peer_generation: str | None,
                     progress: bool = True) -> tuple[dict, dict[str, tuple[float, list[Rec]]]]:
    """A warm-up request, then each point in turn; returns the warm-up's figures and, per point key,
    its start and records."""
    import aiohttp
    from tqdm import tqdm

    from bench.sse import stream_completion

    clock = time.perf_counter
    url = base.rstrip("/") + "/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=None, sock_read=1800)
    out: dict[str, tuple[float, list[Rec]]] = {}
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = clock()
        warm = await stream_completion(session, url, chat_body(model, "[warm-up] Say hello.", WARMUP_TOKENS, server,
                                                               peer_generation))
        if not warm.ok:
            raise RuntimeError(f"{server}: the warm-up request failed: {warm.error}")
        warm_figs = {"warmup_s": round(clock() - t0, 3), "warmup_tokens": warm.completion_tokens}
        for p in points:
            bar = tqdm(total=p.requests, desc=f"{server} out={p.output_tokens} {p.load.label}", unit="req",
                       file=sys.stderr, disable=not progress, leave=True, dynamic_ncols=True)
            bodies = [chat_body(model, c, p.output_tokens, server, peer_generation) for c in p.contents]
            try:
                if p.load.kind == "closed":
                    sem = asyncio.Semaphore(int(p.load.value))

                    async def closed(body: dict) -> Rec:
                        async with sem:
                            s = await stream_completion(session, url, body, clock=clock)
                        bar.update(1)
                        return Rec.from_stream(s, s.sent)

                    start = clock()
                    recs = await asyncio.gather(*(closed(b) for b in bodies))
                else:
                    start = clock() + 0.05

                    async def scheduled(body: dict, at: float) -> Rec:
                        await asyncio.sleep(max(0.0, at - clock()))
                        s = await stream_completion(session, url, body, clock=clock)
                        bar.update(1)
                        return Rec.from_stream(s, at)

                    recs = await asyncio.gather(*(scheduled(b, start + off) for b, off in zip(bodies, p.offsets)))
            finally:
                bar.close()
            out[p.key] = (start, list(recs))
            f = figures(recs, start, p.output_tokens)
            say(f"{server} {p.key}: {json.dumps(f)}")
    return warm_figs, out


# ================================================================ the peer's process
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


class PeerServer:
    """``transformers serve`` from the peer's virtualenv, in its own process group, logs to a file."""

    def __init__(self, venv: Path, model_dir: Path, port: int, device: str, dtype: str, log_file: Path,
                 num_blocks: int | None, max_batch_tokens: int | None, extra: Sequence[str] = (),
                 threads: int | None = None):
        self.exe = Path(venv) / "bin" / "transformers"
        self.model = str(model_dir)  # requests must name the model exactly so
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_file = log_file
        self.cmd = [str(self.exe), "serve", self.model, "--continuous-batching", "--device", device, "--dtype", dtype,
                    "--host", "127.0.0.1", "--port", str(port)]
        if num_blocks:
            self.cmd += ["--cb-num-blocks", str(num_blocks)]
        if max_batch_tokens:
            self.cmd += ["--cb-max-batch-tokens", str(max_batch_tokens)]
        self.cmd += list(extra)
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        if threads:
            self.env["OMP_NUM_THREADS"] = str(threads)
        self.proc: subprocess.Popen | None = None

    def start(self, ready_timeout: float) -> float:
        """Start it and wait until ``/health`` answers 200 (the model is loaded before it listens);
        returns the seconds that took."""
        if not self.exe.exists():
            raise FileNotFoundError(f"{self.exe} is missing: create the peer's virtualenv with bench/peer_env.sh "
                                    f"(or pass --peer-venv)")
        t0 = time.perf_counter()
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        deadline = t0 + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the peer exited with {self.proc.returncode}; see {self.log_file}")
            try:
                with _LOCAL.open(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except (urllib.error.URLError, OSError):
                pass
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the peer was not ready after {ready_timeout:.0f}s; see {self.log_file}")
            time.sleep(0.25)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM its process group, SIGKILL it after ``timeout`` seconds."""
        p, self.proc = self.proc, None
        if p is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # whatever of its group is left (a worker it started)
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def version(self) -> str | None:
        py = self.exe.parent / "python"
        try:
            return subprocess.run([str(py), "-c", "import transformers; print(transformers.__version__)"],
                                  capture_output=True, text=True, timeout=120, env=self.env).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None


# ================================================================ output
COLS = ["load", "yb tok/s", "peer tok/s", "x tok/s", "yb TTFT p50", "peer TTFT p50", "yb TTFT p90", "peer TTFT p90",
        "x TTFT p90", "yb TPOT p50", "peer TPOT p50", "yb TPOT p90", "peer TPOT p90", "err yb/peer"]


def table_rows(results: Sequence[dict]) -> list[dict]:
    rows = []
    for r in results:
        yb, peer = r.get("yuebing") or {}, r.get("peer") or {}

        def x(v):
            return None if v is None else f"{v:.3f}"

        rows.append({"load": r["label"], "yb tok/s": yb.get("tok_s"), "peer tok/s": peer.get("tok_s"),
                     "x tok/s": x(r["ratio_tok_s"]), "yb TTFT p50": yb.get("ttft_p50_ms"),
                     "peer TTFT p50": peer.get("ttft_p50_ms"), "yb TTFT p90": yb.get("ttft_p90_ms"),
                     "peer TTFT p90": peer.get("ttft_p90_ms"), "x TTFT p90": x(r["ratio_ttft_p90"]),
                     "yb TPOT p50": yb.get("tpot_p50_ms"), "peer TPOT p50": peer.get("tpot_p50_ms"),
                     "yb TPOT p90": yb.get("tpot_p90_ms"), "peer TPOT p90": peer.get("tpot_p90_ms"),
                     "err yb/peer": f"{yb.get('errors', '-')}/{peer.get('errors', '-')}"})
    return rows


def describe_conditions(points: Sequence[Point], configs: Sequence[DtypeConfig], seed: int) -> list[str]:
    lengths = [n for p in points for n in p.prompt_tokens]
    lines = [f"prompts: chat messages of {min(lengths)}-{max(lengths)} tokens (median {median(lengths):g}; "
             f"lengths log-uniform in {PROMPT_MIN_TOKENS}-{PROMPT_MAX_TOKENS}, seed {seed}), "
             f"{len(lengths)} in all, the same for both servers",
             "dtypes: " + ", ".join(f"{c.name} (yuebing {c.yuebing}, peer {c.peer})" for c in configs)]
    for p in points:
        extra = ""
        if p.offsets is not None:
            extra = f", arrivals over {p.offsets[-1]:.1f}s (Poisson, seeded)"
        lines.append(f"  point {p.key}: {p.requests} requests, {p.load.label}, {p.output_tokens} output tokens, "
                     f"prompt tokens {min(p.prompt_tokens)}-{max(p.prompt_tokens)} "
                     f"(median {median(p.prompt_tokens):g}){extra}")
    return lines


# ================================================================ entry point
def main(args) -> int:
    """``yuebing bench peer``."""
    return entry(_peer, args)  # quiet logs; SIGTERM unwinds like Ctrl-C, through the servers' stops


def _peer(args) -> int:
    from libs.config import from_env
    from libs.engine.modelpath import DEFAULT_MODEL, resolve_model
    from libs.engine.loading import load_tokenizer
    from libs.natsserver import free_port
    from yuebing.cluster import LocalCluster

    from bench.serve import _chat_ids

    configs = parse_dtypes(getattr(args, "dtypes", None), getattr(args, "dtype", None))
    concurrency = parse_ints(getattr(args, "concurrency", DEFAULT_CONCURRENCY), "--concurrency")
    outputs = parse_ints(getattr(args, "output_tokens", DEFAULT_OUTPUT_TOKENS), "--output-tokens")
    rates = parse_rates(getattr(args, "rate", DEFAULT_RATE))
    if not outputs or not (concurrency or rates):
        raise SystemExit("bench peer: nothing to measure (--output-tokens and --concurrency or --rate)")
    seed = int(getattr(args, "seed", None) or SEED)
    progress = bool(getattr(args, "progress", True))
    venv = Path(getattr(args, "peer_venv", None) or DEFAULT_PEER_VENV).expanduser()
    ready_timeout = float(getattr(args, "ready_timeout", None) or 600)

    spec = getattr(args, "model", None) or DEFAULT_MODEL
    models_dir = resolve_models_dir(args)
    model_dir = resolve_model(spec, models_dir)
    tokenizer = load_tokenizer(model_dir)
    points = plan_points(outputs, loads_of(concurrency, rates), getattr(args, "requests", None), seed)
    t0 = time.perf_counter()
    fill_prompts(points, lambda text: len(_chat_ids(tokenizer, text)), seed)
    say(f"prompts built in {time.perf_counter() - t0:.1f}s")

    blocks_flag = getattr(args, "peer_cb_num_blocks", None)
    num_blocks = peer_num_blocks(points) if blocks_flag is None else (blocks_flag or None)
    batch_flag = getattr(args, "peer_cb_max_batch_tokens", None)
    max_batch_tokens = PEER_MAX_BATCH_TOKENS if batch_flag is None else (batch_flag or None)
    peer_extra = shlex.split(getattr(args, "peer_args", None) or "")
    peer_generation = peer_generation_config(model_dir)
    admission = getattr(args, "admission", None) or "none"

    print(f"bench peer: model {model_dir}; yuebing (1 prefill, 1 decode, 1 cachestore, admission {admission}) "
          f"vs transformers serve from {venv}, one after the other")
    for line in describe_conditions(points, configs, seed):
        print(line)
    print(f"peer KV: --cb-num-blocks {num_blocks or 'its own'} (x{PEER_PAGE_TOKENS} tokens), --cb-max-batch-tokens "
          f"{max_batch_tokens or 'its own'}" + (f", extra {' '.join(peer_extra)}" if peer_extra else ""), flush=True)

    data_dir, own_dir = make_data_dir(args, "yuebing-bench-peer-")
    results: list[dict] = []
    runs: dict[str, dict] = {}
    peer_version = None
    clean = False
    try:
        for cfg in configs:
            run: dict = runs.setdefault(cfg.name, {"yuebing_dtype": cfg.yuebing, "peer_dtype": cfg.peer})
            got: dict[str, dict[str, dict]] = {}

            def measure(server: str, url: str, model: str, generation) -> None:
                """Run every point against ``server``: its warm-up into the run, its figures into ``got``."""
                warm, recs = asyncio.run(run_points(url, server, model, points, generation, progress))
                run.update({f"{server}_{k}": v for k, v in warm.items()})
                for p in points:
                    start, rs = recs[p.key]
                    got.setdefault(p.key, {})[server] = figures(rs, start, p.output_tokens)
            tag = cfg.name.replace(":", "-").replace("/", "-")
            # ---- the cluster, cold, on its own data dir
            settings = from_env(model=str(model_dir), data_dir=str(data_dir / f"yuebing-{tag}"),
                                models_dir=str(models_dir), port=free_port(),
                                block_size=getattr(args, "block_size", None),
                                threads=getattr(args, "threads", None) or None,
                                device=getattr(args, "device", None), dtype=cfg.yuebing,
                                load_format=getattr(args, "load_format", None), admission=admission,
                                no_auth=True)  # a private cluster on loopback, for this run only
            cluster = LocalCluster(settings, prefill=1, decode=1)
            say(f"[{cfg.name}] starting the cluster (dtype {cfg.yuebing}); logs in {cluster.log_dir}")
            try:
                t = time.perf_counter()
                cluster.start(ready_timeout=ready_timeout)
                run["yuebing_ready_s"] = round(time.perf_counter() - t, 2)
                s = cluster.settings
                run.update(yuebing_dtype_resolved=s.dtype, device=s.device, load_format=s.load_format,
                           yuebing_cores=cluster.describe_cores())
                say(f"[{cfg.name}] cluster ready in {run['yuebing_ready_s']}s: {s.device} {s.dtype}; "
                    f"{cluster.describe_cores()}")
                measure("yuebing", cluster.url, _cluster_model(cluster.url), None)
            finally:
                say(f"[{cfg.name}] stopping the cluster")
                cluster.stop()
            # ---- the peer, cold, the cluster stopped
            device = run.get("device") or getattr(args, "device", None) or "auto"
            peer = PeerServer(venv, model_dir, free_port(), device, cfg.peer, data_dir / f"peer-{tag}.log",
                              num_blocks, max_batch_tokens, peer_extra, getattr(args, "peer_threads", None))
            if peer_version is None:
                peer_version = peer.version()
            run["peer_command"] = shlex.join(peer.cmd)
            say(f"[{cfg.name}] starting the peer: {run['peer_command']}")
            try:
                run["peer_ready_s"] = round(peer.start(ready_timeout), 2)
                say(f"[{cfg.name}] peer ready in {run['peer_ready_s']}s")
                measure("peer", peer.url, peer.model, peer_generation)
            finally:
                say(f"[{cfg.name}] stopping the peer")
                peer.stop()
            for p in points:
                both = got.get(p.key, {})
                results.append({"dtypes": cfg.name, "point": p.key, "label": p.load.label,
                                "output_tokens": p.output_tokens, "load": p.load.kind,
                                "concurrency": int(p.load.value) if p.load.kind == "closed" else None,
                                "rate": p.load.value if p.load.kind == "open" else None,
                                "yuebing": both.get("yuebing"), "peer": both.get("peer"),
                                **compare(both.get("yuebing"), both.get("peer"))})
        clean = all(not (r[s] or {}).get("errors") for r in results for s in SERVERS)
    finally:
        release_data_dir(own_dir, clean, "cluster and peer logs")

    targets = evaluate_targets(results)
    for cfg in configs:
        run = runs[cfg.name]
        resolved = run.get("yuebing_dtype_resolved")
        shown_dtype = f"{cfg.yuebing} -> {resolved}" if resolved and resolved != cfg.yuebing else cfg.yuebing
        for out in outputs:
            rows = table_rows([r for r in results if r["dtypes"] == cfg.name and r["output_tokens"] == out])
            print(f"\ndtypes {cfg.name} (yuebing {shown_dtype}, peer {cfg.peer}), {out} output tokens; times in ms "
                  f"from arrival; x = yuebing / peer")
            print(format_table(rows, COLS, ".1f"))
    print()
    for t in targets:
        print(f"target: {t['target']} ({t['dtypes']} dtypes): {t['status']}")
        for c in t["checks"]:
            print("    " + ", ".join(f"{k} {v}" for k, v in c.items() if k != "met") + f": "
                  f"{'met' if c['met'] else 'not met' if c['met'] is False else 'not evaluated'}")

    fig = {"bench": "peer", "model": model_dir.name if spec != DEFAULT_MODEL else DEFAULT_MODEL,
           "peer": {"server": "transformers serve", "transformers": peer_version,
                    "continuous_batching": "--no-continuous-batching" not in peer_extra,
                    "cb_num_blocks": num_blocks, "cb_max_batch_tokens": max_batch_tokens,
                    "forcing": "generation_config eos_token_id=-1"},
           "admission": admission, "seed": seed,
           "conditions": {"prompt_tokens_range": [PROMPT_MIN_TOKENS, PROMPT_MAX_TOKENS],
                          "output_tokens": outputs, "concurrency": concurrency, "rates": rates,
                          "requests": {p.key: p.requests for p in points}},
           "runs": runs, "points": results, "targets": targets}
    line = json.dumps(fig)
    print(line, flush=True)
    out_path = getattr(args, "out", None)
    if out_path:
        Path(out_path).write_text(line + "\n")
    plot_path = getattr(args, "plot", None)
    if plot_path:
        plot(fig, plot_path)
    return 0 if clean else 1


def plot(fig: dict, path: str | Path) -> Path:
    """Both servers over load, a PNG at ``path``: output tokens/s and TTFT p90 against closed-loop
    streams (left) and against open-loop arrival rate (right), one line per server and dtype
    configuration and output length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    canvas, axes = plt.subplots(2, 2, figsize=(11, 8))
    try:
        for col, (load, key, xlabel) in enumerate((("closed", "concurrency", "concurrent streams (closed loop)"),
                                                   ("open", "rate", "arrivals per second (open loop, Poisson)"))):
            series: dict[tuple[str, str, int], list[tuple[float, dict]]] = {}
            for p in fig["points"]:
                if p["load"] != load:
                    continue
                for server in ("yuebing", "peer"):
                    series.setdefault((p["dtypes"], server, p["output_tokens"]), []).append((p[key], p[server]))
            for (dtypes, server, out), pts in sorted(series.items()):
                pts.sort(key=lambda t: t[0])
                xs = [x for x, _ in pts]
                style = dict(marker="o", linestyle="-" if server == "yuebing" else "--",
                             label=f"{'yuebing' if server == 'yuebing' else 'transformers serve'} ({dtypes}, {out} out)")
                axes[0][col].plot(xs, [f.get("tok_s") for _, f in pts], **style)
                axes[1][col].plot(xs, [(f.get("ttft_p90_ms") or 0) / 1000 for _, f in pts], **style)
            axes[0][col].set_ylabel("output tokens/s")
            axes[1][col].set_ylabel("TTFT p90 from arrival, s")
            axes[1][col].set_xlabel(xlabel)
            for row in (0, 1):
                if load == "closed":
                    axes[row][col].set_xscale("log", base=2)
                axes[row][col].grid(alpha=0.3)
                axes[row][col].legend(fontsize=7)
        canvas.suptitle(f"bench peer: {fig.get('model')} on {fig.get('runs') and next(iter(fig['runs'].values())).get('device')}"
                        f", yuebing vs {fig['peer']['server']}", fontsize=10)
        canvas.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.savefig(path, dpi=100)
    finally:
        plt.close(canvas)
    return path


def _cluster_model(base: str) -> str:
    """The model name the cluster lists (``/v1/models``)."""
    with _LOCAL.open(base.rstrip("/") + "/v1/models", timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]
