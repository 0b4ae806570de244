"""The decode-load projection: every admitted request's decode phase, predicted forward in time.

Plain logic with no I/O; the caller passes the clock. Predictive admission judges a decode
instance by its load as projected to when the request would reach it (from the requests already
admitted to prefill and a per-request decode duration), not by its load now.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple


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


class _Slot(NamedTuple):
    """An admitted sequence on its decode instance, as projected: there from ``arrive`` (waiting
    for a row until ``row``), decoding ``tokens`` more tokens from ``row`` (with ``kv_tokens`` KV
    positions then) until ``end``. (A tuple: a decision makes hundreds.)"""
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
    # A decode instance's projection is kept and given again, while nothing it rests on changed
    # (its sequences, their reports, the step prices), for this long on the clock: every decision
    # projects the few least loaded decode instances, and at hundreds of decisions a second most
    # of them are the same, unchanged, a few milliseconds later. Within it, a sequence predicted
    # to reach decode before the clock is taken to reach it when the projection was made, up to
    # this much earlier than a new projection would: a fraction of one decode step.
    REUSE_SECONDS = 0.01

    def __init__(self, default_output_tokens: int = 128, default_token_seconds: float = 0.05,
                 step: Callable[[int, float], float] | None = None):
        self.entries: dict[str, _Admitted] = {}
        # the same entries by decode instance: a projection of one instance reads its own only
        self._of: dict[str, dict[str, _Admitted]] = {}
        self.mean_output = float(default_output_tokens)
        self.token_seconds = default_token_seconds
        self.step = step
        self._observed = 0
        self._seen: dict[str, float] = {}  # decode instance -> when it last reported its sequences
        # what a projection rests on: a revision per decode instance (its sequences and reports),
        # and one for the prices of all (``repriced``); the last projection of each instance
        self._rev: dict[str, int] = {}
        self._prices = 0
        self._kept: dict[str, tuple[tuple, float, list[_Slot]]] = {}

    def _changed(self, decode_id: str) -> None:
        self._rev[decode_id] = self._rev.get(decode_id, 0) + 1

    def repriced(self) -> None:
        """The step prices changed (the decode cost model refitted): no projection is given again."""
        self._prices += 1

    def expected_tokens(self, max_tokens: int, ignore_eos: bool) -> int:
        """Output tokens a request will decode: exactly ``max_tokens`` when EOS is ignored, else the
        mean observed output, capped by its ``max_tokens``."""
        if ignore_eos:
            return max(1, max_tokens)
        return max(1, min(max_tokens, round(self.mean_output)))

    def prior(self, token_seconds: float) -> None:
        """A better guess of the per-token time while no sequence has been seen to finish (e.g. the
        calibrated step of a full batch, once the decode instances' rows are known); ignored after."""
        if self._observed == 0 and token_seconds > 0 and token_seconds != self.token_seconds:
            self.token_seconds = token_seconds
            self._prices += 1

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
        self.forget(rid)
        e = self.entries[rid] = _Admitted(decode_id, start, tokens, kv_tokens, tbt_slo, urgent=urgent)
        self._of.setdefault(decode_id, {})[rid] = e
        self._changed(decode_id)

    def of(self, decode_id: str) -> dict[str, _Admitted]:
        """The admitted requests placed on ``decode_id`` (not to be changed by the caller)."""
        return self._of.get(decode_id, {})

    def started(self, rid: str, now: float) -> None:
        e = self.entries.get(rid)
        if e is not None and not e.started:
            e.start, e.started = now, True
            self._changed(e.decode_id)

    def finished(self, rid: str, output_tokens: int, seconds: float, natural: bool, waited: float = 0.0) -> None:
        """A sequence left decode after ``seconds`` there, ``waited`` of them for a row; ``natural``:
        it ended by stop or length (its figures are learnt)."""
        self.forget(rid)
        decoding = seconds - max(0.0, waited)
        if natural and output_tokens > 0 and decoding > 0:
            a = 0.1 if self._observed >= 10 else 1.0 / (self._observed + 1)
            self.mean_output += a * (output_tokens - self.mean_output)
            self.token_seconds += a * (decoding / output_tokens - self.token_seconds)
            self._observed += 1
            self._prices += 1

    def forget(self, rid: str) -> None:
        e = self.entries.pop(rid, None)
        if e is not None:
            self._changed(e.decode_id)
            of = self._of.get(e.decode_id)
            if of is not None:
                of.pop(rid, None)
                if not of:
                    del self._of[e.decode_id]

    def drop_instance(self, decode_id: str) -> None:
        for rid in self._of.pop(decode_id, {}):
            del self.entries[rid]
        self._seen.pop(decode_id, None)
        self._kept.pop(decode_id, None)
        self._rev.pop(decode_id, None)

    def progress(self, decode_id: str, at: float, sequences: Iterable[tuple[str, int, int, bool]]) -> None:
        """``decode_id`` holds ``sequences`` at ``at``: (request id, steps run there, steps to its
        length limit, holds a row) each, rows first, then those waiting in order. A sequence it
        reported before and not now has left it."""
        listed = set()
        of = self.of(decode_id)
        for pos, (rid, decoded, limit, running) in enumerate(sequences):
            e = of.get(rid)
            if e is None:
                continue
            listed.add(rid)
            if not e.started:  # there before its prefill's report came
                e.start, e.started = at, True
            expected = e.tokens - decoded  # (its expected tokens count the one prefill made)
            e.left = min(limit, expected if expected > 0 else self.OVERDUE_STEPS)
            e.decoded, e.seen, e.running, e.pos = decoded, at, running, pos
        for rid in [r for r, e in of.items() if e.seen is not None and r not in listed]:
            self.forget(rid)
        self._seen[decode_id] = at
        self._changed(decode_id)

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
        ``extra``: one more sequence, admitted last, to see what it would change.

        Without ``extra``, the projection made last for the instance is given again (the same list:
        not to be changed) while nothing it rests on changed, for ``REUSE_SECONDS`` after its
        ``now``."""
        if extra is not None:
            return self._project(decode_id, now, rows, others, others_end, others_kv, extra, urgent_rows)
        basis = (self._rev.get(decode_id, 0), self._prices, rows, others,
                 round(others_end - now, 9) if others else 0.0, others_kv, urgent_rows)
        kept = self._kept.get(decode_id)
        if kept is not None and kept[0] == basis and 0.0 <= now - kept[1] <= self.REUSE_SECONDS:
            return kept[2]
        out = self._project(decode_id, now, rows, others, others_end, others_kv, None, urgent_rows)
        self._kept[decode_id] = (basis, now, out)
        return out

    def _project(self, decode_id: str, now: float, rows: int, others: int, others_end: float, others_kv: int,
                 extra: tuple[str, _Admitted] | None, urgent_rows: int) -> list[_Slot]:
        seen = self._seen.get(decode_id)
        of = self.of(decode_id)
        ids = list(of)
        mine = list(of.values())
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
        kv_base = [e.kv_tokens for e in mine]
        kv0 = [k + int(d) for k, d in zip(kv_base, decoded)]
        tokens0 = [int(x) for x in left]
        # Every sequence holding a row advances by the same tokens a step, so the loop keeps the
        # batch's progress ``done_all`` (tokens any row has decoded since the projection began)
        # rather than each one's: a sequence that took its row at progress ``p0`` with ``left``
        # tokens ends at progress ``p0 + left`` (a heap, the next to end on top), and the KV of the
        # rows is a sum kept as they come and go. Sequences past their projected end while still
        # there at ``now`` (``overdue``) hold their row without progressing until ``now``.
        ends: list[tuple[float, int]] = []  # (progress at which it ends, sequence)
        joined = [0.0] * n  # the batch's progress when it took its row
        kv_rows = 0.0  # sum over progressing rows of (KV positions at its row - progress then)
        done_all = 0.0
        overdue: list[int] = []  # in decode longer than projected: still there at ``now``
        kv_overdue = 0.0

        def take_row(i: int) -> None:
            nonlocal kv_rows
            joined[i] = done_all
            kv_rows += kv_base[i] + decoded[i] - done_all
            heapq.heappush(ends, (done_all + left[i], i))

        # the rows as reported: held since the report
        first_rows = [i for i in range(n) if reported[i] and mine[i].running]
        for i in first_rows:
            row_at[i] = arrive[i]
            take_row(i)
        urgent_q: deque[int] = deque()  # waiting for a row, by kind
        normal_q: deque[int] = deque()
        nxt = len(first_rows)  # sorted first: the report's rows, in its order
        t = arrive[0] if n else now
        while nxt < n or urgent_q or normal_q or ends or overdue:
            while nxt < n and arrive[nxt] <= t:
                (urgent_q if mine[nxt].urgent else normal_q).append(nxt)
                nxt += 1
            if overdue and t >= now:
                for i in overdue:
                    left[i] = float(self.OVERDUE_STEPS)
                    take_row(i)
                overdue.clear()
                kv_overdue = 0.0
            held = others if t < others_end else 0
            if rows > 0:
                held = min(held, rows)
            for queue, cap in ((urgent_q, rows + urgent_rows), (normal_q, rows)):
                while queue and (rows <= 0 or len(ends) + len(overdue) + held < cap):
                    i = queue.popleft()
                    row_at[i] = t
                    take_row(i)
            later = [arrive[nxt]] if nxt < n else []
            if held:
                later.append(others_end)
            if overdue:
                later.append(now)
            running = len(ends) + len(overdue)
            if not running:
                t = min(later)  # idle until the next arrival, or blocked until the others leave
                continue
            batch = running + held
            kv = kv_rows + len(ends) * done_all + kv_overdue + (others_kv if held else 0)
            first = ends[0][0] - done_all if ends else math.inf
            # priced at the KV the batch holds halfway to the next event (it grows a position a token)
            pace = self._pace(batch, kv)
            halfway = (min([t + first * pace] + later) - t) / pace / 2
            pace = self._pace(batch, kv + running * halfway)
            event = min(later, default=math.inf)
            if t + first * pace <= event:
                t, done = t + first * pace, first  # the first of them is done
            else:
                t, done = event, (event - t) / pace
            done_all += done
            while ends and ends[0][0] - done_all <= 1e-9:
                _, i = heapq.heappop(ends)
                decoded[i] += done_all - joined[i]
                kv_rows -= kv_base[i] + decoded[i] - done_all
                if mine[i].started and t < now:  # still there: holds its row, its KV as it was
                    overdue.append(i)
                    kv_overdue += kv_base[i] + decoded[i]
                else:
                    end[i] = t
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
        if len(slots) + 1 + min(others, rows) <= rows:
            return []  # rows for all, the newcomer too: each takes one as it arrives, none waits longer
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
        for e in self.of(decode_id).values():
            if e.started:
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
            self.forget(r)
        return len(lost)
