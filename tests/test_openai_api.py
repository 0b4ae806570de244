"""The official openai client against the running cluster."""

import asyncio

import openai
from openai import AsyncOpenAI
import pytest

from conftest import reference_greedy
from helpers import get_json, logged, post, stream_events, wait_until
from libs.bus import connect
from libs.protocol import IndexSummary, Subjects, decode


def _max_context(tiny_dir) -> int:
    from libs.engine.loading import read_shape

    return read_shape(tiny_dir).max_context


async def test_models_and_health(client, tiny_cluster, tiny_dir):
    models = await client.models.list()
    assert [m.id for m in models.data] == [tiny_dir.name]
    card = models.data[0].model_dump()  # vLLM's fields
    assert {k: card[k] for k in ("object", "owned_by", "root", "parent", "max_model_len")} == {
        "object": "model", "owned_by": "yuebing", "root": tiny_dir.name, "parent": None,
        "max_model_len": _max_context(tiny_dir)}
    assert card["created"] > 0
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


# ---------------------------------------------------------------- parameters: honoured or refused
_CHAT = [{"role": "user", "content": "Say hi"}]
# (endpoint, keyword arguments of the client, the parameter the 400 must name)
REFUSED = [
    ("chat", {"logit_bias": {"42": 5}}, "logit_bias"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"parallel_tool_calls": False}, "parallel_tool_calls"),
    ("chat", {"functions": [{"name": "f"}]}, "functions"),
    ("chat", {"extra_body": {"echo": True}}, "echo"),
    ("chat", {"extra_body": {"best_of": 2}}, "best_of"),
    ("chat", {"extra_body": {"min_tokens": 4}}, "min_tokens"),
    ("text", {"best_of": 3}, "best_of"),
    ("text", {"suffix": " the end"}, "suffix"),
    ("text", {"logit_bias": {"42": -100}}, "logit_bias"),
]


async def _create(client, model, kind, **kw):
    if kind == "chat":
        return await client.chat.completions.create(model=model, messages=_CHAT, max_tokens=2, **kw)
    return await client.completions.create(model=model, prompt="Say hi", max_tokens=2, **kw)


@pytest.mark.parametrize("kind,kw,param", REFUSED, ids=[f"{k}-{p}" for k, _, p in REFUSED])
async def test_parameters_not_implemented_are_refused_by_name(client, tiny_dir, kind, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        await _create(client, tiny_dir.name, kind, **kw)
    assert e.value.param == param and e.value.code == "unsupported_parameter"
    assert "not supported" in e.value.message and param in e.value.message


async def test_parameters_at_their_defaults_are_accepted(client, tiny_dir):
    r = await _create(client, tiny_dir.name, "chat", logprobs=False, n=1, response_format={"type": "text"},
                      user="someone", extra_body={"echo": False, "best_of": 1})
    assert r.choices[0].logprobs is None
    r = await _create(client, tiny_dir.name, "text", echo=False, best_of=1, n=1, user="someone")
    assert r.choices[0].finish_reason in ("stop", "length")


async def test_unknown_fields_are_refused_by_name(client, tiny_dir):
    for kind, extra, param in [("chat", {"temprature": 0.2}, "temprature"),
                               ("text", {"max_token": 3}, "max_token"),
                               ("text", {"stream_options": {"include_usage": True, "every_chunk": True},
                                         "stream": True}, "stream_options.every_chunk")]:
        with pytest.raises(openai.BadRequestError) as e:
            await _create(client, tiny_dir.name, kind, extra_body=extra)
        assert e.value.param == param and e.value.code == "unknown_parameter", e.value.message
        assert param.rpartition(".")[2] in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(
            model=tiny_dir.name, max_tokens=2,
            messages=[{"role": "user", "content": "x", "tool_call_id": "t1"}])
    assert e.value.param == "messages[0].tool_call_id"


def _text(tok, ids):
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _reference(model, prompt, max_new_tokens, presence=0.0, frequency=0.0, repetition=1.0):
    """transformers generate, greedy, with the penalties: the repetition penalty as transformers
    applies it, presence and frequency as OpenAI defines them (on the output tokens so far)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class OpenAIPenalties(LogitsProcessor):
        def __call__(self, input_ids, scores):
            counts = {}
            for t in input_ids[0, len(prompt):].tolist():
                counts[t] = counts.get(t, 0) + 1
            for t, c in counts.items():
                scores[0, t] -= frequency * c + presence
            return scores

    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=repetition,
                             logits_processor=LogitsProcessorList([OpenAIPenalties()]))
    return out[0, len(prompt):].tolist()


def _first_repeat(ids, before=()):
    """Index of the first token of ``ids`` seen earlier in it (or in ``before``), else None."""
    seen = set(before)
    for i, t in enumerate(ids):
        if t in seen:
            return i
        seen.add(t)
    return None


PENALTY_PROMPT = "The cat sat on the mat. The cat sat on the mat. The cat"


async def test_stop_token_ids_stop_at_that_token(client, tiny_dir, tiny_model):
    model, tok = tiny_model
    prompt = tok.encode(PENALTY_PROMPT, add_special_tokens=False)
    ref = _reference(model, prompt, 16)
    k = next(i for i in range(3, len(ref)) if ref[i] not in ref[:i])  # its first occurrence
    kw = dict(model=tiny_dir.name, prompt=prompt, max_tokens=16, temperature=0,
              extra_body={"stop_token_ids": [ref[k]]})
    r = await client.completions.create(**kw)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == k + 1  # the stop token counts; its text is left out, as vLLM does
    assert r.choices[0].text == _text(tok, ref[:k])
    stream = await client.completions.create(**kw, stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == r.choices[0].text


async def test_penalties_change_greedy_output_as_defined(client, tiny_dir, tiny_model):
    model, tok = tiny_model
    prompt = tok.encode(PENALTY_PROMPT, add_special_tokens=False)
    n = 40
    plain = _reference(model, prompt, n)
    k = _first_repeat(plain)
    assert k is not None and len(plain) == n  # the premise: plain greedy repeats a token of its output

    async def served(**extra):
        r = await client.completions.create(model=tiny_dir.name, prompt=prompt, max_tokens=n, temperature=0,
                                            extra_body=extra)
        return r.choices[0].text, r.usage.completion_tokens

    assert await served() == (_text(tok, plain), n)
    for extra, kw in [({"repetition_penalty": 1.5}, {"repetition": 1.5}),
                      ({"frequency_penalty": 1.0}, {"frequency": 1.0}),
                      ({"presence_penalty": 1.0}, {"presence": 1.0})]:
        ref = _reference(model, prompt, n, **kw)
        assert await served(**extra) == (_text(tok, ref), len(ref)), extra
        # the same output up to the first repeat (of the prompt too, for the repetition penalty),
        # which the penalty stops
        at = _first_repeat(plain, prompt) if "repetition" in kw else k
        assert at is not None and ref[:at] == plain[:at] and ref[at] != plain[at], extra
        assert ref[at] not in ref[:at] + (prompt if "repetition" in kw else []), extra
    # a negative frequency penalty rewards repeating: far fewer distinct tokens
    ref = _reference(model, prompt, n, frequency=-2.0)
    assert await served(frequency_penalty=-2.0) == (_text(tok, ref), len(ref))
    assert len(set(ref)) < len(set(plain)) // 2


async def test_penalties_out_of_range_are_refused(client, tiny_dir):
    for kw, param in [({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -2.01}, "frequency_penalty"),
                      ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
                      ({"extra_body": {"repetition_penalty": -1.0}}, "repetition_penalty"),
                      ({"extra_body": {"stop_token_ids": [10**9]}}, "stop_token_ids")]:
        with pytest.raises(openai.BadRequestError) as e:
            await _create(client, tiny_dir.name, "chat", **kw)
        assert e.value.param == param, e.value.message


# ---------------------------------------------------------------- tokenize, version, model names
async def test_tokenize_round_trips_through_detokenize(tiny_cluster, tiny_dir, tiny_model):
    _, tok = tiny_model
    url = tiny_cluster.url
    text = "Tokenize me, then detokenize: naïve café 🚀"
    status, body, _ = await post(url + "/tokenize", {"model": tiny_dir.name, "prompt": text})
    assert status == 200, body
    assert body["tokens"] == tok.encode(text, add_special_tokens=False)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == _max_context(tiny_dir)
    status, back, _ = await post(url + "/detokenize", {"model": tiny_dir.name, "tokens": body["tokens"]})
    assert status == 200 and back == {"prompt": text}
    # chat messages: the template applied as /v1/chat/completions applies it
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    status, chat, _ = await post(url + "/tokenize", {"model": tiny_dir.name, "messages": messages,
                                                     "return_token_strs": True})
    templated = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert status == 200 and chat["tokens"] == list(templated)
    assert chat["token_strs"] == tok.convert_ids_to_tokens(list(templated))
    r = await post(url + "/tokenize", {"messages": messages, "add_generation_prompt": False})
    assert r[0] == 200 and r[1]["tokens"] == list(tok.apply_chat_template(
        messages, add_generation_prompt=False, tokenize=True, return_dict=False))
    for path, body, status, param in [("/tokenize", {"model": tiny_dir.name}, 400, "prompt"),
                                      ("/tokenize", {"prompt": "x", "messages": messages}, 400, "messages"),
                                      ("/tokenize", {"prompt": "x", "model": "another"}, 404, "model"),
                                      ("/tokenize", {"prompt": "x", "add_bos": True}, 400, "add_bos"),
                                      ("/detokenize", {"tokens": [10**9]}, 400, "tokens")]:
        got, resp, _ = await post(url + path, body)
        assert got == status and resp["error"]["param"] == param, (path, body, resp)


async def test_version(tiny_cluster):
    from yuebing import __version__

    assert await get_json(tiny_cluster.url + "/version") == {"version": __version__}


async def test_served_model_name(client, tiny_cluster, tiny_dir):
    """A gateway with a served model name (on the shared cluster's bus and workers) lists that name,
    serves requests naming it and refuses the model's own name."""
    import msgspec

    from libs.natsserver import free_port
    from services.gateway.service import GatewayService

    nats = tiny_cluster.nats
    settings = msgspec.structs.replace(
        tiny_cluster.settings, instance_id="gateway-named", port=free_port(), served_model_name="house-model",
        nats_url=nats.url_for(nats.add_user("gateway", "gateway-named")))
    gateway = GatewayService(settings)
    await gateway.start()
    try:
        named = AsyncOpenAI(base_url=f"http://{settings.host}:{settings.port}/v1", api_key="unused", max_retries=0)
        models = await named.models.list()
        assert [(m.id, m.root, m.parent) for m in models.data] == [("house-model", tiny_dir.name, None)]
        r = await named.completions.create(model="house-model", prompt="Hello", max_tokens=3, temperature=0)
        assert r.model == "house-model" and r.usage.completion_tokens >= 1
        with pytest.raises(openai.NotFoundError) as e:
            await named.completions.create(model=tiny_dir.name, prompt="Hello", max_tokens=3)
        assert e.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):  # and the shared gateway the other way round
            await client.completions.create(model="house-model", prompt="Hello", max_tokens=3)
    finally:
        await gateway.stop()


# ---------------------------------------------------------------- logprobs, echo, n
def _logits(model, ids):
    """The model's float32 logits at every position of ``ids`` (one plain forward)."""
    import torch

    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def _decoded(tok, tid):
    return tok.decode([tid], skip_special_tokens=False, clean_up_tokenization_spaces=False)


LP_TOL = 2e-3  # the served path (KV cache, batched rows) against one plain forward, float32


async def test_chat_logprobs_are_the_models_distribution(client, tiny_dir, tiny_model):
    """Each output token's logprob is the log-softmax of the model's logits at its position, and
    top_logprobs that distribution's most likely tokens in order, streamed or not."""
    import torch

    model, tok = tiny_model
    messages = [{"role": "user", "content": "Name three colours"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = reference_greedy(model, prompt, 6)
    ref = torch.log_softmax(_logits(model, prompt + out), -1)
    kw = dict(model=tiny_dir.name, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=5,
              extra_body={"ignore_eos": True})
    r = await client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 == r.usage.completion_tokens
    for j, (tid, entry) in enumerate(zip(out, content)):
        dist = ref[len(prompt) - 1 + j]
        assert entry.token == _decoded(tok, tid)
        assert entry.logprob == pytest.approx(dist[tid].item(), abs=LP_TOL)
        top = dist.topk(5)
        assert [t.token for t in entry.top_logprobs] == [_decoded(tok, i) for i in top.indices.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=LP_TOL)
    assert bytes(b for e in content for b in e.bytes).decode() == r.choices[0].message.content
    stream = await client.chat.completions.create(**kw, stream=True)
    streamed = [e for c in [c async for c in stream] if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    # (the prompt's prefix is cached now: the same values, up to float rounding)
    assert [(e.token, [t.token for t in e.top_logprobs]) for e in streamed] == [
        (e.token, [t.token for t in e.top_logprobs]) for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=LP_TOL)
    # logprobs without top_logprobs: each token's own, no alternatives
    r = await client.chat.completions.create(**{**kw, "top_logprobs": None, "max_tokens": 2})
    assert [e.top_logprobs for e in r.choices[0].logprobs.content] == [[], []]


async def test_completion_echo_with_logprobs_scores_every_prompt_token(client, tiny_cluster, tiny_dir, tiny_model):
    """echo + logprobs gives the prompt's logprobs from the model's logits at every position (the
    first token's null), even for a prompt whose KV the prefill holds cached: that request reuses
    none of it. ``max_tokens: 0`` returns the prompt alone (a loglikelihood's request)."""
    import torch

    model, tok = tiny_model
    text = ("The quick brown fox jumps over the lazy dog near the river bank, while the cat watches from a tree "
            "and the birds sing their morning songs above the quiet village.")
    prompt = tok.encode(text, add_special_tokens=False)
    bs = tiny_cluster.settings.block_size
    assert len(prompt) > 2 * bs  # whole blocks to reuse
    # the prefix cached: a second plain request finds it
    for _ in range(2):
        plain = await client.completions.create(model=tiny_dir.name, prompt=prompt, max_tokens=2, temperature=0)
    assert plain.usage.prompt_tokens_details.cached_tokens > 0
    out = reference_greedy(model, prompt, 3)
    ref = torch.log_softmax(_logits(model, prompt + out), -1)
    kw = dict(model=tiny_dir.name, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=3,
              extra_body={"ignore_eos": True})
    r = await client.completions.create(**kw)
    assert r.usage.prompt_tokens_details.cached_tokens == 0 and r.usage.completion_tokens == 3
    choice = r.choices[0]
    assert choice.text == text + tok.decode(out, skip_special_tokens=True)
    lp = choice.logprobs
    ids = prompt + out
    assert lp.tokens == [_decoded(tok, t) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for p in range(1, len(ids)):
        dist = ref[p - 1]
        assert lp.token_logprobs[p] == pytest.approx(dist[ids[p]].item(), abs=LP_TOL), p
        top = dist.topk(3)
        want = {_decoded(tok, i): v for i, v in zip(top.indices.tolist(), top.values.tolist())}
        want.setdefault(_decoded(tok, ids[p]), dist[ids[p]].item())  # the token's own, whatever its rank
        got = lp.top_logprobs[p]
        assert list(got)[: len(top.indices)] == list(want)[: len(top.indices)], p
        assert got == pytest.approx(want, abs=LP_TOL), p
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets
    # streamed: the same, the prompt in the first chunk
    stream = await client.completions.create(**kw, stream=True)
    chunks = [c for c in [c async for c in stream] if c.choices]
    assert chunks[0].choices[0].text.startswith(text)
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [v for s in streamed for v in s.token_logprobs] == lp.token_logprobs
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
    # max_tokens 0: the prompt and its logprobs, nothing generated
    r0 = await client.completions.create(**{**kw, "max_tokens": 0})
    assert r0.choices[0].text == text and r0.choices[0].finish_reason == "length"
    assert r0.usage.completion_tokens == 0 and r0.usage.prompt_tokens == len(prompt)
    assert r0.choices[0].logprobs.token_logprobs == lp.token_logprobs[: len(prompt)]
    # echo without logprobs: the text only
    r1 = await client.completions.create(**{**kw, "logprobs": None})
    assert r1.choices[0].text == choice.text and r1.choices[0].logprobs is None


async def test_n_choices_from_one_prefill(client, tiny_cluster, tiny_dir, tiny_model):
    """n=4: four choices, the prompt prefilled once and four sequences decoded; usage counts the
    prompt once. With a seed the choices are reproducible, and choice 0 is what n=1 gives."""
    _, tok = tiny_model
    prompt = tok.encode("Pick a random animal:", add_special_tokens=False)
    kw = dict(model=tiny_dir.name, prompt=prompt, max_tokens=8, temperature=1.0, seed=11, n=4, logprobs=1,
              extra_body={"ignore_eos": True})
    import aiohttp

    from bench.common import prefill_counters

    async with aiohttp.ClientSession() as session:
        before = await prefill_counters(session, tiny_cluster.metrics_urls["prefill-0"])
        r = await client.completions.create(**kw)
        after = await prefill_counters(session, tiny_cluster.metrics_urls["prefill-0"])
    assert after["queries"] - before["queries"] == len(prompt)  # the prefill counters: the prompt once
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" and len(c.logprobs.tokens) == 8 for c in r.choices)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 32
    texts = [c.text for c in r.choices]
    assert len(set(texts)) > 1  # each choice draws with its own seed
    logs = tiny_cluster.log_dir
    prefilled = await logged(logs / "prefill-0.log", "prefilled", {r.id}, 1)
    assert len(prefilled) == 1 and prefilled[0]["choices"] == 4  # the prompt computed once
    forks = {r.id} | {f"{r.id}#{i}" for i in range(1, 4)}
    decoded = await logged(logs / "decode-0.log", "decoded", forks, 4)
    assert sorted(e["request_id"] for e in decoded) == sorted(forks)
    assert all(e["output_tokens"] == 7 for e in decoded)  # the first token is the prefill's
    again = await client.completions.create(**kw)
    assert [c.text for c in again.choices] == texts
    one = await client.completions.create(**{**kw, "n": 1})
    assert one.choices[0].text == texts[0]


async def test_n_greedy_and_streamed_chat(client, tiny_dir):
    kw = dict(model=tiny_dir.name, messages=[{"role": "user", "content": "Say something"}], max_tokens=5,
              temperature=0, extra_body={"ignore_eos": True})
    single = await client.chat.completions.create(**kw)
    r = await client.chat.completions.create(**kw, n=3)
    assert [c.message.content for c in r.choices] == [single.choices[0].message.content] * 3  # greedy: identical
    assert r.usage.completion_tokens == 15 and r.usage.prompt_tokens == single.usage.prompt_tokens
    stream = await client.chat.completions.create(**kw, n=3, stream=True, stream_options={"include_usage": True},
                                                  logprobs=True)
    chunks = [c async for c in stream]
    texts, finishes, lps = {}, {}, {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
            if ch.logprobs:
                lps[ch.index] = lps.get(ch.index, 0) + len(ch.logprobs.content)
    assert texts == {i: single.choices[0].message.content for i in range(3)}
    assert finishes == {i: "length" for i in range(3)} and lps == {i: 5 for i in range(3)}
    assert chunks[-1].usage.completion_tokens == 15


async def test_a_stop_string_ends_one_choice_and_only_its_sequence(client, tiny_cluster, tiny_dir):
    """A stop string that ends choice 0 aborts its sequence on the decode instance; choice 1 runs on."""
    kw = dict(model=tiny_dir.name, prompt="Tell me a long story:", max_tokens=60, temperature=1.0, seed=5, n=2,
              extra_body={"ignore_eos": True})
    full = await client.completions.create(**kw)
    t0, t1 = full.choices[0].text, full.choices[1].text
    stop = next((t0[i : i + 3] for i in range(2, 12) if t0.index(t0[i : i + 3]) == i and t0[i : i + 3] not in t1),
                None)
    assert stop is not None, (t0, t1)
    r = await client.completions.create(**kw, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (t0[: t0.index(stop)], "stop")
    assert (r.choices[1].text, r.choices[1].finish_reason) == (t1, "length")
    decoded = {e["request_id"]: e for e in await logged(tiny_cluster.log_dir / "decode-0.log", "decoded",
                                                         {r.id, f"{r.id}#1"}, 2)}
    assert decoded[r.id]["finish"] == "abort" and decoded[r.id]["output_tokens"] < 59
    assert decoded[f"{r.id}#1"]["finish"] == "length" and decoded[f"{r.id}#1"]["output_tokens"] == 59
