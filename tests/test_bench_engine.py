"""``yuebing bench engine``: its accounting of bytes and FLOPs, the dummy model directories, and a
tiny real run on the CPU (the figures' presence and sanity, never their speed)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from bench import engine
from bench.models import DUMMY_PRESETS, dummy_llama_dir


def test_decode_bytes_and_fraction():
    # weights once, then every row's K and V over the attended columns
    assert engine.decode_step_bytes(1000, 10, rows=4, width=7) == 1000 + 4 * 7 * 10
    assert engine.fraction(0.6, 1.0) == 0.6
    assert engine.fraction(None, 1.0) is None and engine.fraction(1.0, 0) is None
    assert engine.target({"decode_b1_fraction": 0.61})["target_met"] is True
    assert engine.target({"decode_b1_fraction": 0.59})["target_met"] is False
    assert engine.target({})["target_met"] is None and engine.target({})["target_verdict"] == "not measured"
    assert engine.target({"decode_b1_fraction": 0.7})["target_verdict"] == "met"
    assert engine.parse_list("1, 16", "--batches") == [1, 16]
    with pytest.raises(ValueError):
        engine.parse_list("0,2", "--batches")


def test_prefill_flops_formula():
    # linear 2*N*T; causal attention 4*L*H*Dh*(T*P + T(T+1)/2); the head once per chunk
    f = engine.prefill_flops(100, layers=2, heads=3, head_dim=4, vocab=50, hidden=8, tokens=10, past=5, chunk=4)
    assert f == 2 * 100 * 10 + 4 * 2 * 3 * 4 * (10 * 5 + 10 * 11 / 2) + 2 * 50 * 8 * 3


def test_dummy_dir_and_weights(tmp_path, smol_dir):
    """The 1b preset has the asked-for shape and the tokenizer's vocabulary; the tiny one loads, and
    its counted matmul FLOPs are exactly the linear and head terms of the formula."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig

    from libs.engine.loading import load_model, load_tokenizer, read_shape

    big = dummy_llama_dir(tmp_path / "dummy-1b", smol_dir, "1b")
    cfg = AutoConfig.from_pretrained(big)
    tok = load_tokenizer(big)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.max_position_embeddings) == (2048, 16, 32, 8, 8192, 8192)
    assert cfg.tie_word_embeddings and cfg.vocab_size == len(tok)
    assert not list(big.glob("*.safetensors"))
    assert read_shape(big).eos_token_ids == (tok.eos_token_id,)
    mtime = (big / "config.json").stat().st_mtime_ns
    assert dummy_llama_dir(big, smol_dir, "1b") == big and (big / "config.json").stat().st_mtime_ns == mtime  # kept

    tiny = dummy_llama_dir(tmp_path / "dummy-tiny", smol_dir, "tiny")
    model = load_model(tiny, torch.float32, "cpu", "dummy")
    w = engine.weights_of(model)
    assert w.tied and w.step_bytes == w.param_bytes
    assert w.params == sum(p.numel() for p in model.parameters())  # the tied matrix once
    assert w.non_embedding_params == w.params - w.embedding_params
    t = 24
    with FlopCounterMode(display=False) as counter:
        model(input_ids=torch.arange(1000, 1000 + t).unsqueeze(0), logits_to_keep=1)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    counted = sum(counter.get_flop_counts()["Global"].values())
    assert counted == 2 * (w.non_embedding_params - norms) * t + 2 * w.lm_head_params
    assert set(DUMMY_PRESETS) >= {"1b", "tiny"}


def test_tiny_run(tiny_dir, tmp_path, capsys):
    """The whole benchmark at toy sizes through the CLI: a table and a JSON line with every figure."""
    from bench.cli import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="bench"))
    out = tmp_path / "engine.json"
    args = parser.parse_args(["engine", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32",
                              "--threads", "1", "--copy-mib", "8", "--matmul-size", "64", "--runs", "2",
                              "--context", "40", "--steps", "3", "--prompt", "48", "--prefill-runs", "2",
                              "--join-rows", "1,6", "--join-context", "80", "--joins", "3", "--out", str(out)])
    assert args.func(args) == 0
    figures = json.loads(out.read_text())
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == figures
    assert any(line.startswith("decode step b=16") for line in printed)
    assert figures["device"] == "cpu" and figures["dtype"] == "float32" and figures["threads"] == 1
    for key in ("bandwidth_gb_s", "matmul_gflop_s", "prefill_tok_s", "prefill_gflop_s", "decode_b1_best_ms",
                "decode_b16_best_ms", "join_r1_best_ms", "join_r6_best_ms"):
        assert figures[key] > 0, key
    assert 0 < figures["decode_b1_fraction"] and 0 < figures["prefill_fraction_of_matmul"]
    assert figures["decode_b16_bytes"] > figures["decode_b1_bytes"] > figures["step_weight_bytes"]
    assert figures["join_r1_grown_during_joins"] == figures["join_r6_grown_during_joins"] == 0
    assert figures["join_r6_capacity"][0] >= 7
    assert figures["target_met"] in (True, False) and figures["target_figure"] == figures["decode_b1_fraction"]
    assert figures["target_verdict"] in ("met", "not met") and figures["target_verdict"] in printed[1]
    assert figures["bandwidth_gb_s"] == max(figures["bandwidth_start_end_gb_s"])  # the better of before and after
    assert figures["matmul_gflop_s"] == max(figures["matmul_start_end_gflop_s"])
    assert figures["lm_head_read_per_step"] is True and figures["tied_embeddings"] is True
