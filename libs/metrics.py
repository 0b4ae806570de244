"""Prometheus metrics, named the way operators of vLLM know them (``yuebing:`` prefix)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from .stats import nearest_rank

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

TTFT = Histogram("yuebing:time_to_first_token_seconds", "Time to first token, as seen by the gateway",
                 buckets=_LATENCY_BUCKETS)
ITL = Histogram("yuebing:inter_token_latency_seconds", "Time between two output tokens of a request",
                buckets=_ITL_BUCKETS)
E2E = Histogram("yuebing:e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS)
REQUESTS_RUNNING = Gauge("yuebing:num_requests_running", "Requests the gateway is serving")
SUCCESS = Counter("yuebing:request_success", "Finished requests", ["finished_reason"])
REJECTED = Counter("yuebing:request_rejected", "Requests refused before any work", ["reason"])
PROMPT_TOKENS = Counter("yuebing:prompt_tokens", "Prompt tokens of finished requests")
GENERATION_TOKENS = Counter("yuebing:generation_tokens", "Generated tokens of finished requests")
SLO_REQUESTS = Counter("yuebing:slo_requests", "Finished requests, by whether they met their TTFT and TBT objectives",
                       ["result"])
WASTED_PREFILL = Counter("yuebing:prefill_wasted_tokens",
                         "Prompt tokens computed for requests that then missed an objective or failed")


def request_tbt(gaps: list[float]) -> float | None:
    """A request's time between tokens as Mooncake measures it: the 90th percentile of the gaps
    between its consecutive output tokens (nearest rank). None with fewer than two tokens."""
    return nearest_rank(gaps, 90) if gaps else None
