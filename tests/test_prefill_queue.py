"""The conductor's view of each prefill instance's queue, hand-off tail included (plain logic)."""

import pytest

from services.conductor.prefillqueue import HandOffModel, PrefillQueues


def test_the_handoff_model_recovers_a_fixed_part_and_a_cost_per_token():
    m = HandOffModel()
    assert m.seconds(500) == 0.0  # nothing known: no tail
    for tokens in (50, 100, 200, 400, 800, 1600, 300, 700, 1200, 60):
        m.observe(tokens, 0.05 + 0.001 * tokens)
    assert m.coef == pytest.approx((0.05, 0.001), rel=1e-6)
    assert m.seconds(1000) == pytest.approx(1.05)


def test_the_handoff_model_uses_the_mean_until_it_can_fit_and_a_median_without_spread():
    m = HandOffModel()
    m.observe(100, 0.2)
    m.observe(110, 0.4)
    assert m.seconds(10_000) == pytest.approx(0.3)  # a first estimate, all of it fixed
    for _ in range(10):
        m.observe(100, 0.25)
    assert m.coef == (0.25, 0.0)  # lengths alike: no slope to fit
    m.observe(0, 5.0)  # no hand-off: not a sample
    m.observe(100, -1.0)
    assert m.coef == (0.25, 0.0)


def _trained(fixed=0.1, per_token=0.001) -> PrefillQueues:
    q = PrefillQueues()
    for tokens in (100, 200, 400, 800, 100, 200, 400, 800):
        q.handoff.observe(tokens, fixed + per_token * tokens)
    return q


def test_a_queued_task_counts_its_compute_and_its_handoff():
    q = _trained()
    q.placed("p0", "a", 0.5, 400)
    q.placed("p0", "b", 1.0, 100)
    q.placed("p1", "c", 2.0, 100)
    assert q.seconds("p0", now=0.0) == pytest.approx(0.5 + 0.5 + 1.0 + 0.2)
    assert q.seconds("p1", now=0.0) == pytest.approx(2.2)
    assert q.seconds("p2", now=0.0) == 0.0


def test_after_its_first_token_a_task_counts_what_is_left_of_its_handoff_until_done():
    q = _trained()
    q.placed("p0", "a", 0.5, 400)  # hand-off 0.5 s
    q.placed("p0", "b", 1.0, 100)  # 1.0 + 0.2
    q.first_token("p0", "a", now=10.0)
    assert q.seconds("p0", now=10.0) == pytest.approx(0.5 + 1.2)
    assert q.seconds("p0", now=10.3) == pytest.approx(0.2 + 1.2)
    assert q.seconds("p0", now=20.0) == pytest.approx(1.2)  # overdue: nothing more is predicted
    assert q.pending("p0") == 2  # ...but it holds the instance until done
    q.done("p0", "a", 400, 0.9)
    assert q.pending("p0") == 1
    assert q.seconds("p0", now=20.0) == pytest.approx(1.2, abs=0.05)  # the slow sample refits a little


def test_a_task_that_ends_without_a_handoff_is_released_and_not_learned_from():
    q = _trained()
    before = q.handoff.coef
    q.placed("p0", "a", 0.5, 400)
    q.done("p0", "a", 0, 0.0)  # failed, or finished at its first token
    assert q.pending("p0") == 0 and q.seconds("p0", now=0.0) == 0.0
    assert q.handoff.coef == before
    q.done("p9", "zz", 0, 0.0)  # unknown instance or task: nothing to do
    q.first_token("p9", "zz", now=1.0)


def test_lost_instances_and_done_reports_that_never_come_are_forgotten():
    q = PrefillQueues(lost_after=30.0)
    q.placed("p0", "a", 0.5, 100)
    q.placed("p0", "b", 0.5, 100)
    q.placed("p1", "c", 0.5, 100)
    q.first_token("p0", "a", now=0.0)
    assert q.prune(now=29.0) == 0
    assert q.prune(now=31.0) == 1  # a's done report is lost; b still waits for compute: kept
    assert q.pending("p0") == 1
    q.drop_instance("p1")
    assert q.pending("p1") == 0 and q.seconds("p1", now=31.0) == 0.0


def test_the_task_at_the_head_counts_only_what_is_left_of_its_compute():
    q = _trained()
    q.placed("p0", "a", 5.0, 400, now=0.0)  # an idle instance takes it up at once; hand-off 0.5 s
    q.placed("p0", "b", 1.0, 100, now=1.0)  # waits behind a: 1.0 + 0.2
    assert q.seconds("p0", now=0.0) == pytest.approx(5.5 + 1.2)
    assert q.seconds("p0", now=4.0) == pytest.approx(1.5 + 1.2)  # a is 4 s into its 5
    assert q.seconds("p0", now=9.0) == pytest.approx(0.5 + 1.2)  # a overdue: only its hand-off
    q.first_token("p0", "a", now=5.0)
    q.done("p0", "a", 400, 0.5, now=5.5)  # b starts now
    assert q.seconds("p0", now=5.5) == pytest.approx(1.2)
    assert q.seconds("p0", now=6.0) == pytest.approx(0.5 + 0.2)


def test_a_start_is_only_known_from_an_idle_instance_or_the_done_report_ahead():
    q = _trained()
    q.placed("p0", "a", 2.0, 100)  # untracked start: counted whole until its first token
    assert q.seconds("p0", now=100.0) == pytest.approx(2.2)
    q.placed("p1", "x", 2.0, 100, now=0.0)
    q.placed("p1", "y", 2.0, 100, now=0.0)
    assert q.seconds("p1", now=1.0) == pytest.approx(1.2 + 2.2)  # y has not started: whole
    q.done("p1", "zz", 0, 0.0, now=1.0)  # a report of no task here starts nothing
    assert q.seconds("p1", now=1.5) == pytest.approx(0.7 + 2.2)
    q.done("p1", "x", 0, 0.0, now=1.5)  # x failed early: y starts
    assert q.seconds("p1", now=2.5) == pytest.approx(1.2)


def test_the_start_lag_is_learnt_from_first_tokens_and_counted_by_every_task():
    q = PrefillQueues()
    # an idle instance: the task starts when placed; each first token comes 0.1 s past its compute
    for k in range(8):
        t = 10.0 * k
        q.placed("p0", f"t{k}", 0.5, 100, now=t)
        q.first_token("p0", f"t{k}", now=t + 0.6)
        q.done("p0", f"t{k}", 0, 0.0, now=t + 0.6)
    assert q.lag.seconds == pytest.approx(0.1)
    # three queued tasks each count their compute and the lag, and the new prompt its own lag
    for rid in ("a", "b", "c"):
        q.placed("p1", rid, 0.5, 100, now=100.0)
    assert q.seconds("p1", now=100.0) == pytest.approx(3 * 0.6 + 0.1)
    assert q.seconds("p1", now=100.2) == pytest.approx(0.4 + 2 * 0.6 + 0.1)  # the head, 0.2 s in
    assert q.seconds("p9", now=100.0) == pytest.approx(0.1)  # idle: only the new prompt's lag


def test_the_start_lag_learns_from_a_queued_task_from_when_the_one_ahead_was_done():
    q = PrefillQueues()
    q.placed("p0", "a", 0.5, 100, now=0.0)
    q.placed("p0", "b", 0.5, 100, now=0.0)  # queued: its start is not known yet
    q.first_token("p0", "a", now=0.5)
    q.done("p0", "a", 0, 0.0, now=0.5)  # b starts now
    q.first_token("p0", "b", now=1.3)
    q.first_token("p0", "b", now=9.0)  # a repeated report is not a second sample
    assert list(q.lag._samples) == pytest.approx([0.0, 0.3])


def test_a_compute_model_that_runs_high_gives_a_negative_lag_but_no_task_counts_below_nothing():
    q = PrefillQueues()
    for k in range(8):
        q.placed("p0", f"t{k}", 1.0, 100, now=10.0 * k)
        q.first_token("p0", f"t{k}", now=10.0 * k + 0.4)
        q.done("p0", f"t{k}", 0, 0.0, now=10.0 * k + 0.4)
    assert q.lag.seconds == pytest.approx(-0.6)
    q.placed("p1", "a", 0.5, 100, now=100.0)
    q.placed("p1", "b", 1.0, 100, now=100.0)
    assert q.seconds("p1", now=100.0) == pytest.approx(0.0 + 0.4)
    q.first_token("p0", "zz", now=1.0)  # unknown: nothing learnt
    q.lag.observe(-1.0, 0.5)  # a clock gone backwards: not a sample
    assert len(q.lag._samples) == 8


def test_waiting_tasks_are_priced_again_and_computed_ones_are_not():
    q = PrefillQueues()
    q.placed("p0", "a", 2.0, 1000, now=0.0)  # priced at a guess of 2 ms a token
    q.placed("p0", "b", 2.0, 1000, reused=512)
    q.placed("p0", "c", 2.0, 1000, reused=512, load_seconds=0.3)  # its load is slower than its compute
    q.placed("p1", "d", 2.0, 1000)
    q.first_token("p1", "d", now=0.5)  # computed: only its hand-off is left, nothing to price
    assert q.reprice(lambda prompt, reused: 1e-4 * (prompt - reused)) == 3
    assert q.seconds("p0", now=0.0) == pytest.approx(0.1 + 0.0488 + 0.3)
    assert q.seconds("p1", now=0.5) == 0.0
