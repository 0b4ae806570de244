"""The OpenAI-compatible surface: request schemas, validation, errors and response bodies."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from libs.config import SLO
from libs.protocol import MAX_PAYLOAD, SamplingParams, TokenLogprobs
from services.gateway.errors import ApiError
from services.gateway.sessions import MAX_SESSION_ID
from services.gateway.structured import ResponseFormat, StructuredOutputs, request_grammar

MAX_MESSAGES = 1024
MAX_JSON_DEPTH = 16
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 256
MAX_N = 8  # choices per request
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (OpenAI's bound)
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs (OpenAI's bound)
LOGPROB_FLOOR = -9999.0  # a logprob below is reported as this (vLLM's floor; JSON has no -inf)
# an echo's prompt logprobs travel in one bus message: 4 bytes a position, 8 per alternative
PROMPT_LOGPROBS_BYTES = MAX_PAYLOAD - 64 * 1024


# Every request Struct refuses fields it does not declare (a typo, or a parameter of the OpenAI or
# vLLM APIs this server does not implement, never passes silently); the top-level fields this
# server knows but does not implement are refused before that, by name (``UNSUPPORTED``).
class ContentPart(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    text: str | None = None
    # the other kinds of part parse, to be refused by kind ("only text content parts")
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    refusal: str | None = None


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None  # given to the chat template, as vLLM does


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False  # implemented: a last chunk with the usage
    continuous_usage_stats: bool | None = None  # vLLM: refused when true
    include_obfuscation: bool | None = None  # OpenAI: refused when true (no obfuscation padding is sent)


class _Common(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The fields both endpoints accept, each honoured, except ``user`` (informational)."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM: generation stops after one of these tokens
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM
    n: int | None = None  # choices, 1 .. MAX_N, from one prefill
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # informational (OpenAI: an end-user id for abuse monitoring); accepted, no effect on output
    user: str | None = None
    ignore_eos: bool | None = None  # vLLM
    slo_class: str | None = None  # extension: the request class whose latency objectives apply
    # extension: the conversation this turn belongs to; its blocks stay pinned between turns
    # (services/gateway/sessions.py); also the X-Session-Id header
    session_id: str | None = None
    # structured output (services/gateway/structured.py): OpenAI's, and vLLM's two spellings
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None


class ChatCompletionRequest(_Common, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None  # each output token's logprob
    top_logprobs: int | None = None  # and this many most likely tokens at its position (with logprobs)
    # informational in OpenAI's API (ids and tags for the caller's own bookkeeping, a cache
    # routing hint); accepted, no effect on output
    safety_identifier: str | None = None
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None


class CompletionRequest(_Common, kw_only=True, forbid_unknown_fields=True):
    prompt: str | list[Any]
    add_special_tokens: bool | None = None  # vLLM: tokenize a text prompt with BOS etc. (default false here)
    logprobs: int | None = None  # each output token's logprob and this many most likely tokens there
    echo: bool | None = None  # the prompt before the completion (with logprobs: the prompt's too)


class TokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's /tokenize: a text prompt, or chat messages with the chat template applied."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # default: as the completion endpoints tokenize (false)
    return_token_strs: bool = False


class DetokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    tokens: list[int]


# Request fields of the OpenAI and vLLM APIs that this server does not implement, with the values
# that ask for nothing (their defaults, which client libraries may send on their own: ``echo:
# false``, ``best_of: 1``). Any other value is refused with a 400 naming the field.
_OFF_BOTH = {
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    # vLLM's sampling and output extensions
    "use_beam_search": (None, False),
    "length_penalty": (None, 1.0),
    "min_p": (None, 0.0),
    "min_tokens": (None, 0),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),  # what this server does
    "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "logits_processors": (None,),
    "return_tokens_as_token_ids": (None, False),
    "return_token_ids": (None, False),
    "priority": (None, 0),
    "request_id": (None,),
    "cache_salt": (None,),
    "kv_transfer_params": (None,),
    "vllm_xargs": (None,),
    "mm_processor_kwargs": (None,),
}
UNSUPPORTED: dict[type, dict[str, tuple]] = {
    ChatCompletionRequest: {
        **_OFF_BOTH,
        "echo": (None, False),  # vLLM's chat echo (of the last message)
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "parallel_tool_calls": (None, True),  # the default; only meaningful with tools
        "functions": (None, []),
        "function_call": (None, "none"),
        "audio": (None,),
        "modalities": (None, ["text"]),
        "prediction": (None,),
        "reasoning_effort": (None,),
        "verbosity": (None,),
        "web_search_options": (None,),
        "service_tier": (None, "auto"),
        "store": (None, False),
        # vLLM's chat extensions
        "add_generation_prompt": (None, True),  # what this server does
        "continue_final_message": (None, False),
        "add_special_tokens": (None, False),  # what this server does
        "documents": (None,),
        "chat_template": (None,),
        "chat_template_kwargs": (None, {}),
    },
    CompletionRequest: {
        **_OFF_BOTH,
        "suffix": (None, ""),
    },
}


def _same(value: Any, default: Any) -> bool:
    """JSON equality that keeps booleans apart from numbers (``logprobs: 0`` is not ``false``)."""
    if value is None or default is None:
        return value is default
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and value == default
    return type(value) is type(default) and value == default


def check_fields(obj: dict, typ: type[msgspec.Struct]) -> dict:
    """The body's fields that ``typ`` declares; raises a 400 naming a field this server does not
    implement (given with a value other than its default: ``unsupported_parameter``) or does not
    know at all (``unknown_parameter``)."""
    known = set(typ.__struct_fields__)
    off = UNSUPPORTED.get(typ, {})
    unknown = []
    for key, value in obj.items():
        if key in known:
            continue
        if key in off:
            if not any(_same(value, d) for d in off[key]):
                accepted = " or ".join(msgspec.json.encode(d).decode() for d in off[key])
                raise ApiError(400, f"{key} is not supported by this server; only {accepted} (off) is accepted",
                               param=key, code="unsupported_parameter")
            continue
        unknown.append(key)
    if unknown:
        names = ", ".join(repr(k[:64]) for k in unknown[:8])
        raise ApiError(400, f"unknown parameter{'s' if len(unknown) > 1 else ''} {names}: not part of this API",
                       param=unknown[0][:64], code="unknown_parameter")
    return {k: v for k, v in obj.items() if k in known}


_PATH = re.compile(r"at `\$\.?([^`]*)`")


def json_depth(obj: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a decoded JSON value, counting no further than ``limit + 1``."""
    depth, level = 0, [obj]
    while level and depth <= limit:
        depth += 1
        nxt = []
        for v in level:
            if isinstance(v, dict):
                nxt.extend(v.values())
            elif isinstance(v, list):
                nxt.extend(v)
        level = [v for v in nxt if isinstance(v, (dict, list))]
    return depth


def parse(obj: Any, typ: type[msgspec.Struct]):
    """Convert a decoded JSON object into a request Struct, or raise a 400 naming the field."""
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise ApiError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels", code="too_deep")
    obj = check_fields(obj, typ)
    try:
        return msgspec.convert(obj, typ)
    except msgspec.ValidationError as e:
        text = str(e)
        m = _PATH.search(text)
        param = m.group(1) if m else None
        if text.startswith(("Object missing required field", "Object contains unknown field")):
            field = text.split("`")[1]
            param = f"{param}.{field}" if param else field
            if text.startswith("Object contains unknown field"):
                raise ApiError(400, f"unknown parameter {param[:128]!r}: not part of this API", param=param,
                               code="unknown_parameter") from None
        raise ApiError(400, f"invalid request: {text}", param=param, code="invalid_value") from None


@dataclass
class Normalized:
    """A validated request: what the gateway needs to schedule and stream it."""

    prompt_token_ids: list[int]
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    slo: SLO = SLO()
    echo: bool = False  # completions: the prompt goes before each choice's text
    session_id: str | None = None  # the conversation it is a turn of
    grammar_from: str | None = None  # the field that asked for a structured output

    @property
    def n(self) -> int:
        return self.sampling.n

    @property
    def logprobs(self) -> bool:
        return self.sampling.logprobs is not None


def _bad(message: str, param: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"at most {MAX_STOP_STRINGS} stop strings are supported", "stop")
    if any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise _bad(f"a stop string may be at most {MAX_STOP_LENGTH} characters", "stop")
    return [s for s in stops if s]


def _unsupported(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param, code="unsupported_parameter")


def _penalty(value: float | None, default: float, param: str, ok, bounds: str) -> float:
    value = default if value is None else value
    if not ok(value):
        raise _bad(f"{param} must be {bounds}", param)
    return float(value)


def _stop_token_ids(ids: list[int] | None, vocab_size: int | None) -> list[int]:
    ids = list(ids or [])
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise _bad(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are supported", "stop_token_ids")
    bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise _bad(f"stop token id {bad[0]} is outside the vocabulary"
                   + (f" (0..{vocab_size - 1})" if vocab_size else ""), "stop_token_ids")
    return sorted(set(ids))


def logprobs_asked(req: _Common) -> tuple[int | None, bool]:
    """(alternatives per output token's logprobs, None when not asked for; whether the prompt is
    echoed) of a request: chat's ``logprobs`` and ``top_logprobs``, completions' ``logprobs`` and
    ``echo``."""
    if isinstance(req, ChatCompletionRequest):
        top = req.top_logprobs
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise _bad(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "top_logprobs")
        if req.logprobs:
            return top or 0, False
        if top:
            raise _bad("top_logprobs needs logprobs set to true", "top_logprobs")
        return None, False
    if isinstance(req, CompletionRequest):
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise _bad(f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}", "logprobs")
        return req.logprobs, bool(req.echo)
    return None, False


def prompt_logprobs_fit(prompt_len: int, k: int) -> bool:
    """Whether an echo's prompt logprobs with ``k`` alternatives fit the one message they travel in."""
    return (prompt_len - 1) * (4 + 8 * k) <= PROMPT_LOGPROBS_BYTES


def normalize(req: _Common, prompt_ids: list[int], max_context: int, max_tokens: int | None,
              default_max_tokens: int | None, slo: SLO = SLO(), slo_classes: dict[str, SLO] | None = None,
              vocab_size: int | None = None, session_header: str | None = None) -> Normalized:
    """Check sampling parameters, the context budget and the SLO class; build SamplingParams.
    ``slo`` applies to requests without a class; ``slo_classes`` are the classes a request may name;
    ``vocab_size`` bounds the stop token ids; ``session_header``: the request's X-Session-Id."""
    session = req.session_id if req.session_id is not None else session_header
    if session is not None and not 0 < len(session) <= MAX_SESSION_ID:
        raise _bad(f"session_id must be 1 to {MAX_SESSION_ID} characters",
                   "session_id" if req.session_id is not None else "X-Session-Id")
    if req.slo_class is not None:
        classes = slo_classes or {}
        if req.slo_class not in classes:
            known = ", ".join(sorted(classes)) or "none are configured"
            raise _bad(f"unknown slo_class {req.slo_class[:64]!r} ({known})", "slo_class")
        slo = classes[req.slo_class]
    n = 1 if req.n is None else req.n
    if not 1 <= n <= MAX_N:
        raise _bad(f"n must be between 1 and {MAX_N}", "n")
    logprobs, echo = logprobs_asked(req)
    prompt_logprobs = logprobs if echo else None
    if req.stream_options is not None:
        for name in ("continuous_usage_stats", "include_obfuscation"):
            if getattr(req.stream_options, name):
                raise _unsupported(f"stream_options.{name} is not supported by this server; only false (off) "
                                   "is accepted",
                                   f"stream_options.{name}")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0.0 <= temperature <= 2.0:
        raise _bad("temperature must be between 0 and 2", "temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0.0 < top_p <= 1.0:
        raise _bad("top_p must be in (0, 1]", "top_p")
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    if top_k < 0:
        raise _bad("top_k must be -1, 0 (off) or positive", "top_k")
    if req.seed is not None and not -(2**63) <= req.seed < 2**63:
        raise _bad("seed must fit in 64 bits", "seed")
    # OpenAI's and vLLM's ranges
    presence = _penalty(req.presence_penalty, 0.0, "presence_penalty", lambda v: -2.0 <= v <= 2.0, "between -2 and 2")
    frequency = _penalty(req.frequency_penalty, 0.0, "frequency_penalty", lambda v: -2.0 <= v <= 2.0,
                         "between -2 and 2")
    repetition = _penalty(req.repetition_penalty, 1.0, "repetition_penalty", lambda v: 0.0 < v < math.inf,
                          "greater than 0")
    stop_ids = _stop_token_ids(req.stop_token_ids, vocab_size)
    grammar_from, grammar = request_grammar(req) or (None, None)  # checked against the tokenizer by the gateway
    if not prompt_ids:
        raise _bad("the prompt is empty", "prompt")
    room = max_context - len(prompt_ids)
    if room < 1:
        raise ApiError(
            400,
            f"this model's maximum context length is {max_context} tokens; the prompt has {len(prompt_ids)}",
            param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    if prompt_logprobs is not None and not prompt_logprobs_fit(len(prompt_ids), prompt_logprobs):
        longest = PROMPT_LOGPROBS_BYTES // (4 + 8 * prompt_logprobs) + 1
        raise _bad(f"echo with logprobs={prompt_logprobs} supports prompts of at most {longest} tokens; "
                   f"the prompt has {len(prompt_ids)}", "echo")
    if max_tokens is not None:
        # 0 with echo: the prompt alone (with its logprobs, when asked: a prompt's score)
        if max_tokens < 0 or (max_tokens == 0 and not echo):
            raise _bad("max_tokens must be at least 1 (0 only with echo)", "max_tokens")
        if max_tokens > room:
            raise ApiError(
                400,
                f"this model's maximum context length is {max_context} tokens; the prompt has "
                f"{len(prompt_ids)} and max_tokens is {max_tokens}",
                param="max_tokens",
                code="context_length_exceeded",
            )
    else:
        max_tokens = min(room, default_max_tokens) if default_max_tokens else room
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=req.seed,
        stop_token_ids=stop_ids,
        ignore_eos=bool(req.ignore_eos),
        presence_penalty=presence,
        frequency_penalty=frequency,
        repetition_penalty=repetition,
        n=n,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        grammar=grammar,
    )
    return Normalized(
        prompt_token_ids=prompt_ids,
        sampling=sampling,
        stop=_stops(req.stop),
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
        slo=slo,
        echo=echo,
        grammar_from=grammar_from,
        session_id=session,
    )


def chat_messages(req: ChatCompletionRequest | TokenizeRequest) -> list[dict]:
    """The request's messages as the chat template takes them."""
    messages = req.messages or []
    if not messages:
        raise _bad("messages must not be empty", "messages")
    if len(messages) > MAX_MESSAGES:
        raise _bad(f"at most {MAX_MESSAGES} messages are supported", "messages")
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant"):
            raise _bad(f"unsupported role {m.role!r}", f"messages.[{i}].role")
        if isinstance(m.content, list):
            texts = []
            for p in m.content:
                if p.type != "text" or p.text is None:
                    raise _bad("only text content parts are supported", f"messages.[{i}].content")
                texts.append(p.text)
            content = "".join(texts)
        else:
            content = m.content or ""
        out.append({"role": role, "content": content, **({"name": m.name} if m.name is not None else {})})
    return out


def completion_prompt(req: CompletionRequest, vocab_size: int) -> str | list[int]:
    p = req.prompt
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise _bad(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", "prompt")
        return p
    if isinstance(p, list) and not p:
        raise _bad("the prompt is empty", "prompt")
    raise _bad("prompt must be a string, a list of token ids, or a list of one of those (a batch of one)", "prompt")


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> list[int]:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise _bad(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", param)
    return ids


def tokenize_input(req: TokenizeRequest) -> str:
    """Which input a /tokenize request gives ("prompt" or "messages"): exactly one of them."""
    if (req.prompt is None) == (req.messages is None):
        raise _bad("give either prompt or messages", "prompt" if req.prompt is None else "messages")
    if req.messages is not None and req.add_special_tokens:
        raise _unsupported("add_special_tokens is not supported with messages (the chat template places "
                           "the special tokens)", "add_special_tokens")
    return "prompt" if req.prompt is not None else "messages"


# ---------------------------------------------------------------- responses
def model_card(served: str, root: str, created: int, max_model_len: int) -> dict:
    """A /v1/models entry with vLLM's fields: ``id`` is the name clients send, ``root`` the model
    it serves."""
    return {"id": served, "object": "model", "created": created, "owned_by": "yuebing", "root": root,
            "parent": None, "max_model_len": max_model_len}


def tokenize_body(ids: list[int], max_model_len: int, token_strs: list[str] | None) -> dict:
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": token_strs}


def ended_by_stop_token(token: int, finish_reason: str | None, stop_token_ids: list[int]) -> bool:
    """Whether ``token``, the last of its request, is one of the request's ``stop_token_ids``: its
    text is then left out of the output (as vLLM does), though it counts as a completion token."""
    return finish_reason == "stop" and token in stop_token_ids
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _floor(logprob: float) -> float:
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR  # -inf too (a NaN stays NaN)


def chat_logprobs(token_ids: list[int], lps: list[TokenLogprobs], text) -> list[dict]:
    """OpenAI's ``choices[].logprobs.content`` entries of ``token_ids``: each token, its logprob,
    its bytes and its position's most likely tokens, most likely first. ``text(id)`` gives a
    token's (string, bytes)."""
    out = []
    for tid, lp in zip(token_ids, lps):
        token, raw = text(tid)
        top = []
        for i, v in zip(lp.top_ids, lp.top_logprobs):
            t, b = text(i)
            top.append({"token": t, "logprob": _floor(v), "bytes": b})
        out.append({"token": token, "logprob": _floor(lp.logprob), "bytes": raw, "top_logprobs": top})
    return out


class CompletionLogprobs:
    """A completion choice's ``logprobs`` as OpenAI's legacy API and vLLM give it: ``tokens``,
    ``token_logprobs``, ``top_logprobs`` (per position a token -> logprob object of its most likely
    tokens and the token itself; null, as its logprob, for the prompt's first token, which nothing
    precedes) and ``text_offset`` (where each token's text starts: the token strings' lengths summed,
    from the first chunk's offset on)."""

    def __init__(self, text, offset: int = 0):
        self.text = text  # token id -> (string, bytes)
        self.offset = offset

    def body(self, entries: list[tuple[int, TokenLogprobs | None]], offset: int | None = None) -> dict:
        """The object for ``entries`` (token id, its logprobs or None), its offsets from ``offset``
        (default: where the previous call's ended)."""
        if offset is not None:
            self.offset = offset
        tokens, logprobs, tops, offsets = [], [], [], []
        for tid, lp in entries:
            token = self.text(tid)[0]
            tokens.append(token)
            offsets.append(self.offset)
            self.offset += len(token)
            if lp is None:
                logprobs.append(None)
                tops.append(None)
                continue
            logprobs.append(_floor(lp.logprob))
            top = {self.text(i)[0]: _floor(v) for i, v in zip(lp.top_ids, lp.top_logprobs)}
            top.setdefault(token, _floor(lp.logprob))  # the sampled token's, whatever its rank
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def prompt_entries(prompt: list[int], rows: list[tuple[float, list[int], list[float]]] | None
                   ) -> list[tuple[int, TokenLogprobs | None]]:
    """An echoed prompt's positions for ``CompletionLogprobs``: its first token without logprobs,
    the others with theirs (``rows``, ``PromptLogprobs.rows()``)."""
    out: list[tuple[int, TokenLogprobs | None]] = [(prompt[0], None)]
    for tid, (lp, ids, vals) in zip(prompt[1:], rows or []):
        out.append((tid, TokenLogprobs(lp, ids, vals)))
    return out


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None, index: int = 0,
               logprobs: list[dict] | None = None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta,
                     "logprobs": {"content": logprobs} if logprobs is not None else None,
                     "finish_reason": finish_reason}],
    }


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None, index: int = 0,
                     logprobs: dict | None = None) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def chat_choice(index: int, text: str, finish_reason: str, logprobs: list[dict] | None = None) -> dict:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": {"content": logprobs} if logprobs is not None else None,
        "finish_reason": finish_reason,
    }


def completion_choice(index: int, text: str, finish_reason: str, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_body(rid: str, model: str, created: int, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": use}


def completion_body(rid: str, model: str, created: int, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": use}


def now() -> int:
    return int(time.time())
