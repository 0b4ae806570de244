"""The trace replay (``yuebing bench trace FILE --url URL``): preparing requests, the metrics on hand-made
records, the SSE token counting, and whole replays against a small OpenAI-style server started here.
Behaviour only: no assertion depends on how fast anything ran."""

from __future__ import annotations

import argparse
import asyncio
import threading

import orjson
import pytest
from aiohttp import web

from bench import cache_trace, common, replay
from yuebing.cli import build_parser
from bench.cli import trace_main
from bench.replay import COMPLETED, FAILED, REJECTED, RequestRecord
from bench.sse import TokenCounter, parse_retry_after

API_KEY = "test-key"
MODEL = "fake-model"
MAX_MODEL_LEN = 4096
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ================================================================ a small OpenAI-compatible server
class FakeServer:
    """Streams ``/v1/completions`` the way an OpenAI-compatible server does, in a thread of its own.

    By ``max_tokens``: 3 -> 429 with Retry-After 7; 4 -> two tokens, then an error event; 6 -> two tokens
    per event (``logprobs.tokens``); otherwise one event per token. Usage reports half the prompt cached.
    """

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.runner: web.AppRunner | None = None
        self.url = ""

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/completions", self.completions)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "max_model_len": MAX_MODEL_LEN}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "workers": [
            {"kind": "prefill", "id": "p0", "queued": 2, "running": 1},
            {"kind": "prefill", "id": "p1", "queued": 1, "running": 0},
            {"kind": "decode", "id": "d0", "queued": 0, "running": 3},
        ]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return web.json_response({"error": {"message": "bad key", "type": "authentication_error"}}, status=401)
        body = await request.json()
        self.bodies.append(body)
        n = int(body["max_tokens"])
        if n == 3:
            return web.json_response({"error": {"message": "overloaded", "type": "rate_limit_error",
                                                "param": None, "code": "rate_limited"}},
                                     status=429, headers={"Retry-After": "7"})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(obj) -> None:
            await resp.write(b"data: " + orjson.dumps(obj) + b"\n\n")
            await asyncio.sleep(0.001)

        def chunk(text: str, reason=None, logprobs=None) -> dict:
            return {"id": "cmpl-1", "object": "text_completion", "model": MODEL,
                    "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}]}

        if n == 4:
            await send(chunk("a"))
            await send(chunk("b"))
            await send({"error": {"message": "worker lost", "type": "server_error"}})
        else:
            if n == 6:
                for _ in range(3):
                    await send(chunk("ab", logprobs={"tokens": ["a", "b"], "token_logprobs": [0.0, 0.0]}))
            else:
                for _ in range(n):
                    await send(chunk("x"))
            await send(chunk("", "length"))
            prompt = len(body["prompt"])
            await send({"id": "cmpl-1", "object": "text_completion", "model": MODEL, "choices": [],
                        "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n,
                                  "prompt_tokens_details": {"cached_tokens": prompt // 2}}})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def start(self) -> "FakeServer":
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.runner = web.AppRunner(self._app())
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            host, port = self.runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(30), "the fake server did not start"
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module")
def server():
    s = FakeServer().start()
    yield s
    s.stop()


def _row(ts: int, inp: int, out_tokens: int, hash_ids: list[int]) -> dict:
    """A trace line; at token_scale 32 its output is ``out_tokens`` tokens."""
    return {"timestamp": ts, "input_length": inp, "output_length": 32 * out_tokens, "hash_ids": hash_ids}


# Six requests that fit, one that does not (200,000 / 32 tokens > the server's context of 4096).
TRACE = [
    _row(0, 1024, 5, [0, 1]),  # 32 prompt tokens, 5 output tokens
    _row(10, 1536, 2, [0, 1, 2]),  # 48 tokens, shares its first 32 with the first
    _row(20, 512, 3, [3]),  # rejected (429)
    _row(30, 1024, 4, [4, 5]),  # fails after two tokens
    _row(40, 512, 1, [6]),  # one token: no TBT
    _row(50, 512, 6, [7]),  # six tokens, two per event
    _row(60, 200_000, 2, list(range(100, 491))),  # too long: dropped
]


# ================================================================ prepare
def test_prepare_scales_lengths_and_times():
    rows = [_row(1000, 100, 0, [0]), _row(3000, 1536, 2, [0, 1, 2]), _row(6000, 512, 5, [3])]
    rows[0]["output_length"] = 10  # 10 / 32 rounds down to 0: at least one token
    reqs, dropped = replay.prepare(rows, token_scale=32, time_scale=2.0, vocab=5000, max_context=None)
    assert dropped == 0
    assert [len(r.prompt) for r in reqs] == [3, 48, 16]  # input_length / 32
    assert [r.max_tokens for r in reqs] == [1, 2, 5]
    assert [r.send_at for r in reqs] == [0.0, 1.0, 2.5]  # ms after the first, / 1000 / time_scale
    assert [r.hash_ids for r in reqs] == [[0], [0, 1, 2], [3]]
    assert all(common.TOKEN_LO <= t < 5000 for r in reqs for t in r.prompt)


def test_prepare_is_deterministic_and_shares_prefixes():
    rows = [_row(0, 1536, 1, [0, 1, 2]), _row(5, 1536, 1, [0, 1, 9]), _row(9, 512, 1, [9])]
    a, _ = replay.prepare(rows, token_scale=32, time_scale=1.0, vocab=49152, max_context=None)
    b, _ = replay.prepare(rows, token_scale=32, time_scale=1.0, vocab=49152, max_context=None)
    c, _ = replay.prepare(rows, token_scale=32, time_scale=1.0, vocab=49152, max_context=None, seed=1)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert a[0].prompt != c[0].prompt  # another seed, other token ids
    assert a[0].prompt[:32] == a[1].prompt[:32]  # hash ids 0, 1 shared: 2 x 16 tokens
    assert a[0].prompt[32:] != a[1].prompt[32:]
    assert a[1].prompt[32:] == a[2].prompt  # hash id 9: the same block wherever it appears
    # the same hash ids at another scale: 64 tokens per id
    d, _ = replay.prepare(rows, token_scale=8, time_scale=1.0, vocab=49152, max_context=None)
    assert [len(r.prompt) for r in d] == [192, 192, 64] and d[0].prompt[:128] == d[1].prompt[:128]


def test_prepare_rate_overrides_arrival_times_in_order():
    rows = [_row(0, 512, 1, [0]), _row(50_000, 512, 1, [1]), _row(50_001, 512, 1, [2])]
    reqs, _ = replay.prepare(rows, token_scale=32, time_scale=100.0, rate=4.0, vocab=49152, max_context=None)
    assert [r.send_at for r in reqs] == [0.0, 0.25, 0.5]
    assert [r.hash_ids for r in reqs] == [[0], [1], [2]]


def test_prepare_drops_what_does_not_fit_and_numbers_lines():
    rows = [_row(1000, 512, 1, [0]), _row(2000, 1024, 1, [1, 2]), _row(4000, 1024, 20, [3, 4])]
    # 16 + 1 fits 40; 32 + 1 fits; 32 + 20 does not
    reqs, dropped = replay.prepare(rows, token_scale=32, time_scale=1.0, vocab=49152, max_context=40, start=100)
    assert dropped == 1 and [r.index for r in reqs] == [100, 101]
    reqs, dropped = replay.prepare(rows[1:] + [_row(4500, 512, 1, [5])], token_scale=32, time_scale=1.0,
                                   vocab=49152, max_context=20)
    assert dropped == 2 and [r.send_at for r in reqs] == [0.0]  # times counted from the first kept request
    with pytest.raises(ValueError):
        replay.prepare(rows, token_scale=3, time_scale=1.0, vocab=49152, max_context=None)


def test_read_trace_start_and_limit(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(orjson.dumps(r).decode() + "\n" for r in TRACE))
    assert common.read_trace(path, start=2, limit=3) == TRACE[2:5]
    assert common.read_trace(path, start=5) == TRACE[5:]


# ================================================================ metrics on hand-made records
def _rec(outcome: str, sent: float, tokens: list[float], finished: float, *, prompt: int | None = None,
         cached: int | None = None, completion: int | None = None, prompt_len: int = 0,
         status: int = 200) -> RequestRecord:
    return RequestRecord(index=0, send_at=sent, sent=sent, prompt_len=prompt_len or (prompt or 0), max_tokens=8,
                         outcome=outcome, status=status, token_times=tokens, finished=finished,
                         prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion)


def test_tbt_is_the_p90_of_a_requests_gaps():
    r = _rec(COMPLETED, 0.5, [1.0, 1.1, 1.2, 1.3, 2.0], 2.0)
    assert replay.ttft(r) == pytest.approx(0.5)
    assert replay.token_gaps(r) == pytest.approx([0.1, 0.1, 0.1, 0.7])
    assert replay.tbt(r) == pytest.approx(0.7)  # 4 gaps: the 90th percentile by nearest rank is the 4th
    times = [0.0]
    for g in [0.1] * 8 + [0.5, 0.9]:
        times.append(times[-1] + g)
    r = _rec(COMPLETED, 0.0, times, times[-1])
    assert replay.tbt(r) == pytest.approx(0.5)  # 10 gaps: the 9th smallest, not the largest
    one = _rec(COMPLETED, 0.0, [0.2], 0.3)
    assert replay.tbt(one) is None and replay.meets_slo(one, ttft_slo=1.0, tbt_slo=0.0)
    assert not replay.meets_slo(one, ttft_slo=0.1, tbt_slo=1.0)
    assert not replay.meets_slo(_rec(FAILED, 0.0, [0.1], 0.2), ttft_slo=9.0, tbt_slo=9.0)


def _hand_made() -> replay.ReplayResult:
    recs = [
        _rec(COMPLETED, 0.0, [1.0, 1.1, 1.2], 1.3, prompt=100, cached=40, completion=3),  # within both SLOs
        _rec(COMPLETED, 1.0, [4.0], 4.0, prompt=50, cached=0, completion=1),  # TTFT 3 > 2
        # TBT 1 > 0.5; one of its 4 tokens came in an event no token could be credited to
        _rec(COMPLETED, 2.0, [2.5, 3.5, 4.5], 4.6, prompt=80, cached=16, completion=4),
        _rec(REJECTED, 3.0, [], 3.01, status=429, prompt_len=70),
        _rec(FAILED, 3.5, [3.9], 5.0, prompt_len=60),  # failed after its first token: prefill wasted
        _rec(FAILED, 4.0, [], 4.1, status=503, prompt_len=90),  # failed before any work
    ]
    return replay.ReplayResult(url="http://x", model="m", ttft_slo=2.0, tbt_slo=0.5, started=0.0, records=recs,
                               dropped=2)


def test_summary_of_hand_made_records():
    s = replay.summarize(_hand_made(), ttft_slo=2.0, tbt_slo=0.5)
    assert (s["requests"], s["completed"], s["rejected"], s["failed"], s["admitted"]) == (6, 3, 1, 2, 5)
    assert s["dropped_context"] == 2
    assert s["slo_ok"] == 1 and s["ttft_missed"] == 1 and s["tbt_missed"] == 1
    assert s["slo_attainment"] == round(1 / 6, 4) and s["slo_attainment_admitted"] == 0.2
    assert s["wall_s"] == 5.0  # first send 0.0 -> last response over 5.0
    assert s["goodput_rps"] == 0.2 and s["completed_rps"] == 0.6
    assert s["output_tokens"] == 8 and s["throughput_tok_s"] == 1.6 and s["tokens_unattributed"] == 1
    assert s["prefix_hit_ratio"] == round(56 / 230, 4)
    assert s["wasted_prefill_tokens"] == (50 - 0) + (80 - 16) + 60
    assert s["ttft_p50_ms"] == pytest.approx(1000.0) and s["ttft_mean_ms"] == pytest.approx(1500.0)
    assert s["itl_p50_ms"] == pytest.approx(100.0)  # gaps 0.1, 0.1, 1, 1 pooled: the 2nd of 4 by nearest rank
    assert s["tbt_p50_ms"] == pytest.approx(100.0)  # TBTs 0.1 and 1.0 (the one-token request has none)
    assert s["e2e_p50_ms"] == pytest.approx(2600.0)  # 1.3, 3.0, 2.6
    table = replay.summary_table(s)
    assert "TTFT" in table and "goodput req/s" in table and "rejected (429)" in table


def test_summary_and_plot_of_nothing(tmp_path):
    empty = replay.ReplayResult(url="u", model="m", ttft_slo=1.0, tbt_slo=1.0, started=0.0)
    s = replay.summarize(empty, 1.0, 1.0)
    assert s["requests"] == 0 and s["slo_attainment"] is None and s["goodput_rps"] is None
    assert s["ttft_p50_ms"] is None and s["prefix_hit_ratio"] is None
    assert replay.plot(empty, s, tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC
    assert "requests sent" in replay.summary_table(s)


def test_load_series():
    recs = [_rec(COMPLETED, 0.0, [], 2.0), _rec(COMPLETED, 1.0, [], 3.0), _rec(REJECTED, 1.5, [], 1.6)]
    times, counts = replay.in_flight(recs)
    assert times == [0.0, 1.0, 1.5, 1.6, 2.0, 3.0] and counts == [1, 2, 3, 2, 1, 0]
    starts, rates = replay.per_second([0.2, 0.3, 2.5], 3.0)
    assert starts == [0.0, 1.0, 2.0] and rates == [2.0, 0.0, 1.0]
    starts, rates = replay.per_second([0.0, 1.0, 5.0], 10.0, max_bins=2)  # bins of 5 s
    assert starts == [0.0, 5.0] and rates == [0.4, 0.2]
    sample = replay.health_sample(1.0, {"workers": [{"kind": "prefill", "queued": 2, "running": 1},
                                                    {"kind": "decode", "queued": 1, "running": 4},
                                                    {"kind": "cachestore", "queued": 9, "running": 9}]})
    assert (sample.prefill_queued, sample.prefill_running, sample.decode_queued, sample.decode_running) == (2, 1, 1, 4)
    assert replay.health_sample(1.0, {"status": "ok"}) is None


def test_api_root_and_output_path(tmp_path):
    assert replay.api_root("http://h:8000/v1/") == replay.api_root("http://h:8000") == "http://h:8000"
    assert replay.output_path(str(tmp_path)).parent == tmp_path
    assert replay.output_path(str(tmp_path)).name.startswith("replay-")
    assert replay.output_path(str(tmp_path / "x.json")) == tmp_path / "x.json"


# ================================================================ SSE token counting
def test_token_counter_rules():
    c = TokenCounter()

    def ev(text=None, logprobs=None, usage=None, choices=True) -> dict:
        e: dict = {"choices": [{"text": text, "logprobs": logprobs}] if choices else []}
        if usage is not None:
            e["usage"] = {"completion_tokens": usage}
        return e

    assert c.tokens(ev("a")) == 1 and c.tokens(ev("")) == 0
    assert c.tokens(ev("abc", logprobs={"tokens": ["a", "b", "c"]})) == 3
    assert c.tokens({"choices": [{"delta": {"content": "hi"}}]}) == 1  # a chat chunk
    assert c.tokens({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == 0
    assert c.tokens(ev(choices=False, usage=5)) == 0  # the final usage-only event
    running = TokenCounter()  # a running usage count (vLLM continuous_usage_stats)
    assert [running.tokens(ev("x", usage=n)) for n in (1, 3, 4)] == [1, 2, 1]
    final = TokenCounter()  # usage next to the last choice: not counted twice
    assert [final.tokens(ev("x")) for _ in range(3)] + [final.tokens(ev("", usage=3))] == [1, 1, 1, 0]


def test_parse_retry_after():
    assert parse_retry_after("7") == 7.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT", now=90.0) == pytest.approx(10.0)


# ================================================================ against a server
async def test_replay_against_a_server(server, tmp_path):
    reqs, dropped = replay.prepare(TRACE, token_scale=32, time_scale=10.0, vocab=49152, max_context=MAX_MODEL_LEN)
    assert dropped == 1 and len(reqs) == 6
    before = len(server.bodies)
    result = await replay.replay(server.url + "/v1", reqs, api_key=API_KEY, ttft_slo=1e6, tbt_slo=1e6,
                                 progress=False, health_interval=0.05)
    result.dropped = dropped
    assert result.model == MODEL  # from GET /v1/models
    by_index = {r.index: r for r in result.records}
    assert [by_index[i].outcome for i in range(6)] == [COMPLETED, COMPLETED, REJECTED, FAILED, COMPLETED, COMPLETED]

    # what the server received
    bodies = sorted(server.bodies[before:], key=lambda b: b["prompt"])
    assert sorted(r.prompt for r in reqs) == [b["prompt"] for b in bodies]
    for b in bodies:
        assert b["model"] == MODEL and b["stream"] is True and b["ignore_eos"] is True and b["temperature"] == 0
        assert b["stream_options"] == {"include_usage": True}

    # per-request records
    rej, bad, one, pairs = by_index[2], by_index[3], by_index[4], by_index[5]
    assert rej.status == 429 and rej.retry_after == 7.0 and not rej.token_times
    assert bad.status == 200 and "worker lost" in bad.error and len(bad.token_times) == 2
    assert len(one.token_times) == 1 and replay.tbt(one) is None
    assert pairs.chunks == 3 and len(pairs.token_times) == 6 and pairs.completion_tokens == 6
    assert by_index[0].prompt_tokens == 32 and by_index[0].cached_tokens == 16 and by_index[0].completion_tokens == 5
    for r in result.records:
        assert r.sent <= (r.first_token if r.first_token is not None else r.finished) <= r.finished
        assert r.token_times == sorted(r.token_times)

    # the server's load, sampled from /health
    assert result.health and all(h.prefill_queued == 3 and h.decode_running == 3 for h in result.health)

    s = replay.summarize(result, 1e6, 1e6)
    assert (s["requests"], s["completed"], s["rejected"], s["failed"], s["dropped_context"]) == (6, 4, 1, 1, 1)
    assert s["slo_ok"] == 4 and s["slo_attainment"] == round(4 / 6, 4) and s["slo_attainment_admitted"] == 0.8
    assert s["prefix_hit_ratio"] == 0.5  # the server reports half of every prompt cached
    assert s["output_tokens"] == 5 + 2 + 1 + 6 and s["tokens_unattributed"] == 0
    assert s["wasted_prefill_tokens"] == 32  # only the failed request, its prefill done (no usage: all 32)
    strict = replay.summarize(result, -1.0, 1e6)  # an SLO nothing meets
    assert strict["slo_ok"] == 0 and strict["wasted_prefill_tokens"] == (32 + 48 + 16 + 16) // 2 + 32

    out = replay.write_json(result, s, tmp_path / "replay.json")
    doc = orjson.loads(out.read_bytes())
    assert doc["summary"] == s and len(doc["records"]) == 6 and doc["config"]["model"] == MODEL
    png = replay.plot(result, s, tmp_path / "replay.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


async def test_replay_without_the_key_fails_every_request(server):
    reqs, _ = replay.prepare(TRACE[:2], token_scale=32, time_scale=10.0, vocab=49152, max_context=None)
    result = await replay.replay(server.url, reqs, model=MODEL, ttft_slo=1.0, tbt_slo=1.0, progress=False)
    assert [r.outcome for r in result.records] == [FAILED, FAILED]
    assert all(r.status == 401 and "bad key" in r.error for r in result.records)


# ================================================================ the CLI
def test_cli_dispatches_on_url(monkeypatch, tmp_path):
    p = build_parser()
    args = p.parse_args(["bench", "trace", "t.jsonl", "--url", "http://h:1", "--rate", "2", "--requests", "5"])
    assert args.func is trace_main and args.file == "t.jsonl" and args.rate == 2.0
    calls = []
    monkeypatch.setattr(replay, "main", lambda a: calls.append(("replay", a.file)) or 0)
    monkeypatch.setattr(cache_trace, "entry", lambda body, a: calls.append((body.__name__, a.file)) or 0)
    assert args.func(args) == 0
    cache = p.parse_args(["bench", "trace", "t.jsonl", "--requests", "10", "--configs", "global"])
    assert cache.url is None and cache.token_scale == 32 and cache.configs == "global"
    assert cache.func(cache) == 0
    assert calls == [("replay", "t.jsonl"), ("_trace", "t.jsonl")]


def test_cli_replay_writes_json_png_and_a_last_json_line(server, tmp_path, monkeypatch, capsys):
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(orjson.dumps(r).decode() + "\n" for r in TRACE))
    monkeypatch.setenv("YUEBING_API_KEY", API_KEY)
    out = tmp_path / "run" / "r.json"
    args = build_parser().parse_args(["bench", "trace", str(path), "--url", server.url, "--time-scale", "10",
                                      "--ttft-slo", "1000", "--tbt-slo", "1000", "--out", str(out),
                                      "--no-progress"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = orjson.loads(lines[-1])
    doc = orjson.loads(out.read_bytes())
    assert figures == doc["summary"]
    assert figures["dropped_context"] == 1  # longer than the server's max_model_len
    assert (figures["completed"], figures["rejected"], figures["failed"]) == (4, 1, 1)
    assert doc["config"]["token_scale"] == 32 and doc["config"]["max_context"] == MAX_MODEL_LEN
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert any("SLO attainment" in line for line in lines)


def test_cli_standalone_parser_has_the_replay_options():
    parser = argparse.ArgumentParser()
    replay.add_arguments(parser)
    args = parser.parse_args(["f.jsonl", "--url", "http://h", "--token-scale", "16", "--time-scale", "60",
                              "--start", "10", "--max-context", "8192", "--vocab", "32000", "--seed", "3"])
    assert (args.file, args.token_scale, args.time_scale, args.start, args.max_context, args.vocab, args.seed) == (
        "f.jsonl", 16, 60.0, 10, 8192, 32000, 3)
    assert args.ttft_slo == replay.DEFAULT_TTFT_SLO and args.progress is True
