"""The benchmarks' client for OpenAI-compatible servers: one streaming completion, and what arrived when.

``bench serve``, ``bench prefix`` and the trace replay (``bench.replay``) all send streaming
``/v1/completions`` requests and read the server-sent events the same way, through
:func:`stream_completion`. It records, per request: the HTTP status and ``Retry-After``, when the first
SSE data event arrived, when every output token arrived, ``usage``, the finish reason and any error
(a non-200 status with its OpenAI-style ``{"error": {...}}`` body, an ``{"error": ...}`` event inside
the stream, or a broken connection).

How tokens are counted. A data event (one JSON object on one ``data:`` line) brings:

- as many tokens as its ``logprobs`` lists (``logprobs.tokens`` of a completion, ``logprobs.content``
  of a chat chunk), when the server sends them;
- otherwise, when the event carries ``usage`` next to its choices (a running count, as vLLM's
  ``continuous_usage_stats``, or a final one), the tokens of ``usage.completion_tokens`` not credited
  to earlier events;
- otherwise one token if it carries text (``choices[0].text`` or ``choices[0].delta.content``), none if not.

Several tokens in one event arrive at the same instant, so they are recorded as that many arrivals at
the event's time. yuebing's gateway writes one event per token whose text is not empty; a token that
decodes to no text yet (half of a UTF-8 character) reaches the client inside the next event, and the
finishing event (empty text, ``finish_reason`` set) carries no token. So the arrivals counted can be
fewer than ``usage.completion_tokens``: callers compare the two (see ``StreamResult.unattributed``).
When no event carried text at all but the server reports output tokens, the first token is taken to
have arrived with the finishing event.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson

ERROR_TEXT_LIMIT = 300  # characters of an error body kept in ``StreamResult.error``


@dataclass
class StreamResult:
    """One streaming request as the client saw it; every time is a ``clock()`` reading."""

    sent: float
    status: int | None = None  # None: no HTTP response (the connection failed)
    retry_after: float | None = None  # seconds, from the ``Retry-After`` header
    first_event: float | None = None  # the first SSE data event of any kind ([DONE] included)
    token_times: list[float] = field(default_factory=list)  # one entry per token arrival, in order
    chunks: int = 0  # data events that brought at least one token
    text: str = ""  # the first choice's text (chat's delta content, completions' text), as streamed
    finish_reason: str | None = None
    finish_time: float | None = None  # the first event with a finish_reason
    usage: dict | None = None
    request_id: str = ""
    done: bool = False  # the stream ended with ``data: [DONE]``
    ended: float | None = None  # the response was over (or failed)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """HTTP 200 and the stream ran to its end without an error."""
        return self.status == 200 and self.error is None

    @property
    def prompt_tokens(self) -> int | None:
        return _usage_int(self.usage, "prompt_tokens")

    @property
    def completion_tokens(self) -> int | None:
        return _usage_int(self.usage, "completion_tokens")

    @property
    def cached_tokens(self) -> int | None:
        """``usage.prompt_tokens_details.cached_tokens`` (0 when usage has no details; None without usage)."""
        if self.usage is None:
            return None
        details = self.usage.get("prompt_tokens_details") or {}
        return int(details.get("cached_tokens") or 0)

    @property
    def unattributed(self) -> int:
        """Output tokens the server reports that no event could be credited with (see the module doc)."""
        n = self.completion_tokens
        return max(0, n - len(self.token_times)) if n is not None else 0


def _usage_int(usage: dict | None, key: str) -> int | None:
    if usage is None or usage.get(key) is None:
        return None
    return int(usage[key])


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header in seconds: delta-seconds, or an HTTP date counted from ``now`` (unix time)."""
    if not value:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_message(status: int, body: bytes) -> str:
    """``HTTP <status>: <message>`` from an OpenAI-style error body, or from the start of any other body."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and obj.get("error") is not None:
        return f"HTTP {status}: {_event_error(obj['error'])}"
    return f"HTTP {status}: {body[:ERROR_TEXT_LIMIT].decode(errors='replace')}"


def _event_error(err: Any) -> str:
    if isinstance(err, dict):
        return str(err.get("message") or err)[:ERROR_TEXT_LIMIT]
    return str(err)[:ERROR_TEXT_LIMIT]


class TokenCounter:
    """How many output tokens each data event of one stream brings (the rules in the module doc)."""

    def __init__(self) -> None:
        self.credited = 0  # tokens credited to the events so far

    def tokens(self, event: dict) -> int:
        n = self._count(event)
        self.credited += n
        return n

    def _count(self, event: dict) -> int:
        choices = event.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            return 0  # e.g. the final usage-only event
        choice = choices[0]
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            listed = logprobs.get("tokens") if logprobs.get("tokens") is not None else logprobs.get("content")
            if isinstance(listed, list):
                return len(listed)
        usage = event.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            # a running count (or a final one next to the last choice): only what is not credited yet
            return max(0, int(usage["completion_tokens"]) - self.credited)
        delta = choice.get("delta")
        text = choice.get("text") or (delta.get("content") if isinstance(delta, dict) else None)
        return 1 if text else 0


def _on_event(res: StreamResult, counter: TokenCounter, payload: bytes, at: float) -> bool:
    """Take one data event into ``res``; False when the stream is over ([DONE] or data that is not JSON)."""
    if res.first_event is None:
        res.first_event = at
    if payload == b"[DONE]":
        res.done = True
        return False
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        res.error = f"not JSON in the stream: {payload[:ERROR_TEXT_LIMIT]!r}"
        return False
    if not isinstance(event, dict):
        return True
    if res.error is not None:
        return True  # after an error event: read on to the end of the stream, taking nothing more
    if event.get("error") is not None:
        res.error = _event_error(event["error"])
        return True
    res.request_id = res.request_id or str(event.get("id") or "")
    n = counter.tokens(event)
    if n:
        res.chunks += 1
        res.token_times.extend([at] * n)
    if event.get("usage"):
        res.usage = event["usage"]
    choices = event.get("choices") or []
    if choices and isinstance(choices[0], dict) and not choices[0].get("index"):
        delta = choices[0].get("delta")
        res.text += choices[0].get("text") or (delta.get("content") if isinstance(delta, dict) else None) or ""
    reason = choices[0].get("finish_reason") if choices and isinstance(choices[0], dict) else None
    if reason and res.finish_reason is None:
        res.finish_reason, res.finish_time = reason, at
    return True


def _finish(res: StreamResult, at: float) -> None:
    res.ended = at
    if res.error is None and not (res.done or res.finish_reason or res.usage):
        res.error = "the stream ended before [DONE]"
    if not res.token_times and res.finish_time is not None and (res.completion_tokens or 0) > 0:
        res.token_times.append(res.finish_time)  # every token's text was empty: it came with the finish


async def stream_completion(session, url: str, body: dict, *,
                            clock: Callable[[], float] = time.perf_counter) -> StreamResult:
    """POST ``body`` (a streaming request) to ``url`` with the aiohttp ``session``; never raises for a
    failed request: the failure is in ``StreamResult.error``."""
    res = StreamResult(sent=clock())
    counter = TokenCounter()
    try:
        async with session.post(url, json=body) as r:
            res.status = r.status
            res.retry_after = parse_retry_after(r.headers.get("Retry-After"))
            if r.status != 200:
                res.error = error_message(r.status, await r.read())
                res.ended = clock()
                return res
            async for raw in r.content:
                line = raw.strip()
                if line.startswith(b"data:") and not _on_event(res, counter, line[5:].lstrip(), clock()):
                    break
    except Exception as e:  # noqa: BLE001 - a failed request is a measurement, not a crashed benchmark
        res.error = res.error or repr(e)
    _finish(res, clock())
    return res


async def first_model(session, base: str) -> dict:
    """The first entry of ``GET {base}/v1/models`` (``base``: the server's root URL)."""
    async with session.get(base.rstrip("/") + "/v1/models") as r:
        r.raise_for_status()
        return (await r.json())["data"][0]
