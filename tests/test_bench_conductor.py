"""``yuebing bench conductor``: its prompts and keys against the gateway's, its plan and thresholds, the
synthetic instances' messages, and one small run against a real conductor and nats-server (the
figures' presence and sanity, never their speed)."""

from __future__ import annotations

import argparse
import json

import pytest

from bench import conductor as bc
from bench.common import DEFAULT_TRACE, read_trace
from libs.kv.keys import block_hashes, namespace_digest
from libs.protocol import DecodeReport, KVEvent, PrefillDone, PrefillReport, ScheduleRequest, decode

NS = namespace_digest(bc.MODEL_ID, "bfloat16", 16)


@pytest.mark.parametrize("scale", [1, 32])
def test_chains_are_the_gateways_keys_and_requests_decode_as_the_conductor_reads_them(scale):
    chains = bc.TraceChains(scale, 16, NS)
    rows = read_trace(DEFAULT_TRACE, limit=4)
    prompts = [chains.prompt(r, i) for i, r in enumerate(rows)]
    for p, row in zip(prompts, rows):
        tokens = chains.tokens(p)
        assert len(tokens) == p.tokens == max(1, row["input_length"] // scale)
        assert chains.keys(p) == block_hashes(tokens, 16, NS)  # what the gateway sends for these tokens
        assert len(chains.keys(p)) == chains.blocks(p) == p.tokens // 16
        req = decode(bc.schedule_request(chains, p, "a-1", ttft_slo=30.0, tbt_slo=1.0, arrival_time=5.0),
                     ScheduleRequest)
        assert req.prompt_token_ids == tokens and req.block_hashes == chains.keys(p)
        assert (req.attempt_id, req.ttft_slo, req.tbt_slo, req.arrival_time) == ("a-1", 30.0, 1.0, 5.0)
        assert req.sampling.max_tokens == p.max_tokens == row["output_length"] and req.sampling.ignore_eos
    # the trace's reuse: the first two requests share hash id 0 only, so exactly its whole blocks
    assert rows[0]["hash_ids"][0] == rows[1]["hash_ids"][0] and rows[0]["hash_ids"][1] != rows[1]["hash_ids"][1]
    a, b = chains.keys(prompts[0]), chains.keys(prompts[1])
    shared = bc.TRACE_BLOCK_TOKENS // scale // 16
    assert a[:shared] == b[:shared] and a[shared] != b[shared]


def test_chains_refuse_scales_that_split_blocks():
    with pytest.raises(ValueError):
        bc.TraceChains(3, 16, NS)  # 512 / 3 is not whole
    with pytest.raises(ValueError):
        bc.TraceChains(64, 16, NS)  # 8 tokens a hash id: a block would span two
    assert bc.array_header(3) == b"\x93" and bc.array_header(300) == b"\xdc\x01\x2c"


def test_plan_counts_quotas_and_ladder():
    assert bc.parse_counts("1e5, 1e6", "--blocks") == [100_000, 1_000_000]
    for bad in ("", "0", "1.5", "x"):
        with pytest.raises(ValueError):
            bc.parse_counts(bad, "--blocks")
    groups = bc.sweep_plan([32, 8], [1_000_000, 100_000, 100_000])
    assert groups == [[bc.Stage(8, 100_000), bc.Stage(8, 1_000_000)],
                      [bc.Stage(32, 100_000), bc.Stage(32, 1_000_000)]]
    prefill, pool = bc.quotas(1003, 4, True, 0.5)
    assert pool == 502 and prefill == [126, 125, 125, 125] and sum(prefill) + pool == 1003
    assert bc.quotas(10, 3, False, 0.5) == ([4, 3, 3], 0)
    assert bc.ladder(100.0) == [10.0, 25.0, 50.0, 75.0, 100.0, 150.0]
    assert bc.ladder(100.0, max_rate=60.0) == [10.0, 25.0, 50.0, 60.0]
    assert bc.ladder(1.0) == [0.5, 0.75, 1.0, 1.5]  # never below the floor, no repeats


def _pt(rate, p99, lost=0, backlog=0.0):
    return {"offered_rate": rate, "p99_ms": p99, "lost": lost, "backlog_s": backlog}


def test_threshold_keeps_the_highest_rate_below_the_first_failure():
    assert bc.passes(_pt(10, 9.9), 10) and bc.passes(_pt(10, 10.0), 10)
    assert not bc.passes(_pt(10, 10.1), 10)
    assert not bc.passes(_pt(10, 1.0, lost=1), 10)  # a request without its reply
    assert not bc.passes({"offered_rate": 10, "p99_ms": None, "lost": 0}, 10)
    pts = [_pt(40, 12.0), _pt(10, 2.0), _pt(20, 4.0), _pt(80, 3.0)]  # 80 passing after 40 failed: noise
    assert bc.sustained(pts, 10) == 20
    assert bc.sustained([_pt(5, 11.0), _pt(10, 3.0)], 10) is None
    assert bc.sustained([], 10) is None
    # the ladder stops once the conductor no longer keeps up: a lost or late reply, or the median over
    assert not bc.saturated({**_pt(10, 500.0), "p50_ms": 40.0}, 10)  # a long tail, a slow median: go on
    assert bc.saturated({**_pt(10, 500.0), "p50_ms": 101.0}, 10)
    assert bc.saturated({**_pt(10, 5.0, lost=1), "p50_ms": 1.0}, 10)
    assert bc.saturated({**_pt(10, 5.0, backlog=1.5), "p50_ms": 1.0}, 10)
    curve = [{**_pt(10, 50.0), "p50_ms": 4.0}, {**_pt(20, 90.0), "p50_ms": 30.0},
             {**_pt(40, 900.0, backlog=2.0), "p50_ms": 500.0}]
    assert bc.kept_up(curve, 10) == 20 and bc.sustained(curve, 10) is None
    # one more rate between the sustained one and the next measured
    assert bc.refine_rate(pts, 10) == 28.0  # sqrt(20 * 40), two digits
    assert bc.refine_rate([_pt(10, 2.0), _pt(11, 12.0)], 10) is None  # nothing strictly between at two digits
    assert bc.refine_rate([_pt(10, 2.0)], 10) is None and bc.refine_rate([_pt(10, 12.0)], 10) is None


def test_host_cpu_pressure():
    text = ("some avg10=82.12 avg60=85.50 avg300=69.19 total=8448273653\n"
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert bc.parse_pressure(text) == 8448.273653
    assert bc.parse_pressure("") is None
    assert bc.pressure_share(10.0, 12.0, 4.0) == 0.5
    assert bc.pressure_share(10.0, 30.0, 4.0) == 1.0 and bc.pressure_share(None, 1.0, 1.0) is None


def test_sim_pace_keeps_the_instances_as_busy_as_asked():
    per_token, step, stay = bc.sim_pace(100.0, 8, 8, 1000.0, 200.0, 32, 0.7, 0.75, 10.0)
    # prefill: rate x prompt tokens x (1 + hand-off) x per-token = util x instances
    assert 100.0 * 1000.0 * (1 + bc.HANDOFF_SHARE) * per_token == pytest.approx(0.7 * 8)
    assert stay == pytest.approx(0.75 * 32 * 8 / 100.0) and step == pytest.approx(stay / 200.0)
    assert bc.sim_pace(1.0, 8, 8, 1000.0, 200.0, 32, 0.7, 0.75, 3.0)[2] == 3.0  # capped stay


def _keys(n, tag=b"k"):
    return [tag + i.to_bytes(15, "big") for i in range(n)]


def test_holder_keeps_capacity_evicting_filler_then_least_recently_used():
    h = bc.Holder("prefill-0", "prefill", 0)
    h.capacity = 6
    h.add(_keys(3))
    filler = h.add_filler(3)
    assert len(h) == 6 and h.all_keys() == filler + _keys(3)
    stored, removed = h.keep(_keys(2) + _keys(5)[3:])  # two reused, two new
    assert stored == _keys(5)[3:] and removed == filler[:2] and len(h) == 6
    stored, removed = h.keep(_keys(3, b"x"))
    assert not set(stored) & set(removed) and len(h) == 6
    assert removed == [filler[2], _keys(3)[2], _keys(3)[0]]  # filler, then the least recently used
    assert h.prefix_len(_keys(3, b"x")) == 3 and h.prefix_len(_keys(2)) == 0
    small = bc.Holder("prefill-1", "prefill", 1)
    small.capacity = 2
    stored, removed = small.keep(_keys(5))
    assert stored == _keys(2) and removed == [] and len(small) == 2
    ev = h.event(stored, removed)
    assert (ev.seq, ev.epoch, ev.source) == (1, h.epoch, "prefill")


def test_sim_cluster_reports_keeps_blocks_and_decodes():
    chains = bc.TraceChains(32, 16, NS)
    rows = read_trace(DEFAULT_TRACE, limit=3)
    prompts = [chains.prompt(r, i, output_scale=50) for i, r in enumerate(rows)]
    sim = bc.SimCluster(2, 2, True, block_size=16, rows=1, interval=1.0, namespace=NS)
    sim.resize([100, 100], 1000)
    events = list(sim.preload([(chains.keys(prompts[0]), "prefill-1")], event_keys=40))
    assert sim.total_blocks() == 1200 and all(isinstance(e, KVEvent) for e in events)
    assert {e.instance_id for e in events} == {"prefill-0", "prefill-1", "cachestore-0"}
    assert sum(len(e.stored) for e in events) == 1200
    first = next(e for e in events if e.instance_id == "prefill-1")
    assert first.stored == chains.keys(prompts[0]) and first.seq == 1  # the served prompt's blocks first, in order
    sim.set_pace(1e-4, 1.0)
    keys = [chains.keys(p) for p in prompts]
    sim.placed("a", prompts[1], keys[1], "prefill-0", "decode-0", 0.0, 0.0)
    sim.placed("b", prompts[2], keys[2], "prefill-0", "decode-0", 0.0, 0.0)
    assert sim.heartbeat("prefill", "prefill-0", 0.0).queued == 2
    out = sim.advance(1e6)
    kinds = [type(m).__name__ for _, m, _ in out]
    assert kinds.count("PrefillReport") == kinds.count("PrefillDone") == kinds.count("DecodeReport") == 2
    reports = [m for _, m, _ in out if isinstance(m, PrefillReport)]
    assert reports[0].local_tokens == 0 and reports[0].pool_tokens == 16 * (bc.TRACE_BLOCK_TOKENS // 32 // 16)
    kv = [(s, m) for s, m, js in out if js]
    assert kv and all(s == f"yb.kvev.{m.instance_id}" for s, m in kv)
    assert sim.total_blocks() == 1200  # kept blocks evict as many
    decodes = [m for _, m, _ in out if isinstance(m, DecodeReport)]
    assert [d.output_tokens for d in decodes] == [prompts[1].max_tokens - 1, prompts[2].max_tokens - 1]
    assert decodes[1].waited_seconds > 0  # one row: the second waited for the first
    done = [m for _, m, _ in out if isinstance(m, PrefillDone)]
    assert all(d.kv_tokens > 0 for d in done)
    with pytest.raises(KeyError):
        sim.placed("c", prompts[0], keys[0], "prefill-9", "decode-0", 0.0, 0.0)
    dump = sim.dump("cachestore-0", 0, 20000)
    assert dump.total == 1000 and dump.seq == sim.holders["cachestore-0"].seq
    assert sim.dump("nobody", 0, 10).total == 0


def test_small_run_against_a_real_conductor(tmp_path):
    """4+4 instances, 10^3 blocks, a few hundred decisions: every request answered, on instances
    that exist, and the conductor's index holds exactly what the instances published."""
    p = argparse.ArgumentParser()
    bc.add_arguments(p)
    out = tmp_path / "figures.json"
    args = p.parse_args([
        "--instances", "4", "--blocks", "1e3", "--token-scale", "32", "--warm-requests", "20", "--requests", "300",
        "--rates", "20,40", "--warm-seconds", "0.5", "--measure-seconds", "1", "--min-decisions", "10",
        "--closed-seconds", "1", "--closed-decisions", "100", "--max-stay", "0.5", "--heartbeat-interval", "0.5",
        "--event-keys", "100", "--preload-batch", "4", "--no-pin",
        "--out-dir", str(tmp_path / "png"), "--out", str(out), "--data-dir", str(tmp_path / "data")])
    assert bc.main(args) == 0
    fig = json.loads(out.read_text())
    (cfg,) = fig["configs"]
    assert cfg["instances"] == 4 and cfg["blocks"] == 1000
    assert cfg["index_blocks"] == cfg["published_blocks"] == 1000 and cfg["index_matches"]
    assert cfg["end_index_blocks"] == cfg["end_published_blocks"] == 1000 and cfg["end_index_matches"]
    assert cfg["index_gaps"] == 0 and cfg["js_publish_failures"] == 0
    assert cfg["preload_keys"] == 1000 and cfg["preload_seconds"] > 0 and cfg["ingest_keys_per_s"] > 0
    assert cfg["preload_events"] >= 10  # published four at a time, each batch applied before the next
    assert cfg["unknown_instances"] == 0  # every admitted reply named a prefill and a decode instance that exist
    assert cfg["instances_lost"] == 0
    assert cfg["closed_decisions"] > 0 and 0 < cfg["closed_p50_ms"] <= cfg["closed_p99_ms"]
    assert cfg["closed_cpu_ms_per_decision"] > 0
    points = fig["points"]
    assert [pt["offered_rate"] for pt in points] == [20.0, 40.0]
    decided = cfg["closed_decisions"] + sum(pt["sent"] for pt in points)
    assert decided >= 100
    for pt in points:
        assert pt["lost"] == 0 and pt["replies"] == pt["sent"] > 0  # every request got its reply
        assert pt["backlog_s"] >= 0
        assert pt["host_cpu_pressure"] is None or 0 <= pt["host_cpu_pressure"] <= 1
        assert 0 < pt["p50_ms"] <= pt["p99_ms"] <= pt["max_ms"]
        assert pt["cpu_ms_per_decision"] > 0 and 0 < pt["conductor_core_share"]
        assert pt["kv_events_per_s"] > 0 and pt["reports_per_s"] > 0
    assert sum(cfg["rejected"].values()) < cfg["replies"]  # most were placed
    assert all((tmp_path / "png" / name).exists()
               for name in ("conductor-rates.png", "conductor-instances.png", "conductor-blocks.png"))


def test_bench_decisions_feeds_the_scheduler_an_index_it_holds_and_counts_every_input(tmp_path, monkeypatch):
    """``bench decisions``: every request placed, the index pre-loaded as the instances hold it (the
    run refuses to measure otherwise), and the KV events, heartbeats and reports all handed over."""
    from bench import decisions

    p = argparse.ArgumentParser()
    decisions.add_arguments(p)
    out = tmp_path / "d.json"
    args = p.parse_args(["--instances", "4", "--blocks", "3e4", "--rates", "50", "--requests", "120", "--warm", "20",
                         "--warm-requests", "40", "--out", str(out)])
    assert decisions.main(args) == 0
    (point,) = json.loads(out.read_text())["points"]
    assert point["decisions"] == point["admitted"] == 120
    assert point["kv_events_per_request"] > 0 and point["kv_keys_per_event"] > 0
    assert point["kv_event_ms_per_request"] > 0 and point["heartbeat_ms_per_request"] > 0
    assert point["report_ms_per_request"] > 0 and point["decision_p50_ms"] > 0
