"""The admission decision: admit or reject a request at arrival.

Plain logic with no I/O. Mooncake's overload handling: a request is rejected at arrival, before any
work is spent on it, when its best predicted TTFT is over the TTFT SLO, or when decode would be
over the TBT SLO. ``early`` judges decode by its load now; ``predictive`` judges it by its load
projected to when the request would reach decode (``projector.py``), so a decode pool that is busy
now but will have drained by then does not cause a rejection, and one that is idle now but will
be flooded by the prefills already under way does.
"""

from __future__ import annotations

from dataclasses import dataclass

from libs.config import SLO

ADMISSION_MODES = ("none", "early", "predictive")


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    status: int = 200
    reason: str = ""
    retry_after: float = 0.0
    cause: str = ""  # "ttft" | "tbt" when rejected


class AdmissionController:
    """Admit or reject at arrival; counts what it decided."""

    def __init__(self, mode: str = "predictive"):
        if mode not in ADMISSION_MODES:
            raise ValueError(f"unknown admission mode {mode!r}; choose one of {', '.join(ADMISSION_MODES)}")
        self.mode = mode
        self.admitted = 0
        self.rejected = {"ttft": 0, "tbt": 0}

    def decide(self, slo: SLO, ttft: float, tbt_now: float, tbt_projected: float,
               tbt_retry: float = 1.0, projection_checked: bool = True, delays: int = 0) -> Verdict:
        """``ttft``: best predicted TTFT; ``tbt_now``: predicted time between tokens on the chosen
        decode instance with this request added to its load now; ``tbt_projected``: the same with
        the load projected to when this request reaches it; ``tbt_retry``: seconds until that
        instance is expected to shed load. ``projection_checked``: whether the projection has yet
        been compared with enough outcomes (``WaitErrorModel.learnt``); until it has, ``predictive``
        does not let a forecast of decode draining admit what the load now would reject.
        ``delays``: admitted requests this one would push past their TBT objective, as projected
        (``predictive`` rejects it then)."""
        if self.mode != "none":
            if slo.ttft > 0 and ttft > slo.ttft:
                return self._reject("ttft", f"the predicted time to first token ({ttft:.2f}s) exceeds the "
                                    f"{slo.ttft:g}s objective; the prefill instances are overloaded",
                                    max(1.0, ttft - slo.ttft))
            if self.mode == "predictive":
                tbt = tbt_projected if projection_checked else max(tbt_now, tbt_projected)
            else:
                tbt = tbt_now
            if slo.tbt > 0 and tbt > slo.tbt:
                return self._reject("tbt", f"the predicted time between tokens ({tbt:.3f}s) exceeds the "
                                    f"{slo.tbt:g}s objective; the decode instances are overloaded",
                                    max(1.0, tbt_retry))
            if self.mode == "predictive" and slo.tbt > 0 and delays > 0:
                return self._reject("tbt", f"it would delay {delays} admitted request(s) past their time "
                                    "between tokens objective; the decode instances are overloaded",
                                    max(1.0, tbt_retry))
        self.admitted += 1
        return Verdict(True)

    def _reject(self, cause: str, reason: str, retry_after: float) -> Verdict:
        self.rejected[cause] += 1
        return Verdict(False, status=429, reason=reason, retry_after=round(retry_after, 1), cause=cause)
