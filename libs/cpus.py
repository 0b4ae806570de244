"""Sharing a host's cores between model workers.

Two model processes that each run as many torch threads as the host has cores oversubscribe it:
their OpenMP teams wait at barriers for threads the other process has descheduled, and both slow
down by more than their share. A host's model workers therefore split its cores: each sizes its
thread pool to its share (one thread each when there are more workers than cores). Pinning each
to its own core set is optional: measured on 2 cores, a pinned decode worker lost more to the
I/O threads and the other services on its core than it gained (docs/benchmarks.md).
"""

from __future__ import annotations

import os


def parse_cpu_list(spec: str) -> list[int]:
    """``"0-3,8"`` -> [0, 1, 2, 3, 8] (the Linux cpuset list format); "" -> []."""
    cpus: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"bad CPU list {spec!r}: expected e.g. 0-3,8") from None
        if a < 0 or b < a:
            raise ValueError(f"bad CPU list {spec!r}: range {part!r} is empty or negative")
        cpus.update(range(a, b + 1))
    return sorted(cpus)


def format_cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 3, 8] -> ``"0-3,8"``."""
    parts: list[str] = []
    run: list[int] = []
    for c in sorted(set(cpus)):
        if run and c != run[-1] + 1:
            parts.append(_run(run))
            run = []
        run.append(c)
    if run:
        parts.append(_run(run))
    return ",".join(parts)


def _run(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


class CorePlan:
    """Threads (and, with ``pin``, cores) of each of ``workers`` model processes on a host with ``cores``.

    With at least one core per worker, the cores are split into contiguous disjoint sets (the
    first workers get one more when they do not divide evenly); each worker runs as many threads
    as its set has cores, and is pinned to the set when ``pin``. With more workers than cores,
    every worker gets one thread and no pinning: the kernel spreads them.
    """

    def __init__(self, cores: list[int], workers: int, pin: bool = False):
        if workers < 0:
            raise ValueError("workers must be >= 0")
        self.cores = sorted(set(cores))
        self.workers = workers
        self.sets: list[list[int]] = []
        if 0 < workers <= len(self.cores):
            base, extra = divmod(len(self.cores), workers)
            start = 0
            for i in range(workers):
                n = base + (1 if i < extra else 0)
                self.sets.append(self.cores[start : start + n])
                start += n
        self.pinned = pin and bool(self.sets)

    def threads(self, worker: int) -> int:
        return len(self.sets[worker]) if self.sets else 1

    def cpus(self, worker: int) -> str:
        return format_cpu_list(self.sets[worker]) if self.pinned else ""


def available_cores() -> list[int]:
    """The cores this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def pin_current_thread(cpus: str) -> list[int]:
    """Restrict the calling thread (and the threads it starts, e.g. torch's OpenMP team) to ``cpus``.

    Returns the cores used; [] when ``cpus`` is empty or the platform cannot pin.
    """
    wanted = parse_cpu_list(cpus)
    if not wanted:
        return []
    allowed = set(available_cores())
    use = [c for c in wanted if c in allowed]
    if not use:
        raise ValueError(f"none of the CPUs {cpus!r} is available to this process (allowed: "
                         f"{format_cpu_list(sorted(allowed))})")
    if not hasattr(os, "sched_setaffinity"):
        return []
    os.sched_setaffinity(0, use)  # pid 0: the calling thread
    return use
