"""The cost model, the simulated engine (SimRunner / SimDecodeBatch) and the calibration."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from libs.engine.costs import (
    DEFAULT,
    CostProfile,
    DecodePoint,
    PrefillPoint,
    decode_features,
    fit,
    prefill_features,
    profile_path,
)

# A profile with small, distinct times: the sim's sleeps stay short in tests.
FAST = CostProfile(model="test", threads=1, prefill=(0.002, 2e-5, 1e-8), decode=(0.001, 1e-4, 1e-7))


# ---------------------------------------------------------------- costs
def test_features():
    assert prefill_features(10, 0) == (1.0, 10.0, 50.0)
    assert prefill_features(4, 6) == (1.0, 4.0, 4 * (6 + 2))
    assert decode_features(3, 120) == (1.0, 3.0, 120.0)


@pytest.mark.parametrize("relative", [False, True])
def test_fit_recovers_known_coefficients(relative):
    true = np.array([0.03, 2.5e-3, 1.5e-7])
    rows = [prefill_features(n, r) for n in (16, 64, 256, 1024) for r in (0, 512, 2048)]
    y = np.array(rows) @ true
    coef = fit(rows, y, relative=relative)
    assert np.allclose(coef, true, rtol=1e-6)

    rng = np.random.default_rng(0)
    noisy = y * (1 + rng.normal(0, 0.01, size=len(y)))
    coef = fit(rows, noisy, relative=relative)
    assert all(c >= 0 for c in coef)
    assert np.allclose(coef[:2], true[:2], rtol=0.2)


def test_fit_never_negative():
    rows = [decode_features(b, kv) for b in (1, 4, 16, 32) for kv in (64 * b, 1024 * b)]
    # data whose unconstrained fit has a negative intercept and a negative kv slope
    y = [max(1e-4, 0.01 * f[1] - 0.02 - 1e-7 * f[2]) for f in rows]
    unconstrained = np.linalg.lstsq(np.array(rows), np.array(y), rcond=None)[0]
    assert (unconstrained < 0).any()
    for relative in (False, True):
        coef = fit(rows, y, relative=relative)
        assert len(coef) == 3 and all(c >= 0 for c in coef)
    # the optimum: no non-negative coefficients nearby fit better
    a, y = np.array(rows), np.array(y)
    coef = np.array(fit(rows, y))
    best = np.sum((a @ coef - y) ** 2)
    rng = np.random.default_rng(1)
    for _ in range(500):
        other = np.maximum(0.0, coef * rng.uniform(0.5, 1.5, 3) + rng.uniform(0, 1, 3) * [1e-3, 1e-4, 1e-7])
        assert best <= np.sum((a @ other - y) ** 2) + 1e-15
    assert fit([[1.0, 2.0]], [-5.0]) == (0.0, 0.0)  # nothing non-negative fits better than zero


def test_profile_save_load_round_trip(tmp_path):
    p = CostProfile(
        model="abc", threads=2, prefill=(0.03, 2e-3, 1e-7), decode=(0.05, 2e-3, 3e-6),
        load_tokens_per_second=5000.0, created="2026-01-01T00:00:00+00:00", host="h",
        points=[PrefillPoint(new=16, reused=0, seconds=0.1, runs=3),
                DecodePoint(batch=4, context=64, kv_tokens=260.0, seconds=0.07, runs=5)],
    )
    path = profile_path(tmp_path, "model/x y:1", 2)
    assert path.parent == tmp_path / "calibration" and path.name == "model_x_y_1-cpu-float32-t2.json"
    assert profile_path(tmp_path, "a", 2, "bfloat16") != profile_path(tmp_path, "a", 2, "float32")
    assert profile_path(tmp_path, "a", 2, "bfloat16", "cuda:0").name == "a-cuda0-bfloat16-t2.json"
    p.save(path)
    q = CostProfile.load(path)
    assert q == p
    assert isinstance(q.points[0], PrefillPoint) and isinstance(q.points[1], DecodePoint)
    assert profile_path(tmp_path, "a", 1) != profile_path(tmp_path, "a", 2)


@pytest.mark.parametrize("profile", [DEFAULT, FAST])
def test_costs_monotone(profile):
    for reused in (0, 100, 1000):
        t = [profile.prefill_seconds(reused + n, reused) for n in (1, 2, 16, 100, 1000, 4000)]
        assert all(b >= a for a, b in zip(t, t[1:])) and t[0] >= 0
    for new in (1, 64, 512):  # same new tokens after a longer prefix: more attention
        t = [profile.prefill_seconds(r + new, r) for r in (0, 10, 1000, 5000)]
        assert all(b >= a for a, b in zip(t, t[1:]))
    # a longer cached part of the same prompt never costs more
    t = [profile.prefill_seconds(2048, r) for r in (0, 16, 1024, 2047, 2048)]
    assert all(b <= a for a, b in zip(t, t[1:]))
    assert profile.prefill_seconds(10, 10) == profile.prefill_seconds(10, 9) > 0  # at least one token
    for kv in (0, 100, 10000):
        t = [profile.step_seconds(b, kv) for b in (1, 2, 8, 32)]
        assert all(y >= x for x, y in zip(t, t[1:])) and t[0] > 0
    for b in (1, 16):
        t = [profile.step_seconds(b, kv) for kv in (0, 64, 1024, 65536)]
        assert all(y >= x for x, y in zip(t, t[1:]))
    neg = CostProfile(model="n", threads=1, prefill=(-1.0, 0.0, 0.0), decode=(-1.0, 0.0, 0.0))
    assert neg.prefill_seconds(10, 0) == 0.0 and neg.step_seconds(1, 10) == 0.0


# ---------------------------------------------------------------- sim engine
@pytest.fixture(scope="module")
def sim(tiny_dir):
    from libs.engine.simengine import SimRunner

    threads = torch.get_num_threads()
    runner = SimRunner(tiny_dir, FAST)
    torch.set_num_threads(threads)  # SimRunner sets 1 for the process; keep the other tests' setting
    return runner


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from libs.engine.loading import load_tokenizer

    return load_tokenizer(tiny_dir)


def _visible_word(tok, shape, token: int) -> bool:
    return (token not in shape.eos_token_ids and token not in set(tok.all_special_ids)
            and tok.decode([token]).strip() != "")


def test_sim_prefill_shapes_and_tokens(sim, tok):
    s = sim.shape
    prompt = tok.encode("The quick brown fox jumps over the lazy dog because it is late.")
    logits, kv = sim.prefill(prompt)
    assert sim.modelled_seconds == FAST.prefill_seconds(len(prompt), 0)
    assert logits.shape == (s.vocab_size,) and logits.dtype == torch.float32
    assert kv.shape == (s.num_layers, 2, s.num_kv_heads, len(prompt), s.head_dim)
    assert kv.dtype == s.dtype and kv.is_contiguous()
    first = int(torch.argmax(logits))
    assert _visible_word(tok, s, first)

    # same prompt, same token; and the same with its prefix's KV given (the cached path)
    logits2, _ = sim.prefill(prompt)
    assert int(torch.argmax(logits2)) == first
    past = kv[:, :, :, :8].clone()
    past[1] = 7.5  # arbitrary bytes: they must come back untouched
    logits3, kv3 = sim.prefill(prompt[8:], past)
    assert sim.modelled_seconds == FAST.prefill_seconds(len(prompt), 8)
    assert int(torch.argmax(logits3)) == first
    assert kv3.shape == kv.shape and kv3.dtype == s.dtype and kv3.is_contiguous()
    assert torch.equal(kv3[:, :, :, :8], past)
    assert torch.equal(kv3[:, :, :, 8:], kv[:, :, :, 8:])  # the filler depends on the tokens only

    # different prompts give (mostly) different first tokens, all of them visible words
    firsts = set()
    text = tok.encode("Once upon a time there was a small village by the sea where fishermen mended their nets.")
    for i in range(12):
        lg, _ = sim.prefill(text[: 4 + i])
        t = int(torch.argmax(lg))
        assert _visible_word(tok, s, t)
        firsts.add(t)
    assert len(firsts) > 3
    with pytest.raises(ValueError):
        sim.prefill([], past)


def test_sim_prefill_runs_each_layer_only_once_its_past_is_in(sim, tok):
    """A past streamed in layer by layer (a pool or peer load): the sim computes layer i only
    after layer i's past is released, as a real forward does, and counts the waits apart from the
    compute (the time it reports is the call's less ``waited``)."""
    import threading
    import time

    from libs.engine.prefill_kv import PrefillKV

    s = sim.shape
    prompt = tok.encode("A streamed past arrives one layer after another while the prompt runs.")
    buf = PrefillKV.with_past(s, len(prompt) - 8, pending=8)
    seen = []
    computed = buf.layer_computed

    def record(i):
        seen.append((i, buf._ready))
        computed(i)

    buf.layer_computed = record

    def loader():
        for i in range(1, s.num_layers + 1):
            time.sleep(0.01)
            buf.layer_ready(i)

    t = threading.Thread(target=loader)
    t.start()
    start = time.perf_counter()
    sim.prefill(prompt[8:], buffer=buf)
    took = time.perf_counter() - start
    t.join()
    assert [i for i, _ in seen] == list(range(s.num_layers))
    assert all(ready > i for i, ready in seen)
    # the sim's clock: what a load made it wait comes on top of the modelled compute, never inside it
    assert buf.waited > 0 and sim.modelled_seconds > 0
    assert took >= buf.waited + sim.modelled_seconds


def test_sim_decode_batch_mirrors_decode_batch(sim, tiny_dir):
    from libs.engine.runner import ModelRunner
    from libs.engine.simengine import SimDecodeBatch

    threads = torch.get_num_threads()
    real = ModelRunner(tiny_dir)
    torch.set_num_threads(threads)
    rb, sb = real.new_batch(), sim.new_batch()
    assert isinstance(sb, SimDecodeBatch) and len(sb) == 0 and sb.kv_tokens() == 0
    s = sim.shape
    lens = {"a": 5, "b": 9, "c": 3, "d": 7, "e": 4}

    def kv(n):
        return torch.randn(s.num_layers, 2, s.num_kv_heads, n, s.head_dim)

    for sid in "abcd":
        x = kv(lens[sid])
        rb.add(sid, x)
        sb.add(sid, x)
    assert sb.ids == rb.ids == list("abcd") and len(sb) == 4 and sb.kv_tokens() == rb.kv_tokens() == 24
    rb.step([10, 11, 12, 13])
    logits = sb.step([10, 11, 12, 13])
    assert logits.shape == (4, s.vocab_size) and logits.dtype == torch.float32
    assert sb.kv_tokens() == rb.kv_tokens() == 28
    for remove in ({"a"}, {"e"}):  # "e" is not in the batch: nothing happens
        rb.remove(remove)
        sb.remove(remove)
        assert sb.ids == rb.ids and sb.kv_tokens() == rb.kv_tokens()
    x = kv(lens["e"])
    rb.add("e", x)
    sb.add("e", x)
    rb.remove({"b", "e"})
    sb.remove({"b", "e"})
    assert sb.ids == rb.ids and sb.lengths == rb.lengths and sb.kv_tokens() == rb.kv_tokens()
    sb.remove(set(sb.ids))
    assert len(sb) == 0 and sb.kv_tokens() == 0


def test_sim_decode_tokens_deterministic_and_timed(sim, tok):
    s = sim.shape
    prompt = tok.encode("Write a short story about a lighthouse.")
    logits, kv = sim.prefill(prompt)

    def generate(batch, others: int) -> list[int]:
        for i in range(others):  # other rows of other lengths around it
            batch.add(f"o{i}", kv[:, :, :, : 3 + i])
        batch.add("r", kv)
        out = [int(torch.argmax(logits))]
        for _ in range(6):
            row = batch.ids.index("r")
            last = [out[-1] if sid == "r" else 100 for sid in batch.ids]
            kv_before, b = batch.kv_tokens(), len(batch)
            lg = batch.step(last)
            assert batch.runner.modelled_seconds == FAST.step_seconds(b, kv_before)
            out.append(int(torch.argmax(lg[row])))
            if batch.ids[0] != "r":
                batch.remove({batch.ids[0]})  # rows leave mid-way: "r" keeps its text
        return out

    alone = generate(sim.new_batch(), 0)
    crowded = generate(sim.new_batch(), 3)
    assert alone == crowded
    assert all(_visible_word(tok, s, t) for t in alone)
    assert len(set(alone)) > 1
    # the resumed path: a prefill of the prompt and the tokens so far continues the same text
    lg, _ = sim.prefill(prompt + alone[:3])
    assert int(torch.argmax(lg)) == alone[3]
    with pytest.raises(ValueError):
        sim.new_batch().step([1])


# ---------------------------------------------------------------- calibration
def test_calibrate_quick_tiny(tiny_dir, tmp_path):
    from libs.engine.calibrate import calibrate, fitted_rows
    from libs.engine.loading import model_identity

    threads = torch.get_num_threads()
    prof = calibrate(tiny_dir, threads=1, progress=False, quick=True)
    torch.set_num_threads(threads)
    assert prof.model == model_identity(tiny_dir) and prof.threads == 1
    assert len(prof.prefill) == 3 and len(prof.decode) == 3
    assert all(c >= 0 for c in (*prof.prefill, *prof.decode))
    assert prof.load_tokens_per_second > 0 and prof.created and prof.host
    pre = [p for p in prof.points if isinstance(p, PrefillPoint)]
    dec = [p for p in prof.points if isinstance(p, DecodePoint)]
    assert len(pre) >= 3 and len(dec) >= 3
    assert all(p.seconds > 0 for p in prof.points)
    assert {p.reused for p in pre} >= {0} and len({p.reused for p in pre}) > 1
    assert len({p.batch for p in dec}) > 1
    assert len(fitted_rows(prof)) == len(prof.points)
    path = prof.save(profile_path(tmp_path, prof.model, prof.threads))
    assert CostProfile.load(path) == prof


def test_calibration_fit_drops_slow_outliers():
    from libs.engine.calibrate import _fit_points

    true = (0.05, 3e-3, 2e-6)
    pts = [DecodePoint(batch=b, context=c, kv_tokens=float(b * c), seconds=float(np.dot(decode_features(b, b * c), true)))
           for c in (64, 256, 1024) for b in (1, 4, 16, 32)]
    pts[5].seconds *= 8  # measured while the machine was busy
    coef = _fit_points(pts, [decode_features(p.batch, p.kv_tokens) for p in pts])
    assert [p.used for p in pts].count(False) == 1 and not pts[5].used
    assert np.allclose(coef, true, rtol=1e-6)


def test_a_simulated_engine_process_does_not_import_transformers(tiny_dir):
    """Many simulated instances start on one small host: each skips transformers' import."""
    import subprocess
    import sys

    code = ("import sys\nimport services.prefill.service, services.decode.service\n"
            "from libs.engine.simengine import SimRunner\nfrom libs.engine.costs import DEFAULT\n"
            f"SimRunner({str(tiny_dir)!r}, DEFAULT).new_batch()\nprint('transformers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
