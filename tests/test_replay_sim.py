"""The trace replay tool against a real cluster on the simulated engine: the real model's shape
(real KV bytes on the bus and in the pool), compute replaced by a cost profile."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import TRACE_HEAD, start_cluster
from libs.engine.costs import CostProfile

REQUESTS = 16


@pytest.fixture(scope="module")
def sim_cluster(smol_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("sim")
    profile = CostProfile(model="test", threads=1, prefill=(0.02, 2e-4, 0.0), decode=(0.01, 1e-3, 0.0))
    cluster = start_cluster(smol_dir, data, engine="sim", calibration=str(profile.save(data / "profile.json")),
                            prefill=2, decode=2, admission="predictive", ttft_slo=30.0, tbt_slo=1.0)
    yield cluster
    cluster.stop()


@pytest.mark.slow
def test_replay_a_slice_of_the_trace_on_the_simulated_engine(sim_cluster, tmp_path):
    out = tmp_path / "replay.json"
    cmd = [sys.executable, "-m", "yuebing.cli", "bench", "trace", str(TRACE_HEAD), "--url", sim_cluster.url,
           "--requests", str(REQUESTS), "--token-scale", "32", "--time-scale", "10", "--ttft-slo", "30",
           "--tbt-slo", "1", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    doc = json.loads(out.read_text())
    assert doc["summary"] == last
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert last["requests"] == REQUESTS and last["completed"] == REQUESTS and last["failed"] == 0
    # the first requests of the trace share their first hash id: the later ones reuse that prefix
    assert last["cached_tokens"] > 0 and 0 < last["prefix_hit_ratio"] < 1
    for rec in doc["records"]:
        assert rec["outcome"] == "completed"
        assert rec["completion_tokens"] == rec["max_tokens"]  # EOS is ignored: every length is the trace's
    assert last["slo_attainment"] is not None and last["goodput_rps"] > 0
