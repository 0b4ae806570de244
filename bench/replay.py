"""``yuebing bench trace FILE --url URL``: replay a Mooncake-format trace against any OpenAI-compatible
server and measure serving under SLOs.

A trace is JSONL, one request a line: ``timestamp`` (ms after the first request), ``input_length``,
``output_length`` and ``hash_ids`` (prefix-chained ids of 512-token blocks). :func:`prepare` scales it as
``bench/traces/README.md`` says: every hash id becomes a deterministic block of ``512 / token_scale``
token ids (``bench.common.TraceTokens``: same id, same tokens, so requests that share leading ids share
a prompt prefix), output lengths are divided by the same ``token_scale`` (at least one token), arrival
times by ``time_scale`` (or replaced by a fixed ``rate``), and prompts that do not fit ``max_context``
with their output are dropped and counted.

:func:`replay` is open loop: each request is sent at its arrival time whether or not earlier ones
have finished, as a streaming ``POST /v1/completions`` with the token ids as ``prompt``,
``ignore_eos`` so it makes exactly ``max_tokens`` tokens, and the usage chunk requested. While it
runs, ``GET /health`` is sampled when the server answers it with a ``workers`` list (yuebing's gateway
does): the prefill queue and the decode batch over time. Responses are read by ``bench.sse``, whose
module doc says how token arrivals are counted when one SSE event carries several tokens.

:func:`summarize` turns the per-request records into the figures, all from the client's clock:

- TTFT: send -> first token; ITL: every gap between consecutive tokens of a request, pooled;
  TBT of a request: the 90th percentile (nearest rank) of its gaps, as the Mooncake paper measures it
  and the gateway computes it (a request with fewer than two tokens has none, and passes the TBT check); end-to-end: send -> end of stream.
  p50/p90/p99 and means over the completed requests.
- A 429 is a rejected request; any other non-200 status, an ``{"error": ...}`` event in the stream or a
  broken connection is a failed one. Admitted = sent - rejected.
- SLO attainment: the fraction of requests that completed with TTFT <= ``ttft_slo`` and TBT <=
  ``tbt_slo``, of all sent and of the admitted; goodput: those requests per second of replay wall time
  (first send -> last response over); throughput: output tokens of the completed requests per second.
- Prefix hit ratio: sum ``cached_tokens`` / sum ``prompt_tokens`` over the completed requests.
- Wasted prefill tokens: ``prompt_tokens - cached_tokens`` of the requests that completed but missed an
  SLO, plus of the failed ones whose prefill was done (a token had arrived), as the gateway counts them.

The CLI prints a table and, as its last line, one JSON object of the named figures; it writes a JSON
file (config, summary, per-request records, health samples) and a PNG of TTFT, load and rejections
over time.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import orjson

from bench.common import (DEFAULT_TRACE, TRACE_BLOCK_TOKENS, TraceTokens, ms, percentile, ratio, read_trace, say,
                          shown, stream_body)
from bench.sse import StreamResult, first_model, stream_completion
from libs.metrics import request_tbt
from yuebing.tables import format_table

DEFAULT_VOCAB = 49152  # SmolLM2's vocabulary
DEFAULT_TOKEN_SCALE = 32
DEFAULT_TTFT_SLO = 30.0  # seconds: the cluster's own default objectives (libs/config.py)
DEFAULT_TBT_SLO = 1.0
STREAM_READ_TIMEOUT = 900.0  # seconds without a byte before a stream counts as failed
MAX_PLOT_BINS = 300  # rejections-per-second panel: at most this many bins

COMPLETED, REJECTED, FAILED = "completed", "rejected", "failed"


# ================================================================ requests
@dataclass(frozen=True)
class PreparedRequest:
    """One scaled trace request, ready to send ``send_at`` seconds after the replay starts."""

    index: int  # its line in the trace (0-based)
    prompt: list[int]
    max_tokens: int
    send_at: float
    hash_ids: list[int] = field(default_factory=list)  # the hash ids its prompt is made of


def prepare(trace_rows: Sequence[dict], *, token_scale: int, time_scale: float, rate: float | None = None,
            vocab: int = DEFAULT_VOCAB, max_context: int | None, seed: int = 0,
            start: int = 0, output_scale: int | None = None) -> tuple[list[PreparedRequest], int]:
    """Scale ``trace_rows`` (see the module doc) into requests in trace order, and count the dropped.

    ``rate`` (requests/s) replaces the trace's arrival times by evenly spaced ones in the same order;
    otherwise arrival times are the trace's, divided by ``time_scale`` and counted from the earliest
    kept request. ``max_context`` None keeps every prompt. ``start`` is the trace line of
    ``trace_rows[0]`` (for the records' ``index``). ``output_scale`` divides the output lengths
    instead of ``token_scale`` (default: the same factor, as the trace's README prescribes).
    """
    if token_scale < 1 or TRACE_BLOCK_TOKENS % token_scale:
        raise ValueError(f"token_scale must divide {TRACE_BLOCK_TOKENS}, got {token_scale}")
    if time_scale <= 0:
        raise ValueError(f"time_scale must be positive, got {time_scale}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    tokens = TraceTokens(TRACE_BLOCK_TOKENS // token_scale, vocab, seed)
    kept: list[tuple[int, list[int], list[int], int, float]] = []
    dropped = 0
    for i, row in enumerate(trace_rows):
        prompt, used = tokens.prompt(row, token_scale)
        out = scaled_output(row, output_scale or token_scale)
        if max_context is not None and len(prompt) + out > max_context:
            dropped += 1
            continue
        kept.append((start + i, prompt, list(used), out, float(row.get("timestamp", 0))))
    first_ms = min((k[4] for k in kept), default=0.0)
    requests = [
        PreparedRequest(index=idx, prompt=prompt, max_tokens=out, hash_ids=used,
                        send_at=n / rate if rate is not None else (ts - first_ms) / 1000.0 / time_scale)
        for n, (idx, prompt, used, out, ts) in enumerate(kept)
    ]
    return requests, dropped


def scaled_output(row: dict, token_scale: int) -> int:
    """A trace request's output length divided by ``token_scale``, at least one token."""
    return max(1, int(row["output_length"]) // token_scale)


# ================================================================ records
@dataclass
class RequestRecord:
    """What happened to one request. Times are seconds since the replay started (the client's clock)."""

    index: int
    send_at: float  # when it was due
    sent: float  # when it was sent
    prompt_len: int
    max_tokens: int
    outcome: str  # completed | rejected | failed
    status: int | None = None
    retry_after: float | None = None
    error: str | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of every token, the first one included
    finished: float | None = None  # the response was over (or failed)
    chunks: int = 0  # SSE events that brought tokens
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None

    @property
    def first_token(self) -> float | None:
        return self.token_times[0] if self.token_times else None


def outcome_of(s: StreamResult) -> str:
    """429 -> rejected; a clean 200 stream -> completed; anything else -> failed."""
    if s.status == 429:
        return REJECTED
    return COMPLETED if s.ok else FAILED


def record_from(req: PreparedRequest, s: StreamResult, t0: float) -> RequestRecord:
    """A request's record from the stream client's result (clock readings made relative to ``t0``)."""

    def rel(x: float | None) -> float | None:
        return None if x is None else x - t0

    return RequestRecord(
        index=req.index, send_at=req.send_at, sent=s.sent - t0, prompt_len=len(req.prompt),
        max_tokens=req.max_tokens, outcome=outcome_of(s), status=s.status, retry_after=s.retry_after,
        error=s.error, token_times=[x - t0 for x in s.token_times], finished=rel(s.ended), chunks=s.chunks,
        prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens, cached_tokens=s.cached_tokens,
        finish_reason=s.finish_reason,
    )


@dataclass
class HealthSample:
    """The server's load at ``t`` (seconds since the start), summed over its workers of each kind."""

    t: float
    prefill_queued: int = 0
    prefill_running: int = 0
    decode_queued: int = 0
    decode_running: int = 0


def health_sample(t: float, body: Any) -> HealthSample | None:
    """A sample from a ``/health`` body with a ``workers`` list of ``{kind, id, queued, running}``;
    None for any other body."""
    workers = body.get("workers") if isinstance(body, dict) else None
    if not isinstance(workers, list):
        return None
    s = HealthSample(t=t)
    for w in workers:
        if not isinstance(w, dict) or w.get("kind") not in ("prefill", "decode"):
            continue
        kind = w["kind"]
        setattr(s, f"{kind}_queued", getattr(s, f"{kind}_queued") + int(w.get("queued") or 0))
        setattr(s, f"{kind}_running", getattr(s, f"{kind}_running") + int(w.get("running") or 0))
    return s


@dataclass
class ReplayResult:
    """A replay: its records in send order, the server's load samples, and how it was set up."""

    url: str
    model: str
    ttft_slo: float
    tbt_slo: float
    started: float  # unix time of the start
    records: list[RequestRecord] = field(default_factory=list)
    health: list[HealthSample] = field(default_factory=list)
    dropped: int = 0  # requests prepare() left out (too long for the context): set by the caller
    config: dict = field(default_factory=dict)  # how the requests were made, kept in the JSON file


# ================================================================ replay
def api_root(url: str) -> str:
    """The server's root URL from a base URL given with or without ``/v1``."""
    root = url.strip().rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def _session(api_key: str | None):
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=STREAM_READ_TIMEOUT),
        headers=headers,
        json_serialize=lambda obj: orjson.dumps(obj).decode(),
    )


async def server_model(url: str, api_key: str | None = None) -> dict:
    """The first model the server lists (``GET /v1/models``): ``id`` and, where given, ``max_model_len``."""
    async with _session(api_key) as session:
        return await first_model(session, api_root(url))


class HealthSampler:
    """Samples ``GET /health`` every ``interval`` seconds until stopped, if the server answers it with a
    ``workers`` list; gives up at once otherwise. Always takes at least one sample attempt."""

    def __init__(self, session, root: str, interval: float, t0: float):
        self.session = session
        self.url = root + "/health"
        self.interval = interval
        self.t0 = t0
        self.samples: list[HealthSample] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> "HealthSampler":
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> list[HealthSample]:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.samples

    async def _once(self) -> tuple[bool, HealthSample | None]:
        """(the server answered at all, the sample if the answer is JSON with workers)."""
        import aiohttp

        try:
            limit = aiohttp.ClientTimeout(total=max(1.0, 4 * self.interval))
            async with self.session.get(self.url, timeout=limit) as r:
                raw = await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False, None  # busy or restarting: ask again later
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return True, None
        return True, health_sample(time.perf_counter() - self.t0, body)

    async def _run(self) -> None:
        first = True
        while True:
            answered, sample = await self._once()
            if first and sample is None and answered:
                return  # a /health without workers: nothing to plot
            first = False
            if sample is not None:
                self.samples.append(sample)
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval)
                return
            except asyncio.TimeoutError:
                pass


class _Progress:
    """The tqdm bar: completed of all, with sent / rejected / failed so far."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="replay", unit="req", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True)
        self.sent = self.rejected = self.failed = 0

    def on_send(self) -> None:
        self.sent += 1
        self._postfix()

    def on_done(self, rec: RequestRecord) -> None:
        self.rejected += rec.outcome == REJECTED
        self.failed += rec.outcome == FAILED
        self.bar.update(1)
        self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix(sent=self.sent, rejected=self.rejected, failed=self.failed, refresh=False)

    def close(self) -> None:
        self.bar.close()


async def replay(url: str, requests: Sequence[PreparedRequest], *, api_key: str | None = None,
                 model: str | None = None, ttft_slo: float, tbt_slo: float, progress: bool = True,
                 health_interval: float | None = 0.5) -> ReplayResult:
    """Send ``requests`` open loop at their ``send_at`` times to the server at ``url`` (with or without
    ``/v1``) and record each; ``model`` None: the first of ``GET /v1/models``; ``health_interval`` None
    or 0: no ``/health`` sampling. Failed and rejected requests are records, never exceptions.
    ``result.dropped`` and ``result.config`` are left for the caller (see :func:`main`)."""
    root = api_root(url)
    completions = root + "/v1/completions"
    ordered = sorted(requests, key=lambda r: r.send_at)
    async with _session(api_key) as session:
        if model is None:
            model = str((await first_model(session, root))["id"])
        result = ReplayResult(url=root, model=model, ttft_slo=ttft_slo, tbt_slo=tbt_slo, started=time.time())
        bar = _Progress(len(ordered), progress)
        t0 = time.perf_counter()
        sampler = HealthSampler(session, root, health_interval, t0).start() if health_interval else None

        async def send(req: PreparedRequest) -> RequestRecord:
            bar.on_send()
            rec = record_from(req, await stream_completion(session, completions, stream_body(model, req.prompt, req.max_tokens)), t0)
            bar.on_done(rec)
            return rec

        tasks: list[asyncio.Task] = []
        try:
            for req in ordered:
                delay = t0 + req.send_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(send(req)))
            result.records = list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()
            result.health = await sampler.stop() if sampler is not None else []
            bar.close()
    return result


# ================================================================ metrics
def ttft(rec: RequestRecord) -> float | None:
    """Send -> first token, seconds."""
    return None if rec.first_token is None else rec.first_token - rec.sent


def token_gaps(rec: RequestRecord) -> list[float]:
    """Every gap between consecutive token arrivals of one request."""
    return [b - a for a, b in zip(rec.token_times, rec.token_times[1:])]


def tbt(rec: RequestRecord) -> float | None:
    """A request's time between tokens: the 90th percentile (nearest rank) of its gaps, the gateway's
    own definition (``libs.metrics.request_tbt``); None with fewer than 2 tokens."""
    return request_tbt(token_gaps(rec))


def e2e(rec: RequestRecord) -> float | None:
    """Send -> end of the response, seconds."""
    return None if rec.finished is None else rec.finished - rec.sent


def meets_slo(rec: RequestRecord, ttft_slo: float, tbt_slo: float) -> bool:
    """Completed, with TTFT <= ``ttft_slo`` and TBT <= ``tbt_slo`` (no TBT: passes that check)."""
    if rec.outcome != COMPLETED:
        return False
    first, between = ttft(rec), tbt(rec)
    return first is not None and first <= ttft_slo and (between is None or between <= tbt_slo)


def replay_wall(records: Sequence[RequestRecord]) -> float:
    """First send -> last response over, seconds (0 without records)."""
    ends = [r.finished for r in records if r.finished is not None]
    if not records or not ends:
        return 0.0
    return max(ends) - min(r.sent for r in records)


def prefix_hit_ratio(records: Iterable[RequestRecord]) -> float | None:
    """Sum cached_tokens / sum prompt_tokens over the completed requests that reported usage."""
    done = [r for r in records if r.outcome == COMPLETED and r.prompt_tokens is not None]
    prompt = sum(r.prompt_tokens for r in done)
    return sum(r.cached_tokens or 0 for r in done) / prompt if prompt else None


def wasted_prefill_tokens(records: Iterable[RequestRecord], ttft_slo: float, tbt_slo: float) -> int:
    """Prompt tokens computed for nothing: ``prompt_tokens - cached_tokens`` of the requests that
    completed but missed an SLO, and of the failed ones whose prefill was done (a token arrived), as the
    gateway counts them; without usage, a failed request counts its whole prompt as computed."""
    total = 0
    for r in records:
        missed = r.outcome == COMPLETED and not meets_slo(r, ttft_slo, tbt_slo)
        if missed or (r.outcome == FAILED and r.token_times):
            prompt = r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len
            total += max(0, prompt - (r.cached_tokens or 0))
    return total


def output_tokens(rec: RequestRecord) -> int:
    """Tokens a request generated: the server's usage, else the arrivals counted."""
    return rec.completion_tokens if rec.completion_tokens is not None else len(rec.token_times)


def distribution_ms(name: str, values: list[float]) -> dict[str, float | None]:
    """``{name}_p50_ms``, ``_p90_ms``, ``_p99_ms``, ``_mean_ms`` of ``values`` (seconds)."""
    out: dict[str, float | None] = {f"{name}_p{q}_ms": ms(percentile(values, q)) for q in (50, 90, 99)}
    out[f"{name}_mean_ms"] = ms(sum(values) / len(values)) if values else None
    return out


def summarize(result: ReplayResult, ttft_slo: float, tbt_slo: float) -> dict:
    """The named figures of a replay (see the module doc); every value a number, string or None."""
    recs = result.records
    done = [r for r in recs if r.outcome == COMPLETED]
    rejected = sum(r.outcome == REJECTED for r in recs)
    failed = sum(r.outcome == FAILED for r in recs)
    admitted = len(recs) - rejected
    good = [r for r in done if meets_slo(r, ttft_slo, tbt_slo)]
    wall = replay_wall(recs)
    hit = prefix_hit_ratio(done)
    out_tokens = sum(output_tokens(r) for r in done)
    summary: dict = {
        "model": result.model,
        "requests": len(recs),
        "dropped_context": result.dropped,
        "completed": len(done),
        "rejected": rejected,
        "failed": failed,
        "admitted": admitted,
        "ttft_slo_s": ttft_slo,
        "tbt_slo_s": tbt_slo,
        "slo_ok": len(good),
        "ttft_missed": sum(1 for r in done if (ttft(r) is None or ttft(r) > ttft_slo)),
        "tbt_missed": sum(1 for r in done if (tbt(r) or 0.0) > tbt_slo),
        "slo_attainment": ratio(len(good), len(recs), 4),
        "slo_attainment_admitted": ratio(len(good), admitted, 4),
        "goodput_rps": ratio(len(good), wall, 3),
        "completed_rps": ratio(len(done), wall, 3),
        "throughput_tok_s": ratio(out_tokens, wall, 2),
        "wall_s": round(wall, 3),
    }
    summary.update(distribution_ms("ttft", [x for x in map(ttft, done) if x is not None]))
    summary.update(distribution_ms("itl", [g for r in done for g in token_gaps(r)]))
    summary.update(distribution_ms("tbt", [x for x in map(tbt, done) if x is not None]))
    summary.update(distribution_ms("e2e", [x for x in map(e2e, done) if x is not None]))
    summary.update({
        "prefix_hit_ratio": None if hit is None else round(hit, 4),
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in done),
        "cached_tokens": sum(r.cached_tokens or 0 for r in done),
        "output_tokens": out_tokens,
        "wasted_prefill_tokens": wasted_prefill_tokens(recs, ttft_slo, tbt_slo),
        "tokens_unattributed": sum(max(0, output_tokens(r) - len(r.token_times)) for r in done),
    })
    return summary


# ================================================================ output
def summary_table(summary: dict) -> str:
    """The summary for a human: latencies (ms) in one table, counts and rates in another."""
    lat_rows = [{"latency ms": label, **{c: summary.get(f"{key}_{c}_ms") for c in ("p50", "p90", "p99", "mean")}}
                for label, key in (("TTFT", "ttft"), ("ITL", "itl"), ("TBT (p90 per request)", "tbt"),
                                   ("end to end", "e2e"))]
    figures = [
        ("requests sent", summary["requests"]), ("dropped (context)", summary["dropped_context"]),
        ("completed", summary["completed"]), ("rejected (429)", summary["rejected"]),
        ("failed", summary["failed"]),
        (f"within SLOs (TTFT <= {summary['ttft_slo_s']} s, TBT <= {summary['tbt_slo_s']} s)", summary["slo_ok"]),
        ("SLO attainment, of sent", summary["slo_attainment"]),
        ("SLO attainment, of admitted", summary["slo_attainment_admitted"]),
        ("goodput req/s", summary["goodput_rps"]), ("throughput output tok/s", summary["throughput_tok_s"]),
        ("prefix hit ratio", summary["prefix_hit_ratio"]),
        ("wasted prefill tokens", summary["wasted_prefill_tokens"]), ("wall s", summary["wall_s"]),
    ]
    fig_rows = [{"figure": k, "value": v} for k, v in figures]
    return (format_table(lat_rows, ["latency ms", "p50", "p90", "p99", "mean"]) + "\n\n"
            + format_table(fig_rows, ["figure", "value"]))


def in_flight(records: Sequence[RequestRecord]) -> tuple[list[float], list[int]]:
    """Requests in flight from the client's view, as a step function: (times, count from each time on)."""
    events = sorted([(r.sent, 1) for r in records] + [(r.finished, -1) for r in records if r.finished is not None])
    times, counts, n = [], [], 0
    for t, d in events:
        n += d
        times.append(t)
        counts.append(n)
    return times, counts


def per_second(times: Sequence[float], span: float, max_bins: int = MAX_PLOT_BINS) -> tuple[list[float], list[float]]:
    """Events per second over [0, span): (bin starts, rates); bins of 1 s, wider when that makes too many."""
    width = max(1.0, math.ceil(span / max_bins)) if span > 0 else 1.0
    n = max(1, math.ceil(span / width))
    counts = [0] * n
    for t in times:
        counts[min(n - 1, max(0, int(t // width)))] += 1
    return [i * width for i in range(n)], [c / width for c in counts]


def plot(result: ReplayResult, summary: dict, path: str | Path) -> Path:
    """Three panels over replay time: TTFT by send time, load, rejections per second; a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    recs = result.records
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 10), sharex=True)
    try:
        _plot_ttft(ax1, recs, result.ttft_slo, result.tbt_slo)
        _plot_load(ax2, recs, result.health)
        _plot_rejections(ax3, recs)
        ax3.set_xlabel("seconds since the replay started (send time)")
        fig.suptitle(f"{result.model} @ {result.url}: {summary['requests']} requests\nSLO attainment "
                     f"{_pct(summary['slo_attainment'])} (of admitted {_pct(summary['slo_attainment_admitted'])}), "
                     f"goodput {summary['goodput_rps']} req/s, rejected {summary['rejected']}, "
                     f"failed {summary['failed']}", fontsize=10)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _plot_ttft(ax, recs: Sequence[RequestRecord], ttft_slo: float, tbt_slo: float) -> None:
    done = [r for r in recs if r.outcome == COMPLETED and r.first_token is not None]
    good = [r for r in done if meets_slo(r, ttft_slo, tbt_slo)]
    missed = [r for r in done if not meets_slo(r, ttft_slo, tbt_slo)]
    ax.scatter([r.sent for r in good], [ttft(r) for r in good], s=8, c="tab:green", label="within both SLOs")
    ax.scatter([r.sent for r in missed], [ttft(r) for r in missed], s=8, c="tab:orange", label="missed an SLO")
    rejected = [r.sent for r in recs if r.outcome == REJECTED]
    failed = [r.sent for r in recs if r.outcome == FAILED]
    if rejected:
        ax.scatter(rejected, [0.0] * len(rejected), marker="x", s=18, c="tab:red", label="rejected (429)")
    if failed:
        ax.scatter(failed, [0.0] * len(failed), marker="v", s=18, c="black", label="failed")
    ax.axhline(ttft_slo, color="tab:red", linestyle="--", linewidth=1, label=f"TTFT SLO {ttft_slo} s")
    ax.set_ylabel("TTFT (s)")
    ax.legend(loc="upper left", fontsize=8)


def _plot_load(ax, recs: Sequence[RequestRecord], health: Sequence[HealthSample]) -> None:
    times, counts = in_flight(recs)
    ax.step(times, counts, where="post", label="in flight (client)")
    if health:
        ts = [h.t for h in health]
        ax.plot(ts, [h.prefill_queued for h in health], marker=".", markersize=3, label="prefill queued (server)")
        ax.plot(ts, [h.decode_running for h in health], marker=".", markersize=3, label="decode running (server)")
    ax.set_ylabel("requests")
    ax.legend(loc="upper left", fontsize=8)


def _plot_rejections(ax, recs: Sequence[RequestRecord]) -> None:
    span = max((r.finished if r.finished is not None else r.sent for r in recs), default=0.0)
    starts, rates = per_second([r.sent for r in recs if r.outcome == REJECTED], span)
    width = starts[1] - starts[0] if len(starts) > 1 else 1.0
    ax.bar(starts, rates, width=width, align="edge", color="tab:red")
    ax.set_ylabel("rejected / s")


def result_document(result: ReplayResult, summary: dict) -> dict:
    """The JSON file's content: config, summary, per-request records, health samples."""
    return {
        "config": {"url": result.url, "model": result.model, "ttft_slo_s": result.ttft_slo,
                   "tbt_slo_s": result.tbt_slo, "started_unix": result.started, **result.config},
        "summary": summary,
        "records": [asdict(r) for r in result.records],
        "health": [asdict(h) for h in result.health],
    }


def write_json(result: ReplayResult, summary: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(result_document(result, summary), option=orjson.OPT_INDENT_2))
    return path


def output_path(out: str | None, now: float | None = None) -> Path:
    """``--out``: a file, or a directory for ``replay-<timestamp>.json``; default that name in the cwd."""
    name = time.strftime("replay-%Y%m%d-%H%M%S.json", time.localtime(now))
    if not out:
        return Path.cwd() / name
    p = Path(out).expanduser()
    return p / name if p.is_dir() else p


# ================================================================ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The replay's arguments: ``FILE`` and ``--url`` and its options."""
    parser.add_argument("file", nargs="?", default=None, metavar="FILE",
                        help=f"the trace, Mooncake JSONL (default {DEFAULT_TRACE.name} in {shown(DEFAULT_TRACE.parent)})")
    g = parser.add_argument_group("replay against a running OpenAI-compatible server (with --url)")
    g.add_argument("--url", default=None, help="base URL of the server, with or without /v1 "
                   "(e.g. http://127.0.0.1:8000)")
    g.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (default: $YUEBING_API_KEY)")
    g.add_argument("--model", default=None, help="with --url: the model name in the requests (default: the first "
                   "of GET /v1/models); without: the model the clusters serve")
    g.add_argument("--token-scale", type=int, default=DEFAULT_TOKEN_SCALE,
                   help="divides prompt and output lengths: 512/token_scale tokens per hash id (default 32)")
    g.add_argument("--output-scale", type=int, default=None,
                   help="divides the output lengths instead of --token-scale (default: the same factor)")
    g.add_argument("--time-scale", type=float, default=1.0, help="divides the arrival times (default 1: real time)")
    g.add_argument("--rate", type=float, default=None,
                   help="requests/s, evenly spaced in trace order, instead of the trace's arrival times")
    g.add_argument("--requests", type=int, default=None,
                   help="the first N requests from --start (default: all; without --url: 1000)")
    g.add_argument("--start", type=int, default=0, help="skip the first N lines of the trace (default 0)")
    g.add_argument("--max-context", type=int, default=None,
                   help="drop requests whose prompt + output exceed it (default: the server's max_model_len, "
                        "else none; without --url: the context of the tiny model built, 32768)")
    g.add_argument("--vocab", type=int, default=DEFAULT_VOCAB, help=f"token ids below it (default {DEFAULT_VOCAB})")
    g.add_argument("--ttft-slo", type=float, default=DEFAULT_TTFT_SLO, help=f"seconds (default {DEFAULT_TTFT_SLO})")
    g.add_argument("--tbt-slo", type=float, default=DEFAULT_TBT_SLO,
                   help=f"seconds, on each request's P90 gap between tokens (default {DEFAULT_TBT_SLO})")
    g.add_argument("--seed", type=int, default=0, help="seed of the token ids of the hash blocks (default 0)")
    g.add_argument("--out", default=None, help="JSON file or directory (default ./replay-<timestamp>.json); "
                   "without --url: where the JSON figures go")
    g.add_argument("--plot", default=None, help="PNG file (default: the JSON file's name with .png)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run a replay from parsed arguments: table on stdout, last line the summary as JSON. 0 when at
    least one request completed, 1 when none did, 2 for bad arguments or an unreachable server."""
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        say("interrupted")
        return 130


async def _main(args: argparse.Namespace) -> int:
    url = args.url
    api_key = getattr(args, "api_key", None) or os.environ.get("YUEBING_API_KEY") or None
    path = Path(getattr(args, "file", None) or DEFAULT_TRACE)
    start, limit = int(getattr(args, "start", 0) or 0), getattr(args, "requests", None)
    model, max_context = getattr(args, "model", None), getattr(args, "max_context", None)
    if model is None or max_context is None:
        try:
            info = await server_model(url, api_key)
        except Exception as e:  # noqa: BLE001 - reported, not a traceback
            if model is None:
                say(f"bench trace: cannot list the models of {url}: {e!r}")
                return 2
            info = {}
        model = model or str(info["id"])
        max_context = max_context or info.get("max_model_len")
    token_scale = int(getattr(args, "token_scale", DEFAULT_TOKEN_SCALE))
    time_scale = float(getattr(args, "time_scale", 1.0))
    rate, seed = getattr(args, "rate", None), int(getattr(args, "seed", 0))
    vocab = int(getattr(args, "vocab", DEFAULT_VOCAB))
    ttft_slo = float(getattr(args, "ttft_slo", DEFAULT_TTFT_SLO))
    tbt_slo = float(getattr(args, "tbt_slo", DEFAULT_TBT_SLO))
    rows = read_trace(path, start=start, limit=limit)
    try:
        requests, dropped = prepare(rows, token_scale=token_scale, time_scale=time_scale, rate=rate, vocab=vocab,
                                    max_context=max_context, seed=seed, start=start,
                                    output_scale=getattr(args, "output_scale", None))
    except ValueError as e:
        say(f"bench trace: {e}")
        return 2
    span = requests[-1].send_at if requests else 0.0
    say(f"bench trace: {len(requests)} requests of {path.name} (lines {start}..{start + len(rows) - 1}, dropped "
         f"{dropped} longer than the context {max_context}) over {span:.1f} s to {api_root(url)}, model {model}; "
         f"token_scale {token_scale}, " + (f"rate {rate} req/s" if rate else f"time_scale {time_scale}"))
    result = await replay(url, requests, api_key=api_key, model=model, ttft_slo=ttft_slo, tbt_slo=tbt_slo,
                          progress=bool(getattr(args, "progress", True)))
    result.dropped = dropped
    result.config = {"trace": str(path), "start": start, "requests": limit, "token_scale": token_scale,
                     "output_scale": getattr(args, "output_scale", None) or token_scale, "time_scale": time_scale, "rate": rate, "max_context": max_context, "vocab": vocab,
                     "seed": seed}
    summary = summarize(result, ttft_slo, tbt_slo)
    out = write_json(result, summary, output_path(getattr(args, "out", None)))
    png = plot(result, summary, getattr(args, "plot", None) or out.with_suffix(".png"))
    say(f"wrote {out} and {png}")
    print(f"\nreplay of {path.name} against {result.url} ({model}): {summary['requests']} requests, times in ms")
    print(summary_table(summary))
    print(orjson.dumps(summary).decode(), flush=True)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    _ns = _parser.parse_args()
    if not _ns.url:
        _parser.error("--url is required")
    sys.exit(main(_ns))
