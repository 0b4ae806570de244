"""The decode cost model and what it predicts of a request's time between tokens.

Plain logic with no I/O. A decode step's time is fitted online from the decode instances' reports
(batch size and KV positions); from it follow the TBT of a batch and of a request joining one.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from libs.engine.costs import Refits, decode_features, fit
from libs.metrics import largest_gap_counts


class DecodeCostModel:
    """Seconds of one decode step: coef . (1, rows, KV positions), from the calibration, refitted
    online from the steps decode instances report in their heartbeats."""

    MIN_SAMPLES = 6

    def __init__(self, coef: tuple[float, float, float] = (0.02, 0.006, 2e-6), window: int = 256):
        self.prior = np.array(coef, dtype=float)
        # plain floats: a placement prices thousands of steps, 40 % faster than numpy on three terms
        self.coef = tuple(float(c) for c in coef)
        self._samples: deque[tuple[float, float, float, float]] = deque(maxlen=window)
        self._refits = Refits()
        self.fits = 0

    def step_seconds(self, batch: float, kv_tokens: float) -> float:
        if batch <= 0:
            return 0.0
        fixed, per_row, per_kv = self.coef  # (decode_features: 1, rows, KV positions)
        return max(0.0, fixed + per_row * batch + per_kv * kv_tokens)

    def observe(self, steps: int, batch: float, kv_tokens: float, seconds: float) -> None:
        """``steps`` steps with these mean rows, KV positions and seconds."""
        if steps <= 0 or batch <= 0 or seconds <= 0:
            return
        self._samples.append((float(steps), float(batch), float(kv_tokens), float(seconds)))
        if len(self._samples) >= self.MIN_SAMPLES and self._refits.due(len(self._samples)):
            self._fit()

    def _fit(self) -> None:
        rows = [decode_features(b, kv) for _, b, kv, _ in self._samples]
        y = [t for *_, t in self._samples]
        x = np.array(rows)
        if np.linalg.matrix_rank(x[:, 1:]) < 2:
            # one operating point only: keep the prior's shape, scale it to what is observed
            predicted = float(np.mean(x @ self.prior))
            coef = self.prior * (float(np.mean(y)) / max(predicted, 1e-9))
        else:
            coef = fit(rows, y)
        self.coef = tuple(float(c) for c in coef)
        self.fits += 1


def predicted_tbt(cost: DecodeCostModel, sequences: int, kv_tokens: int, max_running: int) -> float:
    """Time between tokens on a decode instance holding ``sequences`` sequences with ``kv_tokens``
    KV positions: one step of its running batch, times the rounds a sequence waits for a row when
    there are more sequences than rows (``max_running``; 0 = unbounded)."""
    if sequences <= 0:
        return 0.0
    rows = _rows(sequences, max_running)
    return cost.step_seconds(rows, kv_tokens * rows / sequences) * (sequences / rows)


def _rows(sequences: int, max_running: int) -> int:
    """Rows of a batch holding ``sequences`` sequences (``max_running`` rows at most; 0: unbounded)."""
    return min(sequences, max_running) if max_running > 0 else sequences


def request_tbt_joining(cost: DecodeCostModel, sequences: int, kv_tokens: int, max_running: int, tokens: int,
                        wait: float) -> float:
    """The TBT a request of ``tokens`` output tokens is predicted to see (the metric: the
    nearest-rank 90th percentile of its gaps, ``libs.metrics.request_tbt``) joining a decode
    instance that then holds ``sequences`` sequences (itself included) with ``kv_tokens`` KV
    positions, ``wait`` seconds after its first token (the rest of its KV on the way, a row to
    free up).

    Its first token comes from prefill, so its first gap is ``wait`` plus one step of the batch;
    the others are ``predicted_tbt`` each. With nine gaps or fewer the largest is the 90th
    percentile, so a short request's TBT is its first gap; with more, the first gap falls outside
    it. A request of one token never reaches decode: 0.
    """
    gaps = tokens - 1
    if gaps <= 0 or sequences <= 0:
        return 0.0
    steady = predicted_tbt(cost, sequences, kv_tokens, max_running)
    if not largest_gap_counts(tokens):  # the 90th percentile is not the largest gap: a normal one
        return steady
    rows = _rows(sequences, max_running)
    return max(steady, wait + cost.step_seconds(rows, kv_tokens * rows / sequences))


def pushed_past(cost: DecodeCostModel, sequences: int, kv_tokens: int, max_running: int, tokens: int, slo: float,
                judged: float, added: float, margin: float) -> bool:
    """Whether delaying an admitted request of ``tokens`` output tokens by ``added`` seconds for a
    row takes it past its TBT objective ``slo`` (on an instance then holding ``sequences`` with
    ``kv_tokens``, as in ``request_tbt_joining``): on the wait its admission was judged by
    (``judged``, as revised since) it meets the objective before any margin, and on that wait
    plus ``added`` it misses it, ``margin`` included, as its own admission was judged. One past
    its objective on its judged wait alone is not this delay's doing; a long request, whose first
    gap does not count, is never pushed past."""
    before = request_tbt_joining(cost, sequences, kv_tokens, max_running, tokens, judged)
    after = request_tbt_joining(cost, sequences, kv_tokens, max_running, tokens, judged + added + margin)
    return before <= slo < after
