"""Structured output through the cluster: OpenAI's response_format and vLLM's structured_outputs /
guided_* fields, through the official client, against a plain forward masked by the same grammar."""

from __future__ import annotations

import json
import re

import llguidance
import openai
import pytest

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "colour": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "colour"], "additionalProperties": False}
REGEX = r"(yes|no), [a-z]{2,6}!"
CHOICES = ["apple pie", "banana \"split\"", "cherry\\tart"]


def _reference(model, tok, prompt: list[int], grammar: str, max_new_tokens: int) -> tuple[list[int], bool]:
    """Greedy decoding by plain forwards, each step's logits masked by llguidance for ``grammar``
    (the whole sequence recomputed every step: no KV cache); (tokens, ended with EOS)."""
    import numpy as np
    import torch

    lt = llguidance.LLTokenizer(tok.backend_tokenizer.to_str(), eos_token=tok.eos_token_id)
    matcher = llguidance.LLMatcher(lt, grammar)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([prompt + out])).logits[0, -1].float()
            bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = torch.from_numpy(bits[: logits.shape[0]].astype(bool))
            token = int(torch.argmax(logits.masked_fill(~allowed, float("-inf"))))
            if token == tok.eos_token_id:
                return out, True
            assert matcher.consume_token(token)
            out.append(token)
    return out, False


def _chat_prompt(tok, text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                   return_dict=False)


CASES = [  # (request fields, the grammar llguidance builds for them, a check of the text)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}},
     llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False}),
     lambda text: set(json.loads(text)) == {"ok", "colour"} and json.loads(text)["colour"] in SCHEMA[
         "properties"]["colour"]["enum"]),
    ({"extra_body": {"structured_outputs": {"regex": REGEX}}}, llguidance.LLMatcher.grammar_from_regex(REGEX),
     lambda text: re.fullmatch(REGEX, text) is not None),
    ({"extra_body": {"guided_choice": CHOICES}},
     llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in CHOICES)),
     lambda text: text in CHOICES),
]


@pytest.mark.parametrize("fields,grammar,valid", CASES, ids=["json_schema", "regex", "choice"])
async def test_greedy_output_follows_the_grammar_as_a_masked_forward_does(client, tiny_dir, tiny_model,
                                                                           fields, grammar, valid):
    model, tok = tiny_model
    text = "Answer in the format asked"
    ref, ended = _reference(model, tok, _chat_prompt(tok, text), grammar, 48)
    assert ended, "the reference must finish within the budget for the check to mean something"
    r = await client.chat.completions.create(model=tiny_dir.name, messages=[{"role": "user", "content": text}],
                                             max_tokens=48, temperature=0, **fields)
    choice = r.choices[0]
    assert choice.message.content == tok.decode(ref, skip_special_tokens=True)
    assert choice.finish_reason == "stop" and valid(choice.message.content)


async def test_sampled_choices_and_completions_follow_the_grammar(client, tiny_dir):
    """n sampled choices, streamed (each fork's matcher after its own first token), and the
    completions endpoint with a JSON object."""
    stream = await client.chat.completions.create(
        model=tiny_dir.name, messages=[{"role": "user", "content": "Say yes or no"}], max_tokens=24, n=3,
        temperature=1.0, seed=7, stream=True, extra_body={"guided_regex": REGEX})
    texts, reasons = ["", "", ""], [None] * 3
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    for text, reason in zip(texts, reasons):
        assert reason == "length" or re.fullmatch(REGEX, text), text
    assert any(reason == "stop" for reason in reasons)
    r = await client.completions.create(model=tiny_dir.name, prompt="A JSON object:", max_tokens=40, temperature=0,
                                        extra_body={"structured_outputs": {"json_object": True,
                                                                           "whitespace_pattern": "[ ]?"}})
    text = r.choices[0].text
    assert text.startswith("{") and "\n" not in text and "  " not in text
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


BAD = [  # (request fields, the parameter the 400 names, its code)
    ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex", "invalid_grammar"),
    ({"extra_body": {"guided_grammar": "start: undefined_rule"}}, "guided_grammar", "invalid_grammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strange"}}}},
     "response_format", "invalid_grammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema",
     "invalid_value"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "invalid_value"),
    ({"extra_body": {"guided_json": "{not json"}}, "guided_json", "invalid_value"),
    ({"extra_body": {"guided_choice": []}}, "guided_choice", "invalid_value"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}}, "guided_regex",
     "invalid_value"),
    ({"extra_body": {"structured_outputs": {"regex": "a+", "choice": ["a"]}}}, "structured_outputs.choice",
     "invalid_value"),
    ({"extra_body": {"structured_outputs": {"structural_tag": "{}"}}}, "structured_outputs.structural_tag",
     "unsupported_parameter"),
    ({"extra_body": {"guided_regex": "a+", "guided_decoding_backend": "xgrammar"}}, "guided_decoding_backend",
     "unsupported_parameter"),
    ({"extra_body": {"guided_regex": "a+", "guided_whitespace_pattern": " "}}, "guided_whitespace_pattern",
     "invalid_value"),
    ({"extra_body": {"guided_regex": "a+", "ignore_eos": True}}, "ignore_eos", "invalid_value"),
]


@pytest.mark.parametrize("fields,param,code", BAD, ids=[p + "-" + c for _, p, c in BAD])
async def test_bad_structured_output_requests_are_refused_by_name(client, tiny_dir, fields, param, code):
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model=tiny_dir.name, messages=[{"role": "user", "content": "x"}],
                                             max_tokens=2, **fields)
    assert (e.value.param, e.value.code) == (param, code), e.value.message
