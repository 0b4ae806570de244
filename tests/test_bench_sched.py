"""``yuebing bench sched``'s plan of runs, its curves and named figures, and its CPU accounting (plain
logic and real processes; the runs themselves are the replay tool against real clusters, covered by
test_replay_sim)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil
import pytest

from bench.sched import (ADMISSIONS, PLACEMENT_POLICIES, Run, arena_use, colocated_chunk, cpu_use, figures, native_rate,
                         plan, slices)
from bench.sched_curves import curve, point, threshold_capacity
from yuebing.cluster import LocalCluster
from libs.config import from_env


def _args(**kw) -> argparse.Namespace:
    base = dict(prefill=8, decode=8, real_prefill=2, real_decode=1, repeats=1, overload_repeats=1, slices=1,
                loads=[0.5, 1.0], overload_loads=[2.0], policies=list(PLACEMENT_POLICIES),
                admissions=list(ADMISSIONS), arch_admissions=["none", "predictive"], real_admission="predictive",
                real_rate=0.5, prefill_cache_mb=256, pool_dram_mb=1024, colocated_chunk=80)
    return argparse.Namespace(**{**base, **kw})


def test_plan_gives_only_the_global_policy_the_pool_and_the_baseline_the_same_instances_and_memory():
    runs = plan(["placement", "architecture"], _args(prefill=12, decode=4, loads=[1.0]))
    placement = [r for r in runs if r.experiment == "placement"]
    assert [r.policy for r in placement] == list(PLACEMENT_POLICIES) == [r.series for r in placement]
    assert [r.use_pool for r in placement] == [False, False, False, True]
    arch = [r for r in runs if r.experiment == "architecture"]
    assert [(r.series, r.admission) for r in arch] == [
        ("disaggregated/none", "none"), ("colocated/none", "none"),
        ("disaggregated/predictive", "predictive"), ("colocated/predictive", "predictive")]
    dis, col = arch[0], arch[1]
    assert (dis.prefill, dis.decode, dis.use_pool, dis.policy) == (12, 4, True, "global_cache_aware")
    # as many workers as instances; placed by cache match and load; prefilling in chunks between
    # decode steps; own caches adding up to the prefill caches and the pool's DRAM together
    assert (col.colocated, col.prefill, col.decode, col.use_pool, col.policy) == (16, 0, 0, False, "local_cache_aware")
    assert col.prefill_chunk == 80 and dis.prefill_chunk == 0
    assert col.prefill_cache_mb * 16 == 12 * 256 + 1024
    # the real-model pair: 2P+1D against 3 colocated workers, at one fixed rate, admission alike
    dis, col = plan(["real"], _args())
    assert (dis.prefill, dis.decode, dis.engine, dis.admission, dis.rate) == (2, 1, "model", "predictive", 0.5)
    assert (col.colocated, col.engine, col.admission, col.use_pool, col.rate) == (3, "model", "predictive", False, 0.5)


def test_plan_puts_repeats_outermost_then_slices_loads_and_series_and_names_every_point():
    runs = plan(["placement"], _args(policies=["least_loaded", "global_cache_aware"], repeats=2, slices=2))
    keys = [(r.repeat, r.slice, r.load, r.series) for r in runs]
    assert keys == [(k, s, x, p) for k in (1, 2) for s in (1, 2) for x in (0.5, 1.0)
                    for p in ("least_loaded", "global_cache_aware")]
    assert len({r.name for r in runs}) == len(runs)
    assert runs[0].name == "placement-least_loaded-x0.5-s1-r1"
    over = plan(["overload"], _args(overload_repeats=4, overload_loads=[1.5, 3.0]))
    assert len(over) == 4 * 2 * 3 and {r.repeat for r in over} == {1, 2, 3, 4}
    assert [r.admission for r in over[:3]] == list(ADMISSIONS)
    assert plan(["architecture"], _args(slices=2))[-1].name == "architecture-colocated-predictive-x1-s2-r1"


def test_slices_are_disjoint_and_the_native_rate_is_the_traces_own():
    rows = [{"timestamp": 1000 * i} for i in range(10)]
    assert slices(rows, 2, 4) == [rows[:4], rows[4:8]]
    assert slices(rows, 3, 4)[-1] == rows[8:]
    assert native_rate(rows[:5]) == 1.0  # 4 gaps of a second
    with pytest.raises(SystemExit):
        native_rate([{"timestamp": 5}, {"timestamp": 5}])


def test_the_colocated_chunk_fits_a_step_in_the_tbt_objective():
    from libs.engine.costs import CostProfile

    profile = CostProfile(model="t", threads=1, prefill=(0.1, 1e-3, 0.0), decode=(0.05, 0.0, 0.0))
    # 0.1 + n ms of prefill + 0.05 of decode within 0.3 s: n <= 150 -> 144 tokens in blocks of 16
    assert colocated_chunk(profile, 0.3, 16, 200) == 144
    assert colocated_chunk(profile, 0.01, 16, 200) == 16  # never less than a block


def _points(values: dict[tuple[str, float], list[float]], metric: str, experiment: str) -> list[Run]:
    runs = []
    for (series, load), vs in values.items():
        for k, v in enumerate(vs, 1):
            runs.append(Run(experiment, series, load=load, repeat=k, summary={metric: v}))
    return runs


def test_placement_figures_are_curves_with_a_ratio_per_load_and_a_capacity_per_policy():
    runs = _points({("least_loaded", 0.5): [2000.0, 2400.0], ("least_loaded", 1.0): [9000.0, 9000.0],
                    ("global_cache_aware", 0.5): [1100.0, 1100.0], ("global_cache_aware", 1.0): [4000.0, 5000.0]},
                   "ttft_p90_ms", "placement")
    for r in runs:
        r.summary["ttft_mean_ms"] = r.summary["ttft_p90_ms"] / 2
    figs = figures(runs, ttft_slo=5.0)
    assert figs["placement_ttft_p90_ms"]["least_loaded"] == {"0.5": 2200.0, "1": 9000.0}
    assert figs["placement_global_vs_least_loaded_p90"] == {"0.5": 0.5, "1": 0.5}
    assert figs["placement_global_vs_least_loaded_mean"] == {"0.5": 0.5, "1": 0.5}
    # global's p90 (mean 4500 at 1.0) is within 5 s at both loads; least_loaded's crosses between
    assert figs["placement_capacity"]["global_cache_aware"] == {"highest_load_meeting": 1.0, "crossing": 1.0}
    ll = figs["placement_capacity"]["least_loaded"]
    assert ll["highest_load_meeting"] == 0.5 and ll["crossing"] == pytest.approx(0.5 + 0.5 * 2800 / 6800, abs=1e-4)


def test_architecture_capacity_is_where_90_percent_meet_both_slos_and_the_ratio_of_the_crossings():
    runs = _points({("disaggregated/none", 0.5): [1.0], ("disaggregated/none", 1.0): [0.95],
                    ("disaggregated/none", 1.5): [0.5], ("colocated/none", 0.5): [0.92],
                    ("colocated/none", 1.0): [0.6], ("colocated/none", 1.5): [0.2]}, "slo_attainment", "architecture")
    figs = figures(runs, ttft_slo=5.0)
    dis, col = figs["architecture_capacity"]["disaggregated/none"], figs["architecture_capacity"]["colocated/none"]
    assert dis == {"highest_load_meeting": 1.0, "crossing": pytest.approx(1.0 + 0.5 * 0.05 / 0.45, abs=1e-4)}
    assert col["highest_load_meeting"] == 0.5 and col["crossing"] == pytest.approx(0.5 + 0.5 * 0.02 / 0.32, abs=1e-4)
    assert figs["architecture_capacity_ratio_none"] == pytest.approx(dis["crossing"] / col["crossing"], abs=1e-3)
    runs = _points({("disaggregated/none", 0.5): [0.5], ("colocated/none", 0.5): [0.95]}, "slo_attainment",
                   "architecture")
    figs = figures(runs, ttft_slo=5.0)  # missing at the lightest load: no capacity, no ratio
    assert figs["architecture_capacity"]["disaggregated/none"] == {"highest_load_meeting": None, "crossing": None}
    assert figs["architecture_capacity_ratio_none"] is None


def test_overload_figures_are_read_where_early_rejection_refuses_a_fifth_or_more():
    runs = _points({("early", 1.0): [0.05, 0.1], ("early", 2.0): [0.3, 0.2], ("predictive", 1.0): [0.0, 0.0],
                    ("predictive", 2.0): [0.2, 0.1]}, "rejected_share", "overload")
    for r in runs:
        r.summary["wasted_prefill_tokens"] = 100 * r.repeat
    figs = figures(runs, ttft_slo=5.0)
    assert figs["overload_heavy_loads"] == ["2"]
    assert figs["overload"]["rejected_share"]["early"] == {"2": {"mean": 0.25, "min": 0.2, "max": 0.3, "n": 2}}
    assert figs["overload"]["wasted_prefill_tokens"]["predictive"]["2"]["mean"] == 150.0
    assert "1" not in figs["overload"]["rejected_share"]["predictive"]


def test_curves_keep_mean_and_spread_and_capacity_handles_every_shape():
    pts = [point("placement", "a", load, 1, k, {"ttft_p90_ms": v})
           for load, vs in ((1.0, [1.0, 3.0]), (2.0, [5.0])) for k, v in enumerate(vs, 1)]
    pts.append(point("placement", "a", 3.0, 1, 1, {"ttft_p90_ms": None}))  # a run without the metric
    assert curve(pts, "ttft_p90_ms") == {"a": {1.0: {"mean": 2.0, "min": 1.0, "max": 3.0, "n": 2},
                                               2.0: {"mean": 5.0, "min": 5.0, "max": 5.0, "n": 1}}}
    by = curve(pts, "ttft_p90_ms")["a"]
    assert threshold_capacity(by, 10.0, below=True) == {"highest_load_meeting": 2.0, "crossing": 2.0}
    assert threshold_capacity(by, 1.0, below=True) == {"highest_load_meeting": None, "crossing": None}
    assert threshold_capacity(by, 3.5, below=True) == {"highest_load_meeting": 1.0, "crossing": 1.5}
    # a curve that dips back under the threshold after missing it counts only up to the first miss
    wavy = {1.0: {"mean": 1.0}, 2.0: {"mean": 9.0}, 3.0: {"mean": 1.0}}
    assert threshold_capacity(wavy, 5.0, below=True)["highest_load_meeting"] == 1.0


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
