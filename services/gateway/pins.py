"""Operators' pins of a prefix (``POST /cache/pins``, ``DELETE /cache/pins``): the request and its
checks. The gateway turns the prefix into its block keys and asks every cachestore instance to keep
them (``CachePinRequest``) until the time to live runs out; pinned blocks are never evicted."""

from __future__ import annotations

import msgspec

from services.gateway.errors import ApiError
from services.gateway.openai import ChatMessage

MAX_PIN_TTL = 7 * 24 * 3600.0  # a week: a pin outliving that is a configuration, not a pin


class PinRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A prefix to pin: a text prompt (tokenized as /v1/completions does), token ids, or chat
    messages (the chat template applied without a generation prompt: a system prompt's blocks are
    those every conversation starting with it shares)."""

    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None
    ttl_seconds: float | None = None  # POST: required


def check(req: PinRequest, pinning: bool) -> None:
    """A 400 naming the field for a request that gives no prefix or two, or a bad time to live."""
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "give either prompt or messages", param="prompt" if req.prompt is None else "messages",
                       code="invalid_value")
    if not pinning:
        if req.ttl_seconds is not None:
            raise ApiError(400, "ttl_seconds applies to a pin (POST), not to its removal", param="ttl_seconds",
                           code="invalid_value")
        return
    if req.ttl_seconds is None or not 0 < req.ttl_seconds <= MAX_PIN_TTL:
        raise ApiError(400, f"ttl_seconds must be in (0, {MAX_PIN_TTL:.0f}]", param="ttl_seconds",
                       code="invalid_value")
