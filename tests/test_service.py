"""The service lifecycle over a real nats-server: an essential task that dies takes the service
down (so it is declared lost and its work resumed elsewhere), a side task that dies does not."""

from __future__ import annotations

import asyncio
import gc

from libs.config import from_env
from libs.service import Service, serve_all


class _Worker(Service):
    kind = "worker"
    uses_jetstream = False

    async def setup(self) -> None:
        self.spawn(self._side())  # not essential: its failure is logged, the service goes on
        self.spawn(self._engine(), essential=True)

    async def _side(self) -> None:
        self.side_failed = True
        raise ValueError("a report could not be sent")

    async def _engine(self) -> None:
        await asyncio.sleep(0.2)
        raise RuntimeError("the engine loop died")


async def test_a_dead_essential_task_stops_the_service_and_a_dead_side_task_does_not(nats_server):
    svc = _Worker(from_env(nats_url=nats_server.url))
    failed = await asyncio.wait_for(serve_all([svc]), 30)
    assert failed and svc.failed.is_set() and svc.stopping
    assert svc.nc.is_closed


async def test_a_side_task_failure_leaves_the_service_running(nats_server):
    svc = _Worker(from_env(nats_url=nats_server.url))
    svc._engine = lambda: asyncio.sleep(3600)  # an engine that keeps running
    await svc.start()
    try:
        await asyncio.sleep(0.3)  # the side task has failed by now
        assert svc.side_failed
        assert not svc.failed.is_set() and not svc.stopping and svc.nc.is_connected
    finally:
        await svc.stop()


class _Loader(Service):
    kind = "loader"
    uses_jetstream = False

    async def setup(self) -> None:
        self.loaded = [{"weights": i} for i in range(1000)]  # what a service loads to serve: a model, a tokenizer


async def test_what_a_service_loads_at_start_is_out_of_the_collectors_sight(nats_server):
    svc = _Loader(from_env(nats_url=nats_server.url))
    await svc.start()
    try:
        assert gc.get_freeze_count() >= len(svc.loaded)
        tracked = {id(o) for o in gc.get_objects()}  # what a collection scans
        assert not any(id(o) in tracked for o in svc.loaded) and id(svc.loaded) not in tracked
        later = [{"request": 1}]
        assert id(later) in {id(o) for o in gc.get_objects()}  # what requests leave behind still is
    finally:
        await svc.stop()
        gc.unfreeze()
