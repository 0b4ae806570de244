"""The operator's live dashboard, served by the gateway: a static page (``static/``, plain JS and
the vendored uPlot, no build step) that polls one JSON document, ``/dashboard/data``.

The document is filled from what the gateway already hears: every instance's heartbeats
(instances by kind, the pool's tiers, the counters the hit ratio by source is made of, see
``clusterview.py``) and its own requests (the placement decision and prediction the conductor's
schedule reply carries, what each request turned out to be, rejections; ``recent.py``).

Access (``Settings.dashboard``): ``on`` serves the page, its data behind the API keys when the
gateway has any (the page asks for a key and sends it as a Bearer header); ``open`` serves the data
without a key; ``off`` serves neither.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson
from aiohttp import web

from libs.protocol import Heartbeat, ScheduleReply

from services.gateway.clusterview import ReuseWindow, counters, hit_ratio, instances, pool
from services.gateway.recent import RecentRequests

MODES = ("on", "open", "off")
STATIC = Path(__file__).parent / "static"
DATA_PATH = "/dashboard/data"
REFRESH_SECONDS = 1.5  # how often the page asks for the data
WINDOW_SECONDS = 300.0  # what the charts, the hit ratio and the rejections in the window cover
BUCKET_SECONDS = 10.0  # one point of the charts


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown dashboard setting {mode!r}; choose one of {', '.join(MODES)}")
    return mode


class Dashboard:
    """The dashboard's state and routes; the gateway tells it of its requests (``recent``)."""

    def __init__(self, gateway, mode: str = "on", *, ready_needs: tuple[str, ...] = ("conductor", "prefill", "decode"),
                 forget_after: float = 600.0, window: float = WINDOW_SECONDS, bucket: float = BUCKET_SECONDS):
        """``ready_needs``: the kinds the cluster needs one live instance of to serve; an instance
        silent longer than ``forget_after`` seconds is no longer listed."""
        self.gateway = gateway
        self.ready_needs = ready_needs
        self.forget_after = forget_after
        self.mode = check_mode(mode)
        self.recent = RecentRequests(window=window, bucket=bucket)
        self.reuse = ReuseWindow(window)
        self.window = window

    @property
    def keyed_paths(self) -> frozenset[str]:
        """Paths behind the gateway's API keys (the page and its scripts hold no data: open)."""
        return frozenset({DATA_PATH}) if self.mode == "on" else frozenset()

    def start(self, app: web.Application) -> None:
        if self.mode == "off":
            return
        app.router.add_get("/dashboard", self.page)
        app.router.add_get("/dashboard/", self.slash)
        app.router.add_get(DATA_PATH, self.data)
        app.router.add_static("/dashboard/static/", STATIC)

    # ---- what the gateway tells it
    def heartbeat(self, hb: Heartbeat, now: float) -> None:
        """A heartbeat the gateway took in (its own subscription: the dashboard has none)."""
        if self.mode != "off":
            self.reuse.observe(f"{hb.kind}/{hb.instance_id}", counters(hb), now)


    def placed(self, rid: str, prompt_tokens: int, reply: ScheduleReply) -> None:
        self.recent.placed(rid, prompt_tokens, reply, time.time())

    def rejected(self, rid: str, reply: ScheduleReply | None, message: str, prompt_tokens: int = 0) -> None:
        """Not admitted by the conductor (``reply``), or no conductor answered (None)."""
        if reply is None:
            reason = "no_conductor"
        else:
            reason = reply.cause or ("unavailable" if reply.status == 503 else str(reply.status))
        self.recent.rejected(rid, reason, message, time.time(), prompt_tokens)

    # ---- routes
    async def page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "dashboard.html", headers={"Cache-Control": "no-cache"})

    async def slash(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/dashboard")  # the page's relative links are made for /dashboard

    async def data(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.document(time.time(), time.monotonic())),
                            content_type="application/json", headers={"Cache-Control": "no-store"})

    def document(self, now: float, mono: float) -> dict:
        gw = self.gateway
        heard = [(mono - seen, hb) for seen, hb in gw.live.values()]
        live = [hb for silent, hb in heard if silent <= 3 * hb.interval]
        kinds = instances(heard, self.forget_after)
        missing = ([] if gw.nc.is_connected else ["nats"]) + [
            k for k in self.ready_needs if not any(r["state"] != "down" for r in kinds.get(k, []))]
        return {
            "now": now,
            "refresh_seconds": REFRESH_SECONDS,
            "window_seconds": self.window,
            "bucket_seconds": self.recent.bucket,
            "gateway": {"id": gw.instance_id, "model": gw.model_name, "ready": not missing, "missing": missing,
                        "running": self.recent.running()},
            "slo": {"ttft": gw.slo.ttft, "tbt": gw.slo.tbt},
            "instances": kinds,
            "pool": {**pool(live), "hit_ratio": hit_ratio(self.reuse.increase(mono))},
            "series": self.recent.series(now),
            "totals": self.recent.totals(now),
            "rejections": self.recent.rejections(now),
            "requests": self.recent.last(),
        }
