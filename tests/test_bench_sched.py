"""``yuebing bench sched``'s plan of runs and its named figures (plain logic; the runs themselves
are the replay tool against real clusters, covered by test_replay_sim)."""

from __future__ import annotations

import argparse

from yuebing.bench_sched import PLACEMENT_POLICIES, figures, plan


def _args(**kw) -> argparse.Namespace:
    base = dict(prefill=8, decode=8, overload=2.0, goodput_load=1.0, real_prefill=2, real_decode=1)
    return argparse.Namespace(**{**base, **kw})


def test_plan_gives_only_the_global_policy_the_pool_and_the_baseline_the_same_instances():
    runs = plan(["placement", "goodput"], _args(prefill=12, decode=4))
    placement = [r for r in runs if r.experiment == "placement"]
    assert [r.policy for r in placement] == list(PLACEMENT_POLICIES)
    assert [r.use_pool for r in placement] == [False, False, False, True]
    dis, col = [r for r in runs if r.experiment == "goodput"]
    assert (dis.prefill, dis.decode, dis.use_pool, dis.policy) == (12, 4, True, "global_cache_aware")
    assert (col.colocated, col.prefill, col.decode, col.use_pool, col.policy) == (16, 0, 0, False, "round_robin")


def test_figures_report_the_ratio_and_whether_the_ordering_holds():
    runs = plan(["placement"], _args())
    for r, ttft in zip(runs, (4000.0, 2000.0, 1900.0, 1100.0)):
        r.summary = {"ttft_mean_ms": ttft}
    figs = figures(runs)
    assert figs["placement_global_vs_least_loaded"] == 0.55
    assert figs["placement_ordering_holds"] is True
    runs[2].summary = {"ttft_mean_ms": 2100.0}  # local behind least_loaded
    assert figures(runs)["placement_ordering_holds"] is False
