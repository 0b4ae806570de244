"""How the conductor's predictions have lately turned out: the factor by which actual TTFTs exceed
predicted ones, and the margin by which waits for a decode row exceed theirs. Plain logic."""

from __future__ import annotations

import math
from collections import deque

from libs.stats import nearest_rank_index


class _RecentQuantile:
    """The 90th percentile (nearest rank) of the last ``window`` samples, kept within bounds;
    ``initial`` until ``MIN_SAMPLES`` have come. Recomputed per sample, read per decision."""

    MIN_SAMPLES = 20
    PERCENT = 90

    def __init__(self, window: int, initial: float, lo: float, hi: float):
        self._samples: deque[float] = deque(maxlen=window)
        self._value, self._lo, self._hi = initial, lo, hi

    @property
    def learnt(self) -> bool:
        """Whether enough samples have come for the value to be their quantile."""
        return len(self._samples) >= self.MIN_SAMPLES

    def _add(self, sample: float) -> None:
        self._samples.append(sample)
        if len(self._samples) >= self.MIN_SAMPLES:
            self._learn(sorted(self._samples))

    def _learn(self, ordered: list[float]) -> None:
        """The window's samples, sorted once per sample for every quantile read from them."""
        self._value = min(self._hi, max(self._lo, ordered[nearest_rank_index(len(ordered), self.PERCENT)]))


class TTFTErrorModel(_RecentQuantile):
    """How far actual times to first token run past the conductor's predictions, so admission can
    judge a prediction as it will turn out rather than as it was made.

    Each placed request's predicted TTFT is compared with the TTFT its prefill instance reports;
    ``factor`` is the 90th percentile (nearest rank) of actual / predicted over a window, so that,
    while the errors stay as they were, nine admitted requests in ten whose scaled prediction is
    within the objective meet it. Until ``MIN_SAMPLES`` reports have come, the predictions are
    taken as they are (1.0); the factor stays within ``BOUNDS``.
    """

    BOUNDS = (0.5, 4.0)
    MIN_PREDICTED = 0.05  # seconds: below this a ratio says more about noise than about the model
    EARLY_PERCENT = 10

    def __init__(self, window: int = 256):
        super().__init__(window, 1.0, *self.BOUNDS)
        self._early = 1.0

    def observe(self, predicted: float, actual: float) -> None:
        if predicted >= self.MIN_PREDICTED and actual > 0:
            self._add(actual / predicted)

    def _learn(self, ordered: list[float]) -> None:
        super()._learn(ordered)
        early = ordered[nearest_rank_index(len(ordered), self.EARLY_PERCENT)]
        self._early = min(1.0, max(self.BOUNDS[0], early))

    def factor(self) -> float:
        return self._value

    def early_factor(self) -> float:
        """The 10th percentile of actual / predicted, at most 1 (1 until ``MIN_SAMPLES``): how far
        ahead of its prediction a first token may come."""
        return self._early


class WaitErrorModel(_RecentQuantile):
    """How much longer than predicted requests have waited between their first token (from prefill)
    and a row of their decode batch: the margin admission adds to a predicted wait.

    The wait depends on when the sequences ahead leave, which a projection gets wrong by a few of
    their tokens either way; for a short request the wait is its TBT as the metric counts it, so an
    objective a few steps long is missed by any underestimate. ``margin`` is the 90th percentile
    (nearest rank) of actual - predicted over a window, at least 0; 0 until ``MIN_SAMPLES``. Not a
    higher one: a run at 2x load has only about a hundred such forecasts, so its 99th percentile
    is its largest error, and one request overtaken by a later one that came to decode first
    (seconds late) would set the margin for the rest of the run.

    Only forecasts of waits an admission can turn on are learnt from: those no longer than the
    request's own TBT objective (``within``). A wait forecast longer than that belongs to a long
    request, whose first gap does not count, behind a deep queue, and such a forecast is off by a
    share of its length (seconds, when the queue is many sequences deep), which says nothing about
    a forecast of a row free within a step or two.
    """

    MAX_MARGIN = 10.0  # seconds

    def __init__(self, window: int = 256):
        super().__init__(window, 0.0, 0.0, self.MAX_MARGIN)

    def observe(self, predicted: float, actual: float, within: float = math.inf) -> None:
        if 0 <= predicted <= within and actual >= 0:
            self._add(actual - predicted)

    def margin(self) -> float:
        return self._value
