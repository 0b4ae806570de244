"""Command-line pieces the product's commands and the benchmarks share: the model and storage flags,
and an integer type with a least value."""

from __future__ import annotations

import argparse


def count(least: int):
    """An argparse type: an integer of at least ``least``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value
    parse.__name__ = "integer"  # what argparse names in its error
    return parse


def add_engine(p: argparse.ArgumentParser) -> None:
    """Where the model runs, in what number format, from what weights."""
    p.add_argument("--device", default=None, metavar="auto|cpu|cuda|cuda:N",
                   help="where the model runs (default auto: the first GPU torch sees, else the CPU)")
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                   help="the model's number format, and its KV blocks' (default auto: bfloat16 on a GPU; on a CPU "
                   "whichever of bfloat16 and float32 was measured faster on this machine, measured once)")
    p.add_argument("--load-format", default=None, choices=("auto", "safetensors", "dummy"),
                   help="auto (default): the model directory's safetensors; dummy: random weights from its "
                   "config.json (the same in every instance), to measure the engine at any model size")


def add_common(p: argparse.ArgumentParser) -> None:
    """The model, where files go, the KV block size and torch threads."""
    p.add_argument("--model", default=None,
                   help="smollm2-135m-instruct (default), a .gguf file, or a local Hugging Face model directory")
    p.add_argument("--data-dir", default=None, help="models, cache files, NATS store and logs (default ~/.cache/yuebing)")
    p.add_argument("--models-dir", default=None, help="converted models (default DATA_DIR/models)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default 16)")
    add_engine(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per model worker (default: `up` splits the host's cores between its model "
                   "workers, pinned only with --pin-cores; `serve`: torch's choice, or the count of --cpus)")
