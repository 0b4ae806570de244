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

from yuebing.libs.protocol import (
    Heartbeat,
    IndexSummary,
    KVDump,
    KVDumpRequest,
    KVEvent,
    PrefillReport,
    PrefillTask,
    ScheduleReply,
    ScheduleRequest,
    Subjects,
    TokenEvent,
    decode,
    encode,
    keys_digest,
)
from yuebing.libs.service import Service

from .costmodel import PrefillCostModel
from .index import PrefixIndex
from .placement import DecodeView, PrefillView, RequestView, make_policy
from .registry import Registry

_BAD = (msgspec.DecodeError, msgspec.ValidationError)

PLACED = Counter("yuebing:conductor_placements", "Requests placed", ["policy", "plan"])
NOT_ADMITTED = Counter("yuebing:conductor_rejections", "Requests not admitted", ["status"])
PREDICTED_TTFT = Histogram("yuebing:conductor_predicted_ttft_seconds", "Predicted TTFT of placed requests")
INDEX_BLOCKS = Gauge("yuebing:conductor_index_blocks", "Blocks in the global prefix index", ["source"])
RESYNCS = Counter("yuebing:conductor_index_resyncs", "Dumps fetched to repair the prefix index")


class ConductorService(Service):
    kind = "conductor"

    async def setup(self) -> None:
        s = self.settings
        self.registry = Registry()
        self.index = PrefixIndex()
        self.cost = PrefillCostModel()
        self.policy = make_policy(s.policy, self.cost, use_pool=s.use_pool)
        self.outstanding: dict[str, dict[str, float]] = {}  # prefill id -> request id -> predicted seconds
        self._dumping: set[str] = set()
        await self.nc.subscribe(f"{Subjects.HEARTBEAT_PREFIX}.>", cb=self._on_heartbeat)
        await self.nc.subscribe(Subjects.PREFILL_REPORT, cb=self._on_report)
        # Replay every KV event kept in the stream, then follow it: this rebuilds the index after a
        # restart; gaps and unknown epochs are repaired with dumps.
        await self.js.subscribe("yb.kvev.>", cb=self._on_kv_event, ordered_consumer=True,
                                deliver_policy=DeliverPolicy.ALL)
        await self.nc.subscribe(Subjects.SCHEDULE, queue="conductor", cb=self._on_schedule)
        await self.nc.subscribe(Subjects.CONDUCTOR_STATE, cb=self._on_state)
        self.resyncs = 0
        self.spawn(self._maintenance_loop())
        self.log.info("conductor_policy", policy=s.policy, use_pool=s.use_pool)

    def load(self):
        return self.heartbeat()

    # ---- inputs
    async def _on_heartbeat(self, msg) -> None:
        try:
            hb = decode(msg.data, Heartbeat)
        except _BAD:
            return
        if self.registry.get(hb.kind, hb.instance_id) is None:
            self.log.info("instance_joined", kind=hb.kind, id=hb.instance_id)
        self.registry.beat(hb, time.monotonic())

    async def _on_report(self, msg) -> None:
        try:
            r = decode(msg.data, PrefillReport)
        except _BAD:
            return
        self.outstanding.get(r.instance_id, {}).pop(r.request_id, None)
        reused = r.local_tokens + r.pool_tokens
        self.cost.observe_prefill(r.prompt_tokens - reused, reused, r.compute_seconds)
        self.cost.observe_load(r.pool_tokens, r.load_seconds)

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
            if self.registry.get(source, iid) is None:
                self.index.drop_instance(iid)  # an instance that is gone: its blocks are too
        except _BAD as e:
            self.log.warning("bad_dump", instance=iid, error=str(e))
        finally:
            self._dumping.discard(iid)

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for gone in self.registry.prune(time.monotonic()):
                self.log.warning("instance_lost", kind=gone.kind, id=gone.instance_id)
                self.index.drop_instance(gone.instance_id)
                self.outstanding.pop(gone.instance_id, None)
                if gone.kind == "prefill":
                    self.spawn(self._reassign_prefill(gone.instance_id))
                elif gone.kind == "decode":
                    self.spawn(self._drop_decode_tasks(gone.instance_id))
            for iid in self.index.instances():
                if self.index.needs_dump(iid) and iid not in self._dumping:
                    src = "cachestore" if self.registry.get("cachestore", iid) else "prefill"
                    self.spawn(self._fetch_dump(iid, src))
            pool = self.index.pool_keys()
            INDEX_BLOCKS.labels(source="cachestore").set(len(pool))

    async def _on_state(self, msg) -> None:
        if not msg.reply:
            return
        pool = self.index.pool_keys()
        summary = IndexSummary(
            blocks={i: len(self.index.keys_of(i)) for i in self.index.instances()},
            pool_blocks=len(pool),
            pool_digest=keys_digest(pool),
            gaps=self.index.gaps,
            resyncs=self.resyncs,
        )
        await msg.respond(encode(summary))

    # ---- placement
    def queue_seconds(self, iid: str) -> float:
        return sum(self.outstanding.get(iid, {}).values())

    def _place(self, prompt_len: int, keys: list[bytes]):
        now = time.monotonic()
        view = RequestView(
            prompt_len=prompt_len,
            block_size=self.settings.block_size,
            pool_blocks=self.index.pool_prefix_len(keys) if self.settings.use_pool else 0,
        )
        prefills = [
            PrefillView(i.instance_id, self.queue_seconds(i.instance_id), self.index.prefix_len(keys, i.instance_id))
            for i in self.registry.alive("prefill", now)
        ]
        decodes = [
            DecodeView(i.instance_id, i.beat.running + i.beat.queued + i.placed_since_beat, i.beat.kv_tokens)
            for i in self.registry.alive("decode", now)
        ]
        return self.policy.place(view, prefills, decodes), view

    def _placed(self, request_id: str, placement) -> None:
        self.outstanding.setdefault(placement.prefill_id, {})[request_id] = placement.predicted_prefill
        inst = self.registry.get("decode", placement.decode_id)
        if inst is not None:
            inst.placed_since_beat += 1

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
        moved = failed = 0
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
                    placement, _ = self._place(len(task.prompt_token_ids), task.block_hashes)
                    if not placement.admitted:
                        await self.nc.publish(Subjects.output(task.output_id), encode(TokenEvent(
                            request_id=task.output_id, seq=task.seq_base, token_ids=[], finish_reason="error",
                            error=f"prefill instance {dead} was lost and {placement.reason}")))
                        failed += 1
                    else:
                        task.decode_id = placement.decode_id
                        task.reuse_blocks, task.use_pool = placement.reuse_blocks, placement.use_pool
                        await self.js.publish(Subjects.prefill_task(placement.prefill_id), encode(task),
                                              headers={"Nats-Msg-Id": f"{task.request_id}@{placement.prefill_id}"})
                        self._placed(task.request_id, placement)
                        moved += 1
                    await m.ack()
        finally:
            await sub.unsubscribe()
            # delete the temporary consumer now: a work queue allows one consumer per subject, and
            # the instance may come back under the same id
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(stream, consumer)
        if moved or failed:
            self.log.warning("prefill_tasks_reassigned", instance=dead, moved=moved, failed=failed)

    async def _on_schedule(self, msg) -> None:
        try:
            req = decode(msg.data, ScheduleRequest)
        except _BAD as e:
            self.log.warning("bad_schedule_request", error=str(e))
            return
        log = self.log.bind(request_id=req.request_id)
        keys = req.block_hashes
        placement, view = self._place(len(req.prompt_token_ids), keys)
        if placement.admitted:
            task = PrefillTask(
                request_id=req.request_id,
                prompt_token_ids=req.prompt_token_ids,
                sampling=req.sampling,
                decode_id=placement.decode_id,
                block_hashes=keys,
                arrival_time=req.arrival_time,
                reuse_blocks=placement.reuse_blocks,
                use_pool=placement.use_pool and self.settings.use_pool,
                predicted_seconds=placement.predicted_prefill,
                resume=req.resume,
            )
            try:
                await self.js.publish(Subjects.prefill_task(placement.prefill_id), encode(task),
                                      headers={"Nats-Msg-Id": req.request_id})
            except Exception as e:  # noqa: BLE001 - JetStream unavailable: tell the client, do not hang
                log.error("dispatch_failed", error=str(e))
                reply = ScheduleReply(request_id=req.request_id, admitted=False, status=503,
                                      reason="task queue unavailable", retry_after=1.0)
                await msg.respond(encode(reply))
                return
            self._placed(req.request_id, placement)
            PLACED.labels(policy=self.policy.name, plan="pool" if placement.use_pool else "local").inc()
            PREDICTED_TTFT.observe(placement.predicted_ttft)
            log.info("scheduled", prefill=placement.prefill_id, decode=placement.decode_id,
                     prompt_tokens=view.prompt_len, cached_blocks=placement.cached_blocks,
                     pool_blocks=view.pool_blocks, predicted_ttft=round(placement.predicted_ttft, 4))
        else:
            NOT_ADMITTED.labels(status=str(placement.status)).inc()
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
