"""KV-cache reuse end to end: the output with a cached prefix equals the cold output, token for
token, whether the prefix comes from the instance's own DRAM, from the pool, or from LMDB after a
cachestore restart; cached_tokens says how much was reused."""

import signal

import lmdb
import pytest

from conftest import reference_greedy, start_cluster
from helpers import get_json, log_events, logged, post, prompt_keys, run_prefill_tasks, wait_for_pool, wait_until
from libs.bus import connect, synced
from libs.engine.loading import model_identity
from libs.kv.keys import block_hashes, namespace_digest
from libs.protocol import IndexSummary, KVDump, KVDumpRequest, Subjects, decode, encode, keys_digest

BS = 16


def _text(tok, ids):
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


async def _complete(cluster, model, prompt, max_tokens=24):
    status, body, _ = await post(cluster.url + "/v1/completions",
                                 {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert status == 200, body
    return body["choices"][0]["text"], body["usage"]


async def _prefill_hits(cluster, name: str) -> dict[str, float]:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.get(cluster.metrics_urls[name]) as r:
            text = await r.text()
    out = {"local": 0.0, "pool": 0.0}
    for line in text.splitlines():
        if line.startswith("yuebing:prefix_cache_hits_total{"):
            src = line.split('source="')[1].split('"')[0]
            out[src] = float(line.rsplit(" ", 1)[1])
    return out


async def _pool_holds(cluster, n_keys: int) -> bool:
    nc = await connect(cluster.nats.url, "test-pool-holds")
    try:
        raw = await nc.request(Subjects.kv_dump("cachestore-0"), encode(KVDumpRequest()), timeout=5)
        return decode(raw.data, KVDump).total >= n_keys
    finally:
        await nc.close()


async def _gone(cluster, name):
    """Wait until the cluster no longer counts ``name`` as alive (its heartbeats have lapsed)."""

    async def gone():
        h = await get_json(cluster.url + "/health")
        return all(w["id"] != name for w in h["workers"])

    assert await wait_until(gone, timeout=30)


async def _restart(cluster, name, sig=signal.SIGTERM):
    """Stop an instance, let the cluster notice, and start it again under the same id."""
    kind, index = name.rsplit("-", 1)
    cluster.kill(name, sig)
    await _gone(cluster, name)
    cluster.start_service(kind, int(index))


async def _wait_ready(cluster):
    want = {"prefill": cluster.prefill, "decode": cluster.decode, "cachestore": cluster.cachestore, "conductor": 1}

    async def ready():
        h = await get_json(cluster.url + "/health")
        return all(h["instances"].get(k, 0) >= n for k, n in want.items())

    assert await wait_until(ready, timeout=120)


@pytest.fixture(scope="module")
def rr_cluster(tiny_dir, tmp_path_factory):
    """Two prefill instances taking turns, so a prefix computed on one is needed on the other."""
    cluster = start_cluster(tiny_dir, tmp_path_factory.mktemp("rr"), prefill=2, policy="round_robin")
    yield cluster
    cluster.stop()


async def test_own_dram_hit_full_and_partial_is_token_exact(tiny_cluster, tiny_dir, tiny_model):
    model, tok = tiny_model
    prompt = [(7 * i + 3) % 20000 + 100 for i in range(100)]  # 6 full blocks and a tail of 4
    cold_text, cold_usage = await _complete(tiny_cluster, tiny_dir.name, prompt)
    assert cold_usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert cold_text == _text(tok, reference_greedy(model, prompt, 24))
    warm_text, warm_usage = await _complete(tiny_cluster, tiny_dir.name, prompt)
    assert warm_usage["prompt_tokens_details"]["cached_tokens"] == 96
    assert warm_text == cold_text
    partial = prompt[:70] + [555, 556, 557, 558, 559]
    text, usage = await _complete(tiny_cluster, tiny_dir.name, partial)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 64  # 4 blocks of the shared 70 tokens
    assert text == _text(tok, reference_greedy(model, partial, 24))
    # a prompt that is exactly cached still computes its last token
    exact = prompt[:64]
    _, _ = await _complete(tiny_cluster, tiny_dir.name, exact)
    text, usage = await _complete(tiny_cluster, tiny_dir.name, exact)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 48
    assert text == _text(tok, reference_greedy(model, exact, 24))


async def test_multi_turn_chat_cached_tokens(tiny_cluster, tiny_dir, tiny_model):
    """The second turn reuses every whole block of what it shares with the first turn's prompt and
    answer (the answer's blocks written to the pool by decode), as far as the chat template renders
    the answer as the tokens generated (the tiny model's random tokens may not tokenize back alike)."""
    model, tok = tiny_model
    turn1 = [{"role": "system", "content": "You answer questions about astronomy in detail. " * 3},
             {"role": "user", "content": "Why is the Moon's far side never visible from Earth?"}]
    status, body, _ = await post(tiny_cluster.url + "/v1/chat/completions",
                                 {"model": tiny_dir.name, "messages": turn1, "max_tokens": 16, "temperature": 0})
    assert status == 200
    answer = body["choices"][0]["message"]["content"]
    ids1 = tok.apply_chat_template(turn1, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = reference_greedy(model, ids1, 16)[: body["usage"]["completion_tokens"]]
    written = (len(ids1) + len(out) - 1) // BS  # the blocks whose KV prefill or decode computed
    ns = namespace_digest(model_identity(tiny_dir), "float32", BS)
    assert await wait_for_pool(tiny_cluster.nats.url, block_hashes(ids1 + out, BS, ns)[:written])
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And Mars?"}]
    status, body2, _ = await post(tiny_cluster.url + "/v1/chat/completions",
                                  {"model": tiny_dir.name, "messages": turn2, "max_tokens": 8, "temperature": 0})
    assert status == 200
    ids2 = tok.apply_chat_template(turn2, add_generation_prompt=True, tokenize=True, return_dict=False)
    seen = ids1 + out
    common = next((i for i, (a, b) in enumerate(zip(seen, ids2)) if a != b), min(len(seen), len(ids2)))
    expected = min(written, common // BS, (len(ids2) - 1) // BS) * BS
    assert expected >= len(ids1) // BS * BS > 0
    # what the pool holds of the new prompt, as the conductor saw it; it is loaded unless the cost
    # model finds recomputing the tiny model's few blocks faster
    (placed,) = await logged(tiny_cluster.log_dir / "conductor-0.log", "scheduled", {body2["id"]})
    assert placed["pool_blocks"] * BS == expected
    if placed["plan"] == "pool":
        assert body2["usage"]["prompt_tokens_details"]["cached_tokens"] == expected


async def test_prefix_from_instance_a_is_reused_by_instance_b(rr_cluster, tiny_dir, tiny_model):
    model, tok = tiny_model
    prompt = [(11 * i + 5) % 30000 + 200 for i in range(90)]  # 5 full blocks
    cold_text, cold_usage = await _complete(rr_cluster, tiny_dir.name, prompt)  # on prefill-0
    assert cold_usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert await wait_until(lambda: _pool_holds(rr_cluster, 5), timeout=30)
    before = await _prefill_hits(rr_cluster, "prefill-1")
    # every presence check the pool is asked (lookups and the checks before pool writes)
    nc = await connect(rr_cluster.nats.url, "test-presence-spy")
    asked = []

    async def spy(msg):
        asked.append(msg.subject)

    await nc.subscribe(Subjects.cache("cachestore-0", "exists"), cb=spy)
    await synced(nc)
    try:
        text, usage = await _complete(rr_cluster, tiny_dir.name, prompt)  # round robin: on prefill-1
        assert usage["prompt_tokens_details"]["cached_tokens"] == 80
        assert text == cold_text == _text(tok, reference_greedy(model, prompt, 24))
        after = await _prefill_hits(rr_cluster, "prefill-1")
        assert after["pool"] - before["pool"] == 80  # loaded from the pool, not its own DRAM
        await nc.flush()
        # the conductor planned the load from its index: the prefill asked the pool nothing first
        # (and had nothing new to write)
        assert asked == []
        # a new prompt's pool write does check presence: the spy hears it
        await _complete(rr_cluster, tiny_dir.name, [(7 * i + 3) % 30000 + 500 for i in range(40)])

        async def heard():
            return len(asked) > 0

        assert await wait_until(heard, timeout=30)
    finally:
        await nc.close()


async def test_reuse_from_lmdb_after_cachestore_restart_and_index_rebuild(rr_cluster, tiny_dir, tiny_model):
    model, tok = tiny_model
    prompt = [(13 * i + 1) % 30000 + 300 for i in range(70)]  # 4 full blocks
    cold_text, _ = await _complete(rr_cluster, tiny_dir.name, prompt)
    assert await wait_until(lambda: _pool_holds(rr_cluster, 4), timeout=30)
    # restart the cachestore (its DRAM is gone, LMDB stays) and both prefills (their DRAM is gone)
    for name in ("cachestore-0", "prefill-0", "prefill-1"):
        await _restart(rr_cluster, name)
    await _wait_ready(rr_cluster)
    text, usage = await _complete(rr_cluster, tiny_dir.name, prompt)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 64
    assert text == cold_text == _text(tok, reference_greedy(model, prompt, 24))
    # the conductor, restarted, rebuilds its index from the event stream and dumps
    await _restart(rr_cluster, "conductor-0")
    await _wait_ready(rr_cluster)
    nc = await connect(rr_cluster.nats.url, "test-index")
    try:
        async def matches():
            raw = await nc.request(Subjects.kv_dump("cachestore-0"), encode(KVDumpRequest(limit=20000)), timeout=5)
            dump = decode(raw.data, KVDump)
            try:
                s = decode((await nc.request(Subjects.CONDUCTOR_STATE, b"", timeout=5)).data, IndexSummary)
            except Exception:
                return False
            return s.pool_blocks == dump.total and s.pool_digest == keys_digest(dump.keys)

        assert await wait_until(matches, timeout=30)
    finally:
        await nc.close()


async def test_corrupt_block_in_lmdb_is_a_miss_not_wrong_text(tiny_dir, tiny_model, tmp_path):
    model, tok = tiny_model
    # no own cache on the prefill instance: the pool is the only place its prefixes come from
    cluster = start_cluster(tiny_dir, tmp_path / "c", prefill_cache_bytes=0)
    try:
        prompt = [(17 * i + 9) % 30000 + 400 for i in range(60)]  # 3 full blocks
        cold_text, _ = await _complete(cluster, tiny_dir.name, prompt)
        assert await wait_until(lambda: _pool_holds(cluster, 3), timeout=30)
        text, usage = await _complete(cluster, tiny_dir.name, prompt)
        assert usage["prompt_tokens_details"]["cached_tokens"] == 48  # from the pool
        cluster.kill("cachestore-0", signal.SIGTERM)
        await _gone(cluster, "cachestore-0")
        db = cluster.data_dir / "cachestore" / "cachestore-0"
        env = lmdb.open(str(db), max_dbs=3)
        blocks = env.open_db(b"blocks")
        with env.begin(write=True) as txn:
            for k, v in list(txn.cursor(db=blocks)):
                bad = bytearray(v)
                bad[len(bad) // 2] ^= 0x5A  # flip bits in every stored block's KV bytes
                txn.put(k, bytes(bad), db=blocks)
        env.close()
        # while the pool is down the prefill recomputes: same text, nothing cached
        text, usage = await _complete(cluster, tiny_dir.name, prompt)
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        assert text == cold_text
        # back, it lists the corrupt blocks; a read of them is a miss, not their bytes
        cluster.start_service("cachestore", 0)
        await _wait_ready(cluster)
        assert await wait_for_pool(cluster.nats.url, _keys(tiny_dir, prompt)[:3])  # and the index knows
        text, usage = await _complete(cluster, tiny_dir.name, prompt)
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        assert text == cold_text == _text(tok, reference_greedy(model, prompt, 24))
        assert log_events(cluster.log_dir / "cachestore-0.log", "block_corrupt_dropped")
    finally:
        cluster.stop()


def _keys(model_dir, prompt: list[int]) -> list[bytes]:
    return prompt_keys(model_dir, prompt, BS)


async def _run_prefill_task(cluster, model_dir, instance: str, prompt: list[int], max_tokens: int, **plan):
    """Put a PrefillTask straight on ``instance``'s work queue (the plan in ``plan``, as the
    conductor would have made it) and collect the request's token events until it finishes."""
    import uuid

    from libs.protocol import PrefillTask, SamplingParams

    rid = f"cmpl-peer-{uuid.uuid4().hex[:8]}"
    task = PrefillTask(attempt_id=rid, prompt_token_ids=prompt, decode_id="decode-0",
                       block_hashes=_keys(model_dir, prompt),
                       sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0), **plan)
    return await run_prefill_tasks(cluster.nats.url, rid, [(instance, task)])


async def _holds(cluster, name: str, key: bytes) -> bool:
    """Whether prefill instance ``name``'s own cache holds ``key``."""
    nc = await connect(cluster.nats.url, "test-holder")
    try:
        raw = await nc.request(Subjects.kv_dump(name), encode(KVDumpRequest(limit=20000)), timeout=5)
        return key in decode(raw.data, KVDump).keys
    finally:
        await nc.close()


async def test_a_prefix_loaded_from_a_peer_instance_is_token_exact(rr_cluster, tiny_dir, tiny_model):
    """An instance named as peer sends the blocks of its own cache; the instance that loads them
    gives the cold output and keeps them; a peer that does not hold them is a recompute, not
    wrong text."""
    model, tok = tiny_model
    prompt = [(13 * i + 7) % 30000 + 300 for i in range(90)]  # 5 full blocks
    cold_text, _ = await _complete(rr_cluster, tiny_dir.name, prompt)
    last = _keys(tiny_dir, prompt)[4]
    held = [name for name in ("prefill-0", "prefill-1") if await _holds(rr_cluster, name, last)]
    assert len(held) == 1
    holder = held[0]
    other = "prefill-1" if holder == "prefill-0" else "prefill-0"
    before = await _prefill_hits(rr_cluster, other)
    expected = reference_greedy(model, prompt, 24)
    tokens, cached = await _run_prefill_task(rr_cluster, tiny_dir, other, prompt, 24, use_pool=False,
                                             peer_id=holder, peer_blocks=5)
    assert cached == 80 and tokens == expected and _text(tok, tokens) == cold_text
    after = await _prefill_hits(rr_cluster, other)
    assert after.get("peer", 0) - before.get("peer", 0) == 80 and after["pool"] == before["pool"]
    assert await wait_until(lambda: _holds(rr_cluster, other, last), timeout=10)  # kept where it was pulled to
    unseen = [(17 * i + 1) % 30000 + 400 for i in range(90)]
    tokens, cached = await _run_prefill_task(rr_cluster, tiny_dir, other, unseen, 24, use_pool=False,
                                             peer_id=holder, peer_blocks=5)
    assert cached == 0 and tokens == reference_greedy(model, unseen, 24)
    # planned past the part held: the own 5 blocks are kept, the 4 the peer lacks are recomputed
    longer = prompt[:80] + [(7 * i + 3) % 30000 + 500 for i in range(80)]
    tokens, cached = await _run_prefill_task(rr_cluster, tiny_dir, other, longer, 24, use_pool=False,
                                             peer_id=holder, peer_blocks=9)
    assert cached == 80 and tokens == reference_greedy(model, longer, 24)
