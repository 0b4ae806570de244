"""SLOs, the decode cost model, the decode-load projection and the admission decision.

Plain logic with no I/O; the caller passes the clock. Mooncake's overload handling: a request is
rejected at arrival, before any work is spent on it, when its best predicted TTFT is over the TTFT
SLO, or when decode would be over the TBT SLO. ``early`` judges decode by its load now;
``predictive`` projects the decode load forward to when the request would reach decode (from the
requests already admitted to prefill and a per-request decode duration), so a decode pool that is
busy now but will have drained by then does not cause a rejection, and one that is idle now but
will be flooded by the prefills already under way does.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from libs.config import SLO
from libs.engine.costs import decode_features, fit
from libs.metrics import largest_gap_counts
from libs.stats import nearest_rank_index

ADMISSION_MODES = ("none", "early", "predictive")


class DecodeCostModel:
    """Seconds of one decode step: coef . (1, rows, KV positions), from the calibration, refitted
    online from the steps decode instances report in their heartbeats."""

    MIN_SAMPLES = 6

    def __init__(self, coef: tuple[float, float, float] = (0.02, 0.006, 2e-6), window: int = 256):
        self.prior = np.array(coef, dtype=float)
        # plain floats: a placement prices thousands of steps, 40 % faster than numpy on three terms
        self.coef = tuple(float(c) for c in coef)
        self._samples: deque[tuple[float, float, float, float]] = deque(maxlen=window)
        self.fits = 0

    def step_seconds(self, batch: float, kv_tokens: float) -> float:
        if batch <= 0:
            return 0.0
        return max(0.0, sum(c * f for c, f in zip(self.coef, decode_features(batch, kv_tokens))))

    def observe(self, steps: int, batch: float, kv_tokens: float, seconds: float) -> None:
        """``steps`` steps with these mean rows, KV positions and seconds."""
        if steps <= 0 or batch <= 0 or seconds <= 0:
            return
        self._samples.append((float(steps), float(batch), float(kv_tokens), float(seconds)))
        if len(self._samples) >= self.MIN_SAMPLES:
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


@dataclass
class _Admitted:
    decode_id: str
    start: float  # when it joins decode: predicted until its prefill reports, then actual
    tokens: int  # output tokens it is expected to decode
    kv_tokens: int  # KV positions it brings
    tbt_slo: float = 0.0  # the TBT objective it was admitted under (0: none)
    started: bool = False
    # as its decode instance last reported it (``seen``: when; None: not yet there)
    seen: float | None = None
    running: bool = False
    decoded: int = 0  # steps run
    left: int = 0  # steps still to run
    pos: int = 0  # its place in the instance's list: rows first, then the queue in order
    urgent: bool = False  # its wait for a row counts in its TBT: decode serves it first (``Batcher``)


@dataclass(frozen=True)
class _Slot:
    """An admitted sequence on its decode instance, as projected: there from ``arrive`` (waiting
    for a row until ``row``), decoding ``tokens`` more tokens from ``row`` (with ``kv_tokens`` KV
    positions then) until ``end``."""
    arrive: float
    row: float
    end: float
    tokens: int
    kv_tokens: int
    rid: str
    urgent: bool = False


class DecodeLoadProjector:
    """Every admitted request's decode phase, predicted, to project each decode instance's load.

    A request reaches decode when its prefill is predicted to finish (then when its prefill
    reports), takes a row of the batch when one is free, in the decode batcher's order (urgent
    sequences, whose wait for a row counts in their TBT, first; first come, first served within
    each kind; none preempted; ``urgent_rows`` rows beyond the batch's ``rows`` for urgent ones
    only), and keeps it until it has decoded its ``tokens``. Every sequence holding a row advances
    a token per step of the batch, and a step takes ``step(rows, KV positions)`` seconds for the
    batch as it is at that moment (the decode cost model): a sequence decodes slower once the rows
    fill up, and faster again as they empty. Without a step model a token takes ``token_seconds``, learnt from the decode instances'
    reports of their sequences' time in a row.

    Once a decode instance reports the sequences it holds (``progress``, from its heartbeat), the
    projection starts from there: who holds a row, how many steps each has left, who waits in
    which order. Only what comes after the report is predicted, not a stay from its start.
    """

    LOST_AFTER = 120.0  # a request not seen to start or finish this long after expected is forgotten
    OVERDUE_STEPS = 2  # a sequence still there past its projected end is taken to end within these

    def __init__(self, default_output_tokens: int = 128, default_token_seconds: float = 0.05,
                 step: Callable[[int, float], float] | None = None):
        self.entries: dict[str, _Admitted] = {}
        self.mean_output = float(default_output_tokens)
        self.token_seconds = default_token_seconds
        self.step = step
        self._observed = 0
        self._seen: dict[str, float] = {}  # decode instance -> when it last reported its sequences

    def expected_tokens(self, max_tokens: int, ignore_eos: bool) -> int:
        """Output tokens a request will decode: exactly ``max_tokens`` when EOS is ignored, else the
        mean observed output, capped by its ``max_tokens``."""
        if ignore_eos:
            return max(1, max_tokens)
        return max(1, min(max_tokens, round(self.mean_output)))

    def prior(self, token_seconds: float) -> None:
        """A better guess of the per-token time while no sequence has been seen to finish (e.g. the
        calibrated step of a full batch, once the decode instances' rows are known); ignored after."""
        if self._observed == 0 and token_seconds > 0:
            self.token_seconds = token_seconds

    def duration(self, tokens: int) -> float:
        """A stay of ``tokens`` tokens at the learnt per-token time (for sequences the projection
        does not follow step by step)."""
        return tokens * self.token_seconds

    def _pace(self, rows: int, kv_tokens: float) -> float:
        """Seconds per token of a batch of ``rows`` rows holding ``kv_tokens`` KV positions."""
        if self.step is None:
            return self.token_seconds
        return max(self.step(rows, kv_tokens), 1e-6)

    def admit(self, rid: str, decode_id: str, start: float, tokens: int, kv_tokens: int,
              tbt_slo: float = 0.0, urgent: bool = False) -> None:
        self.entries[rid] = _Admitted(decode_id, start, tokens, kv_tokens, tbt_slo, urgent=urgent)

    def started(self, rid: str, now: float) -> None:
        e = self.entries.get(rid)
        if e is not None and not e.started:
            e.start, e.started = now, True

    def finished(self, rid: str, output_tokens: int, seconds: float, natural: bool, waited: float = 0.0) -> None:
        """A sequence left decode after ``seconds`` there, ``waited`` of them for a row; ``natural``:
        it ended by stop or length (its figures are learnt)."""
        self.entries.pop(rid, None)
        decoding = seconds - max(0.0, waited)
        if natural and output_tokens > 0 and decoding > 0:
            a = 0.1 if self._observed >= 10 else 1.0 / (self._observed + 1)
            self.mean_output += a * (output_tokens - self.mean_output)
            self.token_seconds += a * (decoding / output_tokens - self.token_seconds)
            self._observed += 1

    def forget(self, rid: str) -> None:
        self.entries.pop(rid, None)

    def drop_instance(self, decode_id: str) -> None:
        for rid in [r for r, e in self.entries.items() if e.decode_id == decode_id]:
            del self.entries[rid]
        self._seen.pop(decode_id, None)

    def progress(self, decode_id: str, at: float, sequences: Iterable[tuple[str, int, int, bool]]) -> None:
        """``decode_id`` holds ``sequences`` at ``at``: (request id, steps run there, steps to its
        length limit, holds a row) each, rows first, then those waiting in order. A sequence it
        reported before and not now has left it."""
        listed = set()
        for pos, (rid, decoded, limit, running) in enumerate(sequences):
            e = self.entries.get(rid)
            if e is None or e.decode_id != decode_id:
                continue
            listed.add(rid)
            if not e.started:  # there before its prefill's report came
                e.start, e.started = at, True
            expected = e.tokens - decoded  # (its expected tokens count the one prefill made)
            e.left = min(limit, expected if expected > 0 else self.OVERDUE_STEPS)
            e.decoded, e.seen, e.running, e.pos = decoded, at, running, pos
        for rid in [r for r, e in self.entries.items()
                    if e.decode_id == decode_id and e.seen is not None and r not in listed]:
            del self.entries[rid]
        self._seen[decode_id] = at

    def _rows_free(self, rows: int, others: int, others_end: float) -> list[float]:
        """When each row of a batch of ``rows`` is free, before any admitted sequence: ``others``
        sequences this projection did not admit hold rows until ``others_end``."""
        free = [-math.inf] * rows
        for i in range(min(others, rows)):
            free[i] = others_end
        heapq.heapify(free)
        return free

    def slots(self, decode_id: str, now: float, rows: int = 0, others: int = 0,
              others_end: float = 0.0, others_kv: int = 0,
              extra: tuple[str, _Admitted] | None = None, urgent_rows: int = 0) -> list[_Slot]:
        """The admitted sequences of ``decode_id`` on its ``rows`` rows (0: unbounded), in order of
        arrival: each takes a row in the batcher's order (urgent ones first, also on the
        ``urgent_rows`` beyond ``rows``; then first come, first served) and decodes its tokens at the
        pace of the batch it is in. ``others`` sequences this projection did not admit
        (``others_kv`` KV positions) hold rows until ``others_end`` and count in the batch.
        ``extra``: one more sequence, admitted last, to see what it would change."""
        seen = self._seen.get(decode_id)
        ids = [r for r, e in self.entries.items() if e.decode_id == decode_id]
        mine = [self.entries[r] for r in ids]
        if extra is not None:
            ids.append(extra[0])
            mine.append(extra[1])
        reported = [e.seen is not None for e in mine]
        # a reported sequence is there since the report; one that is not arrives when its first
        # token came (not before the report) or is predicted to come (not before now)
        since = seen if seen is not None else -math.inf
        arrive = [seen if r else max(e.start, since) if e.started else max(e.start, now)
                  for e, r in zip(mine, reported)]
        order = sorted(range(len(mine)), key=lambda i: (arrive[i], not reported[i], mine[i].pos))  # stable
        mine, arrive, reported = [mine[i] for i in order], [arrive[i] for i in order], [reported[i] for i in order]
        ids = [ids[i] for i in order]
        n = len(mine)
        row_at, end = [0.0] * n, [0.0] * n
        left = [float(e.left if r else e.tokens) for e, r in zip(mine, reported)]  # tokens still to decode
        decoded = [float(e.decoded) if r else 0.0 for e, r in zip(mine, reported)]
        kv0 = [e.kv_tokens + int(d) for e, d in zip(mine, decoded)]
        tokens0 = [int(x) for x in left]
        # the rows as reported: held since the report
        running = [i for i in range(n) if reported[i] and mine[i].running]
        for i in running:
            row_at[i] = arrive[i]
        urgent_q: deque[int] = deque()  # waiting for a row, by kind
        normal_q: deque[int] = deque()
        overdue: list[int] = []  # in decode longer than projected: still there at ``now``
        nxt = len(running)  # sorted first: the report's rows, in its order
        t = arrive[0] if n else now
        while nxt < n or urgent_q or normal_q or running:
            while nxt < n and arrive[nxt] <= t:
                (urgent_q if mine[nxt].urgent else normal_q).append(nxt)
                nxt += 1
            if overdue and t >= now:
                for i in overdue:
                    left[i] = float(self.OVERDUE_STEPS)
                overdue.clear()
            held = others if t < others_end else 0
            if rows > 0:
                held = min(held, rows)
            for queue, cap in ((urgent_q, rows + urgent_rows), (normal_q, rows)):
                while queue and (rows <= 0 or len(running) + held < cap):
                    i = queue.popleft()
                    row_at[i] = t
                    running.append(i)
            later = [arrive[nxt]] if nxt < n else []
            if held:
                later.append(others_end)
            if overdue:
                later.append(now)
            if not running:
                t = min(later)  # idle until the next arrival, or blocked until the others leave
                continue
            batch = len(running) + held
            kv = sum(mine[i].kv_tokens + decoded[i] for i in running) + (others_kv if held else 0)
            first = min(left[i] for i in running)
            # priced at the KV the batch holds halfway to the next event (it grows a position a token)
            pace = self._pace(batch, kv)
            halfway = (min([t + first * pace] + later) - t) / pace / 2
            pace = self._pace(batch, kv + len(running) * halfway)
            event = min(later, default=math.inf)
            if t + first * pace <= event:
                t, done = t + first * pace, first  # the first of them is done (exactly: no float creep)
            else:
                t, done = event, (event - t) / pace
            for i in list(running):
                if left[i] < math.inf:  # (an overdue one's KV is taken to stay as it was)
                    decoded[i] += done
                left[i] -= done
                if left[i] > 1e-9:
                    continue
                if mine[i].started and t < now:
                    left[i] = math.inf
                    overdue.append(i)
                    continue
                end[i] = t
                running.remove(i)
        return [_Slot(arrive[i], row_at[i], end[i], tokens0[i], kv0[i], ids[i], mine[i].urgent) for i in range(n)]

    def delayed_by(self, decode_id: str, now: float, arrive: float, tokens: int, kv_tokens: int, rows: int,
                   others: int = 0, others_end: float = 0.0, others_kv: int = 0,
                   slots: list[_Slot] | None = None, urgent: bool = False,
                   urgent_rows: int = 0) -> list[tuple[str, float, float]]:
        """The admitted sequences of ``decode_id`` that a newcomer reaching it at ``arrive`` (with
        ``tokens`` to decode and ``kv_tokens`` KV positions) would make wait longer for a row: it
        would take a row before them (it reaches decode first, though admitted later, or is urgent
        and they are not) or slow the batch they wait on. Each with its wait from reaching decode
        to a row, without the newcomer and with it."""
        if rows <= 0:
            return []
        if slots is None:
            slots = self.slots(decode_id, now, rows, others, others_end, others_kv, urgent_rows=urgent_rows)
        before = {s.rid: s for s in slots}
        after = self.slots(decode_id, now, rows, others, others_end, others_kv,
                           extra=("", _Admitted(decode_id, arrive, tokens, kv_tokens, urgent=urgent)),
                           urgent_rows=urgent_rows)
        return [(s.rid, before[s.rid].row - before[s.rid].arrive, s.row - s.arrive) for s in after
                if s.rid in before and s.row > before[s.rid].row + 1e-9]

    def load_at(self, decode_id: str, t: float, now: float, rows: int = 0, others: int = 0,
                others_end: float = 0.0, slots: list[_Slot] | None = None) -> tuple[int, int]:
        """(sequences, KV positions) on ``decode_id`` at time ``t`` >= ``now``, as projected: those
        there, decoding or waiting for a row; KV grows by a position per token decoded by then."""
        if slots is None:
            slots = self.slots(decode_id, now, rows, others, others_end)
        seqs = kv = 0
        for s in slots:
            if s.arrive <= t < s.end:
                seqs += 1
                done = s.tokens * max(0.0, t - s.row) / (s.end - s.row) if s.end > s.row else 0.0
                kv += s.kv_tokens + int(min(done, s.tokens))
        return seqs, kv

    def current(self, decode_id: str) -> tuple[int, int]:
        """(sequences, KV positions) in decode now: started and not yet finished."""
        seqs = kv = 0
        for e in self.entries.values():
            if e.decode_id == decode_id and e.started:
                seqs += 1
                kv += e.kv_tokens
        return seqs, kv

    def row_wait(self, decode_id: str, t: float, now: float, rows: int, others: int = 0,
                 others_end: float = 0.0, slots: list[_Slot] | None = None, urgent: bool = False,
                 urgent_rows: int = 0) -> float:
        """Seconds after ``t`` until a sequence arriving at ``t`` (``urgent`` or not) gets a row on
        ``decode_id``, whose batch of ``rows`` rows (0: unbounded; ``urgent_rows`` more for urgent
        sequences only) serves the sequences ahead of it first: those holding a row by ``t``, those
        of its kind there before it, and, for one not urgent, the urgent ones there when a row
        frees. ``others`` sequences it holds that this projection did not admit leave at
        ``others_end``."""
        if rows <= 0:
            return 0.0
        if slots is None:
            slots = self.slots(decode_id, now, rows, others, others_end, urgent_rows=urgent_rows)
        free = self._rows_free(rows + urgent_rows, others, others_end)
        # the rows free to it: any for an urgent one; one not urgent needs more than the urgent rows free
        nth = 0 if urgent else urgent_rows

        def row_for_it() -> float:
            return max(t, heapq.nsmallest(nth + 1, free)[-1])

        for s in sorted(slots, key=lambda s: s.row):  # the order rows go out without it
            if s.row > t:  # a row after it came: is this one still ahead of it?
                ahead = s.arrive <= t if s.urgent == urgent else s.urgent and s.arrive <= row_for_it()
                if not ahead:
                    break  # it takes the next free row before this one and those after
            heapq.heapreplace(free, s.end)
        return row_for_it() - t

    def next_departure(self, decode_id: str, now: float, slots: list[_Slot] | None = None) -> float:
        """Seconds until the first sequence on ``decode_id`` is expected to leave (inf if none)."""
        if slots is None:
            slots = self.slots(decode_id, now)
        return max(0.0, min(s.end for s in slots) - now) if slots else float("inf")

    def prune(self, now: float) -> int:
        """Forget requests long overdue (aborted before prefill, or lost with an instance)."""
        lost = [r for r, e in self.entries.items()
                if now > e.start + (self.duration(e.tokens) if e.started else 0.0) + self.LOST_AFTER]
        for r in lost:
            del self.entries[r]
        return len(lost)


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
