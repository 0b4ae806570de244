"""bfloat16 through the cluster: greedy output equals transformers generate in bfloat16, cold and
with a cached prefix; KV of one dtype is never used by a cluster of another."""

import pytest
import torch

from conftest import reference_greedy, start_cluster
from helpers import post, wait_until
from libs.bus import connect
from libs.engine.loading import load_model, model_identity
from libs.engine.runner import ModelRunner
from libs.kv.client import CacheClient
from libs.kv.keys import block_hashes, namespace_digest

BS = 16


@pytest.fixture(scope="module")
def bf16_cluster(tiny_dir, tmp_path_factory):
    cluster = start_cluster(tiny_dir, tmp_path_factory.mktemp("bf16"), dtype="bfloat16")
    yield cluster
    cluster.stop()


async def _complete(cluster, model: str, prompt: list[int], max_tokens: int) -> dict:
    status, body, _ = await post(cluster.url + "/v1/completions",
                                 {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert status == 200, body
    return body


def _same(body, tok, reference: list[int]) -> bool:
    """The completion is the reference's tokens: the same text and the same number of tokens."""
    text = tok.decode(reference, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return body["choices"][0]["text"] == text and body["usage"]["completion_tokens"] == len(reference)


async def test_bfloat16_cold_and_cached_prefix_match_generate(bf16_cluster, tiny_dir, tiny_model):
    """One request at a time (a decode batch of one row, as generate runs): token for token."""
    tok = tiny_model[1]
    model = load_model(tiny_dir, torch.bfloat16)
    shared = list(range(2000, 2000 + 3 * BS))  # three full blocks another prompt reuses
    prompts = [list(range(3000, 3021)), shared + list(range(500, 509)), list(range(4000, 4070)),
               shared + list(range(700, 730))]
    cached = []
    for prompt in prompts:
        body = await _complete(bf16_cluster, tiny_dir.name, prompt, 24)
        assert _same(body, tok, reference_greedy(model, prompt, 24)), prompt[:3]
        cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached[:3] == [0, 0, 0]
    assert cached[3] == 3 * BS  # the shared prefix came from the cache, and the output is still exact


async def test_kv_of_another_dtype_is_a_miss_never_garbage(tiny_cluster, tiny_dir, tiny_model):
    """The float32 cluster's pool is given bfloat16 blocks of a prompt: under the bfloat16
    namespace (what a bfloat16 cluster sharing the pool writes) and, as if a writer were wrong,
    under the float32 keys themselves. Neither is used: the output is float32 generate's."""
    prompt = list(range(6000, 6000 + 4 * BS + 5))
    identity = model_identity(tiny_dir)
    bf16_keys = block_hashes(prompt, BS, namespace_digest(identity, "bfloat16", BS))
    fp32_keys = block_hashes(prompt, BS, namespace_digest(identity, "float32", BS))
    assert not set(bf16_keys) & set(fp32_keys)
    _, kv = ModelRunner(tiny_dir, dtype=torch.bfloat16).prefill(prompt)
    blocks = [kv[:, :, :, BS * i : BS * (i + 1)].contiguous() for i in range(4)]
    nc = await connect(tiny_cluster.nats.url, "test-dtype")
    try:
        client = CacheClient(nc)
        await client.put_blocks(list(zip(bf16_keys, blocks)))
        await client.put_blocks(list(zip(fp32_keys[:2], blocks[:2])))  # the wrong dtype under the right keys

        async def stored():
            return all(await client.exists(bf16_keys + fp32_keys[:2]))

        assert await wait_until(stored, timeout=30)
    finally:
        await nc.close()
    model, tok = tiny_model
    body = await _complete(tiny_cluster, tiny_dir.name, prompt, 16)
    assert _same(body, tok, reference_greedy(model, prompt, 16))
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
