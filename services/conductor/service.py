"""Conductor wiring: heartbeats in, schedule requests answered, prefill tasks dispatched."""

from __future__ import annotations

import time

import msgspec

from yuebing.libs.protocol import (
    Heartbeat,
    PrefillTask,
    ScheduleReply,
    ScheduleRequest,
    Subjects,
    decode,
    encode,
)
from yuebing.libs.service import Service

from .placement import LeastLoaded
from .registry import Registry


class ConductorService(Service):
    kind = "conductor"

    async def setup(self) -> None:
        self.registry = Registry()
        self.policy = LeastLoaded()
        await self.nc.subscribe(f"{Subjects.HEARTBEAT_PREFIX}.>", cb=self._on_heartbeat)
        await self.nc.subscribe(Subjects.SCHEDULE, queue="conductor", cb=self._on_schedule)

    def load(self):
        return self.heartbeat()

    async def _on_heartbeat(self, msg) -> None:
        try:
            hb = decode(msg.data, Heartbeat)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if self.registry.get(hb.kind, hb.instance_id) is None:
            self.log.info("instance_joined", kind=hb.kind, id=hb.instance_id)
        self.registry.beat(hb, time.monotonic())

    async def _on_schedule(self, msg) -> None:
        try:
            req = decode(msg.data, ScheduleRequest)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.log.warning("bad_schedule_request", error=str(e))
            return
        log = self.log.bind(request_id=req.request_id)
        now = time.monotonic()
        for gone in self.registry.prune(now):
            self.log.warning("instance_lost", kind=gone.kind, id=gone.instance_id)
        placement = self.policy.place(
            len(req.prompt_token_ids), self.registry.alive("prefill", now), self.registry.alive("decode", now)
        )
        if placement.admitted:
            task = PrefillTask(
                request_id=req.request_id,
                prompt_token_ids=req.prompt_token_ids,
                sampling=req.sampling,
                decode_id=placement.decode_id,
                block_hashes=req.block_hashes,
                arrival_time=req.arrival_time,
            )
            try:
                await self.js.publish(
                    Subjects.prefill_task(placement.prefill_id), encode(task), headers={"Nats-Msg-Id": req.request_id}
                )
            except Exception as e:  # noqa: BLE001 - JetStream unavailable: tell the client, do not hang
                log.error("dispatch_failed", error=str(e))
                reply = ScheduleReply(request_id=req.request_id, admitted=False, status=503,
                                      reason="task queue unavailable", retry_after=1.0)
                await msg.respond(encode(reply))
                return
            log.info("scheduled", prefill=placement.prefill_id, decode=placement.decode_id,
                     prompt_tokens=len(req.prompt_token_ids))
        else:
            log.warning("not_admitted", status=placement.status, reason=placement.reason)
        reply = ScheduleReply(
            request_id=req.request_id,
            admitted=placement.admitted,
            prefill_id=placement.prefill_id,
            decode_id=placement.decode_id,
            status=placement.status,
            reason=placement.reason,
            retry_after=placement.retry_after,
        )
        await msg.respond(encode(reply))
