"""``yuebing bench prefix|transfer|trace`` on tiny settings: the table and the JSON figures, never timings."""

from __future__ import annotations

import argparse
import json

import pytest

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


def test_bench_prefix_figures(smol_dir, tmp_path, capsys):
    # SmolLM2-135M, not the tiny model: on the tiny one recomputing a 128-token prompt takes a few ms,
    # the conductor rightly predicts it faster than loading the prefix, and there is no pool hit to
    # measure; here recomputing the 96 shared tokens costs ten times what loading them does
    out = tmp_path / "prefix.json"
    args = argparse.Namespace(model=str(smol_dir), data_dir=str(tmp_path / "data"), models_dir=None, block_size=None,
                              threads=1, prompt_tokens=128, shared_tokens=96, cold=2, repeats=1, out=str(out),
                              progress=False)
    assert prefix.main(args) == 0  # 1: the benchmark found a problem (printed as PROBLEM lines)
    figures, table = _figures(capsys, out)
    assert figures["cold_runs"] == 2 and figures["hit_runs"] == 1 and figures["problems"] == 0
    for k in ("cold_ttft_ms", "hit_ttft_ms", "hit_vs_cold_ttft", "cached_tokens", "pool_hit_tokens"):
        assert _number(figures[k]), k
    assert figures["prompt_tokens"] == 128 and figures["shared_tokens"] == 96
    # the hit request reuses the whole shared prefix, and from the pool (it runs on the other instance)
    assert figures["cached_tokens"] == 96 and figures["pool_hit_tokens"] == 96
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


def test_trace_configs_sizes_and_selection():
    sizes = cache_trace.BlockBytes(encoded=8270, on_disk=12288, local=8192)
    configs = cache_trace.trace_configs(1001, [1.0, 0.1], sizes, prefills=2)
    assert [c.name for c in configs] == ["global_100pct", "local_100pct", "global_10pct", "local_10pct"]
    g, loc = configs[0], configs[1]
    # the pool holds the working set's blocks in its LMDB tier, no DRAM tier, no own caches beside it
    assert (g.policy, g.use_pool, g.capacity_blocks) == ("global_cache_aware", True, 1001)
    assert (g.disk_bytes, g.dram_bytes, g.prefill_cache_bytes) == (1001 * 12288, 0, 0)
    # with eviction past a high watermark, the pool's bound is the least whose watermark holds them all
    [hw] = cache_trace.trace_configs(1001, [1.0], sizes, names=["global"], evict_high=0.99)
    assert int(hw.disk_bytes * 0.99) >= 1001 * 12288 > int((hw.disk_bytes - 1) * 0.99)
    # local-only: pool off, placed on the own caches, which add up to the pool's size
    assert (loc.policy, loc.use_pool) == ("local_cache_aware", False)
    assert loc.prefill_cache_blocks == 500 and loc.prefill_cache_bytes == 500 * 8192 and loc.capacity_blocks == 1000
    assert configs[2].capacity_blocks == 100 and configs[3].prefill_cache_blocks == 50
    assert [c.name for c in cache_trace.trace_configs(1001, [1.0, 0.1], sizes, names=["local"])] == \
        ["local_100pct", "local_10pct"]
    assert [c.name for c in cache_trace.trace_configs(1001, [1.0, 0.1], sizes, names=["global_10pct", "local_100pct"])] == \
        ["local_100pct", "global_10pct"]
    with pytest.raises(SystemExit):
        cache_trace.trace_configs(1001, [1.0], sizes, names=["pool"])


def test_ideal_lru_on_the_trace_matches_the_bound_when_nothing_is_evicted():
    reqs = common.read_trace(TRACE_HEAD, limit=60)
    requests, _ = cache_trace.build_trace_requests(reqs, 32, 49152, 4096)
    bound = common.trace_bound(requests, 16, 16)
    chains, reusable = cache_trace.prompt_chains(requests, 16, b"ns")
    assert len({k for c in chains for k in c}) == bound["distinct_blocks"]
    full = bound["bound_full_blocks_tokens"]
    assert full > 0  # the slice shares prefixes
    # a cache that holds every distinct block reuses exactly what the (full-block) bound does
    assert cache_trace.ideal_lru_tokens(chains, reusable, bound["distinct_blocks"], 16) == full
    small = [cache_trace.ideal_lru_tokens(chains, reusable, n, 16) for n in (40, 10, 0)]
    assert full >= small[0] >= small[1] >= small[2] == 0 and small[1] < full


def _trace_args(tiny_dir, tmp_path, out, configs: str, fractions: str) -> argparse.Namespace:
    # token_scale 32: one hash id = one 16-token KV block; prompts of the first requests are ~100-450 tokens
    return argparse.Namespace(model=str(tiny_dir), data_dir=str(tmp_path / "data"), models_dir=None, block_size=None,
                              threads=1, trace=str(TRACE_HEAD), requests=30, token_scale=32, concurrency=1,
                              pool_fractions=fractions, configs=configs, max_context=None, out=str(out), progress=False)


def test_bench_trace_global_and_local_figures(tiny_dir, tmp_path, capsys):
    out = tmp_path / "trace.json"
    assert trace_main(_trace_args(tiny_dir, tmp_path, out, "global,local", "1")) == 0
    figures, table = _figures(capsys, out)
    assert figures["requests"] + figures["skipped"] == 30 and figures["token_scale"] == 32
    assert figures["configs"] == ["global_100pct", "local_100pct"]
    bound, n = figures["bound_full_blocks_tokens"], figures["distinct_blocks"]
    assert bound > 0 and figures["bound"] > 0  # the first 30 requests share prefixes
    g, loc = "global_100pct", "local_100pct"
    assert figures[f"{g}_errors"] == figures[f"{loc}_errors"] == 0
    assert figures[f"{g}_settle_timeouts"] == figures[f"{loc}_settle_timeouts"] == 0
    # capacities: the pool holds the working set; the two own caches add up to it (less an odd block)
    assert figures[f"{g}_capacity_blocks"] == n and figures[f"{loc}_capacity_blocks"] == 2 * (n // 2)
    # an ideal LRU of the working set's size never evicts: it reuses exactly what the bound does
    assert figures[f"{g}_ideal_lru_tokens"] == bound
    assert figures[f"{g}_ideal_lru"] == round(bound / figures["prompt_tokens"], 4)
    # global: every block was written to the pool and none evicted; all reuse came from the pool; every
    # token of the bound not reused is one the conductor chose to recompute (a short prompt whose
    # recompute it predicted faster than a load), none missing from the pool or lost on the way
    assert figures[f"{g}_pool_held_blocks"] == n
    assert figures[f"{g}_local_tokens"] == 0 and figures[f"{g}_pool_tokens"] == figures[f"{g}_reused_tokens"]
    assert figures[f"{g}_missed_unavailable"] == figures[f"{g}_missed_not_loaded"] == figures[f"{g}_missed_failed"] == 0
    assert figures[f"{g}_reused_tokens"] + figures[f"{g}_missed_recomputed"] == figures["bound_tokens"]
    assert figures[f"{g}_reused_tokens"] >= 0.75 * bound
    # local-only, own caches of half the working set each: the instance a prompt is placed on holds its
    # whole reusable prefix, so it reuses all the bound does, from its own cache
    assert figures[f"{loc}_reused_tokens"] == figures[f"{loc}_local_tokens"] == bound
    assert figures[f"{loc}_pool_tokens"] == 0 and figures[f"{loc}_pool_held_blocks"] is None
    # every instance is listed, one that served nothing too
    assert set(figures[f"{loc}_requests_per_prefill"]) == {"prefill-0", "prefill-1"}
    assert sum(figures[f"{loc}_requests_per_prefill"].values()) == figures["requests"]
    for cfg in (g, loc):
        # no request failed, so measured and ideal hit ratios share their denominator
        assert figures[f"{cfg}_vs_ideal"] == round(figures[f"{cfg}_reused_tokens"] / figures[f"{cfg}_ideal_lru_tokens"], 3)
        assert figures[f"{cfg}_pool_put_failures"] == figures[f"{cfg}_pool_write_failures"] == 0
    assert _number(figures["global_vs_local"])
    assert figures["global_vs_local"] == figures["global_vs_local_100pct"] == round(
        figures[f"{g}_reused_tokens"] / figures[f"{loc}_reused_tokens"], 3)
    assert figures["headline_config"] == g and figures["global_vs_bound"] == figures[f"{g}_vs_bound"]
    assert figures["settle"] is True
    assert "unbounded bound" in table and "global_cache_aware" in table and "local_cache_aware" in table
    assert "ideal LRU" in table and "round_robin" not in table
