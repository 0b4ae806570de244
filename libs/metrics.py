"""Prometheus metrics, named the way operators of vLLM know them (``yuebing:`` prefix), each
exported with the served model's name as its ``model_name`` label (``ModelLabelled``).

The gateway's are here; each service declares its own beside its code (``services/*/service.py``).
docs/metrics.md lists them all, and deploy/grafana/yuebing.json charts them.
"""

from __future__ import annotations

import copy
import weakref

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from libs.stats import nearest_rank, nearest_rank_index

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

TTFT = Histogram("yuebing:time_to_first_token_seconds", "Time to first token, as seen by the gateway",
                 buckets=_LATENCY_BUCKETS)
ITL = Histogram("yuebing:inter_token_latency_seconds", "Time between two output tokens of a request",
                buckets=_ITL_BUCKETS)
E2E = Histogram("yuebing:e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS)
RESTARTS = Gauge("yuebing:instance_restarts", "Times its supervisor (yuebing up) has restarted this instance",
                 ["kind", "instance"])
# vLLM's num_requests_running is a batch's rows: decode's yuebing:num_requests_running here
REQUESTS_RUNNING = Gauge("yuebing:gateway_requests_running", "Requests the gateway is serving")
SUCCESS = Counter("yuebing:request_success", "Finished requests", ["finished_reason"])
REJECTED = Counter("yuebing:request_rejected", "Requests refused before any work", ["reason"])
PROMPT_TOKENS = Counter("yuebing:prompt_tokens", "Prompt tokens of finished requests")
PROMPT_TOKENS_CACHED = Counter("yuebing:prompt_tokens_cached",
                               "Prompt tokens of finished requests whose KV was reused (their usage's cached_tokens)")
GENERATION_TOKENS = Counter("yuebing:generation_tokens", "Generated tokens of finished requests")
SLO_REQUESTS = Counter("yuebing:slo_requests", "Finished requests, by whether they met their TTFT and TBT objectives",
                       ["result"])
WASTED_PREFILL = Counter("yuebing:prefill_wasted_tokens",
                         "Prompt tokens computed for requests that then missed an objective or failed")
# a finished request's phases, as the gateway sees them (services/gateway/phases.py); vLLM's names,
# and its meaning of decode: first token to last, which a request's KV transfer is part of
_KV_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUEUE_TIME = Histogram("yuebing:request_queue_time_seconds",
                       "Arrival at the gateway to its prefill instance taking the prompt up (scheduling and queue)",
                       buckets=_LATENCY_BUCKETS)
PREFILL_TIME = Histogram("yuebing:request_prefill_time_seconds",
                         "Prefill instance taking the prompt up to its first token sent", buckets=_LATENCY_BUCKETS)
KV_TRANSFER_TIME = Histogram("yuebing:request_kv_transfer_time_seconds",
                             "First token to the decode instance holding the request's KV and task (requests "
                             "that reach decode)", buckets=_KV_BUCKETS)
DECODE_TIME = Histogram("yuebing:request_decode_time_seconds", "First token to last token",
                        buckets=_LATENCY_BUCKETS)
INFERENCE_TIME = Histogram("yuebing:request_inference_time_seconds", "Prefill taking the prompt up to the last token",
                           buckets=_LATENCY_BUCKETS)
PHASES = {"queue": QUEUE_TIME, "prefill": PREFILL_TIME, "kv_transfer": KV_TRANSFER_TIME, "decode": DECODE_TIME,
          "inference": INFERENCE_TIME}


def observe_phases(phases: dict[str, float]) -> None:
    """A finished request's phases (``services.gateway.phases.PhaseTimes.phases``)."""
    for name, seconds in phases.items():
        PHASES[name].observe(seconds)


def request_tbt(gaps: list[float]) -> float | None:
    """A request's time between tokens as Mooncake measures it: the 90th percentile of the gaps
    between its consecutive output tokens (nearest rank). None with fewer than two tokens."""
    return nearest_rank(gaps, 90) if gaps else None


def largest_gap_counts(tokens: int) -> bool:
    """Whether every gap of a request of ``tokens`` output tokens counts in its TBT
    (``request_tbt``): with nine gaps or fewer the 90th percentile is the largest, so a wait of one
    step, e.g. its first gap's wait for a decode row, is its TBT; with more it falls outside."""
    gaps = tokens - 1
    return gaps > 0 and nearest_rank_index(gaps, 90) == gaps - 1


class KVArenaCollector:
    """Exports the KV arenas of this process (``KVArena.stats``, summed by arena name): how many
    buffers the slab served and how many needed fresh memory (the slab was full), which a host
    pays for in page faults, and how much of the slab is free. Arenas are held weakly."""

    def __init__(self):
        self._arenas: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # arena -> name

    def add(self, name: str, arena) -> None:
        self._arenas[arena] = name

    def collect(self):
        totals: dict[str, dict[str, int]] = {}
        for arena, name in list(self._arenas.items()):
            t = totals.setdefault(name, {})
            for k, v in arena.stats().items():
                t[k] = t.get(k, 0) + v
        takes = CounterMetricFamily("yuebing:kv_arena_takes", "KV buffers handed out, by whether the arena's "
                                    "slab served them or fresh memory had to be paged in", labels=["arena", "source"])
        fresh = CounterMetricFamily("yuebing:kv_arena_allocated_bytes", "Fresh memory the arena allocated",
                                    labels=["arena"])
        dropped = CounterMetricFamily("yuebing:kv_arena_dropped_bytes", "Fresh buffers freed (taken "
                                      "when the slab had no room)", labels=["arena"])
        kept = GaugeMetricFamily("yuebing:kv_arena_kept_bytes", "Free memory in the arena's slab",
                                 labels=["arena"])
        for name, t in sorted(totals.items()):
            takes.add_metric([name, "kept"], t["reused"])
            takes.add_metric([name, "fresh"], t["allocated"])
            fresh.add_metric([name], t["allocated_bytes"])
            dropped.add_metric([name], t["dropped_bytes"])
            kept.add_metric([name], t["kept_bytes"])
        return [takes, fresh, dropped, kept]


KV_ARENAS = KVArenaCollector()
REGISTRY.register(KV_ARENAS)


class ModelLabelled:
    """The default registry as a scrape sees it: every ``yuebing:`` sample with a ``model_name``
    label, the served model's name (as vLLM labels its metrics), so a Prometheus serving several
    models tells them apart. One place adds it, whatever declares the metric."""

    PREFIX = "yuebing:"

    def __init__(self, registry=REGISTRY, model_name: str = ""):
        self.registry = registry
        self.model_name = model_name

    def collect(self):
        name = self.model_name
        for family in self.registry.collect():
            if not name or not family.name.startswith(self.PREFIX):
                yield family
                continue
            out = copy.copy(family)
            out.samples = [s._replace(labels={"model_name": name, **s.labels}) for s in family.samples]
            yield out

    def restricted_registry(self, names):  # a scrape asking for some names only (``name[]``)
        return ModelLabelled(self.registry.restricted_registry(names), self.model_name)


EXPORTED = ModelLabelled()


def set_model_name(name: str) -> None:
    """Label this process's metrics with the served model's name from now on."""
    EXPORTED.model_name = name
