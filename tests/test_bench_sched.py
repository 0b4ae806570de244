"""``yuebing bench sched``'s plan of runs, its named figures and its CPU accounting (plain logic
and real processes; the runs themselves are the replay tool against real clusters, covered by
test_replay_sim)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil
import pytest

from bench.sched import PLACEMENT_POLICIES, arena_use, cpu_use, figures, plan
from yuebing.cluster import LocalCluster
from libs.config import from_env


def _args(**kw) -> argparse.Namespace:
    base = dict(prefill=8, decode=8, overload=2.0, goodput_load="1", real_prefill=2, real_decode=1,
                goodput_admission="predictive", colocated_admission="none")
    return argparse.Namespace(**{**base, **kw})


def test_plan_gives_only_the_global_policy_the_pool_and_the_baseline_the_same_instances():
    runs = plan(["placement", "goodput"], _args(prefill=12, decode=4))
    placement = [r for r in runs if r.experiment == "placement"]
    assert [r.policy for r in placement] == list(PLACEMENT_POLICIES)
    assert [r.use_pool for r in placement] == [False, False, False, True]
    dis, col = [r for r in runs if r.experiment == "goodput"]
    assert (dis.prefill, dis.decode, dis.use_pool, dis.policy) == (12, 4, True, "global_cache_aware")
    assert (col.colocated, col.prefill, col.decode, col.use_pool, col.policy) == (16, 0, 0, False, "round_robin")
    assert (dis.admission, col.admission) == ("predictive", "none")  # the system as deployed vs a plain engine
    assert (dis.name, col.name) == ("goodput-disaggregated", "goodput-colocated")
    # the real-model run of the same experiment: 2P+1D against 3 colocated, admission alike
    dis, col = plan(["real"], _args())
    assert (dis.prefill, dis.decode, dis.engine, dis.admission) == (2, 1, "model", "predictive")
    assert (col.colocated, col.engine, col.admission, col.use_pool) == (3, "model", "none", False)


def test_a_goodput_sweep_pairs_each_load_and_reports_a_ratio_per_load():
    runs = plan(["goodput"], _args(goodput_load="2,3", goodput_admission="none", colocated_admission="early"))
    assert [(r.name, r.load, r.admission) for r in runs] == [
        ("goodput-disaggregated-x2", 2.0, "none"), ("goodput-colocated-x2", 2.0, "early"),
        ("goodput-disaggregated-x3", 3.0, "none"), ("goodput-colocated-x3", 3.0, "early")]
    for r, rps in zip(runs, (3.0, 2.0, 4.0, 1.0)):
        r.summary = {"goodput_rps": rps}
    figs = figures(runs)
    assert (figs["goodput_x2_ratio"], figs["goodput_x3_ratio"]) == (1.5, 4.0)
    assert figs["goodput_x3_colocated_rps"] == 1.0
    runs[3].summary = {}  # a load whose baseline did not run has no ratio
    assert "goodput_x3_ratio" not in figures(runs)
    with pytest.raises(SystemExit):
        plan(["goodput"], _args(goodput_load="2,0"))


def test_goodput_repeats_interleave_the_sides_and_report_each_repeats_ratio():
    runs = plan(["goodput"], _args(goodput_load="5", repeats=3))
    assert [(r.name, r.repeat, bool(r.colocated)) for r in runs] == [
        ("goodput-disaggregated-r1", 1, False), ("goodput-colocated-r1", 1, True),
        ("goodput-disaggregated-r2", 2, False), ("goodput-colocated-r2", 2, True),
        ("goodput-disaggregated-r3", 3, False), ("goodput-colocated-r3", 3, True)]
    for r, rps in zip(runs, (4.0, 2.0, 3.0, 2.0, 3.5, 1.0)):
        r.summary = {"goodput_rps": rps}
    figs = figures(runs)
    assert figs["goodput_ratios"] == [2.0, 1.5, 3.5]
    assert (figs["goodput_disaggregated_rps"], figs["goodput_colocated_rps"]) == (3.5, pytest.approx(1.6667))
    assert (figs["goodput_ratio"], figs["goodput_repeats"]) == (2.1, 3)  # the ratio of the means
    runs[5].summary = {}  # a repeat whose baseline did not run counts on neither side
    figs = figures(runs)
    assert (figs["goodput_ratios"], figs["goodput_disaggregated_rps"], figs["goodput_ratio"]) == ([2.0, 1.5], 3.5, 1.75)
    real = plan(["real"], _args(repeats=2))
    assert [(r.name, r.engine, r.repeat) for r in real] == [
        ("real-disaggregated-r1", "model", 1), ("real-colocated-r1", "model", 1),
        ("real-disaggregated-r2", "model", 2), ("real-colocated-r2", "model", 2)]
    for r, rps in zip(real, (1.4, 0.3, 1.2, 0.4)):
        r.summary = {"goodput_rps": rps}
    assert figures(real)["real_ratios"] == [4.67, 3.0]
    swept = plan(["goodput"], _args(goodput_load="3,5", repeats=2))
    assert [r.name for r in swept][:4] == ["goodput-disaggregated-x3-r1", "goodput-colocated-x3-r1",
                                           "goodput-disaggregated-x3-r2", "goodput-colocated-x3-r2"]


def test_overload_repeats_interleave_the_modes_and_count_where_prediction_was_ahead():
    runs = plan(["overload"], _args(admissions=["early", "predictive"], repeats=3))
    assert [(r.name, r.admission, r.repeat) for r in runs] == [
        ("overload-early-r1", "early", 1), ("overload-predictive-r1", "predictive", 1),
        ("overload-early-r2", "early", 2), ("overload-predictive-r2", "predictive", 2),
        ("overload-early-r3", "early", 3), ("overload-predictive-r3", "predictive", 3)]
    results = [(60, 1000, 0.99, 4.0), (50, 800, 0.99, 4.2),  # ahead on all three counts
               (70, 500, 0.98, 4.1), (65, 900, 0.97, 4.0),  # fewer rejected only
               (55, 300, 0.97, 4.0), (58, 200, 0.99, 4.1)]  # less waste, higher attainment
    for r, (rej, waste, att, rps) in zip(runs, results):
        r.summary = {"rejected": rej, "wasted_prefill_tokens": waste, "slo_attainment_admitted": att,
                     "goodput_rps": rps}
    figs = figures(runs)
    assert figs["overload_repeats"] == 3
    assert figs["overload_predictive_fewer_rejected_runs"] == 2
    assert figs["overload_predictive_less_waste_runs"] == 2
    assert figs["overload_predictive_attainment_not_lower_runs"] == 2
    assert figs["overload_early_rejected"] == pytest.approx(185 / 3, abs=1e-4)
    assert figs["overload_predictive_wasted_prefill_tokens"] == pytest.approx(633.3333, abs=1e-4)
    assert "overload_none_rejected" not in figs  # not run
    one = plan(["overload"], _args())
    assert [r.name for r in one] == ["overload-none", "overload-early", "overload-predictive"]
    for r in one:
        r.summary = {"rejected": 7, "wasted_prefill_tokens": 9, "slo_attainment_admitted": 1.0, "goodput_rps": 2.0}
    figs = figures(one)
    assert (figs["overload_none_rejected"], figs["overload_repeats"]) == (7, 1)
    assert figs["overload_predictive_fewer_rejected_runs"] == 0  # a tie is not ahead


def test_figures_report_the_ratio_and_whether_the_ordering_holds():
    runs = plan(["placement"], _args())
    for r, ttft in zip(runs, (4000.0, 2000.0, 1900.0, 1100.0)):
        r.summary = {"ttft_mean_ms": ttft}
    figs = figures(runs)
    assert figs["placement_global_vs_least_loaded"] == 0.55
    assert figs["placement_ordering_holds"] is True
    runs[2].summary = {"ttft_mean_ms": 2100.0}  # local behind least_loaded
    assert figures(runs)["placement_ordering_holds"] is False


def test_placement_repeats_interleave_the_policies_and_report_means_and_each_repeats_ratio():
    runs = plan(["placement"], _args(repeats=2))
    assert [(r.name, r.repeat) for r in runs] == [
        ("placement-random-r1", 1), ("placement-least_loaded-r1", 1), ("placement-local_cache_aware-r1", 1),
        ("placement-global_cache_aware-r1", 1), ("placement-random-r2", 2), ("placement-least_loaded-r2", 2),
        ("placement-local_cache_aware-r2", 2), ("placement-global_cache_aware-r2", 2)]
    for r, ttft in zip(runs, (9000.0, 2000.0, 1500.0, 1300.0,  # in order, 0.65x
                              8000.0, 2400.0, 1400.0, 1100.0)):  # in order, 0.458x
        r.summary = {"ttft_mean_ms": ttft}
    figs = figures(runs)
    assert figs["placement_ttft_mean_ms_least_loaded"] == 2200.0
    assert figs["placement_global_vs_least_loaded"] == 0.545  # 1200 / 2200, the ratio of the means
    assert figs["placement_global_vs_least_loaded_runs"] == [0.65, 0.458]
    assert (figs["placement_repeats"], figs["placement_ordering_holds_runs"]) == (2, 2)
    runs[6].summary = {"ttft_mean_ms": 2500.0}  # local behind least_loaded in the second repeat only
    figs = figures(runs)
    assert (figs["placement_ordering_holds"], figs["placement_ordering_holds_runs"]) == (True, 1)
    pair = plan(["placement"], _args(policies=["least_loaded", "global_cache_aware"]))
    for r, ttft in zip(pair, (2000.0, 1180.0)):
        r.summary = {"ttft_mean_ms": ttft}
    figs = figures(pair)  # two policies: the ratio, and no ordering to judge
    assert figs["placement_global_vs_least_loaded"] == 0.59 and "placement_ordering_holds" not in figs


def test_cpu_use_is_the_difference_per_kind_most_first_and_the_share_of_the_cores():
    before = {"prefill": 10.0, "cachestore": 2.0}
    after = {"prefill": 40.0, "cachestore": 62.0, "nats-server": 8.0}  # nats-server: started after the first look
    sys_before, sys_after = {"prefill": 1.0, "cachestore": 1.0}, {"prefill": 4.0, "cachestore": 51.0, "nats-server": 2.0}
    faults_before, faults_after = {"prefill": 100, "cachestore": 10}, {"prefill": 150, "cachestore": 9010, "nats-server": 7}
    use = cpu_use({"cpu_seconds": before, "cpu_system_seconds": sys_before, "page_faults": faults_before},
                  {"cpu_seconds": after, "cpu_system_seconds": sys_after, "page_faults": faults_after},
                  wall=50.0, cores=2)
    assert list(use["cpu_seconds"].items()) == [("cachestore", 60.0), ("prefill", 30.0), ("nats-server", 8.0)]
    assert use["cpu_busy"] == 0.98
    assert list(use["cpu_system_seconds"].items()) == [("cachestore", 50.0), ("prefill", 3.0), ("nats-server", 2.0)]
    assert list(use["page_faults"].items()) == [("cachestore", 9000), ("prefill", 50), ("nats-server", 7)]
    empty = {"cpu_seconds": {}, "cpu_system_seconds": {}, "page_faults": {}}
    assert cpu_use(empty, empty, wall=0.0, cores=2) == {
        "cpu_seconds": {}, "cpu_busy": 0.0, "cpu_system_seconds": {}, "page_faults": {}}


def test_arena_use_sums_each_arena_over_the_instances_logs(tmp_path):
    line = ('{{"event": "kv_arena", "arena": "{}", "reused": {}, "allocated": {}, "allocated_bytes": {}, '
            '"dropped": 1, "dropped_bytes": 1048576, "kept_bytes": 0, "level": "info"}}\n')
    (tmp_path / "prefill-0.log").write_text('{"event": "service_started"}\nnot json "kv_arena"\n'
                                            + line.format("prefill", 5, 2, 3 << 20))
    (tmp_path / "prefill-1.log").write_text(line.format("prefill", 1, 1, 1 << 20))
    (tmp_path / "decode-0.log").write_text(line.format("decode", 7, 0, 0))
    (tmp_path / "gateway-0.log").write_text('{"event": "service_started"}\n')
    assert arena_use(tmp_path) == {
        "decode": {"kept": 7, "fresh": 0, "fresh_mb": 0.0, "dropped_mb": 1.0},
        "prefill": {"kept": 6, "fresh": 3, "fresh_mb": 4.0, "dropped_mb": 2.0},
    }


def test_a_cluster_counts_the_cpu_of_its_live_processes_by_kind(tmp_path):
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ninput()"
    cluster = LocalCluster(from_env(data_dir=str(tmp_path)))
    procs = {"prefill-0": [sys.executable, "-c", spin], "prefill-1": [sys.executable, "-c", spin],
             "decode-0": [sys.executable, "-c", "input()"], "decode-1": [sys.executable, "-c", "pass"]}
    for name, cmd in procs.items():
        cluster.procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    try:
        cluster.procs["decode-1"].wait()  # gone: counts nothing
        for name in ("prefill-0", "prefill-1"):  # each has burnt its 0.3 s and waits on its input
            while sum(psutil.Process(cluster.procs[name].pid).cpu_times()[:2]) < 0.3:
                time.sleep(0.05)
        used = cluster.cpu_seconds()
        assert set(used) == {"prefill", "decode"}
        assert used["prefill"] >= 0.5  # both spinning processes, added up
        assert used["decode"] < used["prefill"]
        use = cluster.usage()
        system = use["cpu_system_seconds"]  # the kernel's part of the whole
        assert set(system) == set(used) and all(0 <= system[k] <= used[k] for k in used)
        assert system["prefill"] < used["prefill"]  # spinning in Python is user time
        faults = use["page_faults"]  # every process has faulted its interpreter in
        assert set(faults) == {"prefill", "decode"} and all(n > 0 for n in faults.values())
    finally:
        for p in cluster.procs.values():
            p.kill()
            p.wait()
