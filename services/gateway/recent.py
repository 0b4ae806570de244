"""What happened to the gateway's recent requests, for its dashboard: plain logic with no I/O (the
caller passes the wall clock).

``RecentRequests`` keeps the last requests with their placement decision (the instances chosen and
what the conductor predicted) beside what they turned out to be, and the outcome of every request
of the last ``window`` seconds, from which it draws per-bucket series: TTFT and TBT percentiles,
SLO attainment, and rejections by reason.

A request's outcome is one of ``done`` (its SLOs met or not), ``failed`` (placed, then failed: its
SLOs missed), ``rejected`` (not admitted: missed) or ``cancelled`` (its client left: not counted in
the attainment). Attainment is the share of requests that met their SLOs among those that ended
done, failed or rejected: a request the admission turned away counts as missed.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from libs.protocol import Prediction, ScheduleReply

COUNTED = ("done", "failed", "rejected")  # the outcomes the attainment counts


@dataclass
class RequestRecord:
    """One request as the dashboard lists it."""

    id: str
    arrived: float  # wall clock: when it was placed (or turned away)
    prompt_tokens: int = 0
    status: str = "running"  # running | done | failed | rejected | cancelled
    prefill: str = ""
    decode: str = ""
    prediction: Prediction | None = None
    ended: float | None = None
    ttft: float | None = None
    tbt: float | None = None
    cached_tokens: int = 0
    output_tokens: int = 0
    slo_met: bool | None = None
    finish_reason: str = ""
    error: str = ""  # a failure's or a rejection's message
    reason: str = ""  # a rejection's reason label

    def as_dict(self) -> dict:
        p = self.prediction
        return {
            "id": self.id, "arrived": self.arrived, "status": self.status, "prompt_tokens": self.prompt_tokens,
            "prefill": self.prefill, "decode": self.decode,
            "predicted": None if p is None else {
                "ttft": p.ttft, "queue": p.queue, "compute": p.compute, "load": p.load, "tbt": p.tbt,
                "plan": p.plan, "peer": p.peer_id, "reused_tokens": p.reused_tokens},
            "ttft": self.ttft, "tbt": self.tbt, "cached_tokens": self.cached_tokens,
            "output_tokens": self.output_tokens, "slo_met": self.slo_met, "finish_reason": self.finish_reason,
            "error": self.error, "reason": self.reason,
            "seconds": None if self.ended is None else max(0.0, self.ended - self.arrived),
        }


@dataclass(frozen=True)
class Outcome:
    """A request that ended, as the series count it."""

    at: float
    status: str
    met: bool
    ttft: float | None = None
    tbt: float | None = None
    reason: str = ""


@dataclass
class RecentRequests:
    window: float = 300.0  # seconds of outcomes the series cover
    bucket: float = 10.0  # seconds per point of the series
    keep: int = 50  # requests listed
    max_running: int = 10_000  # requests followed until they end (the oldest forgotten past it)
    _listed: deque = field(init=False)
    _running: OrderedDict = field(init=False, default_factory=OrderedDict)
    _outcomes: deque = field(init=False, default_factory=deque)
    rejections_total: Counter = field(init=False, default_factory=Counter)
    last_rejection: dict = field(init=False, default_factory=dict)  # reason -> its last message

    def __post_init__(self) -> None:
        if self.window <= 0 or self.bucket <= 0:
            raise ValueError("window and bucket must be positive")
        self._listed = deque(maxlen=self.keep)

    # ---- what happens to a request
    def placed(self, rid: str, prompt_tokens: int, reply: ScheduleReply, now: float) -> None:
        """A request admitted and placed (its first attempt)."""
        rec = RequestRecord(rid, now, prompt_tokens, prefill=reply.prefill_id, decode=reply.decode_id,
                            prediction=reply.prediction)
        self._running[rid] = rec
        while len(self._running) > self.max_running:
            self._running.popitem(last=False)
        self._listed.append(rec)

    def rejected(self, rid: str, reason: str, message: str, now: float, prompt_tokens: int = 0) -> None:
        """A request not admitted (``reason``: a short label, e.g. the SLO it would miss)."""
        rec = RequestRecord(rid, now, prompt_tokens, status="rejected", ended=now, slo_met=False, error=message,
                            reason=reason)
        self._listed.append(rec)
        self.rejections_total[reason] += 1
        self.last_rejection[reason] = message
        self._outcome(Outcome(now, "rejected", False, reason=reason))

    def finished(self, rid: str, now: float, *, ttft: float | None, tbt: float | None, met: bool,
                 cached_tokens: int = 0, output_tokens: int = 0, finish_reason: str = "") -> None:
        rec = self._running.pop(rid, None)
        if rec is not None:
            rec.status, rec.ended, rec.ttft, rec.tbt, rec.slo_met = "done", now, ttft, tbt, met
            rec.cached_tokens, rec.output_tokens, rec.finish_reason = cached_tokens, output_tokens, finish_reason
        self._outcome(Outcome(now, "done", met, ttft, tbt))

    def failed(self, rid: str, message: str, now: float, ttft: float | None = None) -> None:
        """A placed request that failed (a request never placed is not followed: nothing to do)."""
        rec = self._running.pop(rid, None)
        if rec is None:
            return
        rec.status, rec.ended, rec.error, rec.slo_met, rec.ttft = "failed", now, message, False, ttft
        self._outcome(Outcome(now, "failed", False, ttft))

    def cancelled(self, rid: str, now: float) -> None:
        """Its client went away before the end."""
        rec = self._running.pop(rid, None)
        if rec is not None:
            rec.status, rec.ended = "cancelled", now
            self._outcome(Outcome(now, "cancelled", False))

    def _outcome(self, o: Outcome) -> None:
        self._outcomes.append(o)
        self._prune(o.at)

    def _prune(self, now: float) -> None:
        cutoff = now - self.window
        while self._outcomes and self._outcomes[0].at < cutoff:
            self._outcomes.popleft()

    # ---- what the dashboard shows
    def last(self) -> list[dict]:
        """The last requests, newest first."""
        return [r.as_dict() for r in reversed(self._listed)]

    def running(self) -> int:
        return len(self._running)

    def series(self, now: float) -> dict:
        """Per bucket of the window, oldest first: its start (wall clock), the TTFT and TBT p50 and
        p90 of the requests done in it (None: none), the SLO attainment (None: nothing counted),
        and how many requests ended done, failed and rejected."""
        self._prune(now)
        n = int(np.ceil(self.window / self.bucket))
        end = np.floor(now / self.bucket) * self.bucket + self.bucket  # the current bucket's end
        start = end - n * self.bucket
        buckets: list[list[Outcome]] = [[] for _ in range(n)]
        for o in self._outcomes:
            i = int((o.at - start) // self.bucket)
            if 0 <= i < n:
                buckets[i].append(o)
        out = {k: [] for k in ("t", "ttft_p50", "ttft_p90", "tbt_p50", "tbt_p90", "attainment", "done", "failed",
                               "rejected")}
        for i, b in enumerate(buckets):
            out["t"].append(float(start + i * self.bucket))
            ttfts = [o.ttft for o in b if o.status == "done" and o.ttft is not None]
            tbts = [o.tbt for o in b if o.status == "done" and o.tbt is not None]
            out["ttft_p50"].append(_pct(ttfts, 50))
            out["ttft_p90"].append(_pct(ttfts, 90))
            out["tbt_p50"].append(_pct(tbts, 50))
            out["tbt_p90"].append(_pct(tbts, 90))
            counted = [o for o in b if o.status in COUNTED]
            out["attainment"].append(sum(o.met for o in counted) / len(counted) if counted else None)
            for status in ("done", "failed", "rejected"):
                out[status].append(sum(1 for o in b if o.status == status))
        return out

    def totals(self, now: float) -> dict:
        """Over the whole window: TTFT and TBT percentiles, attainment, outcomes counted."""
        self._prune(now)
        done = [o for o in self._outcomes if o.status == "done"]
        ttfts = [o.ttft for o in done if o.ttft is not None]
        tbts = [o.tbt for o in done if o.tbt is not None]
        counted = [o for o in self._outcomes if o.status in COUNTED]
        statuses = Counter(o.status for o in self._outcomes)
        return {"ttft_p50": _pct(ttfts, 50), "ttft_p90": _pct(ttfts, 90), "tbt_p50": _pct(tbts, 50),
                "tbt_p90": _pct(tbts, 90),
                "attainment": sum(o.met for o in counted) / len(counted) if counted else None,
                **{s: statuses.get(s, 0) for s in ("done", "failed", "rejected", "cancelled")}}

    def rejections(self, now: float) -> list[dict]:
        """Rejections by reason: in the window and since the gateway started, with the last message."""
        self._prune(now)
        window = Counter(o.reason for o in self._outcomes if o.status == "rejected")
        return [{"reason": r, "window": window.get(r, 0), "total": n, "last": self.last_rejection.get(r, "")}
                for r, n in sorted(self.rejections_total.items(), key=lambda kv: (-kv[1], kv[0]))]


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None
