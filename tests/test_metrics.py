"""The Prometheus metrics: every service's /metrics after real requests on the shared tiny cluster
(each moved as the requests imply, each labelled with the served model's name), the phases the
gateway times, the model_name label, and docs/metrics.md against what the code declares."""

import random
import re
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from helpers import declared_metrics, get_json, post, wait_until
from libs.bus import connect
from libs.metrics import ModelLabelled
from libs.protocol import IndexSummary, Subjects, TokenEvent, decode
from services.conductor.placement import RequestView
from services.gateway.phases import PhaseTimes

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- plain logic
def _ev(seq, tokens=(5,), **timed):
    return TokenEvent(output_id="r", seq=seq, token_ids=list(tokens), **timed)


def test_phases_split_a_request_by_clocks_of_one_host():
    t = PhaseTimes(started=100.0)
    t.event(_ev(0, prefill_seconds=0.25), 101.0)  # first token 1 s after arrival, 0.25 s of it on prefill
    t.event(_ev(1, since_kv_seconds=0.1), 101.5)  # decode's first, 0.1 s after it had the KV
    t.event(_ev(2), 101.6)
    t.event(_ev(3, since_kv_seconds=9.0), 101.7)  # a later attempt's timing does not replace the first's
    p = t.phases()
    assert p == {"prefill": 0.25, "queue": 0.75, "kv_transfer": 0.4, "decode": p["decode"], "inference": p["inference"]}
    assert abs(p["decode"] - 0.7) < 1e-9 and abs(p["inference"] - 0.95) < 1e-9


def test_phases_leave_out_what_no_event_timed():
    assert PhaseTimes(started=0.0).phases() == {}  # no token
    t = PhaseTimes(started=0.0)
    t.event(_ev(0), 2.0)  # a sender that predates the timings, finished at its first token
    assert t.phases() == {"decode": 0.0}
    t = PhaseTimes(started=0.0)
    t.event(_ev(0, prefill_seconds=3.0), 2.0)  # its clock ran ahead: no negative queue
    assert t.phases()["queue"] == 0.0 and "kv_transfer" not in t.phases()


def test_every_yuebing_sample_gets_the_model_name():
    registry = CollectorRegistry()
    c = Counter("yuebing:things", "x", ["kind"], registry=registry)
    c.labels("a").inc()
    Counter("other_things", "x", registry=registry).inc()
    exported = ModelLabelled(registry, "house-model")
    text = generate_latest(exported).decode()
    assert 'yuebing:things_total{kind="a",model_name="house-model"} 1.0' in text
    assert "other_things_total 1.0" in text  # not ours: as it is
    assert 'yuebing:things_total{kind="a",model_name="house-model"}' in \
        generate_latest(exported.restricted_registry(["yuebing:things_total"])).decode()
    assert 'model_name' not in generate_latest(ModelLabelled(registry, "")).decode()


def test_cluster_hit_is_the_longest_prefix_one_holder_has_less_the_last_token():
    assert RequestView(prompt_len=70, block_size=16, pool_blocks=1, held_blocks=4).cluster_hit_tokens == 64
    assert RequestView(prompt_len=64, block_size=16, pool_blocks=4, held_blocks=4).cluster_hit_tokens == 48
    assert RequestView(prompt_len=64, block_size=16, pool_blocks=0).cluster_hit_tokens == 0


def test_docs_list_every_metric_the_code_declares():
    documented = set(re.findall(r"^\| `(yuebing:[a-z0-9_]+)`", (ROOT / "docs" / "metrics.md").read_text(), re.M))
    assert documented == set(declared_metrics())


# ---------------------------------------------------------------- the real cluster
async def _scrape(urls: dict[str, str]) -> dict[str, list]:
    """Every ``yuebing:`` sample of each service: {service: [(name, labels, value)]}."""
    out = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        for name, url in urls.items():
            async with s.get(url) as r:
                text = await r.text()
            out[name] = [(x.name, x.labels, x.value) for f in text_string_to_metric_families(text)
                         for x in f.samples if x.name.startswith("yuebing:")]
    return out


def _value(samples, name: str, **labels) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and labels.items() <= lab.items())


async def test_every_service_exports_what_real_requests_did(tiny_cluster, tiny_dir):
    cluster = tiny_cluster
    bs = cluster.settings.block_size
    urls = cluster.metrics_urls
    nc = await connect(cluster.nats.url, "test-metrics")

    async def idle():
        h = await get_json(cluster.url + "/health")
        return all(w["running"] == 0 and w["queued"] == 0 for w in h["workers"])

    async def indexed() -> int:
        raw = await nc.request(Subjects.CONDUCTOR_STATE, b"", timeout=5)
        return decode(raw.data, IndexSummary).blocks.get("prefill-0", 0)

    async def complete(prompt):
        status, body, _ = await post(cluster.url + "/v1/completions", {
            "model": tiny_dir.name, "prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True})
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == 5
        return body["usage"]["prompt_tokens_details"]["cached_tokens"]

    rng = random.Random()  # prompts no earlier test of the session sent
    shared = [rng.randrange(300, 30000) for _ in range(70)]  # 4 whole blocks and 6 tokens
    other = [rng.randrange(300, 30000) for _ in range(40)]
    try:
        assert await wait_until(idle, timeout=30)
        before = await _scrape(urls)
        held = await indexed()
        cached = [await complete(shared)]
        # the conductor has heard of the first prompt's blocks before the second is placed
        assert await wait_until(lambda: _more(indexed, held + len(shared) // bs), timeout=30)
        cached += [await complete(shared), await complete(other)]
        assert cached == [0, 4 * bs, 0]
        assert await wait_until(idle, timeout=30)

        async def settled():  # the decode gauges back to nothing, the conductor's queue gauge too
            m = await _scrape(urls)
            d = m["decode-0"]
            return (_value(d, "yuebing:num_requests_running") == 0 and _value(d, "yuebing:num_requests_waiting") == 0
                    and _value(m["conductor-0"], "yuebing:prefill_queue_requests", instance_id="prefill-0") == 0
                    and _value(m["cachestore-0"], "yuebing:cache_pool_blocks") > 0  # the prompts' blocks put
                    and m)

        after = await wait_until(settled, timeout=30)
        assert after
    finally:
        await nc.close()

    def delta(service, name, **labels):
        return _value(after[service], name, **labels) - _value(before[service], name, **labels)

    requests, prompt_tokens = 3, 2 * len(shared) + len(other)
    # every yuebing sample of every service names the model as clients do
    for service, samples in after.items():
        assert samples, service
        assert {lab.get("model_name") for _, lab, _ in samples} == {tiny_dir.name}, service
    # the gateway: each phase of each request, the cached tokens its responses reported
    gw = "gateway-0"
    for phase in ("queue", "prefill", "kv_transfer", "decode", "inference"):
        assert delta(gw, f"yuebing:request_{phase}_time_seconds_count") == requests, phase
    assert delta(gw, "yuebing:time_to_first_token_seconds_count") == requests
    assert delta(gw, "yuebing:prompt_tokens_cached_total") == sum(cached)
    assert delta(gw, "yuebing:prompt_tokens_total") == prompt_tokens
    assert _value(after[gw], "yuebing:gateway_requests_running") == 0
    # decode: a token per row per step, 4 of each request's 5 made there
    assert delta("decode-0", "yuebing:iteration_tokens_total_sum") == requests * 4
    steps = delta("decode-0", "yuebing:decode_step_seconds_count")
    assert steps > 0 and delta("decode-0", "yuebing:iteration_tokens_total_count") == steps
    assert _value(after["decode-0"], "yuebing:kv_cache_usage_perc") == 0
    assert _value(after["decode-0"], "yuebing:decode_kv_tokens") == 0
    assert delta("decode-0", "yuebing:decode_handbacks_total") == 0
    # prefill reused what the responses say; the conductor saw the cluster hold it
    assert delta("prefill-0", "yuebing:prefix_cache_hits_total") == sum(cached)
    assert delta("conductor-0", "yuebing:cluster_prefix_cache_queries_total") == prompt_tokens
    assert delta("conductor-0", "yuebing:cluster_prefix_cache_hits_total") == sum(cached)
    # the pool: bytes and bound per tier
    store = after["cachestore-0"]
    s = cluster.settings
    assert _value(store, "yuebing:cache_pool_capacity_bytes", tier="dram") == s.dram_bytes
    assert _value(store, "yuebing:cache_pool_capacity_bytes", tier="disk") == s.disk_bytes
    assert _value(store, "yuebing:cache_pool_bytes") > 0


async def _more(count, than: int) -> bool:
    return await count() >= than
