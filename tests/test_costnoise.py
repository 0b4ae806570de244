"""The simulated engine's scatter: residuals measured from a calibration's runs, and seeded draws."""

import math
import statistics

import pytest
import torch

from libs.engine.costnoise import CLIP_DEVIATIONS, CostNoise, residuals
from libs.engine.costs import CostProfile, DecodePoint, PrefillPoint

PROFILE = CostProfile(model="t", threads=1, prefill=(0.01, 1e-4, 0.0), decode=(0.005, 1e-4, 0.0))


def _with_runs(prefill_runs: list[float], decode_runs: list[float]) -> CostProfile:
    """A profile whose two points were measured at the given multiples of its predictions."""
    pre_pred = PROFILE.prefill_seconds(100, 0)
    dec_pred = PROFILE.step_seconds(4, 400)
    points = [PrefillPoint(new=100, reused=0, seconds=min(prefill_runs) * pre_pred,
                           times=[x * pre_pred for x in prefill_runs]),
              DecodePoint(batch=4, context=100, kv_tokens=400, seconds=min(decode_runs) * dec_pred,
                          times=[x * dec_pred for x in decode_runs]),
              # a point the fit left out (measured while the machine was busy) does not count
              PrefillPoint(new=10, reused=0, seconds=9.0, times=[9.0, 9.5], used=False)]
    return CostProfile(model="t", threads=1, prefill=PROFILE.prefill, decode=PROFILE.decode, points=points)


def test_residuals_are_the_log_ratios_of_the_runs_the_fit_used():
    profile = _with_runs([1.0, 1.2, 1.5], [1.0, 2.0])
    pre = residuals(profile, "prefill")
    logs = [math.log(x) for x in (1.0, 1.2, 1.5)]
    assert pre.samples == 3
    assert pre.mean == pytest.approx(statistics.fmean(logs)) and pre.std == pytest.approx(statistics.stdev(logs))
    dec = residuals(profile, "decode")
    assert dec.samples == 2 and dec.mean == pytest.approx(math.log(2) / 2)


def test_a_profile_without_kept_runs_uses_each_points_fastest_and_median():
    pred = PROFILE.prefill_seconds(100, 0)
    profile = CostProfile(model="t", threads=1, prefill=PROFILE.prefill, decode=PROFILE.decode,
                          points=[PrefillPoint(new=100, reused=0, seconds=pred, median=2 * pred)])
    r = residuals(profile, "prefill")
    assert r.samples == 2 and r.mean == pytest.approx(math.log(2) / 2)


def test_no_measured_runs_no_noise():
    noise = CostNoise(PROFILE, seed=1)
    assert noise.prefill_factor([1, 2, 3], 0) == 1.0 and noise.step_factor("decode-0", 5) == 1.0
    off = CostNoise(_with_runs([1.0, 1.5], [1.0, 1.5]), seed=1, enabled=False)
    assert off.prefill_factor([1, 2, 3], 0) == 1.0 and off.step_factor("decode-0", 5) == 1.0


def test_draws_are_seeded_keyed_by_the_call_and_follow_the_measured_spread():
    profile = _with_runs([0.9, 1.0, 1.3, 1.6], [0.8, 1.0, 1.1, 1.5])
    a, b, other = CostNoise(profile, seed=7), CostNoise(profile, seed=7), CostNoise(profile, seed=8)
    # the same call draws the same factor in every process with the same seed; another seed differs
    assert a.prefill_factor([5, 6, 7], 16) == b.prefill_factor([5, 6, 7], 16)
    assert a.prefill_factor([5, 6, 7], 16) != other.prefill_factor([5, 6, 7], 16)
    assert a.step_factor("decode-1", 3) == b.step_factor("decode-1", 3)
    # another prompt, cached length, instance or step is another draw
    assert a.prefill_factor([5, 6, 7], 16) != a.prefill_factor([5, 6, 8], 16)
    assert a.prefill_factor([5, 6, 7], 16) != a.prefill_factor([5, 6, 7], 0)
    assert a.step_factor("decode-1", 3) != a.step_factor("decode-2", 3) != a.step_factor("decode-2", 4)

    logs = [math.log(a.step_factor("decode-0", i)) for i in range(4000)]
    r = a.decode
    assert statistics.fmean(logs) == pytest.approx(r.mean, abs=0.1 * r.std)
    assert statistics.stdev(logs) == pytest.approx(r.std, rel=0.1)
    bound = r.std * CLIP_DEVIATIONS + 1e-12
    assert all(abs(x - r.mean) <= bound for x in logs)


def test_the_sim_takes_the_drawn_time(tiny_dir):
    from libs.engine.simengine import SimRunner

    threads = torch.get_num_threads()
    profile = _with_runs([0.9, 1.0, 1.3, 1.6], [0.8, 1.0, 1.1, 1.5])
    fast = CostProfile(model="t", threads=1, prefill=(0.001, 1e-6, 0.0), decode=(0.001, 1e-6, 0.0),
                       points=profile.points)
    noise = CostNoise(fast, seed=3)
    sim = SimRunner(tiny_dir, fast, noise=noise, instance="decode-9")
    torch.set_num_threads(threads)  # SimRunner sets 1 for the process; keep the other tests' setting
    prompt = list(range(5, 45))
    _, kv = sim.prefill(prompt)
    assert sim.modelled_seconds == pytest.approx(fast.prefill_seconds(40, 0) * noise.prefill_factor(prompt, 0))
    assert noise.prefill_factor(prompt, 0) != 1.0
    batch = sim.new_batch()
    batch.add("r", kv)
    for step in range(3):
        batch.step([7])
        assert sim.modelled_seconds == pytest.approx(fast.step_seconds(1, 40 + step) * noise.step_factor("decode-9", step))
