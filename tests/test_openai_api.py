"""The official openai client against the running cluster."""

import asyncio

import openai
import pytest
from openai import AsyncOpenAI

from helpers import get_json, post, stream_events, wait_until
from libs.bus import connect
from libs.protocol import IndexSummary, Subjects, decode


@pytest.fixture
def client(tiny_cluster):
    return AsyncOpenAI(base_url=tiny_cluster.url + "/v1", api_key="unused", max_retries=0)


async def test_models_and_health(client, tiny_cluster, tiny_dir):
    models = await client.models.list()
    assert [m.id for m in models.data] == [tiny_dir.name]
    health = await get_json(tiny_cluster.url + "/health")
    assert health["ready"] is True
    assert health["instances"]["prefill"] == 1 and health["instances"]["decode"] == 1


async def _indexed_blocks(nc, instance: str) -> int:
    """How many blocks the conductor's prefix index places in ``instance``'s own cache."""
    raw = await nc.request(Subjects.CONDUCTOR_STATE, b"", timeout=5)
    return decode(raw.data, IndexSummary).blocks.get(instance, 0)


async def test_chat_non_streaming_with_usage(client, tiny_cluster, tiny_dir, tiny_model):
    """Usage counts the prompt as templated; cached_tokens is 0 for a prompt no earlier one began
    like, and for a later one sharing its start, every whole block of the shared prefix (at least
    one prompt token is always computed)."""
    _, tok = tiny_model
    bs = tiny_cluster.settings.block_size
    system = {"role": "system",
              "content": "You keep the usage accounts of this API test: answer in one short sentence. " * 2}
    nc = await connect(tiny_cluster.nats.url, "test-openai-usage")
    try:
        held = await _indexed_blocks(nc, "prefill-0")
        messages = [system, {"role": "user", "content": "Hello there"}]
        r = await client.chat.completions.create(model=tiny_dir.name, messages=messages, max_tokens=12,
                                                 temperature=0)
        assert r.object == "chat.completion"
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason in ("stop", "length")
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert r.usage.prompt_tokens == len(prompt)
        assert 1 <= r.usage.completion_tokens <= 12
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.usage.prompt_tokens_details.cached_tokens == 0  # a cold prompt: nothing reused

        # the conductor places by what its index says each instance holds: wait until it has the
        # first prompt's full blocks (published once the prompt is handed to decode)
        async def indexed():
            return await _indexed_blocks(nc, "prefill-0") >= held + len(prompt) // bs

        assert await wait_until(indexed, timeout=30, interval=0.05)
    finally:
        await nc.close()
    later = [system, {"role": "user", "content": "What time is it where you are, and what is the weather like there?"}]
    r2 = await client.chat.completions.create(model=tiny_dir.name, messages=later, max_tokens=4, temperature=0)
    prompt2 = tok.apply_chat_template(later, add_generation_prompt=True, tokenize=True, return_dict=False)
    shared = next(i for i, (a, b) in enumerate(zip(prompt, prompt2)) if a != b)
    expected = min(shared // bs, len(prompt) // bs, (len(prompt2) - 1) // bs) * bs
    assert expected >= bs and (len(prompt2) - 1) // bs * bs > expected  # the test's own premise
    assert r2.usage.prompt_tokens == len(prompt2)
    assert r2.usage.prompt_tokens_details.cached_tokens == expected


async def test_chat_streaming(client, tiny_dir):
    stream = await client.chat.completions.create(
        model=tiny_dir.name, messages=[{"role": "user", "content": "Count to ten"}], max_tokens=20,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens >= 1


async def test_completions_with_token_ids_and_text(client, tiny_dir, tiny_model):
    _, tok = tiny_model
    ids = tok.encode("Once upon a time", add_special_tokens=False)
    r = await client.completions.create(model=tiny_dir.name, prompt=ids, max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.usage.prompt_tokens == len(ids)
    r2 = await client.completions.create(model=tiny_dir.name, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r2.choices[0].text == r.choices[0].text
    stream = await client.completions.create(model=tiny_dir.name, prompt=ids, max_tokens=8, temperature=0, stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == r.choices[0].text


async def test_max_tokens_and_max_completion_tokens(client, tiny_dir):
    r = await client.chat.completions.create(
        model=tiny_dir.name, messages=[{"role": "user", "content": "x"}], max_completion_tokens=3,
        temperature=0, extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


async def test_stop_string_cuts_output(client, tiny_dir):
    full = await client.completions.create(model=tiny_dir.name, prompt="Stop here", max_tokens=30, temperature=0,
                                           extra_body={"ignore_eos": True})
    text = full.choices[0].text
    assert len(text) > 6
    stop = text[4:7]
    cut = await client.completions.create(model=tiny_dir.name, prompt="Stop here", max_tokens=30, temperature=0,
                                          stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    events = await stream_events(
        str(client.base_url) + "completions",
        {"model": tiny_dir.name, "prompt": "Stop here", "max_tokens": 30, "temperature": 0, "stop": stop,
         "stream": True, "ignore_eos": True},
    )
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert streamed == cut.choices[0].text


async def test_seeded_sampling_is_reproducible(client, tiny_dir):
    kw = dict(model=tiny_dir.name, prompt="Random words:", max_tokens=16, temperature=1.0, top_p=0.9, seed=1234,
              extra_body={"ignore_eos": True, "top_k": 50})
    a, b = await asyncio.gather(client.completions.create(**kw), client.completions.create(**kw))
    assert a.choices[0].text == b.choices[0].text


async def test_client_disconnect_aborts_on_workers(tiny_cluster, tiny_dir):
    import aiohttp

    body = {"model": tiny_dir.name, "prompt": "Go on forever", "max_tokens": 1900, "temperature": 0,
            "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(tiny_cluster.url + "/v1/completions", json=body) as r:
            n = 0
            async for line in r.content:
                if line.startswith(b"data: "):
                    n += 1
                if n >= 5:
                    break

    async def decode_idle():
        h = await get_json(tiny_cluster.url + "/health")
        return all(w["running"] == 0 and w["queued"] == 0 for w in h["workers"] if w["kind"] == "decode")

    assert await wait_until(decode_idle, timeout=60)
    # and the cluster keeps serving
    status, resp, _ = await post(tiny_cluster.url + "/v1/completions",
                                 {"model": tiny_dir.name, "prompt": "ok", "max_tokens": 2})
    assert status == 200, resp


async def test_openai_client_sees_errors(client):
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
