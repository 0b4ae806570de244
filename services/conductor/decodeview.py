"""A decode instance as a placement sees it: its predicted TBT for a new request, with its load now
and as projected to when the request would reach it. Plain logic with no I/O."""

from __future__ import annotations

import heapq
from typing import Callable

from services.conductor.decodecost import DecodeCostModel, pushed_past, request_tbt_joining
from services.conductor.placement import DecodeView
from services.conductor.projector import DecodeLoadProjector
from services.conductor.registry import Instance


# decode instances whose TBT is predicted for a request, at most: the least loaded ones now
DECODE_CANDIDATES = 8


def decode_candidates(instances: list[Instance], k: int = DECODE_CANDIDATES) -> list[Instance]:
    """The ``k`` decode instances with the fewest sequences (reported, and placed since) and KV
    positions now: the full prediction (``decode_view``, a projection of every admitted sequence
    on the instance) is made for those only, so a decision's cost does not grow with the number of
    decode instances. The instance a request's projected TBT favours is almost always among the
    least loaded now; when it is not, one a little more loaded is chosen."""
    if len(instances) <= k:
        return instances
    return heapq.nsmallest(k, instances, key=lambda i: (i.beat.running + i.beat.queued + i.placed_since_beat,
                                                        i.beat.kv_tokens, i.instance_id))


def decode_view(inst: Instance, p: DecodeLoadProjector, cost: DecodeCostModel, handoff: float, margin: float,
                judged_wait: Callable[[str, int, float], float], *, now: float, arrive: float, prompt_len: int,
                tokens: int, late: float, early: float, urgent: bool = False) -> DecodeView:
    """The decode instance's predicted TBT for this request (``prompt_len`` KV positions,
    ``tokens`` to decode, predicted to ``arrive`` after its first token and a KV hand-off of
    ``handoff`` seconds): the gaps of its running batch, and for a request short enough that its
    first gap counts, that gap (the KV hand-off left after the first token, the wait for a row, a
    step). ``margin`` is added to predicted waits, as they have lately turned out to be longer.

    Rows go first come, first served within each kind (urgent first, ``Batcher``), and
    requests admitted just before this one are predicted to reach decode within a few tenths of
    a second of it: which of them comes first is decided by their TTFT errors, and the last of
    them may wait a whole stay for a row. So its own wait is taken from its ``late`` arrival
    (behind every sequence predicted to arrive before then), and the requests it would delay
    from its ``early`` one (ahead of every sequence predicted to arrive after then): a request
    admitted a second before it, with a longer prefill, is overtaken as often as this one's
    first token comes earlier than predicted.

    ``judged_wait(rid, kv_tokens, before)`` is the wait an admitted request was judged by."""
    late = max(arrive, late)
    early = min(arrive, early)
    hb = inst.beat
    reported = hb.running + hb.queued
    tracked, tracked_kv = p.current(inst.instance_id)
    # sequences the instance reports that this conductor did not admit (e.g. before a restart)
    untracked = sum(1 for q in hb.sequences if q.attempt_id not in p.entries)
    per_seq = hb.kv_tokens / max(1, hb.running)
    now_seqs, now_kv = tracked + untracked, tracked_kv + int(untracked * per_seq)
    cap, lane = hb.max_running, hb.urgent_rows
    iid = inst.instance_id
    others_end = now + p.duration(round(p.mean_output))  # when sequences it did not admit may leave
    # the admitted sequences on its rows, in the batcher's order: one projection for every figure
    slots = p.slots(iid, now, cap, untracked, others_end, int(untracked * per_seq), urgent_rows=lane)
    fut_seqs, fut_kv = p.load_at(iid, arrive, now, slots=slots)
    fut_seqs, fut_kv = fut_seqs + untracked, fut_kv + int(untracked * per_seq)
    wait_now = handoff + p.row_wait(iid, now, now, cap, untracked, others_end, slots=slots, urgent=urgent,
                                    urgent_rows=lane)
    wait_then = handoff + p.row_wait(iid, late, now, cap, untracked, others_end, slots=slots, urgent=urgent,
                                     urgent_rows=lane)
    # the admitted requests it would delay for a row (admitted earlier, their prefills longer):
    # a short one's TBT is that wait. Each is judged on the wait its own admission was judged
    # by, as later admissions have revised it (``judged_wait``), not on the projection's
    # figure: that one is measured from its predicted arrival, the admission's from its late
    # one, and it drifts with every report (its prefill a little late, the rows ahead a step
    # slower), so a request admitted within its objective would read as already missing and
    # every later overtake would go through (``pushed_past``)
    delays, delayed = 0, []
    for rid, before, after in p.delayed_by(iid, now, early, tokens, prompt_len, cap, untracked, others_end,
                                           int(untracked * per_seq), slots=slots, urgent=urgent,
                                           urgent_rows=lane):
        delayed.append((rid, after - before))
        e = p.entries[rid]
        if e.tbt_slo <= 0:
            continue
        delays += pushed_past(cost, fut_seqs + 1, fut_kv + prompt_len, cap, e.tokens, e.tbt_slo,
                              judged_wait(rid, e.kv_tokens, before), after - before, margin)
    return DecodeView(
        iid,
        reported + inst.placed_since_beat,
        hb.kv_tokens,
        current_tbt=request_tbt_joining(cost, now_seqs + 1, now_kv + prompt_len, cap, tokens, wait_now + margin),
        predicted_tbt=request_tbt_joining(cost, fut_seqs + 1, fut_kv + prompt_len, cap, tokens, wait_then + margin),
        sheds_in=p.next_departure(iid, now, slots=slots),
        wait_now=wait_now,
        wait_then=wait_then,
        delays=delays,
        delayed=tuple(delayed),
    )
