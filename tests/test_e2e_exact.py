"""Greedy output through the running cluster equals transformers generate, token for token."""

import asyncio

from conftest import reference_greedy
from helpers import post, stream_events


def _text(tok, ids):
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


async def _complete(cluster, model_id, prompt_ids, max_tokens):
    status, body, _ = await post(
        cluster.url + "/v1/completions",
        {"model": model_id, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0},
    )
    assert status == 200, body
    return body


async def test_single_request_matches_generate(tiny_cluster, tiny_model, tiny_dir):
    model, tok = tiny_model
    prompt = tok.encode("The quick brown fox jumps over the lazy dog", add_special_tokens=False)
    ref = reference_greedy(model, prompt, 40)
    body = await _complete(tiny_cluster, tiny_dir.name, prompt, 40)
    assert body["usage"]["completion_tokens"] == len(ref)
    assert body["choices"][0]["text"] == _text(tok, ref)
    assert body["choices"][0]["finish_reason"] == ("length" if len(ref) == 40 else "stop")


async def test_eight_concurrent_requests_of_different_lengths_match_generate(tiny_cluster, tiny_model, tiny_dir):
    model, tok = tiny_model
    base = tok.encode(
        "Mooncake separates prefill from decode and keeps the KV cache at the centre of the design, "
        "so that prompts sharing a prefix reuse the work already done by any instance in the cluster.",
        add_special_tokens=False,
    )
    prompts = [(base * 4)[3 * i : 3 * i + n] for i, n in enumerate((4, 11, 23, 37, 52, 64, 90, 120))]
    max_tokens = [30, 45, 20, 60, 35, 50, 25, 40]
    refs = [reference_greedy(model, p, m) for p, m in zip(prompts, max_tokens)]
    bodies = await asyncio.gather(*(_complete(tiny_cluster, tiny_dir.name, p, m) for p, m in zip(prompts, max_tokens)))
    for body, ref in zip(bodies, refs):
        assert body["usage"]["completion_tokens"] == len(ref)
        assert body["choices"][0]["text"] == _text(tok, ref)


async def test_streamed_chat_matches_generate(tiny_cluster, tiny_model, tiny_dir):
    model, tok = tiny_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ref = reference_greedy(model, list(prompt), 32)
    events = await stream_events(
        tiny_cluster.url + "/v1/chat/completions",
        {"model": tiny_dir.name, "messages": messages, "max_tokens": 32, "temperature": 0, "stream": True,
         "stream_options": {"include_usage": True}},
    )
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert text == _text(tok, ref)
    usage = events[-2]["usage"]
    assert usage["prompt_tokens"] == len(prompt)
    assert usage["completion_tokens"] == len(ref)
