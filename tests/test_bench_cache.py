"""``yuebing bench prefix|transfer|trace`` on tiny settings: the table and the JSON figures, never timings."""

from __future__ import annotations

import argparse
import json

from conftest import TRACE_HEAD
from bench import cache_trace, common, prefix, transfer
from bench.cli import trace_main
from yuebing.cli import build_parser


def _figures(capsys, out) -> tuple[dict, str]:
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert json.loads(out.read_text()) == figures
    return figures, "\n".join(lines[:-1])


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def test_cli_wires_the_three_benchmarks():
    p = build_parser()
    assert p.parse_args(["bench", "prefix"]).func is prefix.main
    assert p.parse_args(["bench", "transfer", "--blocks", "8"]).func is transfer.main
    args = p.parse_args(["bench", "trace", "--requests", "10", "--configs", "global,local"])
    assert args.func is trace_main and args.requests == 10 and args.token_scale == 32


def test_trace_scaling_and_bound():
    reqs = [
        {"input_length": 100, "hash_ids": [0, 1, 2, 3]},  # 100/32 = 3 tokens: one partial hash block
        {"input_length": 1024, "hash_ids": [0, 1]},  # 32 tokens: ids 0, 1 (1 seen, but only 3 of its tokens)
        {"input_length": 1536, "hash_ids": [0, 1, 5]},  # 48 tokens: 0 and 1 fully stored before
        {"input_length": 1536, "hash_ids": [0, 1, 5]},  # the same prompt again
    ]
    requests, skipped = cache_trace.build_trace_requests(reqs, 32, 49152, 40)
    assert skipped == 2 and [len(r.prompt) for r in requests] == [3, 32]  # 48 + 1 > 40: skipped
    requests, skipped = cache_trace.build_trace_requests(reqs, 32, 49152, 4096)
    assert skipped == 0 and [len(r.prompt) for r in requests] == [3, 32, 48, 48]
    assert requests[1].prompt[:16] == requests[2].prompt[:16] == requests[0].prompt[:3] + requests[1].prompt[3:16]
    assert requests[0].hash_ids == [0]
    b = common.trace_bound(requests, 16, 16)
    # README definition: seen ids count whole: 16 (req 1: id 0) + 32 (req 2) + 32 (req 3, capped: 47 // 16 blocks)
    assert b["bound_tokens"] == 16 + 32 + 32
    # whole KV blocks only: id 0 was stored by request 1, not by request 0 (3 tokens)
    assert b["bound_full_blocks_tokens"] == 0 + 32 + 32
    assert b["prompt_tokens"] == 3 + 32 + 48 + 48 and b["distinct_blocks"] == 3
    assert b["read_again_blocks"] == 2  # ids 0 and 1, by requests 2 and 3; id 5's block never


def test_bench_prefix_figures(tiny_dir, tmp_path, capsys):
    out = tmp_path / "prefix.json"
    args = argparse.Namespace(model=str(tiny_dir), data_dir=str(tmp_path / "data"), models_dir=None, block_size=None,
                              threads=1, prompt_tokens=128, shared_tokens=96, cold=2, repeats=1, out=str(out),
                              progress=False)
    assert prefix.main(args) in (0, 1)  # 1: a problem was reported (the test checks the shape only)
    figures, table = _figures(capsys, out)
    assert figures["cold_runs"] == 2 and figures["hit_runs"] == 1
    for k in ("cold_ttft_ms", "hit_ttft_ms", "hit_vs_cold_ttft", "cached_tokens", "pool_hit_tokens"):
        assert _number(figures[k]), k
    assert figures["prompt_tokens"] == 128 and figures["shared_tokens"] == 96
    assert 0 <= figures["cached_tokens"] <= 96
    assert "median cold" in table and "median hit" in table and "TTFT ms" in table


def test_bench_transfer_figures(tmp_path, capsys):
    out = tmp_path / "transfer.json"
    args = argparse.Namespace(blocks=6, block_shape="2,2,2,16,16", repeats=2, data_dir=str(tmp_path / "data"),
                              out=str(out), progress=False, put_batch=4)
    assert transfer.main(args) == 0
    figures, table = _figures(capsys, out)
    for k in ("pool_mb_s", "raw_nats_mb_s", "pool_vs_raw", "layers_mb_s", "layers_vs_raw", "put_one_mb_s",
              "put_many_mb_s", "put_many_vs_one"):
        assert _number(figures[k]) and figures[k] > 0, k
    assert figures["errors"] == 0 and figures["blocks"] == 6
    assert figures["bytes_per_round"] == 6 * 2 * 2 * 2 * 16 * 16 * 4
    assert len(figures["pool_round_ms"]) == len(figures["raw_round_ms"]) == 2
    assert "pool get_blocks" in table and "pool load_layers" in table and "raw nats pub/sub" in table
    assert figures["put_batch"] == 4 and "pool put, 4 per call" in table


def _trace_args(tiny_dir, tmp_path, out, configs: str) -> argparse.Namespace:
    # token_scale 32: one hash id = one 16-token KV block; prompts of the first requests are ~100-450 tokens
    return argparse.Namespace(model=str(tiny_dir), data_dir=str(tmp_path / "data"), models_dir=None, block_size=None,
                              threads=1, trace=str(TRACE_HEAD), requests=30, token_scale=32, concurrency=2,
                              pool_fractions="0.5", configs=configs, max_context=None, out=str(out), progress=False)


def test_bench_trace_global_and_local_figures(tiny_dir, tmp_path, capsys):
    out = tmp_path / "trace.json"
    assert trace_main(_trace_args(tiny_dir, tmp_path, out, "global,local")) == 0
    figures, table = _figures(capsys, out)
    assert figures["requests"] + figures["skipped"] == 30 and figures["token_scale"] == 32
    for k in ("bound", "bound_full_blocks", "global_hit", "global_vs_bound", "local_hit", "working_set_bytes",
              "distinct_blocks", "prompt_tokens"):
        assert _number(figures[k]), k
    for k in ("bound", "global_hit", "local_hit"):
        assert 0.0 <= figures[k] <= 1.0, k
    assert figures["bound"] > 0  # the first 30 requests share prefixes
    assert figures["global_vs_local"] is None or _number(figures["global_vs_local"])
    assert figures["global_errors"] == figures["local_errors"] == 0
    for cfg in ("global", "local"):
        for k in ("missed_unavailable", "missed_recomputed", "missed_not_loaded", "pool_put_failures",
                  "settle_timeouts"):
            assert isinstance(figures[f"{cfg}_{k}"], int), (cfg, k)
    assert figures["settle"] is True
    assert "pool_50pct_hit" not in figures
    assert "unbounded bound" in table and "global_cache_aware" in table and "round_robin" in table


def test_bench_trace_small_pool_figures(tiny_dir, tmp_path, capsys):
    out = tmp_path / "trace.json"
    assert trace_main(_trace_args(tiny_dir, tmp_path, out, "pool")) == 0
    figures, table = _figures(capsys, out)
    assert _number(figures["pool_50pct_hit"]) and 0.0 <= figures["pool_50pct_hit"] <= 1.0
    assert _number(figures["pool_50pct_vs_bound"]) and figures["pool_50pct_errors"] == 0
    assert "global_hit" not in figures and "pool_50pct" in table
