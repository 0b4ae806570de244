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
