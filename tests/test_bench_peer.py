"""``bench peer``'s pure logic, no server: the workload plan (prompt lengths, contents fitted to them,
the open-loop schedule), the figures from recorded per-request times, and the targets' verdicts."""

from __future__ import annotations

import json
import math

import pytest

from bench import peer
from bench.peer import Load, Rec


# ---------------------------------------------------------------- the plan
def test_prompt_lengths_are_seeded_log_uniform_within_bounds():
    a = peer.prompt_lengths(400, seed=7)
    assert a == peer.prompt_lengths(400, seed=7)
    assert a != peer.prompt_lengths(400, seed=8)
    assert all(peer.PROMPT_MIN_TOKENS <= n <= peer.PROMPT_MAX_TOKENS for n in a)
    # log-uniform: the median is near the geometric mean of the bounds, far below the arithmetic one
    gm = math.sqrt(peer.PROMPT_MIN_TOKENS * peer.PROMPT_MAX_TOKENS)
    assert 0.7 * gm < sorted(a)[len(a) // 2] < 1.3 * gm
    assert sum(n < gm for n in a) > 150 and sum(n > gm for n in a) > 150


def test_arrival_offsets_are_a_seeded_poisson_schedule():
    offs = peer.arrival_offsets(2000, rate=4.0, seed=3)
    assert offs == peer.arrival_offsets(2000, rate=4.0, seed=3)
    assert offs[0] == 0.0 and all(b >= a for a, b in zip(offs, offs[1:]))
    mean_gap = offs[-1] / (len(offs) - 1)
    assert 0.9 * 0.25 < mean_gap < 1.1 * 0.25  # 1 / rate


def test_plan_points_requests_and_schedules():
    loads = peer.loads_of([1, 16, 64], [0.5])
    points = peer.plan_points([64, 256], loads, None, seed=11)
    assert [p.key for p in points] == ["out64_c1", "out64_c16", "out64_c64", "out64_rate0.5",
                                       "out256_c1", "out256_c16", "out256_c64", "out256_rate0.5"]
    assert [len(p.prompt_tokens) for p in points[:4]] == [8, 32, 128, peer.OPEN_LOOP_REQUESTS]
    assert points[3].offsets is not None and len(points[3].offsets) == peer.OPEN_LOOP_REQUESTS
    assert points[0].offsets is None
    assert points[2].in_flight == 64 and points[0].in_flight == 1 and points[3].in_flight == 32
    again = peer.plan_points([64, 256], loads, None, seed=11)
    assert [p.prompt_tokens for p in again] == [p.prompt_tokens for p in points]
    assert [len(p.prompt_tokens) for p in peer.plan_points([64], loads, 5)] == [5, 5, 5, 5]


def _words_count(text: str) -> int:
    """A stand-in tokenizer: a 10-token chat template around one token per word."""
    return 10 + len(text.split())


def test_fill_prompts_fits_each_length_and_tags_each_prompt():
    points = peer.plan_points([16], [Load("closed", 2)], 6, seed=5)
    wanted = list(points[0].prompt_tokens)
    peer.fill_prompts(points, _words_count, seed=5)
    p = points[0]
    assert p.prompt_tokens == wanted  # one token per word: every length is met exactly
    assert all(_words_count(c) == n for c, n in zip(p.contents, p.prompt_tokens))
    assert [c.split()[0] for c in p.contents] == [f"[0-{k}]" for k in range(6)]
    content, n = peer.fit_content(_words_count, 3, "head words here", ["a"] * 50)
    assert content == "head words here" and n == 13  # the head alone when even it is longer


def test_peer_num_blocks_holds_the_largest_requests_in_flight():
    p = peer.Point(0, 256, Load("closed", 2), contents=["x"] * 3, prompt_tokens=[100, 2000, 700])
    # blocks of 256 tokens for prompt + output, plus one: 2000+256 -> 9+1, 700+256 -> 4+1, 100+256 -> 2+1
    assert peer.peer_num_blocks([p]) == 10 + 5 + 16


def test_parse_dtypes():
    names = [(c.name, c.yuebing, c.peer) for c in peer.parse_dtypes("best,same:bfloat16,same,auto/float32")]
    assert names == [("best", "auto", "bfloat16"), ("same:bfloat16", "bfloat16", "bfloat16"),
                     ("same:float32", "float32", "float32"), ("auto/float32", "auto", "float32")]
    assert [c.name for c in peer.parse_dtypes(None)] == ["best", "same:float32"]
    assert [c.name for c in peer.parse_dtypes(None, "bfloat16")] == ["same:bfloat16"]
    for bad in ("same:auto", "fast", "same:int8", "best,best"):
        with pytest.raises(ValueError):
            peer.parse_dtypes(bad)
    with pytest.raises(ValueError):
        peer.parse_dtypes("best", "float32")
    assert peer.parse_rates("") == [] and peer.parse_rates("0.5,0,2") == [0.5, 2.0]


# ---------------------------------------------------------------- figures from recorded times
def _rec(arrival, first, last, tokens, status=200, error=None, ended=None, prompt=100):
    return Rec(arrival=arrival, first_token=first, last_token=last, ended=last if ended is None else ended,
               tokens=tokens, prompt_tokens=prompt, status=status, error=error)


def test_figures_from_arrival_times():
    recs = [
        _rec(10.0, 10.5, 12.0, 16),   # TTFT 0.5 s, TPOT 1.5/15 = 0.1 s
        _rec(10.0, 11.0, 14.0, 16),   # TTFT 1.0 s, TPOT 0.2 s
        _rec(11.0, 13.0, 14.5, 16),   # TTFT 2.0 s (from its arrival, not from the start), TPOT 0.1 s
        _rec(12.0, 12.2, 13.0, 9),    # short: TTFT 0.2 s, TPOT 0.1 s
        _rec(12.0, None, None, 0, status=429, error="HTTP 429: busy", ended=12.1),
    ]
    f = peer.figures(recs, start=10.0, max_tokens=16)
    assert f["requests"] == 5 and f["errors"] == 1 and f["rejected"] == 1 and f["short"] == 1
    assert f["tokens"] == 57 and f["wall_s"] == 4.5
    assert f["tok_s"] == round(57 / 4.5, 2)
    assert f["ttft_p50_ms"] == 500.0 and f["ttft_p90_ms"] == 2000.0  # nearest rank of 0.2, 0.5, 1.0, 2.0
    assert f["tpot_p50_ms"] == 100.0 and f["tpot_p90_ms"] == 200.0
    assert f["first_error"] == "HTTP 429: busy"
    assert json.loads(json.dumps(f)) == f


def test_rec_from_stream_counts_usage_and_the_finishing_event():
    from bench.sse import StreamResult

    s = StreamResult(sent=1.0, status=200, token_times=[1.2, 1.3], finish_time=1.5, ended=1.6,
                     usage={"prompt_tokens": 40, "completion_tokens": 4}, finish_reason="length")
    r = Rec.from_stream(s, arrival=0.5)
    assert r.ok and r.tokens == 4 and r.prompt_tokens == 40
    assert (r.arrival, r.first_token, r.last_token, r.ended) == (0.5, 1.2, 1.5, 1.6)
    failed = Rec.from_stream(StreamResult(sent=1.0, status=None, error="refused", ended=1.1), arrival=1.0)
    assert not failed.ok and failed.tokens == 0 and failed.first_token is None


def test_compare_ratios():
    c = peer.compare({"tok_s": 30.0, "ttft_p90_ms": 400.0}, {"tok_s": 10.0, "ttft_p90_ms": 1000.0})
    assert c == {"ratio_tok_s": 3.0, "ratio_ttft_p90": 0.4}
    assert peer.compare({"tok_s": 30.0}, None) == {"ratio_tok_s": None, "ratio_ttft_p90": None}


# ---------------------------------------------------------------- targets
def _point(dtypes, out, load, value, yb, pr):
    return {"dtypes": dtypes, "output_tokens": out, "load": load,
            "concurrency": value if load == "closed" else None, "rate": value if load == "open" else None,
            "yuebing": yb, "peer": pr, **peer.compare(yb, pr)}


def _figs(tok_s, ttft_p90, errors=0):
    return {"tok_s": tok_s, "ttft_p90_ms": ttft_p90, "errors": errors}


def test_targets_met_and_not_met_with_figures():
    results = [
        _point("best", 64, "closed", 16, _figs(50.0, 900.0), _figs(20.0, 2000.0)),    # 2.5x: met
        _point("best", 256, "closed", 16, _figs(30.0, 900.0), _figs(20.0, 2000.0)),   # 1.5x: not met
        _point("best", 64, "closed", 4, _figs(99.0, 1.0), _figs(1.0, 99.0)),          # not a target point
        _point("best", 64, "open", 0.5, _figs(10.0, 400.0), _figs(10.0, 1000.0)),     # 0.4x: met
        _point("same:float32", 64, "closed", 16, _figs(1.0, 1.0), _figs(99.0, 99.0)),  # other config: ignored
    ]
    tok, ttft = peer.evaluate_targets(results)
    assert tok["target"] == peer.TARGET_TOK_S and tok["met"] is False and tok["status"] == "not met"
    assert [(c["output_tokens"], c["ratio"], c["met"]) for c in tok["checks"]] == [(64, 2.5, True), (256, 1.5, False)]
    assert tok["checks"][0]["yuebing_tok_s"] == 50.0 and tok["checks"][0]["peer_tok_s"] == 20.0
    assert ttft["target"] == peer.TARGET_TTFT and ttft["met"] is True and ttft["status"] == "met"
    assert ttft["checks"] == [{"output_tokens": 64, "rate": 0.5, "yuebing_ttft_p90_ms": 400.0,
                               "peer_ttft_p90_ms": 1000.0, "ratio": 0.4, "met": True}]


def test_targets_count_yuebing_failures_and_missing_points():
    results = [_point("best", 64, "closed", 16, _figs(50.0, 900.0, errors=2), _figs(20.0, 2000.0, errors=1))]
    tok, ttft = peer.evaluate_targets(results)
    assert tok["met"] is False and "2 yuebing requests" in tok["checks"][0]["note"]
    assert "1 peer requests" in tok["checks"][0]["note"]
    assert ttft["met"] is None and ttft["status"].startswith("not evaluated: no open-loop point")
    none = peer.evaluate_targets([_point("same:float32", 64, "closed", 16, _figs(1.0, 1.0), _figs(1.0, 1.0))])
    assert all(t["met"] is None and "best dtype configuration was not run" in t["status"] for t in none)
    missing = peer.evaluate_targets([_point("best", 64, "closed", 16, _figs(None, None), _figs(20.0, 1.0))])
    assert missing[0]["met"] is None and missing[0]["status"] == "not evaluated: a figure is missing"


def test_plot_draws_both_servers_over_load(tmp_path):
    from bench.peer import plot

    def point(load, x, tok_s, ttft):
        f = {"tok_s": tok_s, "ttft_p90_ms": ttft}
        return {"dtypes": "best", "load": load, "output_tokens": 64,
                "concurrency": x if load == "closed" else None, "rate": x if load == "open" else None,
                "yuebing": f, "peer": {"tok_s": tok_s / 2, "ttft_p90_ms": ttft * 2}}

    fig = {"model": "m", "runs": {"best": {"device": "cpu"}}, "peer": {"server": "transformers serve"},
           "points": [point("closed", 1, 10, 500), point("closed", 4, 30, 900), point("open", 0.1, 5, 400)]}
    path = plot(fig, tmp_path / "peer.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
