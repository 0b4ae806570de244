"""SLO admission, the decode cost model, the decode-load projection and SLO-aware placement:
plain classes, no NATS."""

import pytest

from libs.config import SLO, parse_slo_classes
from libs.metrics import request_tbt
from services.conductor.admission import AdmissionController
from services.conductor.decodecost import DecodeCostModel, predicted_tbt, pushed_past, request_tbt_joining
from services.conductor.feedback import TTFTErrorModel, WaitErrorModel
from services.conductor.projector import DecodeLoadProjector
from services.conductor.prefillcost import PrefillCalibration, PrefillCostModel
from services.conductor.placement import DecodeView, PrefillView, RequestView, make_policy


def test_slo_classes_parse_and_refuse_garbage():
    assert parse_slo_classes("interactive=2:0.1, batch=60:1") == {
        "interactive": SLO(2.0, 0.1), "batch": SLO(60.0, 1.0)}
    assert parse_slo_classes("") == {}
    for bad in ("x", "x=1", "=1:2", "x=a:b", "x=-1:2"):
        with pytest.raises(ValueError):
            parse_slo_classes(bad)


def test_request_tbt_is_the_90th_percentile_gap():
    assert request_tbt([]) is None
    assert request_tbt([0.5]) == 0.5
    gaps = [0.01] * 9 + [1.0]  # one stall in ten gaps: the 90th percentile is still a normal gap
    assert request_tbt(gaps) == 0.01
    gaps = [0.01] * 8 + [1.0, 1.0]  # two stalls in ten: it is a stall
    assert request_tbt(gaps) == 1.0


def test_decode_cost_model_fits_reported_steps():
    true = (0.01, 0.004, 1e-5)
    m = DecodeCostModel(coef=(0.1, 0.1, 0.0))
    for batch in (1, 2, 4, 8, 16):
        for kv in (100 * batch, 600 * batch):
            m.observe(10, batch, kv, true[0] + true[1] * batch + true[2] * kv)
    assert m.fits > 0
    assert m.step_seconds(12, 3000) == pytest.approx(0.01 + 0.048 + 0.03, rel=1e-3)
    assert m.step_seconds(0, 0) == 0.0


def test_decode_cost_model_scales_its_prior_from_one_operating_point():
    m = DecodeCostModel(coef=(0.01, 0.01, 0.0))
    for _ in range(DecodeCostModel.MIN_SAMPLES):
        m.observe(5, 4, 400, 0.1)  # the prior says 0.05 here: everything is twice as slow
    assert m.step_seconds(4, 400) == pytest.approx(0.1)
    assert m.step_seconds(8, 800) == pytest.approx(0.18)


def test_predicted_tbt_counts_rounds_when_the_batch_is_full():
    m = DecodeCostModel(coef=(0.0, 0.01, 0.0))
    assert predicted_tbt(m, 0, 0, 8) == 0.0
    assert predicted_tbt(m, 4, 400, 8) == pytest.approx(0.04)
    # 16 sequences on 8 rows: a step of 8 rows, and each sequence waits every other step
    assert predicted_tbt(m, 16, 1600, 8) == pytest.approx(0.16)
    assert predicted_tbt(m, 16, 1600, 0) == pytest.approx(0.16)


def test_a_short_requests_tbt_is_its_first_gap_as_the_metric_counts_it():
    m = DecodeCostModel(coef=(0.0, 0.01, 0.0))
    step = 0.04  # 4 rows
    for tokens in range(2, 40):
        gaps = [2.0 + step] + [step] * (tokens - 2)  # waits 2 s for its KV and a row, then steady
        assert request_tbt_joining(m, 4, 400, 8, tokens, wait=2.0) == pytest.approx(request_tbt(gaps)), tokens
    assert request_tbt_joining(m, 4, 400, 8, 10, wait=2.0) == pytest.approx(2.04)  # nine gaps: the stall is the p90
    assert request_tbt_joining(m, 4, 400, 8, 11, wait=2.0) == pytest.approx(step)  # ten: it is not
    assert request_tbt_joining(m, 4, 400, 8, 1, wait=9.0) == 0.0  # one token never reaches decode
    # more sequences than rows: never below the shared-steps estimate
    assert request_tbt_joining(m, 16, 1600, 8, 100, wait=0.0) == pytest.approx(predicted_tbt(m, 16, 1600, 8))


def test_a_full_batch_makes_a_newcomer_wait_for_departures_in_order():
    p = DecodeLoadProjector(default_token_seconds=0.1)
    now = 0.0
    for rid, tokens in (("a", 10), ("b", 30), ("c", 50)):  # in decode now, leave at 1, 3 and 5 s
        p.admit(rid, "d0", start=now, tokens=tokens, kv_tokens=10)
        p.started(rid, now)
    assert p.row_wait("d0", now, now, rows=4) == 0.0  # a row is free
    assert p.row_wait("d0", now, now, rows=3) == pytest.approx(1.0)  # the first to leave frees one
    assert p.row_wait("d0", now, now, rows=2) == pytest.approx(3.0)  # two must leave
    assert p.row_wait("d0", 2.0, now, rows=3) == 0.0  # by t=2 "a" has left: a row is free then
    assert p.row_wait("d0", 2.0, now, rows=2) == pytest.approx(1.0)  # with two rows, "b" must leave first
    assert p.row_wait("d0", now, now, rows=0) == 0.0  # an unbounded batch never waits
    assert p.row_wait("d1", now, now, rows=1) == 0.0
    # sequences the projection did not admit hold rows too
    assert p.row_wait("d0", now, now, rows=4, others=1, others_end=7.0) == pytest.approx(1.0)


def test_sequences_waiting_for_a_row_hold_it_later_first_come_first_served():
    p = DecodeLoadProjector(default_token_seconds=0.1)
    now = 0.0
    for rid in ("a", "b"):  # ten tokens each on one row: "a" decodes from 0 to 1, "b" waits, then 1 to 2
        p.admit(rid, "d0", start=now, tokens=10, kv_tokens=20)
        p.started(rid, now)
    p.admit("late", "d0", start=5.0, tokens=10, kv_tokens=20)  # reaches decode after the newcomer below
    slots = p.slots("d0", now, rows=1)
    assert [(s.row, s.end) for s in slots] == [(0.0, 1.0), (1.0, 2.0), (5.0, 6.0)]
    assert p.row_wait("d0", now, now, rows=1) == pytest.approx(2.0)  # behind both, not only "a"
    assert p.row_wait("d0", 3.0, now, rows=1) == 0.0  # both gone by 3 s; "late" comes after it
    assert p.row_wait("d0", 5.5, now, rows=1) == pytest.approx(0.5)  # now "late" is ahead
    assert p.next_departure("d0", now, slots=slots) == pytest.approx(1.0)
    # at 1.5 s "b" is decoding (5 tokens in) and "a" has left
    assert p.load_at("d0", 1.5, now, slots=slots) == (1, 25)
    assert p.load_at("d0", 0.5, now, slots=slots) == (2, 20 + 5 + 20)  # "b" waits: its KV does not grow yet
    # the whole decode time of one that waited: only its time in a row teaches the pace
    p.finished("a", output_tokens=10, seconds=3.0, natural=True, waited=2.0)
    assert p.token_seconds == pytest.approx(0.1)


def test_urgent_sequences_take_a_free_row_before_those_waiting_longer():
    # one row, ten tokens a stay at 0.1 s: "a" holds it until 1 s; "long" waits from 0.2 s and
    # "short" (urgent: its wait counts in its TBT) from 0.5 s, and gets the row first, as the
    # decode batcher gives it
    p = DecodeLoadProjector(default_token_seconds=0.1)
    p.admit("a", "d0", start=0.0, tokens=10, kv_tokens=20)
    p.started("a", 0.0)
    p.admit("long", "d0", start=0.2, tokens=10, kv_tokens=20)
    p.admit("short", "d0", start=0.5, tokens=5, kv_tokens=20, urgent=True)
    slots = {s.rid: s for s in p.slots("d0", 0.0, rows=1)}
    assert (slots["short"].row, slots["short"].end) == (pytest.approx(1.0), pytest.approx(1.5))
    assert (slots["long"].row, slots["long"].end) == (pytest.approx(1.5), pytest.approx(2.5))
    # a newcomer's wait: an urgent one arriving at 0.6 s comes after "short" and before "long";
    # one that is not, after both, even arriving before "short"
    assert p.row_wait("d0", 0.6, 0.0, rows=1, urgent=True) == pytest.approx(1.5 - 0.6)
    assert p.row_wait("d0", 0.6, 0.0, rows=1) == pytest.approx(2.5 - 0.6)
    assert p.row_wait("d0", 0.4, 0.0, rows=1) == pytest.approx(2.5 - 0.4)  # "short" still overtakes it
    assert p.row_wait("d0", 1.2, 0.0, rows=1, urgent=True) == pytest.approx(0.3)  # behind "short" only
    # an urgent newcomer arriving at 0.6 s delays "long" (not "short") by its stay
    delayed = p.delayed_by("d0", 0.0, 0.6, 5, 20, rows=1, urgent=True)
    assert [(rid, round(before, 6), round(after, 6)) for rid, before, after in delayed] == [("long", 1.3, 1.8)]
    assert [rid for rid, *_ in p.delayed_by("d0", 0.0, 0.6, 5, 20, rows=1)] == []  # not urgent: behind both
    # one urgent row beyond the batch's: "short" takes it on arrival, and an urgent newcomer takes
    # it when "short" leaves; one not urgent still waits for "a"'s row, and then for "long"'s end
    slots = {s.rid: s for s in p.slots("d0", 0.0, rows=1, urgent_rows=1)}
    assert (slots["short"].row, slots["long"].row) == (pytest.approx(0.5), pytest.approx(1.0))
    assert p.row_wait("d0", 0.6, 0.0, rows=1, urgent=True, urgent_rows=1) == pytest.approx(0.4)
    assert p.row_wait("d0", 0.2, 0.0, rows=1, urgent=True, urgent_rows=1) == 0.0
    assert p.row_wait("d0", 0.6, 0.0, rows=1, urgent_rows=1) == pytest.approx(slots["long"].end - 0.6)


def test_a_stay_is_priced_at_the_pace_of_the_batch_it_is_in():
    # a step of r rows takes 0.1 s per row: a sequence decodes slower while others share its batch
    p = DecodeLoadProjector(default_token_seconds=1.0, step=lambda rows, kv: 0.1 * rows)
    p.admit("a", "d0", start=0.0, tokens=10, kv_tokens=5)
    p.admit("b", "d0", start=0.5, tokens=10, kv_tokens=5)
    a, b = p.slots("d0", 0.0, rows=8)
    # "a" alone for 5 tokens (0.5 s); both at 0.2 s a token until "a" is done at 1.5 s ("b" 5 in);
    # "b" alone again for its last 5 at 0.1 s
    assert (a.row, a.end) == (0.0, pytest.approx(1.5))
    assert (b.row, b.end) == (0.5, pytest.approx(2.0))
    # at 1 s: "a" 2/3 through its stay, "b" 1/3 (the tokens spread evenly over a stay)
    assert p.load_at("d0", 1.0, 0.0, rows=8) == (2, (5 + 6) + (5 + 3))
    # one row: "b" waits for it and then decodes alone
    a, b = p.slots("d0", 0.0, rows=1)
    assert (a.end, b.row, b.end) == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(2.0))
    # a sequence the projection did not admit shares the batch until it leaves at 1 s: "a" at 0.2 s
    # a token until "b" comes, both at 0.3 s until 1 s, then 0.2 s; "b" ends alone at 0.1 s
    a, b = p.slots("d0", 0.0, rows=8, others=1, others_end=1.0, others_kv=100)
    a_end = 1.0 + (10 - 0.5 / 0.2 - 0.5 / 0.3) * 0.2
    assert a.end == pytest.approx(a_end)
    assert b.end == pytest.approx(a_end + (10 - 0.5 / 0.3 - (a_end - 1.0) / 0.2) * 0.1)
    # with one row, the other holds it until it leaves
    a, b = p.slots("d0", 0.0, rows=1, others=1, others_end=1.0)
    assert (a.row, a.end, b.row) == (1.0, pytest.approx(2.0), pytest.approx(2.0))


def test_a_projection_is_given_again_only_while_nothing_it_rests_on_changed():
    """Decisions a few milliseconds apart project the same decode instances: an instance's last
    projection is given again for ``REUSE_SECONDS`` of the clock, and never once its sequences, a
    report of them or the step prices changed: each of those changes the projection."""
    price = [0.1]
    p = DecodeLoadProjector(default_token_seconds=1.0, step=lambda rows, kv: price[0] * rows)
    p.admit("a", "d0", start=0.0, tokens=10, kv_tokens=5)
    p.admit("b", "d1", start=0.0, tokens=10, kv_tokens=5)

    def fresh(now: float, **kw):
        return p._project("d0", now, kw.get("rows", 1), 0, 0.0, 0, None, 0)

    first = p.slots("d0", 0.0, rows=1)
    assert p.slots("d0", 0.004, rows=1) is first and first == fresh(0.0)  # unchanged, a few ms later
    p.admit("c", "d1", start=0.0, tokens=4, kv_tokens=5)  # another instance's change
    assert p.slots("d0", 0.005, rows=1) is first
    assert p.slots("d0", 0.005, rows=2) == fresh(0.005, rows=2)  # asked for another batch
    later = 0.005 + 2 * p.REUSE_SECONDS
    assert p.slots("d0", later, rows=2) == fresh(later, rows=2) != fresh(0.005, rows=2)  # past its time
    changes = [
        lambda: p.admit("d", "d0", start=0.2, tokens=3, kv_tokens=5),  # a sequence placed there
        lambda: p.started("d", 0.3),  # its first token came
        lambda: p.progress("d0", 0.4, [("a", 1, 20, True)]),  # a report: "d" not there yet
        lambda: p.forget("d"),  # aborted
        lambda: (price.__setitem__(0, 0.2), p.repriced()),  # the step prices refitted
        lambda: p.finished("zz", 10, 1.0, True),  # a finished sequence moves the learnt stay
    ]
    now = 0.02
    for change in changes:
        before = p.slots("d0", now, rows=1)
        assert p.slots("d0", now, rows=1) is before
        change()
        after = p.slots("d0", now, rows=1)
        assert after is not before and after == fresh(now), change
    p.drop_instance("d0")
    assert p.slots("d0", now, rows=1) == []


def test_a_stay_is_priced_at_the_kv_the_batch_holds_and_an_overdue_one_is_still_there():
    q = DecodeLoadProjector(default_token_seconds=1.0, step=lambda rows, kv: 0.01 * kv)
    q.admit("c", "d0", start=0.0, tokens=10, kv_tokens=10)
    q.started("c", 0.0)
    (c,) = q.slots("d0", 0.0, rows=8)
    # the KV grows a position per token: 0.10 s for the first token, 0.19 s for the last
    assert c.end == pytest.approx(sum(0.01 * (10 + i) for i in range(10)), rel=0.05)
    # 30 s on it has not left: it is still there, for two steps at its full KV (0.2 s and a bit)
    (c,) = q.slots("d0", 30.0, rows=8)
    assert 30.0 + 2 * 0.2 <= c.end <= 30.0 + 2 * 0.21 + 1e-9


def test_the_projection_ends_on_a_clock_of_days_with_steps_of_microseconds():
    # a tiny model's fitted step is ~0; on a monotonic clock of 10^6 s, adding it barely moves time
    p = DecodeLoadProjector(default_token_seconds=1e-6, step=lambda rows, kv: 1e-9)
    now = 1_000_000.123
    for i in range(12):
        p.admit(str(i), "d0", start=now + i * 1e-7, tokens=7 + i, kv_tokens=3)
        p.started(str(i), now - 1.0 + i * 0.01)
    slots = p.slots("d0", now, rows=4)
    assert len(slots) == 12 and all(s.end >= s.row >= s.arrive for s in slots)


def test_a_decode_instances_report_of_its_sequences_is_where_the_projection_starts():
    p = DecodeLoadProjector(default_token_seconds=0.1, step=lambda rows, kv: 0.1)
    for rid, first in (("a", 0.0), ("b", 0.0), ("c", 0.0), ("d", 5.0)):  # 100 tokens each
        p.admit(rid, "d0", start=first, tokens=100, kv_tokens=10)
        p.started(rid, first)
    p.admit("e", "d0", start=12.0, tokens=100, kv_tokens=10)  # still in prefill
    # its two rows at 10 s: "b" 97 steps in (3 left), "a" 60; "c" and "d" not taken up yet
    p.progress("d0", 10.0, [("b", 97, 3, True), ("a", 60, 40, True), ("x", 5, 50, False)])
    by_end = sorted(p.slots("d0", 10.0, rows=2), key=lambda s: s.end)
    b, a = by_end[0], by_end[1]
    assert (b.row, b.end, b.tokens, b.kv_tokens) == (10.0, pytest.approx(10.3), 3, 10 + 97)
    assert a.end == pytest.approx(14.0)
    # "c" then "d" (first tokens in that order) take the rows "b" and "a" free; "e" the next one
    assert [s.end for s in by_end[2:]] == [pytest.approx(20.3), pytest.approx(24.0), pytest.approx(30.3)]
    assert p.row_wait("d0", 10.0, 10.0, rows=2) == pytest.approx(10.3)  # a newcomer: behind "c" and "d"
    p.progress("d0", 11.0, [("a", 70, 30, True), ("c", 5, 95, True)])
    assert "b" not in p.entries and "c" in p.entries  # "b" was there and is not now: it has left
    ends = sorted(s.end for s in p.slots("d0", 11.0, rows=2))
    assert ends == [pytest.approx(14.0), pytest.approx(20.5), pytest.approx(24.0), pytest.approx(30.5)]
    # a sequence it says it runs past what was expected of it has two steps left, or its limit
    p.progress("d0", 12.0, [("a", 100, 1, True), ("c", 15, 85, True)])
    assert p.entries["a"].left == 1 and min(s.end for s in p.slots("d0", 12.0, rows=2)) == pytest.approx(12.1)
    p.drop_instance("d0")
    assert not p.entries


def test_a_projection_counts_only_its_own_instances_sequences():
    p = DecodeLoadProjector(default_token_seconds=0.1, step=lambda rows, kv: 0.1)
    p.admit("a", "d0", start=0.0, tokens=10, kv_tokens=10)
    p.admit("b", "d1", start=0.0, tokens=20, kv_tokens=10)
    p.started("a", 0.0)
    p.started("b", 0.0)
    assert [s.rid for s in p.slots("d0", 0.0)] == ["a"] and p.current("d1") == (1, 10)
    p.admit("a", "d1", start=1.0, tokens=10, kv_tokens=10)  # placed again elsewhere (a resume)
    assert p.slots("d0", 1.0) == [] and sorted(s.rid for s in p.slots("d1", 1.0)) == ["a", "b"]
    p.progress("d1", 2.0, [("b", 10, 10, True)])  # "a" not there yet: not seen, so not gone
    assert set(p.of("d1")) == {"a", "b"}
    p.finished("b", 20, 2.0, True)
    p.drop_instance("d1")
    assert not p.entries and p.of("d1") == {} and p.slots("d1", 3.0) == []


def test_a_newcomer_reaching_decode_first_delays_those_admitted_before_it():
    p = DecodeLoadProjector(default_token_seconds=0.1, step=lambda rows, kv: 0.1)
    p.admit("run", "d0", start=0.0, tokens=30, kv_tokens=10)  # holds the one row until 3 s
    p.started("run", 0.0)
    p.admit("short", "d0", start=4.0, tokens=3, kv_tokens=10)  # a long prefill: reaches decode at 4 s
    assert p.delayed_by("d0", 0.0, arrive=5.0, tokens=50, kv_tokens=10, rows=1) == []  # after it: no harm
    # one reaching decode at 3.5 s takes the row first: "short" waits until 8.5 s instead of none
    assert p.delayed_by("d0", 0.0, arrive=3.5, tokens=50, kv_tokens=10, rows=1) == [
        ("short", 0.0, pytest.approx(4.5))]
    assert p.delayed_by("d0", 0.0, arrive=3.5, tokens=50, kv_tokens=10, rows=0) == []  # unbounded batch
    assert set(p.entries) == {"run", "short"}  # the newcomer was only tried


def test_a_delay_counts_when_it_takes_an_admitted_short_request_past_its_objective():
    cost = DecodeCostModel(coef=(0.1, 0.0, 0.0))  # a step of 0.1 s
    short = dict(cost=cost, sequences=4, kv_tokens=400, max_running=8, tokens=3, slo=0.348)
    assert pushed_past(**short, judged=0.05, added=0.3, margin=0.05)  # 0.15 s -> 0.5 s
    assert not pushed_past(**short, judged=0.05, added=0.1, margin=0.05)  # 0.3 s: still within
    assert not pushed_past(**short, judged=0.3, added=0.3, margin=0.0)  # past it already: not this delay
    # judged before any margin, and with it after: a request admitted near its objective stays
    # protected though the margin has grown past what it had left
    assert pushed_past(**short, judged=0.2, added=0.02, margin=0.1)
    assert not pushed_past(**short, judged=0.2, added=0.02, margin=0.0)
    long = {**short, "tokens": 50}  # its first gap is not its TBT: a later row costs it nothing
    assert not pushed_past(**long, judged=0.05, added=5.0, margin=0.1)


def test_projection_follows_admitted_requests_into_and_out_of_decode():
    p = DecodeLoadProjector(default_token_seconds=0.1)
    now = 100.0
    p.admit("a", "d0", start=now + 2.0, tokens=10, kv_tokens=50)  # in decode from t+2 to t+3
    p.admit("b", "d0", start=now + 0.5, tokens=100, kv_tokens=70)  # from t+0.5 to t+10.5
    p.admit("c", "d1", start=now + 1.0, tokens=10, kv_tokens=30)
    assert p.load_at("d0", now, now) == (0, 0)
    assert p.load_at("d0", now + 1.0, now)[0] == 1
    seqs, kv = p.load_at("d0", now + 2.5, now)
    assert seqs == 2 and kv >= 120
    assert p.load_at("d0", now + 5.0, now)[0] == 1  # "a" has left by then
    assert p.current("d0") == (0, 0)  # nothing has reached decode yet
    p.started("b", now + 0.4)
    assert p.current("d0") == (1, 70)
    assert p.next_departure("d0", now + 0.4) == pytest.approx(1.0 + 1.6)  # "a" ends at t+3
    p.finished("b", output_tokens=100, seconds=10.0, natural=True)
    assert p.current("d0") == (0, 0)
    p.drop_instance("d1")
    assert p.load_at("d1", now + 1.5, now) == (0, 0)


def test_projection_learns_output_length_and_token_time():
    p = DecodeLoadProjector(default_output_tokens=128, default_token_seconds=0.5)
    assert p.expected_tokens(1000, ignore_eos=True) == 1000
    assert p.expected_tokens(1000, ignore_eos=False) == 128
    assert p.expected_tokens(16, ignore_eos=False) == 16
    for i in range(20):
        p.admit(str(i), "d0", 0.0, 40, 10)
        p.finished(str(i), output_tokens=40, seconds=2.0, natural=True)
    assert p.mean_output == pytest.approx(40)
    assert p.token_seconds == pytest.approx(0.05)
    p.admit("x", "d0", 0.0, 40, 10)
    p.finished("x", output_tokens=3, seconds=100.0, natural=False)  # an abort teaches nothing
    assert p.token_seconds == pytest.approx(0.05)


def test_a_prior_token_time_holds_only_until_a_sequence_has_finished():
    p = DecodeLoadProjector(default_token_seconds=0.05)
    p.prior(0.1)  # a full batch's step, once decode's rows are known
    p.admit("a", "d0", 0.0, 40, 10)
    assert p.duration(40) == pytest.approx(4.0)
    assert p.next_departure("d0", 0.0) == pytest.approx(4.0)
    p.prior(-1.0)  # no guess: nothing changes
    assert p.token_seconds == pytest.approx(0.1)
    p.finished("a", output_tokens=40, seconds=6.0, natural=True)
    p.prior(0.1)  # what was seen wins from then on
    assert p.token_seconds == pytest.approx(0.15)


def test_projection_forgets_requests_never_seen_again():
    p = DecodeLoadProjector(default_token_seconds=0.1)
    p.admit("lost", "d0", start=10.0, tokens=10, kv_tokens=5)
    assert p.prune(10.0 + DecodeLoadProjector.LOST_AFTER - 1) == 0
    assert p.prune(10.0 + DecodeLoadProjector.LOST_AFTER + 1) == 1
    assert not p.entries


def test_ttft_predictions_are_scaled_by_how_they_have_turned_out():
    m = TTFTErrorModel()
    for _ in range(TTFTErrorModel.MIN_SAMPLES - 1):
        m.observe(predicted=2.0, actual=3.0)
    assert m.factor() == 1.0  # too few reports yet: the predictions as they are
    m = TTFTErrorModel()
    for i in range(100):  # 85 came true, 15 took 1.5x as long
        m.observe(predicted=2.0, actual=3.0 if i % 20 < 3 else 2.0)
    assert m.factor() == pytest.approx(1.5)  # 9 in 10 were within 1.5x
    m = TTFTErrorModel()
    for _ in range(100):
        m.observe(predicted=2.0, actual=1.0)  # predictions run long: admit more
        m.observe(predicted=0.01, actual=5.0)  # tiny predictions say nothing and are left out
    assert m.factor() == pytest.approx(0.5)
    for _ in range(300):
        m.observe(predicted=1.0, actual=100.0)
    assert m.factor() == TTFTErrorModel.BOUNDS[1]


def test_the_ttft_error_also_tells_how_early_first_tokens_come():
    m = TTFTErrorModel(window=100)
    for _ in range(TTFTErrorModel.MIN_SAMPLES - 1):
        m.observe(predicted=1.0, actual=0.5)
    assert m.early_factor() == 1.0  # too few reports yet: the predictions as they are
    for i in range(100):  # one in ten came 30 % early, the rest 10 % late
        m.observe(predicted=1.0, actual=0.7 if i % 10 == 0 else 1.1)
    assert m.early_factor() == pytest.approx(0.7)  # the 10th percentile
    assert m.factor() == pytest.approx(1.1)  # the 90th
    for _ in range(100):
        m.observe(predicted=1.0, actual=1.5)  # all late: a first token is never taken to come after
    assert m.early_factor() == 1.0            # its prediction in judging whom it overtakes
    for _ in range(100):
        m.observe(predicted=1.0, actual=0.01)
    assert m.early_factor() == TTFTErrorModel.BOUNDS[0]


def test_no_admission_control_admits_everything():
    a = AdmissionController("none")
    assert a.decide(SLO(1.0, 0.1), ttft=100.0, tbt_now=5.0, tbt_projected=5.0).admitted


def test_ttft_over_its_objective_is_rejected_with_retry_after():
    for mode in ("early", "predictive"):
        a = AdmissionController(mode)
        v = a.decide(SLO(2.0, 0.1), ttft=7.5, tbt_now=0.01, tbt_projected=0.01)
        assert not v.admitted and v.status == 429 and v.cause == "ttft"
        assert v.retry_after == pytest.approx(5.5)
        assert "time to first token" in v.reason
        assert a.decide(SLO(2.0, 0.1), ttft=1.5, tbt_now=0.01, tbt_projected=0.01).admitted
        assert a.rejected["ttft"] == 1 and a.admitted == 1


def test_early_judges_decode_now_predictive_judges_it_on_arrival():
    slo = SLO(10.0, 0.1)
    busy_now_free_later = dict(ttft=1.0, tbt_now=0.3, tbt_projected=0.05, tbt_retry=2.0)
    free_now_busy_later = dict(ttft=1.0, tbt_now=0.05, tbt_projected=0.3, tbt_retry=2.0)
    early, pred = AdmissionController("early"), AdmissionController("predictive")
    v = early.decide(slo, **busy_now_free_later)
    assert not v.admitted and v.cause == "tbt" and v.retry_after == 2.0
    assert pred.decide(slo, **busy_now_free_later).admitted
    assert early.decide(slo, **free_now_busy_later).admitted
    assert not pred.decide(slo, **free_now_busy_later).admitted
    assert AdmissionController("predictive").decide(SLO(0, 0), ttft=1e9, tbt_now=1e9, tbt_projected=1e9).admitted
    # a forecast not yet checked against outcomes does not overrule the load now
    assert not pred.decide(slo, **busy_now_free_later, projection_checked=False).admitted
    assert not pred.decide(slo, **free_now_busy_later, projection_checked=False).admitted
    assert pred.decide(slo, ttft=1.0, tbt_now=0.05, tbt_projected=0.05, projection_checked=False).admitted
    # one that would delay admitted requests past their objective: predictive rejects it
    v = pred.decide(slo, ttft=1.0, tbt_now=0.05, tbt_projected=0.05, tbt_retry=3.0, delays=2)
    assert not v.admitted and v.cause == "tbt" and "delay 2 admitted" in v.reason and v.retry_after == 3.0
    assert early.decide(slo, ttft=1.0, tbt_now=0.05, tbt_projected=0.05, delays=2).admitted
    with pytest.raises(ValueError):
        AdmissionController("sometimes")


def _policy(name="global_cache_aware", colocated=False):
    model = PrefillCostModel(PrefillCalibration(fixed=0.01, per_token=1e-3, per_pair=0.0))
    return make_policy(name, model, colocated=colocated)


def test_decode_placement_prefers_the_lowest_predicted_tbt_within_the_slo():
    req = RequestView(prompt_len=100, block_size=16, pool_blocks=0, tbt_slo=0.1)
    prefills = [PrefillView("p0", 0.0, 0)]
    decodes = [DecodeView("d0", 1, 100, predicted_tbt=0.2), DecodeView("d1", 9, 900, predicted_tbt=0.08),
               DecodeView("d2", 5, 500, predicted_tbt=0.09)]
    p = _policy().place(req, prefills, decodes)
    assert p.decode_id == "d1" and p.predicted_tbt == 0.08
    # all over the objective: still the lowest
    over = [DecodeView("d0", 1, 100, predicted_tbt=0.3), DecodeView("d1", 1, 100, predicted_tbt=0.2)]
    assert _policy().place(req, prefills, over).decode_id == "d1"
    # where it would delay an admitted request past its objective counts as over it
    harm = [DecodeView("d0", 1, 100, predicted_tbt=0.05, delays=1), DecodeView("d1", 1, 100, predicted_tbt=0.09)]
    assert _policy().place(req, prefills, harm).decode_id == "d1"


def test_colocated_placement_decodes_where_it_prefilled():
    req = RequestView(prompt_len=100, block_size=16, pool_blocks=0)
    prefills = [PrefillView("w0", 5.0, 0), PrefillView("w1", 0.0, 0), PrefillView("w2", 0.0, 0)]
    decodes = [DecodeView("w0", 0, 0), DecodeView("w1", 9, 900)]  # w2's decode half is not up
    policy = _policy("round_robin", colocated=True)
    chosen = [policy.place(req, prefills, decodes) for _ in range(4)]
    assert [(c.prefill_id, c.decode_id) for c in chosen] == [("w0", "w0"), ("w1", "w1")] * 2
    ll = _policy("least_loaded", colocated=True).place(req, prefills, decodes)
    assert (ll.prefill_id, ll.decode_id) == ("w1", "w1")
    none = _policy(colocated=True).place(req, [PrefillView("w2", 0.0, 0)], decodes)
    assert not none.admitted and none.status == 503


def test_equally_good_instances_are_told_apart_by_the_prompts_affinity():
    """Idle instances holding nothing of a prompt are equally good: cache-aware policies pick by
    the prompt's first block (rendezvous hashing), so conversations spread and a conversation's
    turns meet again; an instance holding the prefix still wins; least_loaded breaks ties at random."""
    prefills = [PrefillView(f"p{i}", 0.0, 0) for i in range(4)]
    decodes = [DecodeView("d0", 0, 0)]
    for name in ("local_cache_aware", "global_cache_aware"):
        policy = _policy(name)
        chosen = {k: policy.place(RequestView(100, 16, 0, affinity=bytes([k]) * 32), prefills, decodes).prefill_id
                  for k in range(32)}
        assert set(chosen.values()) == {"p0", "p1", "p2", "p3"}  # spread, not all to the first
        again = {k: policy.place(RequestView(200, 16, 0, affinity=bytes([k]) * 32), prefills, decodes).prefill_id
                 for k in range(32)}
        assert again == chosen  # the same first block, the same instance
        holder = [*prefills[:3], PrefillView("p3", 0.0, 4)]
        assert all(policy.place(RequestView(100, 16, 0, affinity=bytes([k]) * 32), holder, decodes).prefill_id == "p3"
                   for k in range(32))
    ll = _policy("least_loaded")
    picks = [ll.place(RequestView(100, 16, 0, affinity=b"x" * 32), prefills, decodes).prefill_id for _ in range(64)]
    assert set(picks) == {"p0", "p1", "p2", "p3"}  # the same prompt: no affinity, spread by chance
    busy = [PrefillView("p0", 0.5, 0), PrefillView("p1", 0.0, 0)]
    assert all(ll.place(RequestView(100, 16, 0), busy, decodes).prefill_id == "p1" for _ in range(16))


def test_the_wait_margin_is_how_much_longer_waits_have_lately_turned_out():
    m = WaitErrorModel(window=100)
    for _ in range(WaitErrorModel.MIN_SAMPLES - 1):
        m.observe(0.2, 1.2)
    assert m.margin() == 0.0 and not m.learnt  # too few to judge by
    m.observe(0.2, 1.2)
    assert m.margin() == pytest.approx(1.0) and m.learnt
    for i in range(100):  # now mostly right, one in eight a little late: the 90th percentile of the errors
        m.observe(0.5, 0.5 + (0.3 if i % 8 == 0 else 0.01))
    assert m.margin() == pytest.approx(0.3)
    for i in range(100):  # one a few seconds late (overtaken) in a hundred does not set the margin
        m.observe(0.5, 0.5 + (3.0 if i == 0 else 0.01))
    assert m.margin() == pytest.approx(0.01)
    for _ in range(100):
        m.observe(1.0, 0.2)  # waits shorter than predicted never make the margin negative
    assert m.margin() == 0.0
    m.observe(-1.0, 5.0)  # nonsense is ignored
    assert m.margin() == 0.0


def test_the_wait_margin_learns_only_from_waits_an_admission_can_turn_on():
    """Deep queues' forecasts, off by seconds, do not widen the margin on a row free within a step."""
    m = WaitErrorModel(window=64)
    for i in range(40):
        m.observe(0.05, 0.05 + (0.1 if i % 5 == 0 else 0.02), within=0.35)
        m.observe(6.0, 9.0, within=0.35)  # a long request behind a queue many sequences deep
    assert m.learnt and m.margin() == pytest.approx(0.1)
    for _ in range(6):
        m.observe(6.0, 9.0)  # with no objective to bound it, every forecast counts
    assert m.margin() == pytest.approx(3.0)
