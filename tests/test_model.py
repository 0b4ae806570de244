"""The model runner and the decode batch against plain transformers generate (in-process)."""

import torch

from conftest import reference_greedy
from libs.engine.decode_batch import DecodeBatch
from libs.engine.runner import ModelRunner
from libs.engine.sampling import sample_token
from libs.protocol import SamplingParams

GREEDY = SamplingParams(max_tokens=64, temperature=0.0)


def test_prefill_then_batched_decode_matches_generate(tiny_dir, tiny_model):
    model, tok = tiny_model
    runner = ModelRunner(tiny_dir)
    prompts = [[5 + i for i in range(n)] for n in (3, 17, 40, 9)]
    n_new = 24
    refs = [reference_greedy(model, p, n_new) for p in prompts]

    batch = DecodeBatch(runner)
    outs: dict[str, list[int]] = {}
    # sequences join at different steps and leave when done: continuous batching
    for k, p in enumerate(prompts):
        logits, kv = runner.prefill(p)
        assert kv.shape[3] == len(p)
        outs[str(k)] = [sample_token(logits, GREEDY, 0)]
        batch.add(str(k), kv)
        for _ in range(2):
            lg = batch.step([outs[s][-1] for s in batch.ids])
            for row, s in enumerate(batch.ids):
                outs[s].append(sample_token(lg[row], GREEDY, 0))
    while batch.ids:
        lg = batch.step([outs[s][-1] for s in batch.ids])
        done = set()
        for row, s in enumerate(batch.ids):
            outs[s].append(sample_token(lg[row], GREEDY, 0))
            if len(outs[s]) >= n_new:
                done.add(s)
        batch.remove(done)
    for k, ref in enumerate(refs):
        assert outs[str(k)][: len(ref)] == ref


def test_prefill_with_past_kv_equals_cold(tiny_dir):
    runner = ModelRunner(tiny_dir)
    prompt = list(range(100, 180))
    logits_cold, kv_cold = runner.prefill(prompt)
    _, kv_prefix = runner.prefill(prompt[:48])
    logits_warm, kv_warm = runner.prefill(prompt[48:], past_kv=kv_prefix)
    assert kv_warm.shape == kv_cold.shape
    assert torch.argmax(logits_warm) == torch.argmax(logits_cold)
    torch.testing.assert_close(kv_warm, kv_cold, rtol=1e-4, atol=1e-5)


def test_prefill_from_blocks_and_a_past_arriving_layer_by_layer(tiny_dir):
    """The past as a list of blocks, or streamed into the buffer while the prompt runs (each layer
    waits for its own), gives the same logits and KV as the past given whole."""
    import threading
    import time

    from libs.kv.codec import split_blocks
    from libs.engine.prefill_kv import PastNotLoaded

    runner = ModelRunner(tiny_dir)
    prompt = list(range(200, 290))
    logits_cold, kv_cold = runner.prefill(prompt)
    past = kv_cold[:, :, :, :64].contiguous()
    want_logits, want_kv = runner.prefill(prompt[64:], past)
    got_logits, got_kv = runner.prefill(prompt[64:], split_blocks(past, 16))
    assert torch.equal(got_logits, want_logits) and torch.equal(got_kv, want_kv)

    buf = runner.kv_buffer(len(prompt) - 64)  # no past yet: announce 64 positions still to come
    buf = type(buf)(torch.empty_like(want_kv), 64, ready=False, timeout=10)
    layers = want_kv.shape[0]

    def loader():
        for i in range(layers):
            time.sleep(0.05)
            buf.kv[i, :, :, :64] = past[i]
            buf.layer_ready(i + 1)

    t = threading.Thread(target=loader)
    t.start()
    streamed_logits, streamed_kv = runner.prefill(prompt[64:], buffer=buf)
    t.join()
    assert torch.equal(streamed_logits, want_logits) and torch.equal(streamed_kv, want_kv)
    assert torch.argmax(streamed_logits) == torch.argmax(logits_cold)

    failing = type(buf)(torch.empty_like(want_kv), 64, ready=False, timeout=10)
    threading.Timer(0.05, failing.fail, args=("pool instance went away",)).start()
    try:
        runner.prefill(prompt[64:], buffer=failing)
    except PastNotLoaded as e:
        assert "went away" in str(e)
    else:
        raise AssertionError("a past that never arrives must fail the prefill")


def test_chunked_prefill_matches_single_pass(tiny_dir):
    runner = ModelRunner(tiny_dir)
    prompt = list(range(300, 400))
    a, kva = runner.prefill(prompt, chunk=512)
    b, kvb = runner.prefill(prompt, chunk=32)
    assert torch.argmax(a) == torch.argmax(b)
    torch.testing.assert_close(kva, kvb, rtol=1e-4, atol=1e-5)
    # one chunk per step (a colocated worker's prefill): a pause after each chunk but the last,
    # then the same result, bit for bit, as the chunked prefill in one call
    steps = list(runner.prefill_steps(prompt, chunk=32))
    assert len(steps) == 4 and steps[:3] == [None] * 3
    c, kvc = steps[-1]
    assert torch.equal(c, b) and torch.equal(kvc, kvb)


def test_seeded_sampling_is_reproducible_and_position_dependent():
    logits = torch.randn(1000)
    p = SamplingParams(max_tokens=4, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    draws = [sample_token(logits, p, pos) for pos in range(20)]
    assert draws == [sample_token(logits, p, pos) for pos in range(20)]
    assert len(set(draws)) > 1
    top50 = set(torch.topk(logits, 50).indices.tolist())
    assert set(draws) <= top50


def test_batch_survives_growth_joins_and_leaves(tiny_dir, tiny_model):
    """Capacity growth inside a step, then joins and leaves (moving rows), stay exact."""
    model, _ = tiny_model
    runner = ModelRunner(tiny_dir)
    DecodeBatch.GROW = 4  # force buffer growth during steps
    try:
        batch = DecodeBatch(runner)
        prompts = {str(k): [40 + 3 * k + i for i in range(5 + 7 * k)] for k in range(5)}
        outs = {}
        for k in ("0", "1"):
            logits, kv = runner.prefill(prompts[k])
            outs[k] = [sample_token(logits, GREEDY, 0)]
            batch.add(k, kv)
        for step in range(30):
            if step == 6:
                batch.remove({"0"})  # a row in the middle leaves
            if step in (8, 9, 10):
                k = str(step - 6)
                logits, kv = runner.prefill(prompts[k])
                outs[k] = [sample_token(logits, GREEDY, 0)]
                batch.add(k, kv)
            lg = batch.step([outs[s][-1] for s in batch.ids])
            for row, s in enumerate(batch.ids):
                outs[s].append(sample_token(lg[row], GREEDY, 0))
        for k, out in outs.items():
            ref = reference_greedy(model, prompts[k], len(out))
            assert out[: len(ref)] == ref, k
    finally:
        DecodeBatch.GROW = 256


def test_tiny_temperatures_sample_like_greedy():
    logits = torch.randn(5000) * 30
    p = SamplingParams(max_tokens=1, temperature=1e-30, top_p=0.5, seed=3)
    assert sample_token(logits, p, 0) == int(torch.argmax(logits))


def test_kv_arena_carves_best_fit_ranges_of_its_slab_and_takes_them_back():
    from libs.engine.arena import KVArena

    arena = KVArena(max_bytes=16 << 20, granule=1 << 20)
    assert arena.reserve() and not arena.reserve()
    arena.commit()
    x, x_kv = arena.take((2, 3, 1000), torch.float32)  # 24,000 bytes: one granule
    assert x.numel() == 1 << 20 and x_kv.shape == (2, 3, 1000) and x_kv.dtype == torch.float32
    assert x_kv.data_ptr() == x.data_ptr() and x_kv.is_contiguous()
    y, _ = arena.take((3 << 20,), torch.uint8)
    z, _ = arena.take((5 << 20,), torch.uint8)
    assert arena.bytes == 7 << 20 and arena.reused == 3 and arena.allocated == 0
    fresh, fresh_kv = arena.take((8 << 20,), torch.uint8)  # 7 MiB free: fresh memory, outside the slab
    assert arena.allocated == 1 and arena.allocated_bytes == 8 << 20 and arena.bytes == 7 << 20
    arena.give(x)  # a 1 MiB hole before y
    again, kv = arena.take((10,), torch.bfloat16)
    assert again.data_ptr() == x.data_ptr() and kv.dtype == torch.bfloat16  # the smallest range that fits
    for t in (again, y, z):
        arena.give(t)
    arena.give(fresh)  # not kept: freed with its last reference
    assert arena.dropped == 0
    del fresh, fresh_kv
    arena.give(torch.empty(1 << 20, dtype=torch.uint8))  # not the arena's: ignored
    assert arena.bytes == 16 << 20 and arena.take((16 << 20,), torch.uint8)[0].data_ptr() == x.data_ptr()
    assert arena.stats() == {"reused": 5, "allocated": 1, "allocated_bytes": 8 << 20,
                             "dropped": 1, "dropped_bytes": 8 << 20, "kept_bytes": 16 << 20}


def test_a_kv_arena_buffer_dropped_without_give_comes_back_with_its_last_view():
    import gc

    from libs.engine.arena import KVArena

    arena = KVArena(max_bytes=8 << 20, granule=1 << 20)
    flat, kv = arena.take((2, 1 << 18), torch.float32)  # 2 MiB
    row = kv[1]
    del flat, kv
    assert arena.bytes == 6 << 20  # a view still reads it
    del row
    gc.collect()
    assert arena.bytes == 8 << 20
    buf = arena.take_bytes(3 << 20)
    t = torch.frombuffer(buf, dtype=torch.uint8)
    del buf
    assert arena.bytes == 5 << 20
    del t
    assert arena.bytes == 8 << 20
    given = arena.take_bytes(1 << 20)
    arena.give_bytes(given)
    other = arena.take_bytes(1 << 20)  # the same range, given out again
    del given  # the first holder's last reference: the range stays with the second
    gc.collect()
    assert arena.bytes == 7 << 20
    del other
    fresh = arena.take_bytes(16 << 20)  # more than the slab: fresh memory, dropped without give
    assert arena.allocated == 1 and arena.dropped == 0
    del fresh
    gc.collect()
    assert arena.dropped == 1 and arena.dropped_bytes == 16 << 20  # freed all the same


def test_kv_arenas_are_exported_by_name_summed_over_instances():
    from prometheus_client import CollectorRegistry, generate_latest

    from libs.metrics import KVArenaCollector
    from libs.engine.arena import KVArena

    collector, registry = KVArenaCollector(), CollectorRegistry()
    registry.register(collector)
    one, two = KVArena(4 << 20, granule=1 << 20), KVArena(4 << 20, granule=1 << 20)
    collector.add("prefill", one)
    collector.add("prefill", two)
    for arena in (one, two):
        arena.give_bytes(arena.take_bytes(10))
    held = one.take_bytes(10)
    fresh, _ = one.take((5 << 20,), torch.uint8)  # larger than the slab: fresh memory
    one.give(fresh)
    del fresh, _  # freed
    lines = set(generate_latest(registry).decode().splitlines())
    assert 'yuebing:kv_arena_takes_total{arena="prefill",source="fresh"} 1.0' in lines
    assert 'yuebing:kv_arena_takes_total{arena="prefill",source="kept"} 3.0' in lines
    assert 'yuebing:kv_arena_allocated_bytes_total{arena="prefill"} 5.24288e+06' in lines
    assert 'yuebing:kv_arena_dropped_bytes_total{arena="prefill"} 5.24288e+06' in lines
    assert 'yuebing:kv_arena_kept_bytes{arena="prefill"} 7.340032e+06' in lines  # 8 MiB less the one held
    del held
    del one, two, arena  # held weakly: a stopped instance's arena is no longer counted
    import gc

    gc.collect()
    assert "arena=" not in generate_latest(registry).decode()


def test_prefill_in_a_reused_buffer_equals_a_fresh_one(tiny_dir):
    """A buffer given back holds the last prompt's bytes: a prompt computed in it, cold or over a
    copied past, gets the same logits and KV as in fresh memory, and release is idempotent."""
    from libs.engine.arena import KVArena

    runner = ModelRunner(tiny_dir)
    prompt = list(range(300, 380))
    want_logits, want_kv = runner.prefill(prompt)
    past = want_kv[:, :, :, :32].clone()
    warm_logits, warm_kv = runner.prefill(prompt[32:], past)
    runner.arena = KVArena(64 << 20)
    for _ in range(2):
        other = runner.kv_buffer(90)
        runner.prefill(list(range(700, 790)), buffer=other)
        other.kv.fill_(float("nan"))  # whatever the last prompt left, it must not leak into the next
        other.release()
        other.release()
        assert runner.arena.bytes > 0
        buf = runner.kv_buffer(len(prompt))
        assert buf.kv.data_ptr() == other.kv.data_ptr()  # the same memory, given out again
        logits, kv = runner.prefill(prompt, buffer=buf)
        assert torch.equal(logits, want_logits) and torch.equal(kv, want_kv)
        buf.release()
        buf = runner.kv_buffer(len(prompt) - 32, past)
        logits, kv = runner.prefill(prompt[32:], buffer=buf)
        assert torch.equal(logits, warm_logits) and torch.equal(kv, warm_kv)
        buf.release()
    assert runner.arena.allocated == 0 and runner.arena.reused == 6  # every buffer from the slab


def test_kv_arena_byte_buffers_come_back_whole_and_are_reused():
    from libs.engine.arena import KVArena

    arena = KVArena(max_bytes=8 << 20, granule=1 << 20)
    buf = arena.take_bytes(1000)
    assert len(buf) == 1000 and not buf.readonly and arena.reused == 1 and arena.bytes == 7 << 20
    buf[:4] = b"abcd"
    arena.give_bytes(buf)  # the 1000-byte view gives back its whole 1 MiB range
    assert arena.bytes == 8 << 20
    again = arena.take_bytes(700_000)  # the same memory, not a new one
    assert arena.reused == 2 and arena.allocated == 0 and bytes(again[:4]) == b"abcd"
    arena.give_bytes(memoryview(bytearray(100)))  # not the arena's: ignored
    assert arena.bytes == 7 << 20


def test_an_instances_kv_arena_is_no_larger_than_its_model_can_fill():
    from libs.engine.arena import ARENA_PROMPTS, kv_arena_for
    from libs.engine.loading import ModelShape

    # SmolLM2-135M: 30 layers, 3 KV heads of 64, bf16, 8192 positions: 46,080 bytes a token
    smol = ModelShape(30, 3, 64, 49152, 8192, torch.bfloat16, (2,))
    arena = kv_arena_for(smol, 256 << 20)
    assert arena.max_bytes == 256 << 20 and arena.granule == 4 << 20  # the deployment's budget
    tiny = ModelShape(2, 2, 32, 1000, 2048, torch.float32, (2,))  # 1 KiB a token, 2 MiB a full prompt
    arena = kv_arena_for(tiny, 256 << 20)
    assert arena.granule == 2 << 20 and arena.max_bytes == ARENA_PROMPTS * (2 << 20)
    flat, _ = arena.take(tiny.kv_dims(2048), tiny.dtype)  # a whole-context prompt: one granule
    assert flat.numel() == 2 << 20 and arena.reused == 1
    assert kv_arena_for(tiny, 1 << 20).take_bytes(10) is not None  # a budget under a granule: fresh memory


def test_a_plain_config_gives_the_shape_autoconfig_gives(tiny_dir, tmp_path, monkeypatch):
    import json
    import shutil

    import libs.engine.loading as loading

    plain = loading.read_shape(tiny_dir, torch.bfloat16)
    monkeypatch.setattr(loading, "_plain_config", lambda path: None)  # transformers' AutoConfig instead
    assert loading.read_shape(tiny_dir, torch.bfloat16) == plain
    monkeypatch.undo()
    # no generation config: the model config's EOS; a config that is not plain goes to AutoConfig
    other = tmp_path / "m"
    shutil.copytree(tiny_dir, other)
    (other / "generation_config.json").unlink(missing_ok=True)
    cfg = json.loads((other / "config.json").read_text())
    cfg["eos_token_id"] = [7, 9]
    (other / "config.json").write_text(json.dumps(cfg))
    assert loading.read_shape(other).eos_token_ids == (7, 9)
    cfg["max_position_embeddings"] = "4096"  # not an int: not plain
    (other / "config.json").write_text(json.dumps(cfg))
    assert loading._plain_config(other) is None
