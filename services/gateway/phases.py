"""A request's phases as the gateway times them, for its metrics. Plain logic: the caller passes
each token event and when it came.

Each phase is a difference of two clocks on one host, never across hosts: the gateway's own clock
gives the time to the first token and from there to decode's first token; the prefill instance says
how long it held the prompt before its first token (``TokenEvent.prefill_seconds``), the decode
instance how long after it had the KV its first token came (``since_kv_seconds``). So

- queue: arrival to the prefill instance taking the prompt up = time to first token - prefill;
- prefill: the prefill instance taking the prompt up to its first token;
- KV transfer: first token to the decode instance having the KV (and task) = the gap from the first
  token to decode's first token - that wait and step on decode;
- decode: first token to last (vLLM's: the KV transfer is part of it);
- inference: prefill + decode.

A phase an event did not time (a sender that predates these fields, a request that never reached
decode) is left out rather than guessed. A resumed request keeps the times of its first attempt.
"""

from __future__ import annotations

from dataclasses import dataclass

from libs.protocol import TokenEvent


@dataclass
class PhaseTimes:
    started: float  # the request's arrival (the gateway's monotonic clock)
    first_at: float | None = None  # its first token (any choice)
    last_at: float | None = None  # its last token
    prefill: float | None = None  # from the first prefill event that timed it
    decode_first_at: float | None = None  # decode's first token
    since_kv: float | None = None  # on decode: KV in hand to that token

    def event(self, ev: TokenEvent, now: float) -> None:
        """Take in a token event that came at ``now``."""
        if self.prefill is None and ev.prefill_seconds is not None:
            self.prefill = ev.prefill_seconds
        if self.since_kv is None and ev.since_kv_seconds is not None:
            self.since_kv, self.decode_first_at = ev.since_kv_seconds, now
        if ev.token_ids:
            if self.first_at is None:
                self.first_at = now
            self.last_at = now

    def phases(self) -> dict[str, float]:
        """Seconds of each phase timed (queue, prefill, kv_transfer, decode, inference)."""
        out: dict[str, float] = {}
        if self.first_at is None:
            return out
        if self.prefill is not None:
            out["prefill"] = self.prefill
            out["queue"] = max(0.0, self.first_at - self.started - self.prefill)
        if self.decode_first_at is not None:
            out["kv_transfer"] = max(0.0, self.decode_first_at - self.first_at - self.since_kv)
        out["decode"] = self.last_at - self.first_at
        if self.prefill is not None:
            out["inference"] = self.prefill + out["decode"]
        return out
