"""Conductor wiring: heartbeats, KV events and prefill reports in; placements out."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections import OrderedDict

import msgspec
import nats
import nats.js.errors
from nats.js.api import DeliverPolicy
from prometheus_client import Counter, Gauge, Histogram

from libs.config import SLO
from libs.engine.costs import DEFAULT as DEFAULT_PROFILE, CostProfile
from libs.metrics import largest_gap_counts
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
    ScheduleRequest,
    Subjects,
    TokenEvent,
    decode,
    encode,
    keys_digest,
)
from libs.service import Service

from services.conductor.admission import (
    AdmissionController,
    DecodeCostModel,
    DecodeLoadProjector,
    TTFTErrorModel,
    WaitErrorModel,
    pushed_past,
    request_tbt_joining,
)
from services.conductor.costmodel import PrefillCostModel
from services.conductor.index import PrefixIndex
from services.conductor.prefillqueue import PrefillQueues
from services.conductor.placement import DecodeView, PrefillView, RequestView, make_policy
from services.conductor.poolwrites import PoolWriteAdmission
from services.conductor.registry import Registry

_BAD = (msgspec.DecodeError, msgspec.ValidationError)

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
PRIOR_KV_TOKENS = 256  # KV positions per sequence assumed before any has been seen
WAIT_MARGIN = Gauge("yuebing:conductor_decode_wait_margin_seconds",
                    "Added to predicted waits for a decode row: how much longer they have lately turned out")
MAX_PENDING_PREDICTIONS = 100_000  # placed requests whose first token is awaited, kept to compare with it
PROJECTED_DECODE = Gauge("yuebing:conductor_decode_sequences", "Sequences admitted and not finished",
                         ["phase"])


def _remember(pending: OrderedDict, request_id: str, predicted: float) -> None:
    """Keep a placed request's prediction until its report comes; the oldest go first when reports
    never come (``MAX_PENDING_PREDICTIONS``)."""
    pending[request_id] = predicted
    while len(pending) > MAX_PENDING_PREDICTIONS:
        pending.popitem(last=False)


class ConductorService(Service):
    kind = "conductor"

    async def setup(self) -> None:
        s = self.settings
        self.registry = Registry()
        self.index = PrefixIndex()
        profile = CostProfile.load(s.calibration) if s.calibration else DEFAULT_PROFILE
        self.cost = PrefillCostModel.from_profile(profile)
        self.decode_cost = DecodeCostModel(tuple(profile.decode))
        # each admitted sequence's stay is priced step by step with the decode cost model
        self.projector = DecodeLoadProjector(default_token_seconds=self.decode_cost.step_seconds(1, PRIOR_KV_TOKENS),
                                             step=self.decode_cost.step_seconds)
        self.admission = AdmissionController(s.admission)
        self.ttft_error = TTFTErrorModel()  # how actual TTFTs compare with the predictions admitted on
        self._predicted_ttft: OrderedDict[str, float] = OrderedDict()  # placed, first token not yet reported
        self.wait_error = WaitErrorModel()  # how much longer than predicted requests wait for a decode row
        self._predicted_wait: OrderedDict[str, float] = OrderedDict()  # placed, decode not yet reported
        self.policy = make_policy(s.policy, self.cost, use_pool=s.use_pool, colocated=s.colocated,
                                  peer_fetch=s.peer_fetch)
        self.queues = PrefillQueues()  # what each prefill instance has to do before a new prompt
        self.pool_writes = PoolWriteAdmission(s.pool_writes)  # which new blocks prefills write to the pool
        self._dumping: set[str] = set()
        await self.nc.subscribe(f"{Subjects.HEARTBEAT_PREFIX}.>", cb=self._on_heartbeat)
        await self.nc.subscribe(Subjects.PREFILL_REPORT, cb=self._on_report)
        await self.nc.subscribe(Subjects.PREFILL_DONE, cb=self._on_prefill_done)
        await self.nc.subscribe(Subjects.DECODE_REPORT, cb=self._on_decode_report)
        # Replay every KV event kept in the stream, then follow it: this rebuilds the index after a
        # restart; gaps and unknown epochs are repaired with dumps.
        await self.js.subscribe("yb.kvev.>", cb=self._on_kv_event, ordered_consumer=True,
                                deliver_policy=DeliverPolicy.ALL)
        await self.nc.subscribe(Subjects.SCHEDULE, queue="conductor", cb=self._on_schedule)
        await self.nc.subscribe(Subjects.CONDUCTOR_STATE, cb=self._on_state)
        self.resyncs = 0
        self.spawn(self._maintenance_loop())
        self.log.info("conductor_policy", policy=s.policy, use_pool=s.use_pool, pool_writes=s.pool_writes,
                      admission=s.admission,
                      ttft_slo=s.ttft_slo, tbt_slo=s.tbt_slo, colocated=s.colocated,
                      calibration=s.calibration or "default")

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
        if hb.kind == "decode":
            self.projector.progress(hb.instance_id, time.monotonic(),
                                    [(q.request_id, q.decoded, q.left, q.running) for q in hb.sequences])
            if hb.steps:
                self.decode_cost.observe(hb.steps, hb.step_batch, hb.step_kv_tokens, hb.step_seconds)
            if hb.max_running > 0:
                # until sequences are seen to finish, each is taken to decode at a full batch's pace
                # (a batch-1 step would have the first admitted requests leave decode twice as soon)
                self.projector.prior(self.decode_cost.step_seconds(hb.max_running, hb.max_running * PRIOR_KV_TOKENS))

    async def _on_report(self, msg) -> None:
        try:
            r = decode(msg.data, PrefillReport)
        except _BAD:
            return
        self.queues.first_token(r.instance_id, r.request_id, time.monotonic())
        START_LAG.set(self.queues.lag.seconds)
        self.projector.started(r.request_id, time.monotonic())
        predicted = self._predicted_ttft.pop(r.request_id, None)
        if predicted is not None and r.ttft_seconds > 0:
            self.ttft_error.observe(predicted, r.ttft_seconds)
            TTFT_FACTOR.set(self.ttft_error.factor())
        reused = r.local_tokens + r.pool_tokens
        self.cost.observe_kv_size(r.kv_bytes_per_token)
        self.cost.observe_prefill(r.prompt_tokens - reused, reused, r.compute_seconds)
        self.cost.observe_load(r.pool_tokens, r.load_seconds, r.load_bytes)

    async def _on_prefill_done(self, msg) -> None:
        try:
            r = decode(msg.data, PrefillDone)
        except _BAD:
            return
        self.queues.done(r.instance_id, r.request_id, r.kv_tokens, r.tail_seconds, time.monotonic())
        fixed, per_token = self.queues.handoff.coef
        HANDOFF_SECONDS.labels(part="fixed").set(fixed)
        HANDOFF_SECONDS.labels(part="per_token").set(per_token)

    async def _on_decode_report(self, msg) -> None:
        try:
            r = decode(msg.data, DecodeReport)
        except _BAD:
            return
        predicted = self._predicted_wait.pop(r.request_id, None)
        e = self.projector.entries.get(r.request_id)
        if predicted is not None and e is not None and e.started and r.output_tokens > 0:
            # from its first token (the prefill's report) to its first step in a row
            row_at = time.monotonic() - (r.seconds - r.waited_seconds)
            waited = max(0.0, row_at - e.start)
            self.wait_error.observe(predicted, waited, within=e.tbt_slo if e.tbt_slo > 0 else math.inf)
            WAIT_MARGIN.set(self.wait_error.margin())
            self.log.info("decode_wait", request_id=r.request_id, decode=r.instance_id, predicted=round(predicted, 4),
                          waited=round(waited, 4), margin=round(self.wait_error.margin(), 4))
        self.projector.finished(r.request_id, r.output_tokens, r.seconds, r.finish_reason in ("stop", "length"),
                                waited=r.waited_seconds)

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
                self.queues.drop_instance(gone.instance_id)
                if gone.kind == "decode":
                    self.projector.drop_instance(gone.instance_id)
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
            self.projector.prune(time.monotonic())
            lost = self.queues.prune(time.monotonic())
            if lost:
                self.log.warning("prefill_done_reports_missing", tasks=lost)
            started = sum(1 for e in self.projector.entries.values() if e.started)
            PROJECTED_DECODE.labels(phase="decode").set(started)
            PROJECTED_DECODE.labels(phase="prefill").set(len(self.projector.entries) - started)

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
        return self.queues.seconds(iid, time.monotonic())

    def _place(self, prompt_len: int, keys: list[bytes], tbt_slo: float = 0.0, tokens: int = 0,
               urgent: bool = False):
        """Placement of a prompt of ``prompt_len`` tokens expected to decode ``tokens`` tokens
        (``urgent``: its wait for a decode row counts in its TBT, so decode serves it first)."""
        now = time.monotonic()
        view = RequestView(
            prompt_len=prompt_len,
            block_size=self.settings.block_size,
            pool_blocks=self.index.pool_prefix_len(keys) if self.settings.use_pool else 0,
            tbt_slo=tbt_slo,
        )
        prefills = [
            PrefillView(i.instance_id, self.queue_seconds(i.instance_id), self.index.prefix_len(keys, i.instance_id))
            for i in self.registry.alive("prefill", now)
        ]
        # when the request would reach decode: its best predicted TTFT, and that TTFT as far over
        # (the 90th percentile of actual / predicted) and as far under (the 10th) as the admitted
        # requests' have lately run
        eta = min((self.policy.estimate(view, p, self.settings.use_pool).ttft for p in prefills), default=0.0)
        late = now + eta * max(1.0, self.ttft_error.factor())
        early = now + eta * self.ttft_error.early_factor()
        decodes = [self._decode_view(i, now, now + eta, prompt_len, tokens, late, early, urgent)
                   for i in self.registry.alive("decode", now)]
        return self.policy.place(view, prefills, decodes), view, decodes

    def _decode_view(self, inst, now: float, arrive: float, prompt_len: int, tokens: int,
                     late: float, early: float, urgent: bool = False) -> DecodeView:
        """The decode instance's predicted TBT for this request, with its load now and as projected
        to when the request reaches it: the gaps of its running batch, and for a request short
        enough that its first gap counts, that gap (the KV hand-off left after the first token, the
        wait for a row, a step).

        Rows go first come, first served within each kind (urgent first, ``Batcher``), and
        requests admitted just before this one are predicted to reach decode within a few tenths of
        a second of it: which of them comes first is decided by their TTFT errors, and the last of
        them may wait a whole stay for a row. So its own wait is taken from its ``late`` arrival
        (behind every sequence predicted to arrive before then), and the requests it would delay
        from its ``early`` one (ahead of every sequence predicted to arrive after then): a request
        admitted a second before it, with a longer prefill, is overtaken as often as this one's
        first token comes earlier than predicted."""
        late = max(arrive, late)
        early = min(arrive, early)
        hb = inst.beat
        reported = hb.running + hb.queued
        tracked, tracked_kv = self.projector.current(inst.instance_id)
        # sequences the instance reports that this conductor did not admit (e.g. before a restart)
        untracked = sum(1 for q in hb.sequences if q.request_id not in self.projector.entries)
        per_seq = hb.kv_tokens / max(1, hb.running)
        now_seqs, now_kv = tracked + untracked, tracked_kv + int(untracked * per_seq)
        cap, lane = hb.max_running, hb.urgent_rows
        p, iid = self.projector, inst.instance_id
        others_end = now + p.duration(round(p.mean_output))  # when sequences it did not admit may leave
        # the admitted sequences on its rows, in the batcher's order: one projection for every figure
        slots = p.slots(iid, now, cap, untracked, others_end, int(untracked * per_seq), urgent_rows=lane)
        fut_seqs, fut_kv = p.load_at(iid, arrive, now, slots=slots)
        fut_seqs, fut_kv = fut_seqs + untracked, fut_kv + int(untracked * per_seq)
        handoff = self.queues.handoff.seconds(prompt_len)
        wait_now = handoff + p.row_wait(iid, now, now, cap, untracked, others_end, slots=slots, urgent=urgent,
                                        urgent_rows=lane)
        wait_then = handoff + p.row_wait(iid, late, now, cap, untracked, others_end, slots=slots, urgent=urgent,
                                         urgent_rows=lane)
        margin = self.wait_error.margin()  # judged as such waits have lately turned out
        # the admitted requests it would delay for a row (admitted earlier, their prefills longer):
        # a short one's TBT is that wait. Each is judged on the wait its own admission was judged
        # by, as later admissions have revised it (``_predicted_wait``), not on the projection's
        # figure: that one is measured from its predicted arrival, the admission's from its late
        # one, and it drifts with every report (its prefill a little late, the rows ahead a step
        # slower), so a request admitted within its objective would read as already missing and
        # every later overtake would go through (``pushed_past``)
        delays, delayed = 0, []
        for rid, before, after in p.delayed_by(iid, now, early, tokens, prompt_len, cap, untracked, others_end,
                                               int(untracked * per_seq), slots=slots, urgent=urgent,
                                               urgent_rows=lane):
            delayed.append((rid, after - before))
            e = p.entries[rid]
            if e.tbt_slo <= 0:
                continue
            judged = self._predicted_wait.get(rid)
            if judged is None:
                judged = self.queues.handoff.seconds(e.kv_tokens) + before
            delays += pushed_past(self.decode_cost, fut_seqs + 1, fut_kv + prompt_len, cap, e.tokens, e.tbt_slo,
                                  judged, after - before, margin)
        return DecodeView(
            iid,
            reported + inst.placed_since_beat,
            hb.kv_tokens,
            current_tbt=request_tbt_joining(self.decode_cost, now_seqs + 1, now_kv + prompt_len, cap, tokens,
                                            wait_now + margin),
            predicted_tbt=request_tbt_joining(self.decode_cost, fut_seqs + 1, fut_kv + prompt_len, cap, tokens,
                                              wait_then + margin),
            sheds_in=p.next_departure(iid, now, slots=slots),
            wait_now=wait_now,
            wait_then=wait_then,
            delays=delays,
            delayed=tuple(delayed),
        )

    def _project(self, request_id: str, placement, prompt_len: int, sampling, tbt_slo: float = 0.0) -> None:
        tokens = self.projector.expected_tokens(sampling.max_tokens, sampling.ignore_eos)
        self.projector.admit(request_id, placement.decode_id, time.monotonic() + placement.predicted_ttft, tokens,
                             prompt_len, tbt_slo, urgent=largest_gap_counts(sampling.max_tokens))

    def _admit(self, req: ScheduleRequest, placement, decodes: list[DecodeView]):
        """Mooncake's admission on top of the placement: TTFT and TBT objectives."""
        if not placement.admitted or req.resume is not None:
            return placement  # a resumed request was admitted once: it is finished, not judged again
        d = next(v for v in decodes if v.instance_id == placement.decode_id)
        # judge only on grounded predictions: a cost profile of this model, or fits of the workers'
        # own reports; the built-in default may be far off for a model never calibrated here
        calibrated = bool(self.settings.calibration)
        slo = SLO(req.ttft_slo if calibrated or self.cost.fits else 0.0,
                  req.tbt_slo if calibrated or self.decode_cost.fits else 0.0)
        # the TTFT as predictions have turned out lately (a factor of 1 until there are enough reports)
        verdict = self.admission.decide(slo, placement.predicted_ttft * self.ttft_error.factor(), d.current_tbt,
                                        d.predicted_tbt,
                                        tbt_retry=d.sheds_in if d.sheds_in != float("inf") else 1.0,
                                        projection_checked=self.wait_error.learnt, delays=d.delays)
        if verdict.admitted:
            return placement
        return dataclasses.replace(placement, admitted=False, status=verdict.status, reason=verdict.reason,
                                       retry_after=verdict.retry_after, cause=verdict.cause)

    def _placed(self, request_id: str, placement, prompt_len: int) -> None:
        _remember(self._predicted_ttft, request_id, placement.predicted_ttft)
        self.queues.placed(placement.prefill_id, request_id, placement.predicted_prefill, prompt_len,
                           time.monotonic())
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
                    tokens = self.projector.expected_tokens(task.sampling.max_tokens, task.sampling.ignore_eos)
                    placement, _, _ = self._place(len(task.prompt_token_ids), task.block_hashes, tokens=tokens,
                                                  urgent=largest_gap_counts(task.sampling.max_tokens))
                    if not placement.admitted:
                        await self.nc.publish(Subjects.output(task.output_id), encode(TokenEvent(
                            request_id=task.output_id, seq=task.seq_base, token_ids=[], finish_reason="error",
                            error=f"prefill instance {dead} was lost and {placement.reason}")))
                        failed += 1
                    else:
                        task.decode_id = placement.decode_id
                        task.reuse_blocks, task.use_pool = placement.reuse_blocks, placement.use_pool
                        task.pool_blocks = placement.pool_blocks
                        task.peer_id, task.peer_blocks = placement.peer_id, placement.peer_blocks
                        await self.js.publish(Subjects.prefill_task(placement.prefill_id), encode(task),
                                              headers={"Nats-Msg-Id": f"{task.request_id}@{placement.prefill_id}"})
                        self._placed(task.request_id, placement, len(task.prompt_token_ids))
                        self._project(task.request_id, placement, len(task.prompt_token_ids), task.sampling)
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
        tokens = self.projector.expected_tokens(req.sampling.max_tokens, req.sampling.ignore_eos)
        placement, view, decodes = self._place(len(req.prompt_token_ids), keys, req.tbt_slo, tokens,
                                               largest_gap_counts(req.sampling.max_tokens))
        placement = self._admit(req, placement, decodes)
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
                pool_blocks=placement.pool_blocks,
                peer_id=placement.peer_id,
                peer_blocks=placement.peer_blocks,
                predicted_seconds=placement.predicted_prefill,
                pool_write_blocks=self.pool_writes.blocks_to_write(keys),
                resume=req.resume,
            )
            self._placed(req.request_id, placement, len(req.prompt_token_ids))
            self._project(req.request_id, placement, len(req.prompt_token_ids), req.sampling, req.tbt_slo)
            wait = None
            d = next(v for v in decodes if v.instance_id == placement.decode_id)
            if tokens > 1:  # it reaches decode: remember the wait the admission judged it by
                wait = d.wait_now if self.admission.mode == "early" else d.wait_then
                _remember(self._predicted_wait, req.request_id, wait)
            # those it will reach a row before (admitted earlier, with longer prompts) now expect to
            # wait that much longer: their waits are judged against that, not against a forecast
            # made before this request existed (placement lets a long request be overtaken so; it
            # avoids pushing a short one, whose first gap counts, past its objective: ``delays``)
            for rid, seconds in d.delayed:
                if rid in self._predicted_wait:
                    self._predicted_wait[rid] += seconds
            log.info("scheduled", prefill=placement.prefill_id, decode=placement.decode_id,
                     prompt_tokens=view.prompt_len, cached_blocks=placement.cached_blocks,
                     plan=placement.plan, peer=placement.peer_id or None,
                     pool_blocks=view.pool_blocks, predicted_ttft=round(placement.predicted_ttft, 4),
                     predicted_prefill=round(placement.predicted_prefill, 4),
                     predicted_tbt=round(placement.predicted_tbt, 4),
                     predicted_wait=None if wait is None else round(wait, 4),
                     overtakes={rid: round(seconds, 3) for rid, seconds in d.delayed} or None)
            # the next request is placed on a state that counts this one already; the JetStream
            # round trip (tenths of a second on a loaded host) does not hold the next decision
            self.spawn(self._dispatch(msg, task, placement, log))
            # a backlog of schedule requests is taken from the subscription's queue without a
            # pause: yield, so that heartbeats (an instance unheard for three beats is declared
            # lost), reports and the dispatches just spawned run between decisions
            await asyncio.sleep(0)
            return
        NOT_ADMITTED.labels(status=str(placement.status), cause=placement.cause or "unavailable").inc()
        log.warning("not_admitted", status=placement.status, reason=placement.reason)
        await msg.respond(encode(self._reply(req.request_id, placement)))

    async def _dispatch(self, msg, task: PrefillTask, placement, log) -> None:
        """Queue an admitted request's prefill task, then answer its gateway; if JetStream cannot
        take it, forget what its placement counted and answer 503 (never a hang)."""
        rid = task.request_id
        try:
            await self.js.publish(Subjects.prefill_task(placement.prefill_id), encode(task),
                                  headers={"Nats-Msg-Id": rid})
        except Exception as e:  # noqa: BLE001 - JetStream unavailable: tell the client, do not hang
            log.error("dispatch_failed", error=str(e))
            self._unplace(rid, placement)
            NOT_ADMITTED.labels(status="503", cause="unavailable").inc()
            await msg.respond(encode(ScheduleReply(request_id=rid, admitted=False, status=503,
                                                   reason="task queue unavailable", retry_after=1.0)))
            return
        # counted once queued: a placement undone above is a request not admitted
        PLACED.labels(policy=self.policy.name, plan=placement.plan).inc()
        PREDICTED_TTFT.observe(placement.predicted_ttft)
        PREDICTED_TBT.observe(placement.predicted_tbt)
        await msg.respond(encode(self._reply(rid, placement)))

    def _unplace(self, request_id: str, placement) -> None:
        """Undo what ``_placed`` and ``_project`` counted for a task that was never queued."""
        self.queues.done(placement.prefill_id, request_id, 0, 0.0)
        self.projector.forget(request_id)
        self._predicted_ttft.pop(request_id, None)
        self._predicted_wait.pop(request_id, None)

    @staticmethod
    def _reply(request_id: str, placement) -> ScheduleReply:
        return ScheduleReply(
            request_id=request_id,
            admitted=placement.admitted,
            prefill_id=placement.prefill_id,
            decode_id=placement.decode_id,
            status=placement.status,
            reason=placement.reason,
            retry_after=placement.retry_after,
        )
