"""The OpenAI-compatible surface: request schemas, validation, errors and response bodies."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from libs.config import SLO
from libs.protocol import SamplingParams

MAX_MESSAGES = 1024
MAX_JSON_DEPTH = 16
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


class ApiError(Exception):
    """An error surfaced to the client as ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "invalid_request_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
        }.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = None
    slo_class: str | None = None  # extension: the request class whose latency objectives apply


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[Any]


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
    try:
        return msgspec.convert(obj, typ)
    except msgspec.ValidationError as e:
        text = str(e)
        m = _PATH.search(text)
        param = m.group(1) if m else None
        if text.startswith("Object missing required field"):
            field = text.split("`")[1]
            param = f"{param}.{field}" if param else field
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


def normalize(req: _Common, prompt_ids: list[int], max_context: int, max_tokens: int | None,
              default_max_tokens: int | None, slo: SLO = SLO(), slo_classes: dict[str, SLO] | None = None) -> Normalized:
    """Check sampling parameters, the context budget and the SLO class; build SamplingParams.
    ``slo`` applies to requests without a class; ``slo_classes`` are the classes a request may name."""
    if req.slo_class is not None:
        classes = slo_classes or {}
        if req.slo_class not in classes:
            known = ", ".join(sorted(classes)) or "none are configured"
            raise _bad(f"unknown slo_class {req.slo_class[:64]!r} ({known})", "slo_class")
        slo = classes[req.slo_class]
    if req.n not in (None, 1):
        raise _bad("only n=1 is supported", "n")
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
    if max_tokens is not None:
        if max_tokens <= 0:
            raise _bad("max_tokens must be at least 1", "max_tokens")
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
        ignore_eos=bool(req.ignore_eos),
    )
    return Normalized(
        prompt_token_ids=prompt_ids,
        sampling=sampling,
        stop=_stops(req.stop),
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
        slo=slo,
    )


def chat_messages(req: ChatCompletionRequest) -> list[dict]:
    if not req.messages:
        raise _bad("messages must not be empty", "messages")
    if len(req.messages) > MAX_MESSAGES:
        raise _bad(f"at most {MAX_MESSAGES} messages are supported", "messages")
    out = []
    for i, m in enumerate(req.messages):
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
        out.append({"role": role, "content": content})
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
    raise _bad("prompt must be a string, a list of token ids, or a list of one of those (n=1)", "prompt")


# ---------------------------------------------------------------- responses
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def chat_body(rid: str, model: str, created: int, text: str, finish_reason: str, use: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": use,
    }


def completion_body(rid: str, model: str, created: int, text: str, finish_reason: str, use: dict) -> dict:
    body = completion_chunk(rid, model, created, text, finish_reason)
    body["usage"] = use
    return body


def now() -> int:
    return int(time.time())
