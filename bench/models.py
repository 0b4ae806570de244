"""A small Llama-family model with random weights and the real tokenizer.

The scheduling replays (`bench trace`) run on it, with the context raised so that scaled trace
prompts fit, and the tests use it at its default context: the same code path as a real model at
a fraction of the compute.
"""

from __future__ import annotations

from pathlib import Path

import torch

from libs.engine.loading import load_tokenizer


def random_llama(out: Path, tokenizer_src: Path, *, max_context: int = 2048, seed: int = 0) -> Path:
    """Write a randomly initialised two-layer Llama (hidden size 64) with ``tokenizer_src``'s
    tokenizer to ``out``; the same ``seed`` gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(tokenizer_src)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_context,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# config-only Llama shapes for --load-format dummy: the engine measured at sizes no package ships
DUMMY_PRESETS: dict[str, dict] = {
    # about 1.07 B parameters with the default tokenizer's 49,152 tokens (Llama-3.2-1B's layout)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, max_position_embeddings=8192, rope_theta=500000.0),
    # a few MB: the pipelines that use the 1b one, proven quickly on a CPU
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rope_theta=10000.0),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def dummy_llama_dir(out: Path, tokenizer_from: Path, preset: str = "1b") -> Path:
    """Write a Llama directory of ``preset``'s shape with no weights (``config.json``,
    ``generation_config.json`` and the tokenizer files of ``tokenizer_from``, copied) to ``out``, for
    ``--load-format dummy``. The vocabulary is the tokenizer's; the embeddings are tied. Written
    once: a directory with the same config is kept as it is."""
    import json
    import os
    import shutil

    from transformers import GenerationConfig, LlamaConfig

    if preset not in DUMMY_PRESETS:
        raise ValueError(f"unknown dummy preset {preset!r}: expected one of {', '.join(DUMMY_PRESETS)}")
    shape = dict(DUMMY_PRESETS[preset])
    theta = shape.pop("rope_theta")
    tok = load_tokenizer(tokenizer_from)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        **shape,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.02,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    out = Path(out)
    want = cfg.to_json_string(use_diff=True)
    have = out / "config.json"
    if have.exists() and json.loads(have.read_text()) == json.loads(want) and (out / "tokenizer_config.json").exists():
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(want)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(tmp)
    copied = [f for f in TOKENIZER_FILES if (Path(tokenizer_from) / f).exists()]
    for f in copied:
        shutil.copy2(Path(tokenizer_from) / f, tmp / f)
    if "tokenizer_config.json" not in copied:  # a tokenizer kept in another form: written out
        tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def dummy_model(preset: str = "1b", models_dir: Path | None = None) -> Path:
    """The dummy Llama ``preset`` under ``models_dir`` (default DATA_DIR/models), named
    ``dummy-llama-PRESET``, with the default model's tokenizer (converted once if need be)."""
    from libs.engine.modelpath import DEFAULT_MODEL, default_data_dir, resolve_model

    models_dir = Path(models_dir) if models_dir else default_data_dir() / "models"
    return dummy_llama_dir(models_dir / f"dummy-llama-{preset}", resolve_model(DEFAULT_MODEL, models_dir), preset)
