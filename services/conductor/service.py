"""Conductor wiring: heartbeats, KV events and prefill reports in; placements out."""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
import nats
import nats.js.errors
from nats.js.api import DeliverPolicy
from prometheus_client import Counter, Gauge, Histogram

from libs.protocol import (
    DecodeReport,
    Heartbeat,
    IndexSummary,
    KVDump,
    KVDumpRequest,
    KVEvent,
    PrefillDone,
    PrefillReport,
    PrefillTask,
    ScheduleReply,
    ScheduleRequestPacked,
    Subjects,
    TokenEvent,
    decode,
    encode,
    keys_digest,
)
from libs.bus import taking_turns
from libs.service import Service

from services.conductor.scheduler import Scheduler, prediction

_BAD = (msgspec.DecodeError, msgspec.ValidationError)
WARMUP_BEATS = 1.5  # heartbeat intervals a starting conductor listens before it schedules

PLACED = Counter("yuebing:conductor_placements", "Requests placed", ["policy", "plan"])
NOT_ADMITTED = Counter("yuebing:conductor_rejections", "Requests not admitted", ["status", "cause"])
PREDICTED_TTFT = Histogram("yuebing:conductor_predicted_ttft_seconds", "Predicted TTFT of placed requests")
INDEX_BLOCKS = Gauge("yuebing:conductor_index_blocks", "Blocks in the global prefix index", ["source"])
RESYNCS = Counter("yuebing:conductor_index_resyncs", "Dumps fetched to repair the prefix index")
PREDICTED_TBT = Histogram("yuebing:conductor_predicted_tbt_seconds", "Predicted time between tokens of placed requests",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
HANDOFF_SECONDS = Gauge("yuebing:conductor_prefill_handoff_seconds",
                        "Fitted time a prefill instance stays busy after a prompt's first token (KV hand-off): "
                        "fixed + per_token * prompt tokens", ["part"])
START_LAG = Gauge("yuebing:conductor_prefill_start_lag_seconds",
                  "Mean time from a prompt's start on its prefill instance to its first token reported, beyond "
                  "its predicted compute; every queued prompt counts it")
TTFT_FACTOR = Gauge("yuebing:conductor_ttft_prediction_factor",
                    "90th percentile of actual / predicted TTFT lately; admission scales its predictions by it")
WAIT_MARGIN = Gauge("yuebing:conductor_decode_wait_margin_seconds",
                    "Added to predicted waits for a decode row: how much longer they have lately turned out")
PROJECTED_DECODE = Gauge("yuebing:conductor_decode_sequences", "Sequences admitted and not finished",
                         ["phase"])
# the cluster's prefix cache as one (vLLM's prefix_cache_queries / hits, in tokens): each placed
# prompt, and the longest prefix of it one holder has (the pool or a prefill instance's own cache)
CLUSTER_QUERIES = Counter("yuebing:cluster_prefix_cache_queries", "Prompt tokens of placed requests")
CLUSTER_HITS = Counter("yuebing:cluster_prefix_cache_hits", "Prompt tokens of placed requests whose KV the cluster "
                       "held (the longest prefix one holder had, as the prefix index saw it at placement)")
PREFILL_QUEUE = Gauge("yuebing:prefill_queue_requests", "Prompts placed on a prefill instance that it is not done "
                      "with (the one it runs included), as the conductor counts them", ["instance_id"])
PREFILL_QUEUE_SECONDS = Gauge("yuebing:prefill_queue_seconds", "Predicted seconds before a prompt placed now on "
                              "the prefill instance would start computing", ["instance_id"])


class ConductorService(Service):
    """Wiring only: messages in, the ``Scheduler``'s decisions out (``scheduler.py``)."""

    kind = "conductor"
    manages_streams = True

    async def setup(self) -> None:
        s = self.settings
        self.scheduler = Scheduler(s)
        self.index = self.scheduler.index
        self._dumping: set[str] = set()
        self._queues_shown: set[str] = set()  # prefill instances with queue gauges
        self.resyncs = 0  # before the KV-event subscription: replaying it may fetch a dump at once
        # each input message gives the others a turn: a burst of one kind (heartbeats, KV events)
        # does not hold a decision behind all of it
        await self.nc.subscribe(f"{Subjects.HEARTBEAT_PREFIX}.>", cb=taking_turns(self._on_heartbeat))
        await self.nc.subscribe(Subjects.PREFILL_REPORT, cb=taking_turns(self._on_report))
        await self.nc.subscribe(Subjects.PREFILL_DONE, cb=taking_turns(self._on_prefill_done))
        await self.nc.subscribe(Subjects.DECODE_REPORT, cb=taking_turns(self._on_decode_report))
        # Replay every KV event kept in the stream, then follow it: this rebuilds the index after a
        # restart; gaps and unknown epochs are repaired with dumps.
        await self.js.subscribe("yb.kvev.>", stream=Subjects.KV_EVENTS_STREAM, cb=taking_turns(self._on_kv_event),
                                ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        # decide nothing before the instances have been heard from: a conductor that has just
        # (re)started knows none, and would answer "no instance alive"; meanwhile gateways find no
        # responder and ask again
        await asyncio.sleep(WARMUP_BEATS * s.heartbeat_interval)
        await self.nc.subscribe(Subjects.SCHEDULE, queue="conductor", cb=self._on_schedule)
        await self.nc.subscribe(Subjects.schedule_to(self.instance_id), cb=self._on_schedule)
        await self.nc.subscribe(Subjects.CONDUCTOR_STATE, cb=self._on_state)
        self.spawn(self._maintenance_loop())
        self.log.info("conductor_policy", policy=s.policy, use_pool=s.use_pool, pool_writes=s.pool_writes,
                      admission=s.admission,
                      ttft_slo=s.ttft_slo, tbt_slo=s.tbt_slo, colocated=s.colocated,
                      calibration=s.calibration or "default")

    def load(self):
        # its own beats come back through the heartbeat subscription: how late is how far behind it is
        now = time.monotonic()
        self.scheduler.registry.clock.sent(now)
        return msgspec.structs.replace(self.heartbeat(), sent_at=now, instances=self.scheduler.placing(now))

    # ---- inputs
    async def _on_heartbeat(self, msg) -> None:
        try:
            hb = decode(msg.data, Heartbeat)
        except _BAD:
            return
        if hb.kind == self.kind and hb.instance_id == self.instance_id and hb.sent_at:
            self.scheduler.registry.clock.received(time.monotonic(), hb.sent_at)
        if self.scheduler.heartbeat(hb, time.monotonic()):
            self.log.info("instance_joined", kind=hb.kind, id=hb.instance_id)

    async def _on_report(self, msg) -> None:
        try:
            r = decode(msg.data, PrefillReport)
        except _BAD:
            return
        self.scheduler.prefill_report(r, time.monotonic())
        START_LAG.set(self.scheduler.queues.lag.seconds)
        TTFT_FACTOR.set(self.scheduler.ttft_error.factor())

    async def _on_prefill_done(self, msg) -> None:
        try:
            r = decode(msg.data, PrefillDone)
        except _BAD:
            return
        self.scheduler.prefill_done(r, time.monotonic())
        fixed, per_token = self.scheduler.queues.handoff.coef
        HANDOFF_SECONDS.labels(part="fixed").set(fixed)
        HANDOFF_SECONDS.labels(part="per_token").set(per_token)

    async def _on_decode_report(self, msg) -> None:
        try:
            r = decode(msg.data, DecodeReport)
        except _BAD:
            return
        wait = self.scheduler.decode_report(r, time.monotonic())
        if wait is not None:
            WAIT_MARGIN.set(wait.margin)
            self.log.info("decode_wait", request_id=r.attempt_id, decode=r.instance_id,
                          predicted=round(wait.predicted, 4), waited=round(wait.waited, 4),
                          margin=round(wait.margin, 4))

    async def _on_kv_event(self, msg) -> None:
        try:
            ev = decode(msg.data, KVEvent)
        except _BAD:
            return
        if self.index.apply(ev):
            self.spawn(self._fetch_dump(ev.instance_id, ev.source))

    async def _fetch_dump(self, iid: str, source: str) -> None:
        if iid in self._dumping:
            return
        self._dumping.add(iid)
        try:
            keys: list[bytes] = []
            offset = 0
            epoch, seq = "", 0
            while True:
                raw = await self.nc.request(Subjects.kv_dump(iid), encode(KVDumpRequest(offset=offset)), timeout=3)
                page = decode(raw.data, KVDump)
                if offset and (page.epoch, page.seq) != (epoch, seq):
                    keys, offset = [], 0  # changed while paging: start over
                    epoch, seq = page.epoch, page.seq
                    continue
                epoch, seq = page.epoch, page.seq
                keys.extend(page.keys)
                offset += len(page.keys)
                if offset >= page.total or not page.keys:
                    break
            self.index.load_dump(iid, source, epoch, seq, keys)
            RESYNCS.inc()
            self.resyncs += 1
            self.log.info("index_resynced", instance=iid, blocks=len(keys), seq=seq)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if self.scheduler.registry.get(source, iid) is None:
                self.index.drop_instance(iid)  # an instance that is gone: its blocks are too
        except _BAD as e:
            self.log.warning("bad_dump", instance=iid, error=str(e))
        finally:
            self._dumping.discard(iid)

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            gone, lost = self.scheduler.prune(now)
            for inst in gone:
                self.log.warning("instance_lost", kind=inst.kind, id=inst.instance_id)
                # with several conductors, the one the lost instance belongs to now moves its work
                if inst.kind in ("prefill", "decode") and not self.scheduler.owns_lost(inst.kind, inst.instance_id, now):
                    continue
                if inst.kind == "prefill":
                    self.spawn(self._reassign_prefill(inst.instance_id))
                elif inst.kind == "decode":
                    self.spawn(self._drop_decode_tasks(inst.instance_id))
            for iid in self.index.instances():
                if self.index.needs_dump(iid) and iid not in self._dumping:
                    src = "cachestore" if self.scheduler.registry.get("cachestore", iid) else "prefill"
                    self.spawn(self._fetch_dump(iid, src))
            INDEX_BLOCKS.labels(source="cachestore").set(self.index.pool_blocks())
            if lost:
                self.log.warning("prefill_done_reports_missing", tasks=lost)
            in_prefill, in_decode = self.scheduler.decode_sequences()
            PROJECTED_DECODE.labels(phase="decode").set(in_decode)
            PROJECTED_DECODE.labels(phase="prefill").set(in_prefill)
            self._show_queues(time.monotonic())

    def _show_queues(self, now: float) -> None:
        """Each live prefill instance's queue on the gauges; a lost one's taken off them."""
        queues = self.scheduler.queues
        alive = {i.instance_id for i in self.scheduler.registry.alive("prefill", now)}
        for iid in self._queues_shown - alive:
            PREFILL_QUEUE.remove(iid)
            PREFILL_QUEUE_SECONDS.remove(iid)
        for iid in alive:
            PREFILL_QUEUE.labels(iid).set(queues.pending(iid))
            PREFILL_QUEUE_SECONDS.labels(iid).set(queues.seconds(iid, now))
        self._queues_shown = alive

    async def _on_state(self, msg) -> None:
        if not msg.reply:
            return
        pool = self.index.pool_keys()
        summary = IndexSummary(
            blocks={i: self.index.count_of(i) for i in self.index.instances()},
            pool_blocks=len(pool),
            # seconds at millions of keys: not on the loop that takes the heartbeats in
            pool_digest=await asyncio.to_thread(keys_digest, pool),
            gaps=self.index.gaps,
            resyncs=self.resyncs,
        )
        await msg.respond(encode(summary))

    async def _drop_decode_tasks(self, dead: str) -> None:
        """A lost decode instance's tasks are useless (their KV died with it): the gateways resume
        those requests on live instances. Drop its consumer and its queued tasks."""
        try:
            await self.js.delete_consumer(Subjects.DECODE_STREAM, dead)
        except Exception:  # noqa: BLE001 - not found, or the server is busy: nothing to drop
            pass
        try:
            await self.js.purge_stream(Subjects.DECODE_STREAM, subject=Subjects.decode_task(dead))
        except Exception as e:  # noqa: BLE001
            self.log.warning("decode_purge_failed", instance=dead, error=str(e))

    async def _reassign_prefill(self, dead: str) -> None:
        """Move the tasks queued on (or in flight at) a lost prefill instance to live ones.

        Its durable consumer is deleted, so its unacked and undelivered tasks become available
        again; a temporary consumer takes them and they are placed afresh. Handlers downstream
        are idempotent by request id, so work the instance had partly done is not repeated
        visibly (duplicate first tokens and KV are dropped).
        """
        stream, subject = Subjects.PREFILL_STREAM, Subjects.prefill_task(dead)
        try:
            await self.js.delete_consumer(stream, dead)
        except nats.js.errors.NotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            self.log.warning("consumer_delete_failed", instance=dead, error=str(e))
        moved = failed = dropped = 0
        sub = await self.js.pull_subscribe(subject, stream=stream)
        consumer = (await sub.consumer_info()).name
        try:
            while True:
                try:
                    msgs = await sub.fetch(32, timeout=1.0)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    break
                for m in msgs:
                    try:
                        task = decode(m.data, PrefillTask)
                    except _BAD:
                        await m.term()
                        continue
                    if task.stage_end:
                        # a pipeline stage before the last: the next stage computes its part itself
                        # once this one's KV does not come; nothing to move, nothing to tell a client
                        await m.ack()
                        dropped += 1
                        continue
                    placement, moved_task = self.scheduler.reassign(task, time.monotonic())
                    if moved_task is None:
                        await self.nc.publish(Subjects.output(task.output_id), encode(TokenEvent(
                            output_id=task.output_id, seq=task.seq_base, token_ids=[], finish_reason="error",
                            error=f"prefill instance {dead} was lost and {placement.reason}",
                            index=task.first_index)))
                        failed += 1
                    else:
                        await self.js.publish(Subjects.prefill_task(placement.prefill_id), encode(moved_task),
                                              headers={"Nats-Msg-Id": f"{task.attempt_id}@{placement.prefill_id}"})
                        moved += 1
                    await m.ack()
        finally:
            await sub.unsubscribe()
            # delete the temporary consumer now: a work queue allows one consumer per subject, and
            # the instance may come back under the same id
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(stream, consumer)
        if moved or failed or dropped:
            self.log.warning("prefill_tasks_reassigned", instance=dead, moved=moved, failed=failed,
                             stages_dropped=dropped)

    async def _on_schedule(self, msg) -> None:
        try:
            req = decode(msg.data, ScheduleRequestPacked).packed()  # its token ids passed on undecoded
        except _BAD as e:
            self.log.warning("bad_schedule_request", error=str(e))
            return
        log = self.log.bind(request_id=req.attempt_id)
        d = self.scheduler.schedule(req, time.monotonic())
        placement, view = d.placement, d.view
        if d.task is not None:
            log.info("scheduled", prefill=placement.prefill_id, decode=placement.decode_id,
                     prompt_tokens=view.prompt_len, cached_blocks=placement.cached_blocks,
                     plan=placement.plan, peer=placement.peer_id or None,
                     pool_blocks=view.pool_blocks, predicted_ttft=round(placement.predicted_ttft, 4),
                     predicted_prefill=round(placement.predicted_prefill, 4),
                     predicted_tbt=round(placement.predicted_tbt, 4),
                     predicted_wait=None if d.wait is None else round(d.wait, 4),
                     overtakes={rid: round(seconds, 3) for rid, seconds in d.delayed} or None,
                     stages=[iid for iid, _ in d.stages] + [placement.prefill_id] if d.stages else None)
            # the next request is placed on a state that counts this one already; the JetStream
            # round trip (tenths of a second on a loaded host) does not hold the next decision
            self.spawn(self._dispatch(msg, d.task, placement, log, view, d.stages))
            # a backlog of schedule requests is taken from the subscription's queue without a
            # pause: yield, so that heartbeats (an instance unheard for three beats is declared
            # lost), reports and the dispatches just spawned run between decisions
            await asyncio.sleep(0)
            return
        NOT_ADMITTED.labels(status=str(placement.status), cause=placement.cause or "unavailable").inc()
        log.warning("not_admitted", status=placement.status, reason=placement.reason)
        await msg.respond(encode(self._reply(req.attempt_id, placement)))

    async def _dispatch(self, msg, task: PrefillTask, placement, log, view, stages=()) -> None:
        """Queue an admitted request's prefill task (after the stages before it, for a prompt split
        over several instances), then answer its gateway; if JetStream cannot take them, forget
        what the placement counted and answer 503 (never a hang)."""
        rid = task.attempt_id
        try:
            for iid, stage in stages:
                await self.js.publish(Subjects.prefill_task(iid), encode(stage), headers={"Nats-Msg-Id": stage.attempt_id})
            ack = await self.js.publish(Subjects.prefill_task(placement.prefill_id), encode(task),
                                        headers={"Nats-Msg-Id": rid})
        except Exception as e:  # noqa: BLE001 - JetStream unavailable: tell the client, do not hang
            log.error("dispatch_failed", error=str(e))
            self.scheduler.unplace(rid, placement)
            for iid, stage in stages:  # a stage queued before the failure finds no next stage to serve
                self.scheduler.queues.done(iid, stage.attempt_id, 0, 0.0)
            NOT_ADMITTED.labels(status="503", cause="unavailable").inc()
            await msg.respond(encode(ScheduleReply(attempt_id=rid, admitted=False, status=503,
                                                   reason="task queue unavailable", retry_after=1.0)))
            return
        if ack.duplicate:
            # placed before, by a conductor lost before it answered: that task runs, this one was
            # dropped; which instances run it is not known here
            log.warning("placed_before", prefill=placement.prefill_id)
            self.scheduler.unplace(rid, placement)
            for iid, stage in stages:
                self.scheduler.queues.done(iid, stage.attempt_id, 0, 0.0)
            await msg.respond(encode(ScheduleReply(attempt_id=rid, admitted=True, reason="placed before")))
            return
        # counted once queued: a placement undone above is a request not admitted
        PLACED.labels(policy=self.scheduler.policy.name, plan=placement.plan).inc()
        PREDICTED_TTFT.observe(placement.predicted_ttft)
        PREDICTED_TBT.observe(placement.predicted_tbt)
        CLUSTER_QUERIES.inc(view.prompt_len)
        CLUSTER_HITS.inc(view.cluster_hit_tokens)
        await msg.respond(encode(self._reply(rid, placement)))

    def _reply(self, attempt_id: str, placement) -> ScheduleReply:
        return ScheduleReply(
            attempt_id=attempt_id,
            admitted=placement.admitted,
            prefill_id=placement.prefill_id,
            decode_id=placement.decode_id,
            status=placement.status,
            reason=placement.reason,
            retry_after=placement.retry_after,
            cause=placement.cause,
            prediction=prediction(placement, self.settings.block_size),
        )
