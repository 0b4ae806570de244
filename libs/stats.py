"""Percentiles, in the two ways this code takes them.

By nearest rank (a value that occurred): the paper's TBT (a request's 90th-percentile gap) and the
conductor's error models. Interpolated linearly between the closest ranks (numpy's default): the
benchmarks' latency distributions (TTFT, ITL and end-to-end p50/p90/p99), as their recorded results
were taken. Plain functions, no metrics registered.
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


def interpolated(values: Iterable[float], percent: float) -> float:
    """The ``percent``-th percentile of ``values`` (not empty), interpolated linearly between the two
    closest ranks (``numpy.percentile``'s default method)."""
    import numpy as np

    return float(np.percentile(np.asarray(list(values), dtype=float), percent))
