"""When a long prompt is split over several prefill instances, and where: chunked pipeline
parallelism (Mooncake's CPP). Plain logic, no I/O.

Stage ``k`` computes the prompt's positions ``[b_k, b_k+1)`` in one forward, over the past
``[0, b_k)`` that stage ``k - 1`` streams to it layer by layer as it computes them. Layer ``i`` of
stage ``k`` can run once stage ``k - 1`` has computed (and sent) its layer ``i``, so the stages'
layers run side by side, one layer apart, rather than one stage after the other.

The split points give each stage the same predicted compute (later chunks attend to a longer past,
so they hold fewer tokens). A stage's predicted finish, from now, with ``L`` layers, compute ``c``,
queue ``q`` and ``h`` the time to move its past over the bus:

    start_k  = max(q_k, start_k-1 + (c_k-1 + h_k) / L)     its layer 0 waits for the one before
    finish_k = max(start_k + c_k, finish_k-1 + (h_k + c_k) / L)   and so does its last layer

The pipeline is chosen when the last stage's finish beats the one-instance placement's predicted
TTFT by ``gain``; of 2 .. ``max_stages`` stages, the count with the earliest finish.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    instance_id: str
    start: int  # first position computed
    end: int  # positions [start, end) computed, over the past [0, start)
    compute: float  # predicted seconds of its forward
    finish: float  # predicted seconds from now until its last layer is computed


@dataclass(frozen=True)
class Pipeline:
    stages: tuple[Stage, ...]

    @property
    def ttft(self) -> float:
        return self.stages[-1].finish


def split_points(prompt_len: int, reused: int, stages: int, block_size: int,
                 price: Callable[[int, int], float]) -> list[int]:
    """``stages + 1`` boundaries from ``reused`` to ``prompt_len``, the inner ones multiples of
    ``block_size``, giving each stage about the same predicted compute; ``price(end, start)`` is
    the compute of positions ``[start, end)`` over the past before ``start``. Fewer stages when
    the prompt has too few blocks for every stage to compute at least one."""
    bounds = [reused]
    total = price(prompt_len, reused)
    for k in range(1, stages):
        lo = (bounds[-1] // block_size + 1) * block_size  # at least one block past the last boundary
        hi = ((prompt_len - 1) // block_size) * block_size  # the last stage keeps at least one token
        if lo > hi:
            break
        target = total * k / stages
        while lo < hi:  # the first block boundary whose cumulative compute reaches the target
            mid = ((lo + hi) // 2 // block_size) * block_size
            if mid < lo:
                mid = lo
            if price(mid, reused) >= target:
                hi = mid
            else:
                lo = mid + block_size
        bounds.append(lo)
    bounds.append(prompt_len)
    return bounds


def pipeline_finish(queues: Sequence[float], computes: Sequence[float], hops: Sequence[float],
                    layers: int) -> list[float]:
    """Each stage's predicted finish (the model above); ``hops[k]``: seconds to move stage k's
    past over the bus (0 for the first stage)."""
    finishes: list[float] = []
    start = finish = 0.0
    for k, (q, c, h) in enumerate(zip(queues, computes, hops)):
        if k == 0:
            start, finish = q, q + c
        else:
            start = max(q, start + (computes[k - 1] + h) / layers)
            finish = max(start + c, finish + (h + c) / layers)
        finishes.append(finish)
    return finishes


def plan_pipeline(prompt_len: int, reused: int, first: tuple[str, float], others: Sequence[tuple[str, float]],
                  *, single_ttft: float, block_size: int, layers: int, price: Callable[[int, int], float],
                  move: Callable[[int], float], max_stages: int, min_tokens: int,
                  gain: float = 0.9) -> Pipeline | None:
    """The pipeline to run the prompt on, or None when one instance does better.

    ``first``: the instance (and its queue, in seconds) the one-instance placement chose, which
    holds or loads the ``reused`` prefix: stage 0 runs there. ``others``: the other instances with
    their queues; the shortest queues take the later stages. ``price(end, start)``: compute of
    positions ``[start, end)``; ``move(tokens)``: seconds to send that many positions' KV."""
    if max_stages < 2 or prompt_len - reused < min_tokens or not others:
        return None
    later = sorted(others, key=lambda o: (o[1], o[0]))
    best: Pipeline | None = None
    for m in range(2, min(max_stages, len(later) + 1) + 1):
        bounds = split_points(prompt_len, reused, m, block_size, price)
        if len(bounds) - 1 < m:
            break
        chosen = [first, *later[: m - 1]]
        computes = [price(bounds[k + 1], bounds[k]) for k in range(m)]
        hops = [0.0] + [move(bounds[k]) for k in range(1, m)]
        finishes = pipeline_finish([q for _, q in chosen], computes, hops, layers)
        p = Pipeline(tuple(Stage(iid, bounds[k], bounds[k + 1], computes[k], finishes[k])
                           for k, (iid, _) in enumerate(chosen)))
        if best is None or p.ttft < best.ttft:
            best = p
    if best is None or best.ttft > gain * single_ttft:
        return None
    return best
