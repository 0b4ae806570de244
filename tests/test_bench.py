"""``yuebing bench serve`` end to end on the tiny model: the table and the JSON figures, never timings."""

from __future__ import annotations

import argparse
import json
import statistics

from bench import serve


def test_bench_serve_prints_table_and_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = argparse.Namespace(
        bench="serve",
        model=str(tiny_dir),
        data_dir=str(tmp_path / "data"),
        block_size=None,
        threads=None,
        concurrency="1,2",
        requests_per_level=2,
        max_tokens=8,
        rounds=2,
        out=str(out),
    )
    assert serve.main(args) == 0
    stdout = capsys.readouterr().out
    lines = stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert json.loads(out.read_text()) == figures

    for c in (1, 2):
        for k in ("tok_s", "ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms", "itl_p90_ms"):
            assert isinstance(figures[f"cluster_c{c}_{k}"], (int, float)), k
        assert figures[f"cluster_c{c}_errors"] == 0
    for k in ("hf_b1_tok_s", "hf_b1_ms_per_token", "hf_b1_itl_p50_ms", "hf_b16_tok_s", "hf_b16_step_p50_ms",
              "ratio_c2_vs_hf_b16", "ratio_c1_vs_hf_b1"):
        assert isinstance(figures[k], (int, float)), k
    assert figures["max_tokens"] == 8
    rounds = figures["ratio_c2_vs_hf_b16_rounds"]
    assert len(rounds) == 2 and all(isinstance(r, float) for r in rounds)
    assert figures["ratio_c2_vs_hf_b16"] == round(statistics.median(rounds), 3)

    table = "\n".join(lines[:-1])
    header = next(line for line in lines if line.startswith("config"))
    assert "tok/s" in header and "TTFT p50" in header and "ITL p50" in header
    for row in ("cluster c=1", "cluster c=2", "hf generate b=1", "hf generate b=16"):
        assert row in table
    assert "rounds" in table and "cluster c=2 tok/s" in table
