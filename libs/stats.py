"""Percentiles, one definition for the whole project: the nearest rank (always a value that
occurred). The paper's TBT (a request's 90th-percentile gap), the conductor's error models and
the benchmarks' latency distributions (TTFT, ITL and end-to-end p50/p90/p99) all take it. Plain
functions, no metrics registered.
"""

from __future__ import annotations

from collections.abc import Iterable


def nearest_rank_index(n: int, percent: int) -> int:
    """Index, in ``n`` sorted values, of their ``percent``-th percentile by nearest rank."""
    return max(0, -(-percent * n // 100) - 1)


def nearest_rank(values: Iterable[float], percent: int) -> float:
    """The ``percent``-th percentile of ``values`` (not empty) by nearest rank."""
    ordered = sorted(values)
    return ordered[nearest_rank_index(len(ordered), percent)]
