"""The operator's dashboard: its windowed series and hit ratio (plain logic), and the page itself in
a real headless Chromium against a keyed gateway on the shared cluster, after real requests."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from pathlib import Path

import aiohttp
import msgspec
import pytest

from helpers import get_json, post, wait_until
from libs.protocol import Heartbeat, PoolEvents, Prediction, ScheduleReply, TierUsage
from services.gateway.clusterview import ReuseWindow, counters, hit_ratio, instances, pool
from services.gateway.dashboard import Dashboard, check_mode
from services.gateway.recent import RecentRequests


# ---------------------------------------------------------------- plain logic
def _reply(rid: str) -> ScheduleReply:
    return ScheduleReply(attempt_id=rid, admitted=True, prefill_id="prefill-a", decode_id="decode-b",
                         prediction=Prediction(ttft=0.3, queue=0.1, compute=0.2, load=0.05, tbt=0.02, plan="pool",
                                               reused_tokens=32))


def test_series_percentiles_and_attainment_per_bucket():
    r = RecentRequests(window=60.0, bucket=10.0, keep=3)
    # bucket [100, 110): TTFTs 1..10 s, the SLO met by the first six
    for i in range(10):
        rid = f"a{i}"
        r.placed(rid, 20, _reply(rid), 100.0 + i * 0.5)
        r.finished(rid, 101.0 + i * 0.5, ttft=float(i + 1), tbt=0.1 * (i + 1), met=i < 6, cached_tokens=16,
                   output_tokens=4, finish_reason="length")
    # bucket [120, 130): one done (met), one failed, two rejected, one cancelled (not counted)
    for rid, at in (("b0", 121.0), ("b1", 122.0), ("b2", 123.0)):
        r.placed(rid, 20, _reply(rid), at)
    r.finished("b0", 121.5, ttft=0.5, tbt=0.05, met=True)
    r.failed("b1", "worker lost", 122.5)
    r.cancelled("b2", 123.5)
    r.rejected("c0", "ttft", "predicted TTFT over the objective", 124.0)
    r.rejected("c1", "tbt", "decode overloaded", 125.0)

    s = r.series(now=125.0)
    assert s["t"] == [70.0, 80.0, 90.0, 100.0, 110.0, 120.0]  # the window's buckets, the current one last
    i = s["t"].index(100.0)
    assert s["ttft_p50"][i] == pytest.approx(5.5) and s["ttft_p90"][i] == pytest.approx(9.1)
    assert s["tbt_p50"][i] == pytest.approx(0.55) and s["tbt_p90"][i] == pytest.approx(0.91)
    assert s["attainment"][i] == pytest.approx(0.6) and s["done"][i] == 10
    j = s["t"].index(120.0)
    assert s["ttft_p50"][j] == pytest.approx(0.5)
    assert s["attainment"][j] == pytest.approx(1 / 4)  # met 1 of done, failed and rejected
    assert (s["done"][j], s["failed"][j], s["rejected"][j]) == (1, 1, 2)
    assert s["ttft_p50"][0] is None and s["attainment"][0] is None  # nothing ended then
    totals = r.totals(125.0)
    assert totals["attainment"] == pytest.approx(7 / 14) and totals["cancelled"] == 1

    # the last requests, newest first, bounded; each with its decision and outcome
    last = r.last()
    assert [x["id"] for x in last] == ["c1", "c0", "b2"]
    assert last[0]["status"] == "rejected" and last[0]["reason"] == "tbt" and last[2]["status"] == "cancelled"
    assert {x["reason"]: (x["window"], x["total"]) for x in r.rejections(125.0)} == {"ttft": (1, 1), "tbt": (1, 1)}

    # past the window the outcomes leave the series, the totals since start stay
    later = r.series(now=200.0)
    assert all(v is None for v in later["ttft_p50"]) and sum(later["rejected"]) == 0
    assert {x["reason"]: (x["window"], x["total"]) for x in r.rejections(200.0)} == {"ttft": (0, 1), "tbt": (0, 1)}


def test_a_finished_request_keeps_its_placement_decision():
    r = RecentRequests(window=60.0, bucket=10.0)
    r.placed("x", 40, _reply("x"), 10.0)
    assert r.last()[0]["status"] == "running" and r.running() == 1
    r.finished("x", 12.0, ttft=0.4, tbt=0.03, met=True, cached_tokens=32, output_tokens=5, finish_reason="stop")
    row = r.last()[0]
    assert row["status"] == "done" and row["prefill"] == "prefill-a" and row["decode"] == "decode-b"
    assert row["predicted"] == {"ttft": 0.3, "queue": 0.1, "compute": 0.2, "load": 0.05, "tbt": 0.02, "plan": "pool",
                                "peer": "", "reused_tokens": 32}
    assert (row["ttft"], row["cached_tokens"], row["seconds"], r.running()) == (0.4, 32, 2.0, 0)


def _prefill(iid: str, prompt: int, own: int, peer: int, pool_: int) -> Heartbeat:
    return Heartbeat(kind="prefill", instance_id=iid, interval=1.0, prompt_tokens=prompt,
                     reused_tokens={"own": own, "peer": peer, "pool": pool_})


def _store(iid: str, dram_hits: int, disk_hits: int) -> Heartbeat:
    return Heartbeat(kind="cachestore", instance_id=iid, interval=1.0, tiers={
        "dram": TierUsage(bytes=100, capacity_bytes=1000, blocks=2, hit_blocks=dram_hits),
        "disk": TierUsage(bytes=300, capacity_bytes=4000, blocks=6, hit_blocks=disk_hits)})


def test_hit_ratio_by_source_over_the_window():
    w = ReuseWindow(window=60.0)
    for t, beats in ((0.0, [_prefill("p1", 1000, 100, 0, 0), _store("c1", 5, 5)]),
                     (30.0, [_prefill("p1", 1400, 200, 50, 100), _store("c1", 8, 6)]),
                     # p1 restarted: its counters start again from 0
                     (50.0, [_prefill("p1", 200, 0, 0, 100), _store("c1", 11, 7)])):
        for hb in beats:
            w.observe(f"{hb.kind}/{hb.instance_id}", counters(hb), t)
    inc = w.increase(50.0)
    assert inc == {"prompt": 600, "own": 100, "peer": 50, "pool": 200, "hits_dram": 6, "hits_disk": 2}
    h = hit_ratio(inc)
    assert h["ratio"]["own"] == pytest.approx(100 / 600) and h["ratio"]["peer"] == pytest.approx(50 / 600)
    # the pool's tokens split as its gets found blocks in each tier
    assert h["ratio"]["pool_dram"] == pytest.approx(150 / 600) and h["ratio"]["pool_disk"] == pytest.approx(50 / 600)
    assert h["ratio"]["computed"] == pytest.approx(250 / 600) and h["tokens"]["computed"] == 250
    # the samples before the window leave it (one stays as the baseline); silent instances are dropped
    assert w.increase(95.0) == {"prompt": 200, "own": 0, "peer": 0, "pool": 100, "hits_dram": 3, "hits_disk": 1}
    assert w.increase(200.0) == {}
    assert hit_ratio({})["ratio"]["own"] is None
    # tokens from the pool with no get reported by a cachestore: its tiers' shares are unknown
    unknown = hit_ratio({"prompt": 100, "pool": 40})["ratio"]
    assert unknown["pool"] == pytest.approx(0.4) and unknown["pool_dram"] is None and unknown["pool_disk"] is None
    assert hit_ratio({"prompt": 100, "own": 40})["ratio"]["pool_disk"] == 0


def test_instances_and_pool_from_heartbeats():
    beats = [(0.5, _store("c1", 0, 0)), (0.2, _prefill("p1", 0, 0, 0, 0)),
             (5.0, Heartbeat(kind="decode", instance_id="d-dead", interval=1.0)),
             (5.0, Heartbeat(kind="decode", instance_id="d-stopped", interval=1.0, draining=True)),
             (900.0, Heartbeat(kind="decode", instance_id="d-forgotten", interval=1.0))]
    kinds = instances(beats, forget_after=600.0)
    assert [(r["id"], r["state"]) for r in kinds["decode"]] == [("d-dead", "down")]
    assert kinds["cachestore"][0]["kv_bytes"] == 100 and kinds["cachestore"][0]["kv_capacity_bytes"] == 1000
    assert kinds["prefill"][0]["state"] == "live" and kinds["conductor"] == []
    events = PoolEvents(promoted=4, demoted=7, evicted={"watermark": 5, "capacity": 1}, corrupt=1, pinned=3,
                        pinned_held=2)
    c2 = msgspec.structs.replace(_store("c2", 0, 0), hot_blocks=3, pool_events=events)
    c3 = msgspec.structs.replace(_store("c3", 0, 0), pool_events=PoolEvents(promoted=1, evicted={"watermark": 2}))
    p = pool([hb for _, hb in beats[:2]] + [c2, c3])
    assert p["instances"] == 3 and p["hot_blocks"] == 3
    assert p["tiers"]["disk"] == {"bytes": 900, "capacity_bytes": 12000, "blocks": 18}
    # summed over the instances that report them (c1's heartbeat carries none)
    assert p["events"] == {"promoted": 5, "demoted": 7, "evicted": {"watermark": 7, "capacity": 1}, "corrupt": 1,
                           "pinned": 3, "pinned_held": 2}


def test_dashboard_modes():
    assert Dashboard(None, "on").keyed_paths == {"/dashboard/data"}
    assert Dashboard(None, "open").keyed_paths == frozenset()
    with pytest.raises(ValueError):
        check_mode("maybe")


# ---------------------------------------------------------------- the page in a real browser
KEY = "k-dash"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
async def keyed_gateway(tiny_cluster):
    """A gateway with an API key, on the shared cluster's bus and workers, in this process."""
    import msgspec

    from libs.natsserver import free_port
    from services.gateway.service import GatewayService

    nats = tiny_cluster.nats
    settings = msgspec.structs.replace(
        tiny_cluster.settings, instance_id="gateway-dash", port=free_port(), no_auth=False, api_keys=KEY,
        dashboard="on", nats_url=nats.url_for(nats.add_user("gateway", "gateway-dash")))
    gateway = GatewayService(settings)
    await gateway.start()
    yield gateway
    await gateway.stop()


def _browse(url: str, request_ids: list[str], instance_ids: list[str], shot: Path) -> dict:
    """Open the dashboard without a key, give it in the form, wait for the instances and the
    requests; a key in the address is taken out of it. Returns what the page showed."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1440,1900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(url + "/dashboard")
        wait = WebDriverWait(driver, 30, poll_frequency=0.2)
        form = wait.until(lambda d: d.find_element(By.ID, "keyform"))
        wait.until(lambda d: form.is_displayed())  # the data wants the key: the page asks for it
        driver.find_element(By.ID, "key").send_keys(KEY)
        form.submit()

        def rows(table: str) -> set[str]:
            return {r.get_attribute("data-id") for r in driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr[data-id]")}

        wait.until(lambda d: set(instance_ids) <= rows("instances") and set(request_ids) <= rows("requests"))
        seen = {"form_hidden": not form.is_displayed(), "instances": rows("instances"), "requests": rows("requests")}
        seen["request_rows"] = {r.get_attribute("data-id"): r.text for r in
                                driver.find_elements(By.CSS_SELECTOR, "#requests tbody tr[data-id]")}
        seen["charts"] = len(driver.find_elements(By.CSS_SELECTOR, ".uplot canvas"))
        seen["pool_events"] = driver.find_element(By.ID, "pool-events").text
        driver.save_screenshot(str(shot))
        # a key given in the address: kept for the tab, taken out of the address
        driver.get(url + f"/dashboard?key={KEY}")
        wait.until(lambda d: set(request_ids) <= rows("requests"))
        seen["url_after_key"] = driver.current_url
        return seen
    finally:
        driver.quit()


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver; "
                           "`make test` installs them)")
async def test_dashboard_shows_instances_and_requests_in_a_browser(keyed_gateway, tiny_cluster, tiny_dir, tmp_path):
    url = keyed_gateway.url
    auth = {"Authorization": f"Bearer {KEY}"}

    async def data():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.get(url + "/dashboard/data", headers=auth) as r:
                assert r.status == 200
                return await r.json()

    async def heard() -> bool:  # its counters so far are the baseline of what the requests add
        doc = await data()
        return all(doc["instances"][k] for k in ("prefill", "cachestore"))

    assert await wait_until(heard, timeout=10)
    # a prompt of a few blocks, sent twice: the second reuses the first one's KV
    prompt = f"{uuid.uuid4().hex} " + "the dashboard shows every instance and request " * 6

    async def own_cache_bytes() -> int:
        return (await data())["instances"]["prefill"][0]["kv_bytes"]

    ids = []
    for i, p in enumerate((prompt, prompt, "Hello")):
        before = await own_cache_bytes()
        status, body, _ = await post(url + "/v1/completions", {"model": tiny_dir.name, "prompt": p, "max_tokens": 4,
                                                               "temperature": 0}, headers=auth)
        assert status == 200, body
        ids.append(body["id"])
        if i == 0:  # its blocks kept in the instance's own cache (its heartbeat says), for the next to reuse
            assert await wait_until(lambda: _grew(own_cache_bytes, before), timeout=10)

    # the data is behind the key; with it, one document says what happened
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get(url + "/dashboard/data") as r:
            assert r.status == 401
        async with s.get(url + "/dashboard") as r:  # the page itself holds no data: open
            assert r.status == 200 and "uPlot.iife.min.js" in await r.text()
        async with s.get(url + "/dashboard/static/vendor/uplot/LICENSE") as r:
            assert r.status == 200 and "MIT" in await r.text()

    health = await get_json(tiny_cluster.url + "/health")
    workers = {w["kind"]: w["id"] for w in health["workers"]}
    doc = await data()
    rows = {r["id"]: r for r in doc["requests"]}
    assert set(ids) <= set(rows)
    for rid in ids:
        r = rows[rid]
        assert r["status"] == "done" and r["prefill"] == workers["prefill"] and r["decode"] == workers["decode"]
        assert r["predicted"]["ttft"] > 0 and r["ttft"] > 0 and r["output_tokens"] >= 1
    assert rows[ids[0]]["cached_tokens"] == 0  # a prompt never seen
    assert rows[ids[1]]["cached_tokens"] > 0 and rows[ids[1]]["predicted"]["plan"] in ("local", "pool", "peer")
    assert {k: [i["id"] for i in doc["instances"][k]] for k in ("prefill", "decode", "cachestore")} == {
        k: [workers[k]] for k in ("prefill", "decode", "cachestore")}
    assert doc["pool"]["tiers"]["dram"]["capacity_bytes"] == tiny_cluster.settings.dram_bytes
    assert set(doc["pool"]["events"]) == {"promoted", "demoted", "evicted", "corrupt", "pinned", "pinned_held"}
    assert sum(doc["series"]["done"]) >= 3 and doc["totals"]["ttft_p50"] > 0
    # the prefill instance's counters reach the hit ratio with its next heartbeats
    assert await wait_until(lambda: _reused(data), timeout=10)

    shot = Path(os.environ.get("YUEBING_DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    seen = await asyncio.to_thread(_browse, url, ids, [workers[k] for k in ("prefill", "decode", "cachestore")], shot)
    assert seen["form_hidden"] and seen["charts"] >= 4
    assert re.fullmatch(r"since the cachestores started: promoted \d+, demoted \d+, evicted .+, corrupt \d+; "
                        r"pinned now \d+ held(, \d+ awaited)?", seen["pool_events"]), seen["pool_events"]
    assert workers["prefill"] in seen["request_rows"][ids[1]]  # the chosen instances, in the row
    assert "key=" not in seen["url_after_key"]
    assert shot.stat().st_size > 10_000


async def _reused(data) -> bool:
    h = (await data())["pool"]["hit_ratio"]
    return h["prompt_tokens"] > 0 and sum(h["tokens"][s] for s in ("own", "peer", "pool")) > 0


async def _grew(read, before: int) -> bool:
    return await read() > before
