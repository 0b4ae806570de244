"""Conductor decision logic as plain classes: prefix index, cost model, placement policies."""

import numpy as np
import pytest

from libs.protocol import KVEvent
from services.conductor.prefillcost import PrefillCalibration, PrefillCostModel
from services.conductor.index import PrefixIndex
from services.conductor.placement import (
    DecodeView,
    PrefillView,
    RequestView,
    make_policy,
)

K = [bytes([i]) * 16 for i in range(10)]


def ev(iid, seq, stored=(), removed=(), epoch="e1", source="prefill"):
    return KVEvent(instance_id=iid, source=source, epoch=epoch, seq=seq, stored=list(stored), removed=list(removed))


# ---------------------------------------------------------------- index
def test_index_new_instance_needs_dump_then_applies_in_order():
    idx = PrefixIndex()
    assert idx.apply(ev("p0", 1)) is True  # first sight of an epoch: resync
    assert idx.apply(ev("p0", 2, stored=K[:3])) is False  # buffered during resync
    idx.load_dump("p0", "prefill", "e1", 1, [])
    assert idx.prefix_len(K, "p0") == 3  # the buffered event applied on top of the dump
    assert idx.apply(ev("p0", 3, removed=[K[1]])) is False
    assert idx.prefix_len(K, "p0") == 1
    assert idx.apply(ev("p0", 3, stored=[K[5]])) is False  # duplicate seq ignored
    assert idx.keys_of("p0") == {K[0], K[2]}


def test_index_gap_triggers_resync_and_dump_repairs():
    idx = PrefixIndex()
    idx.apply(ev("c0", 1, source="cachestore"))
    idx.load_dump("c0", "cachestore", "e1", 1, [])
    idx.apply(ev("c0", 2, stored=K[:2], source="cachestore"))
    assert idx.apply(ev("c0", 4, stored=[K[3]], source="cachestore")) is True  # seq 3 lost
    assert idx.gaps == 1 and idx.needs_dump("c0")
    idx.load_dump("c0", "cachestore", "e1", 4, K[:4])
    assert idx.pool_prefix_len(K) == 4 and not idx.needs_dump("c0")


def test_index_restart_epoch_and_stale_replay():
    idx = PrefixIndex()
    idx.apply(ev("c0", 1, source="cachestore", epoch="old"))
    # the instance restarted meanwhile: the dump answers with the new epoch
    idx.load_dump("c0", "cachestore", "new", 2, K[:2])
    # replayed events of the old epoch are ignored, the new epoch's continue
    assert idx.apply(ev("c0", 2, stored=[K[7]], source="cachestore", epoch="old")) is False
    assert idx.apply(ev("c0", 3, stored=[K[2]], source="cachestore", epoch="new")) is False
    assert idx.pool_prefix_len(K) == 3
    # a further restart (unknown epoch) resyncs
    assert idx.apply(ev("c0", 1, source="cachestore", epoch="newer")) is True


def test_index_a_restart_while_its_dump_was_on_its_way_is_not_taken_for_stale():
    from libs.kvevents import new_epoch

    first, second = new_epoch(), new_epoch()
    assert second > first
    idx = PrefixIndex()
    assert idx.apply(ev("c0", 1, source="cachestore", epoch=first)) is True
    # the instance restarts (second run) before the dump, still of the first run, arrives
    assert idx.apply(ev("c0", 1, source="cachestore", epoch=second)) is False  # buffered
    assert idx.apply(ev("c0", 2, stored=K[:3], source="cachestore", epoch=second)) is False
    idx.load_dump("c0", "cachestore", first, 1, K[:1])
    assert idx.needs_dump("c0")  # the second run needs its own dump
    idx.load_dump("c0", "cachestore", second, 1, [])
    assert idx.pool_prefix_len(K) == 3 and not idx.needs_dump("c0")  # its buffered event on top
    # a late event of the first run changes nothing
    assert idx.apply(ev("c0", 2, removed=K[:3], source="cachestore", epoch=first)) is False
    assert idx.pool_prefix_len(K) == 3


def test_pool_prefix_counts_only_cachestores_and_drop_forgets():
    idx = PrefixIndex()
    idx.load_dump("p0", "prefill", "e", 0, K[:5])
    idx.load_dump("c0", "cachestore", "e", 0, K[:2])
    assert idx.pool_prefix_len(K) == 2 and idx.prefix_len(K, "p0") == 5
    idx.load_dump("c1", "cachestore", "e", 0, K[1:3])  # a second shard, one key in common
    assert idx.pool_blocks() == 3 and idx.pool_keys() == set(K[:3]) and idx.pool_prefix_len(K) == 3
    assert (idx.count_of("c1"), idx.count_of("p0"), idx.count_of("nobody")) == (2, 5, 0)
    idx.drop_instance("c1")
    assert idx.pool_blocks() == 2 and idx.pool_prefix_len(K) == 2  # K[1] still in c0
    idx.drop_instance("c0")
    assert idx.pool_prefix_len(K) == 0 and idx.pool_blocks() == 0
    assert idx.apply(ev("c0", 1, source="cachestore", epoch="e")) is False  # dead epoch ignored


# ---------------------------------------------------------------- cost model
def test_cost_model_fits_reports():
    m = PrefillCostModel(PrefillCalibration(fixed=1.0, per_token=1.0, per_pair=1.0))
    truth = np.array([0.05, 1e-3, 1e-7])
    rng = np.random.default_rng(0)
    for _ in range(64):
        new, reused = int(rng.integers(16, 4000)), int(rng.integers(0, 4000))
        t = float(np.array([1.0, new, new * (reused + new / 2)]) @ truth)
        m.observe_prefill(new, reused, t)
    assert m.fits > 0
    assert m.prefill_seconds(2048, 0) == pytest.approx(float(np.array([1, 2048, 2048 * 1024]) @ truth), rel=1e-3)
    assert m.prefill_seconds(2048, 1984) < m.prefill_seconds(2048, 0) / 10


def test_an_online_fit_is_redone_after_each_sample_while_few_then_after_a_share_of_its_window():
    from libs.engine.costs import Refits
    from services.conductor.decodecost import DecodeCostModel

    r = Refits(share=16)
    assert all(r.due(n) for n in range(1, 32))  # fewer than 32 samples: every one (n // 16 <= 1)
    fits = [n for n in range(32, 200) if r.due(n)]
    assert fits[:3] == [33, 35, 37] and fits[-1] > 180  # every n // 16 new samples
    window = Refits(share=16)
    assert sum(window.due(512) for _ in range(512)) == 16  # a full window of 512: every 32 samples
    m = DecodeCostModel(coef=(0.1, 0.1, 0.0))
    for i in range(400):
        m.observe(10, 1 + i % 8, 100, 0.01 + 0.004 * (1 + i % 8))
    assert 40 < m.fits < 100  # not one a heartbeat
    assert m.step_seconds(4, 100) == pytest.approx(0.026, rel=1e-3)


def test_the_cost_model_counts_a_revision_when_a_fit_moves_its_prices():
    m = PrefillCostModel()  # the built-in guess: 2 ms a token
    for i in range(PrefillCostModel.MIN_SAMPLES):
        m.observe_prefill(500 + 100 * i, 0, 1e-4 * (500 + 100 * i))  # twenty times faster than the guess
    assert (m.fits, m.revision) == (1, 1)  # the first fit always reprices
    m.observe_prefill(800, 0, 1.02e-4 * 800)  # a sample within the noise
    assert (m.fits, m.revision) == (2, 1)
    for i in range(64):  # the machine got twice as slow
        m.observe_prefill(500 + 10 * i, 0, 2e-4 * (500 + 10 * i))
    assert m.revision >= 2
    assert m.prefill_seconds(1000, 0) > 0.15  # from 0.1 s before


def test_cost_model_load_rate_moves_toward_observations():
    m = PrefillCostModel(PrefillCalibration(load_tokens_per_second=1000.0))
    for _ in range(50):
        m.observe_load(10_000, 0.1)  # 100k tokens/s
    assert m.load_seconds(100_000) == pytest.approx(1.0, rel=0.05)


def test_load_cost_follows_the_served_models_kv_size_not_the_profiles():
    """A profile of a large model (5,400 tokens/s = 250 MB/s of 46 KiB positions) must not make
    every load of a small model (512 B positions) look slow: once the workers report the KV size,
    loads are priced in bytes, and the pool is used where it saves compute."""
    m = PrefillCostModel(PrefillCalibration(fixed=2e-3, per_token=1e-5, per_pair=0.0, load_tokens_per_second=5400))
    req = RequestView(prompt_len=400, block_size=16, pool_blocks=20)
    place = lambda: make_policy("global_cache_aware", m).place(req, [PrefillView("p0", 0.0, 1)], DECODES)  # noqa: E731
    assert not place().use_pool  # 304 positions at 5,400/s: 56 ms, longer than computing them
    m.observe_kv_size(512)
    assert m.load_seconds(304) == pytest.approx(304 * 512 / 250e6)
    pl = place()
    assert pl.use_pool and pl.cached_blocks == 20
    for n in (300, 600, 1200, 2400) * 3:  # a slow pool, measured: 1 MB/s
        m.observe_load(n, n * 512 / 1e6, n * 512)
    assert m.load_seconds(304) == pytest.approx(304 * 512 / 1e6, rel=1e-3)
    assert not place().use_pool


def test_a_few_small_loads_price_their_round_trips_not_a_slow_bus():
    m = PrefillCostModel(PrefillCalibration(load_tokens_per_second=5400))
    for n in (16, 32, 16):  # three small loads of 2-3 ms: round trips
        m.observe_load(n, 0.0025, n * 512)
    fixed, per_byte = m.load_coef
    assert fixed == pytest.approx(0.0025 - 16 * 512 / 250e6, rel=1e-3) and per_byte == pytest.approx(1 / 250e6)
    assert m.load_seconds(1600) < 0.01  # a large load is not 100 x a small one


def test_load_cost_has_a_fixed_part_and_a_per_byte_part():
    """Small loads cost their round trips, large ones their bytes: fitted as such, a small load's
    overhead does not make the bus look slow for a large one."""
    m = PrefillCostModel(PrefillCalibration(load_tokens_per_second=5400))
    for n in (16, 32, 64, 160, 320, 640, 1600, 3200) * 3:
        m.observe_load(n, 0.003 + n * 512 / 200e6, n * 512)  # 3 ms + 200 MB/s
    fixed, per_byte = m.load_coef
    assert fixed == pytest.approx(0.003, rel=1e-3) and per_byte == pytest.approx(1 / 200e6, rel=1e-3)
    assert m.load_seconds(10_000) == pytest.approx(0.003 + 10_000 * 512 / 200e6, rel=1e-3)


# ---------------------------------------------------------------- policies
def _model():
    return PrefillCostModel(PrefillCalibration(fixed=0.01, per_token=1e-3, per_pair=0.0,
                                               load_tokens_per_second=100_000))


DECODES = [DecodeView("d0", 3, 100), DecodeView("d1", 1, 50)]


def test_global_cache_aware_prefers_pool_hit_over_recompute():
    req = RequestView(prompt_len=2048, block_size=16, pool_blocks=124)
    prefills = [PrefillView("p0", 0.0, 0), PrefillView("p1", 0.5, 0)]
    pl = make_policy("global_cache_aware", _model()).place(req, prefills, DECODES)
    assert pl.prefill_id == "p0" and pl.use_pool and pl.cached_blocks == 124 and pl.decode_id == "d1"
    assert pl.pool_blocks == 124  # the instance loads what the index has, without asking the pool first
    # compute of 64 tokens + load of 1984 beats computing 2048
    assert pl.predicted_ttft < _model().prefill_seconds(2048, 0) / 5


def test_global_cache_aware_weighs_queue_against_local_hit():
    req = RequestView(prompt_len=1000, block_size=16, pool_blocks=0)
    busy_with_hit = PrefillView("p0", 0.2, 60)
    idle_cold = PrefillView("p1", 0.0, 0)
    pl = make_policy("global_cache_aware", _model()).place(req, [busy_with_hit, idle_cold], DECODES)
    assert pl.prefill_id == "p0"  # 0.2 + 0.05 < 1.01
    very_busy = PrefillView("p0", 5.0, 60)
    assert make_policy("global_cache_aware", _model()).place(req, [very_busy, idle_cold], DECODES).prefill_id == "p1"


def test_global_cache_aware_loads_from_the_peer_holding_the_prefix_when_it_is_busy():
    """The prefix is only in p0's own cache (the pool lacks it): with p0 busy, p1 pulls it from p0
    rather than recompute; without peer fetch it recomputes on p1 or queues on p0."""
    req = RequestView(prompt_len=1000, block_size=16, pool_blocks=0)
    holder, idle, other = PrefillView("p0", 2.0, 60), PrefillView("p1", 0.0, 0), PrefillView("p2", 0.5, 10)
    pl = make_policy("global_cache_aware", _model(), peer_fetch=True).place(req, [holder, idle, other], DECODES)
    assert (pl.prefill_id, pl.peer_id, pl.cached_blocks, pl.plan) == ("p1", "p0", 60, "peer")
    assert not pl.use_pool and pl.peer_blocks == 60
    # 40 tokens to compute, the load of 960 streaming under it: the slower holds the instance
    busy = max(_model().prefill_seconds(1000, 960), _model().load_seconds(960))
    assert pl.predicted_ttft == pytest.approx(busy) and pl.predicted_prefill == pytest.approx(busy)
    off = make_policy("global_cache_aware", _model()).place(req, [holder, idle, other], DECODES)
    assert off.peer_id == "" and off.prefill_id == "p1" and off.cached_blocks == 0 and off.plan == "local"
    assert off.peer_blocks == 0
    # the holder idle too: it reuses its own cache (the same predicted TTFT), nothing moves
    pl = make_policy("global_cache_aware", _model(), peer_fetch=True).place(
        req, [idle, PrefillView("p3", 0.0, 60)], DECODES)
    assert (pl.prefill_id, pl.peer_id, pl.cached_blocks, pl.plan) == ("p3", "", 60, "local")


def test_a_peer_is_the_other_longest_holder_and_loses_to_a_longer_pool_hit():
    # p1 holds the longest prefix but is busy; on p1 itself the next best holder is p2
    req = RequestView(prompt_len=1000, block_size=16, pool_blocks=0)
    ps = [PrefillView("p0", 0.3, 0), PrefillView("p1", 9.0, 50), PrefillView("p2", 9.0, 30)]
    pl = make_policy("global_cache_aware", _model(), peer_fetch=True).place(req, ps, DECODES)
    assert (pl.prefill_id, pl.peer_id, pl.cached_blocks) == ("p0", "p1", 50)
    # the pool holds more than any peer: it is loaded from the pool
    longer = RequestView(prompt_len=1000, block_size=16, pool_blocks=55)
    pl = make_policy("global_cache_aware", _model(), peer_fetch=True).place(longer, ps, DECODES)
    assert (pl.prefill_id, pl.peer_id, pl.cached_blocks, pl.use_pool, pl.plan) == ("p0", "", 55, True, "pool")
    # local_cache_aware never pulls from a peer
    pl = make_policy("local_cache_aware", _model(), peer_fetch=True).place(req, ps, DECODES)
    assert pl.peer_id == "" and pl.cached_blocks == 0


def test_kvcache_balancing_threshold_recomputes_when_loading_is_slower():
    slow_load = PrefillCostModel(PrefillCalibration(fixed=0.0, per_token=1e-4, per_pair=0.0,
                                                    load_tokens_per_second=1000))
    req = RequestView(prompt_len=1600, block_size=16, pool_blocks=99)
    pl = make_policy("global_cache_aware", slow_load).place(req, [PrefillView("p0", 0.0, 0)], DECODES)
    assert not pl.use_pool and pl.cached_blocks == 0


def test_a_load_bound_plan_counts_its_load_in_the_instance_queue():
    """A pool hit whose load is slower than its compute holds the instance for the load: that,
    not the compute alone, is what the tasks placed after it wait for."""
    slowish = PrefillCostModel(PrefillCalibration(fixed=0.0, per_token=1e-3, per_pair=0.0,
                                                  load_tokens_per_second=4000))
    req = RequestView(prompt_len=1000, block_size=16, pool_blocks=62)
    pl = make_policy("global_cache_aware", slowish).place(req, [PrefillView("p0", 0.5, 0)], DECODES)
    assert pl.use_pool and pl.cached_blocks == 62
    assert slowish.load_seconds(992) > slowish.prefill_seconds(1000, 992)
    assert pl.predicted_prefill == pytest.approx(slowish.load_seconds(992))
    assert pl.predicted_ttft == pytest.approx(0.5 + pl.predicted_prefill)


def test_local_cache_aware_never_uses_the_pool():
    req = RequestView(prompt_len=2048, block_size=16, pool_blocks=127)
    pl = make_policy("local_cache_aware", _model()).place(
        req, [PrefillView("p0", 0.0, 10), PrefillView("p1", 0.0, 40)], DECODES)
    assert pl.prefill_id == "p1" and not pl.use_pool and pl.cached_blocks == 40


def test_round_robin_random_least_loaded():
    req = RequestView(prompt_len=100, block_size=16, pool_blocks=0)
    ps = [PrefillView("p0", 0.3, 0), PrefillView("p1", 0.1, 0), PrefillView("p2", 0.2, 0)]
    rr = make_policy("round_robin", _model())
    assert [rr.place(req, ps, DECODES).prefill_id for _ in range(4)] == ["p0", "p1", "p2", "p0"]
    assert make_policy("least_loaded", _model()).place(req, ps, DECODES).prefill_id == "p1"
    rnd = make_policy("random", _model(), seed=1)
    assert {rnd.place(req, ps, DECODES).prefill_id for _ in range(50)} == {"p0", "p1", "p2"}
    with pytest.raises(ValueError):
        make_policy("best_effort", _model())


def test_max_reuse_keeps_one_token_to_compute():
    req = RequestView(prompt_len=64, block_size=16, pool_blocks=4)
    assert req.max_reuse_blocks == 3
    pl = make_policy("global_cache_aware", _model()).place(req, [PrefillView("p0", 0.0, 4)], DECODES)
    assert pl.cached_blocks == 3


def test_no_workers_is_503():
    req = RequestView(prompt_len=10, block_size=16, pool_blocks=0)
    pl = make_policy("global_cache_aware", _model()).place(req, [], DECODES)
    assert not pl.admitted and pl.status == 503


def test_pool_writes_all_or_from_the_second_sight_of_a_prefix():
    from services.conductor.poolwrites import PoolWriteAdmission

    assert PoolWriteAdmission("all").blocks_to_write([b"a", b"b"]) == -1
    seen = PoolWriteAdmission("seen", capacity=4)
    assert seen.blocks_to_write([b"a", b"b"]) == 0  # first sight: nothing worth writing yet
    assert seen.blocks_to_write([b"a", b"b", b"c"]) == 2  # the next turn: its prefix, not its own tail
    assert seen.blocks_to_write([b"a", b"x", b"c"]) == 1  # only leading blocks: a hit is a prefix
    assert len(seen) == 4
    assert seen.blocks_to_write([b"d"]) == 0  # the capacity forgets the least recently seen ("b")
    assert seen.blocks_to_write([b"a", b"b"]) == 1
    with pytest.raises(ValueError):
        PoolWriteAdmission("some")
    with pytest.raises(ValueError):
        PoolWriteAdmission("seen", capacity=0)


@pytest.mark.parametrize("name", ["global_cache_aware", "local_cache_aware"])
def test_cache_aware_choice_among_few_candidates_is_the_choice_among_all(name):
    """The estimates made for the least queued instance of each group holding as much of the prompt
    (and a peer's holders) pick what estimates for every instance would have picked."""
    import random

    from services.conductor.placement import affinity_rank

    rng = random.Random(7)
    policy = make_policy(name, _model(), use_pool=True, peer_fetch=True)
    for trial in range(300):
        n = rng.randint(1, 40)
        # instances holding as much of the prompt as others (a shared system prompt) and queues that tie
        shared = [rng.randint(1, 20) for _ in range(3)]
        prefills = [PrefillView(f"p{i}", rng.choice([0.0, 0.0, 0.5, rng.random() * 3]),
                                rng.choice([0, 0, 0, rng.randint(1, 20)] + shared)) for i in range(n)]
        req = RequestView(prompt_len=rng.randint(32, 600), block_size=16, pool_blocks=rng.randint(0, 20),
                          affinity=rng.randbytes(16))
        chosen = policy.choose_prefill(req, prefills)
        holders = sorted((p for p in prefills if p.local_blocks > 0), key=lambda p: -p.local_blocks)[:2]

        def peer(p):
            return next((q for q in holders if q.instance_id != p.instance_id), None) if name == "global_cache_aware" else None

        every = [policy.estimate(req, p, name == "global_cache_aware", peer(p)) for p in prefills]
        if name == "global_cache_aware":
            best = min(every, key=lambda c: (c.ttft, c.use_pool or bool(c.peer_id),
                                             affinity_rank(req.affinity, c.view.instance_id)))
        else:
            best = min(every, key=lambda c: (c.ttft, affinity_rank(req.affinity, c.view.instance_id)))
        assert chosen.view.instance_id == best.view.instance_id, trial


@pytest.mark.parametrize("n", [1, 15, 16, 14_000, 70_000])
def test_a_schedule_requests_token_ids_reach_the_prefill_task_as_sent_without_being_decoded(n):
    """The conductor reads a schedule request with its token ids packed (every array header size),
    counts them, and the prefill task it encodes carries the same ids."""
    import msgspec

    from libs.config import Settings
    from libs.protocol import (Heartbeat, PrefillTask, SamplingParams, ScheduleRequest, ScheduleRequestPacked,
                               decode, encode)
    from services.conductor.scheduler import Scheduler

    ids = [(i * 7919) % 50_000 for i in range(n)]
    wire = encode(ScheduleRequest(attempt_id="r1", prompt_token_ids=ids, sampling=SamplingParams(max_tokens=4)))
    req = decode(wire, ScheduleRequestPacked).packed()
    assert len(req.prompt_token_ids) == n
    sched = Scheduler(Settings(pipeline_max_stages=1))
    for kind in ("prefill", "decode"):
        sched.heartbeat(Heartbeat(kind=kind, instance_id=f"{kind}-0", interval=1.0, max_running=8), 0.0)
    d = sched.schedule(req, 0.0)
    assert d.task is not None
    assert decode(encode(d.task), PrefillTask).prompt_token_ids == ids
    bad = msgspec.msgpack.encode({"attempt_id": "r2", "prompt_token_ids": "not ids", "sampling": {"max_tokens": 4}})
    with pytest.raises(msgspec.ValidationError):  # a prompt that is not an array of ids
        decode(bad, ScheduleRequestPacked).packed()


def test_the_conductor_process_imports_no_model_libraries():
    """The conductor never runs the model: it starts without importing torch or transformers (a
    second of CPU each at every start, with every other service of a host starting beside it)."""
    import subprocess
    import sys

    code = ("import sys, services.conductor.service, yuebing.cluster; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
