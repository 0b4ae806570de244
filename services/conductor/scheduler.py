"""The conductor's state and decisions: plain logic with no I/O, the caller passes messages and the clock.

``Scheduler`` takes in what the instances report (heartbeats, prefill and decode reports) and
answers placements: the prefill and decode instance of a request, whether it is admitted, and the
``PrefillTask`` to queue. The service (``service.py``) only moves messages to and from it.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass

import msgspec

from libs.config import SLO, Settings
from libs.engine.costs import DEFAULT as DEFAULT_PROFILE, CostProfile
from libs.metrics import largest_gap_counts
from libs.protocol import (DecodeReport, Heartbeat, PrefillDone, PrefillReport, PrefillTask, Prediction,
                           SamplingParams, ScheduleRequest)

from services.conductor.admission import AdmissionController
from services.conductor.decodecost import DecodeCostModel
from services.conductor.decodeview import decode_candidates, decode_view
from services.conductor.feedback import TTFTErrorModel, WaitErrorModel
from services.conductor.index import PrefixIndex
from services.conductor.placement import (DecodeView, Placement, PrefillView, RequestView, cache_candidates,
                                         make_policy)
from services.conductor.poolwrites import PoolWriteAdmission
from services.conductor.prefillcost import PrefillCostModel
from services.conductor.prefillqueue import PrefillQueues
from services.conductor.projector import DecodeLoadProjector
from services.conductor.partition import Partition
from services.conductor.pipeline import Pipeline, plan_pipeline
from services.conductor.registry import Instance, Registry

PRIOR_KV_TOKENS = 256  # KV positions per sequence assumed before any has been seen
MAX_PENDING_PREDICTIONS = 100_000  # placed requests whose first token is awaited, kept to compare with it


def reusable_keys(sampling: SamplingParams, keys: list[bytes]) -> list[bytes]:
    """The block keys a placement may plan to reuse: none for a prompt whose logprobs are asked
    for (prefill computes every position of it: each needs its logits), so its prediction is a
    whole prompt's compute and it loads nothing from the pool or a peer."""
    return [] if sampling.prompt_logprobs is not None else keys


def _remember(pending: OrderedDict, attempt_id: str, predicted: float) -> None:
    """Keep a placed request's prediction until its report comes; the oldest go first when reports
    never come (``MAX_PENDING_PREDICTIONS``)."""
    pending[attempt_id] = predicted
    while len(pending) > MAX_PENDING_PREDICTIONS:
        pending.popitem(last=False)


def prediction(placement: Placement, block_size: int) -> Prediction | None:
    """What an admitted placement predicted, as its reply tells the gateway (None: not admitted)."""
    if not placement.admitted:
        return None
    return Prediction(ttft=placement.predicted_ttft, queue=max(0.0, placement.predicted_ttft - placement.predicted_prefill),
                      compute=placement.predicted_compute, load=placement.predicted_load, tbt=placement.predicted_tbt,
                      plan=placement.plan, peer_id=placement.peer_id,
                      reused_tokens=placement.cached_blocks * block_size)


@dataclass(frozen=True)
class Decision:
    """What ``Scheduler.schedule`` decided for one request."""

    placement: Placement
    view: RequestView | None  # None: not placed here at all (another conductor places it)
    task: PrefillTask | None = None  # the task to queue when admitted
    wait: float | None = None  # the wait for a decode row the admission judged it by (it reaches decode)
    delayed: tuple[tuple[str, float], ...] = ()  # admitted requests it makes wait longer, with the seconds
    # a prompt split over several prefill instances: the stages before the last, (instance, task)
    # each, to queue before ``task`` (the last stage, on ``placement.prefill_id``)
    stages: tuple[tuple[str, PrefillTask], ...] = ()


@dataclass(frozen=True)
class DecodeWait:
    """A decode report compared with the wait for a row its admission predicted."""

    predicted: float
    waited: float
    margin: float


class Scheduler:
    def __init__(self, settings: Settings):
        s = self.settings = settings
        # liveness judged as of how far the conductor is behind on heartbeats, at most ten beats
        self.registry = Registry(lag_cap=10 * settings.heartbeat_interval, interval=settings.heartbeat_interval)
        # with several conductors, the prefill and decode instances this one places work on
        self.partition = Partition(settings.instance_id or "conductor")
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

    # ---- inputs
    def heartbeat(self, hb: Heartbeat, now: float) -> bool:
        """Take in an instance's heartbeat; True when the instance was not known."""
        joined = self.registry.get(hb.kind, hb.instance_id) is None
        self.registry.beat(hb, now)
        if hb.kind == "decode":
            self.projector.progress(hb.instance_id, now,
                                    [(q.attempt_id, q.decoded, q.left, q.running) for q in hb.sequences])
            if hb.steps:
                fits = self.decode_cost.fits
                self.decode_cost.observe(hb.steps, hb.step_batch, hb.step_kv_tokens, hb.step_seconds)
                if self.decode_cost.fits != fits:
                    self.projector.repriced()
            if hb.max_running > 0:
                # until sequences are seen to finish, each is taken to decode at a full batch's pace
                # (a batch-1 step would have the first admitted requests leave decode twice as soon)
                self.projector.prior(self.decode_cost.step_seconds(hb.max_running, hb.max_running * PRIOR_KV_TOKENS))
        return joined

    def prefill_report(self, r: PrefillReport, now: float) -> None:
        """A prompt's first token: its TTFT against the prediction, and the prefill cost model's samples."""
        self.queues.first_token(r.instance_id, r.attempt_id, now)
        self.projector.started(r.attempt_id, now)
        predicted = self._predicted_ttft.pop(r.attempt_id, None)
        if predicted is not None and r.ttft_seconds > 0:
            self.ttft_error.observe(predicted, r.ttft_seconds)
        reused = r.local_tokens + r.pool_tokens
        self.cost.observe_kv_size(r.kv_bytes_per_token)
        if r.num_layers > 0:
            self.cost.layers = r.num_layers
        revision = self.cost.revision
        self.cost.observe_prefill(r.prompt_tokens - reused, reused, r.compute_seconds)
        if self.cost.revision != revision:  # the prices moved: the queued tasks are priced again
            self.queues.reprice(self.cost.prefill_seconds)
        self.cost.observe_load(r.pool_tokens, r.load_seconds, r.load_bytes)

    def prefill_done(self, r: PrefillDone, now: float) -> None:
        """A prompt's KV hand-off is over: its instance is free of it."""
        self.queues.done(r.instance_id, r.attempt_id, r.kv_tokens, r.tail_seconds, now)

    def decode_report(self, r: DecodeReport, now: float) -> DecodeWait | None:
        """A request left decode; returns its wait for a row against the prediction, when there was one."""
        predicted = self._predicted_wait.pop(r.attempt_id, None)
        e = self.projector.entries.get(r.attempt_id)
        judged = None
        if predicted is not None and e is not None and e.started and r.output_tokens > 0:
            # from its first token (the prefill's report) to its first step in a row
            row_at = now - (r.seconds - r.waited_seconds)
            waited = max(0.0, row_at - e.start)
            self.wait_error.observe(predicted, waited, within=e.tbt_slo if e.tbt_slo > 0 else math.inf)
            judged = DecodeWait(predicted, waited, self.wait_error.margin())
        self.projector.finished(r.attempt_id, r.output_tokens, r.seconds, r.finish_reason in ("stop", "length"),
                                waited=r.waited_seconds)
        return judged

    def prune(self, now: float) -> tuple[list[Instance], int]:
        """Forget the instances that missed their heartbeats (returned, for the caller to move their
        work) and the predictions whose reports never came; also returns how many prefill tasks'
        done reports are missing."""
        gone = self.registry.prune(now)
        for inst in gone:
            self.index.drop_instance(inst.instance_id)
            self.queues.drop_instance(inst.instance_id)
            if inst.kind == "decode":
                self.projector.drop_instance(inst.instance_id)
        self.projector.prune(now)
        return gone, self.queues.prune(now)

    def decode_sequences(self) -> tuple[int, int]:
        """Admitted sequences not finished: (in prefill, in decode)."""
        started = sum(1 for e in self.projector.entries.values() if e.started)
        return len(self.projector.entries) - started, started

    # ---- decisions
    def conductors(self, now: float) -> tuple[str, ...]:
        """The conductors sharing the cluster (this one and those beating)."""
        return self.partition.conductors(i.instance_id for i in self.registry.alive("conductor", now))

    def own(self, kind: str, now: float) -> list[Instance]:
        """The live instances of ``kind`` this conductor places work on."""
        alive = self.registry.alive(kind, now)
        conductors = self.conductors(now)
        if len(conductors) == 1:
            return alive
        mine = set(self.partition.mine([i.instance_id for i in alive], conductors))
        return [i for i in alive if i.instance_id in mine]

    def owns_lost(self, kind: str, instance_id: str, now: float) -> bool:
        """Whether this conductor moves the work of ``instance_id``, of ``kind``, just lost: the
        one it belonged to among the instances of its kind still alive."""
        conductors = self.conductors(now)
        alive = [i.instance_id for i in self.registry.alive(kind, now)]
        return self.partition.owner(instance_id, alive, conductors) == self.partition.own

    def elsewhere(self, now: float) -> bool:
        """Whether requests are another conductor's to place: this one has no prefill or no decode
        instance of its own, while the cluster has both."""
        return (len(self.conductors(now)) > 1 and not all(self.placing(now).values())
                and bool(self.registry.alive("prefill", now)) and bool(self.registry.alive("decode", now)))

    def placing(self, now: float) -> dict[str, int]:
        """How many prefill and decode instances this conductor places work on (its heartbeat's)."""
        return {kind: len(self.own(kind, now)) for kind in ("prefill", "decode")}

    def queue_seconds(self, iid: str, now: float) -> float:
        return self.queues.seconds(iid, now)

    def place(self, prompt_len: int, keys: list[bytes], now: float, tbt_slo: float = 0.0, tokens: int = 0,
              urgent: bool = False, avoid_decode: str = "") -> tuple[Placement, RequestView, list[DecodeView]]:
        """Placement of a prompt of ``prompt_len`` tokens expected to decode ``tokens`` tokens
        (``urgent``: its wait for a decode row counts in its TBT, so decode serves it first);
        ``avoid_decode`` is not chosen while another decode instance is alive."""
        ids = [i.instance_id for i in self.own("prefill", now)]
        prefills = [PrefillView(iid, queue, held) for iid, queue, held in
                    zip(ids, self.queues.seconds_of(ids, now), self.index.prefix_lens(keys, ids))]
        pool_blocks = self.index.pool_prefix_len(keys) if self.settings.use_pool else 0
        held = max([pool_blocks] + [p.local_blocks for p in prefills])
        view = RequestView(
            prompt_len=prompt_len,
            block_size=self.settings.block_size,
            pool_blocks=pool_blocks,
            tbt_slo=tbt_slo,
            # ties go by the first block nothing holds: a system prompt every conversation shares
            # does not send them all to one instance, while what tells the prompt apart does
            affinity=keys[min(held, len(keys) - 1)] if keys else b"",
            held_blocks=held,
        )
        # when the request would reach decode: its best predicted TTFT, and that TTFT as far over
        # (the 90th percentile of actual / predicted) and as far under (the 10th) as the admitted
        # requests' have lately run
        # (the best of each group of instances holding as much of the prompt is the best of all)
        eta = min((self.policy.estimate(view, p, self.settings.use_pool).ttft for p in cache_candidates(view, prefills)),
                  default=0.0)
        late = now + eta * max(1.0, self.ttft_error.factor())
        early = now + eta * self.ttft_error.early_factor()
        alive = self.own("decode", now)
        if self.policy.decode_by_prediction and not self.settings.colocated:
            # the prediction for the least loaded few; never only the one to avoid
            alive = decode_candidates([i for i in alive if i.instance_id != avoid_decode] or alive)
        decodes = [decode_view(i, self.projector, self.decode_cost, self.queues.handoff.seconds(prompt_len),
                               self.wait_error.margin(), self._judged_wait, now=now, arrive=now + eta,
                               prompt_len=prompt_len, tokens=tokens, late=late, early=early, urgent=urgent)
                   for i in alive]
        others = [d for d in decodes if d.instance_id != avoid_decode]
        return self.policy.place(view, prefills, others or decodes), view, decodes

    def _judged_wait(self, rid: str, kv_tokens: int, before: float) -> float:
        """The wait for a row an admitted request was judged by, as later admissions have revised it;
        for one admitted before this conductor knew it: its hand-off and ``before``."""
        judged = self._predicted_wait.get(rid)
        return judged if judged is not None else self.queues.handoff.seconds(kv_tokens) + before

    def admit(self, req: ScheduleRequest, placement: Placement, decodes: list[DecodeView]) -> Placement:
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

    def placed_task(self, task: PrefillTask, placement: Placement) -> PrefillTask:
        """``task`` sent where ``placement`` put it, reusing what it planned: the one place a
        placement becomes a task (a new request's, or a task moved off a lost instance)."""
        return msgspec.structs.replace(
            task,
            decode_id=placement.decode_id,
            reuse_blocks=placement.reuse_blocks,
            use_pool=placement.use_pool and self.settings.use_pool,
            pool_blocks=placement.pool_blocks,
            peer_id=placement.peer_id,
            peer_blocks=placement.peer_blocks,
            predicted_seconds=placement.predicted_prefill,
        )

    def schedule(self, req: ScheduleRequest, now: float) -> Decision:
        """Place and admit a new request; when admitted, count it placed and return its task."""
        if self.elsewhere(now):
            return Decision(Placement(False, status=503, cause="elsewhere", reason="this conductor has no share of "
                                      "the instances now: another conductor places requests"), None)
        keys = req.block_hashes
        tokens = self.projector.expected_tokens(req.sampling.max_tokens, req.sampling.ignore_eos)
        urgent = largest_gap_counts(req.sampling.max_tokens)
        avoid = req.resume.failed_decode if req.resume is not None else ""
        placement, view, decodes = self.place(len(req.prompt_token_ids), reusable_keys(req.sampling, keys), now,
                                              req.tbt_slo, tokens, urgent, avoid_decode=avoid)
        placement = self.admit(req, placement, decodes)
        if not placement.admitted:
            return Decision(placement, view)
        task = self.placed_task(PrefillTask(
            attempt_id=req.attempt_id,
            prompt_token_ids=req.prompt_token_ids,
            sampling=req.sampling,
            decode_id=placement.decode_id,
            block_hashes=keys,
            arrival_time=req.arrival_time,
            pool_write_blocks=self.pool_writes.blocks_to_write(keys),
            resume=req.resume,
        ), placement)
        stages: tuple[tuple[str, PrefillTask], ...] = ()
        pipe = self._pipeline(req, placement, now)
        if pipe is not None:
            placement, task, stages = self._staged(task, placement, pipe, now)
        self._placed(req.attempt_id, placement, len(req.prompt_token_ids), tokens, urgent, now, req.tbt_slo,
                     reused=pipe.stages[-1].start if pipe is not None else None)
        wait = None
        d = next(v for v in decodes if v.instance_id == placement.decode_id)
        if tokens > 1:  # it reaches decode: remember the wait the admission judged it by
            wait = d.wait_now if self.admission.mode == "early" else d.wait_then
            _remember(self._predicted_wait, req.attempt_id, wait)
        # those it will reach a row before (admitted earlier, with longer prompts) now expect to
        # wait that much longer: their waits are judged against that, not against a forecast
        # made before this request existed (placement lets a long request be overtaken so; it
        # avoids pushing a short one, whose first gap counts, past its objective: ``delays``)
        for rid, seconds in d.delayed:
            if rid in self._predicted_wait:
                self._predicted_wait[rid] += seconds
        return Decision(placement, view, task, wait, d.delayed, stages)

    def _pipeline(self, req: ScheduleRequest, placement: Placement, now: float) -> Pipeline | None:
        """The pipeline of prefill instances to split the prompt over, when the cost model says it
        gives the first token sooner than the placement's one instance (``pipeline.py``)."""
        s = self.settings
        if (s.pipeline_max_stages < 2 or s.colocated or req.sampling.prompt_logprobs is not None
                or len(req.prompt_token_ids) < s.pipeline_min_tokens or not self.cost.layers):
            return None
        others = [(i.instance_id, self.queue_seconds(i.instance_id, now)) for i in self.own("prefill", now)
                  if i.instance_id != placement.prefill_id]
        first = (placement.prefill_id, self.queue_seconds(placement.prefill_id, now))
        return plan_pipeline(len(req.prompt_token_ids), placement.cached_blocks * s.block_size, first, others,
                             single_ttft=placement.predicted_ttft, block_size=s.block_size, layers=self.cost.layers,
                             price=self.cost.prefill_seconds, move=self.cost.load_seconds,
                             max_stages=s.pipeline_max_stages, min_tokens=s.pipeline_min_tokens)

    def _staged(self, task: PrefillTask, placement: Placement, pipe: Pipeline,
                now: float) -> tuple[Placement, PrefillTask, tuple[tuple[str, PrefillTask], ...]]:
        """The tasks of a pipeline: the first stage reuses what the placement planned, each later
        one loads its past live from the one before; the last keeps the request's id, draws the
        first token and hands off to decode. Every stage but the last is counted on its queue here."""
        bs = self.settings.block_size
        stages: list[tuple[str, PrefillTask]] = []
        before: tuple[str, str] = ("", "")  # the previous stage's instance and task id
        for k, st in enumerate(pipe.stages):
            last = k == len(pipe.stages) - 1
            aid = task.attempt_id if last else f"{task.attempt_id}~s{k}"
            staged = msgspec.structs.replace(
                task, attempt_id=aid, stage_end=0 if last else st.end,
                stage_from=before[0], stage_attempt=before[1], stage_past=st.start if k else 0,
                predicted_seconds=st.compute)
            if k:  # its past comes from the stage before: no cache load of it
                staged = msgspec.structs.replace(staged, reuse_blocks=st.start // bs, use_pool=False, pool_blocks=-1,
                                                 peer_id="", peer_blocks=0)
            if last:
                task = staged
            else:
                stages.append((st.instance_id, staged))
                queue = self.queue_seconds(st.instance_id, now)
                self.queues.placed(st.instance_id, aid, max(0.0, st.finish - queue), st.end, now, reused=st.start)
            before = (st.instance_id, aid)
        final = pipe.stages[-1]
        queue = self.queue_seconds(final.instance_id, now)
        placement = dataclasses.replace(
            placement, prefill_id=final.instance_id, predicted_ttft=final.finish,
            predicted_prefill=max(0.0, final.finish - queue), predicted_compute=final.compute, predicted_load=0.0,
            use_pool=False, peer_id="", reuse_blocks=final.start // bs, stages=len(pipe.stages))
        return placement, task, tuple(stages)

    def reassign(self, task: PrefillTask, now: float) -> tuple[Placement, PrefillTask | None]:
        """Place afresh a task queued on a lost prefill instance (it was admitted once: not judged
        again); returns the placement and, when it found instances, the task to queue."""
        # the last stage of a pipeline is placed afresh as a whole prompt (the stages before it,
        # whose KV it would have read, are the caller's to drop)
        task = msgspec.structs.replace(task, stage_from="", stage_attempt="", stage_past=0)
        tokens = self.projector.expected_tokens(task.sampling.max_tokens, task.sampling.ignore_eos)
        urgent = largest_gap_counts(task.sampling.max_tokens)
        placement, _, _ = self.place(len(task.prompt_token_ids), reusable_keys(task.sampling, task.block_hashes), now,
                                     tokens=tokens, urgent=urgent)
        if not placement.admitted:
            return placement, None
        self._placed(task.attempt_id, placement, len(task.prompt_token_ids), tokens, urgent, now)
        return placement, self.placed_task(task, placement)

    def _placed(self, attempt_id: str, placement: Placement, prompt_len: int, tokens: int, urgent: bool,
                now: float, tbt_slo: float = 0.0, reused: int | None = None) -> None:
        """Count a placed request (expected to decode ``tokens``) on its prefill queue and in the
        decode projection; ``reused``: the positions its instance does not compute, when not the
        placement's reuse (the last stage of a pipeline: the stages' past)."""
        _remember(self._predicted_ttft, attempt_id, placement.predicted_ttft)
        self.queues.placed(placement.prefill_id, attempt_id, placement.predicted_prefill, prompt_len, now,
                           reused=placement.cached_blocks * self.settings.block_size if reused is None else reused,
                           load_seconds=placement.predicted_load)
        inst = self.registry.get("decode", placement.decode_id)
        if inst is not None:
            inst.placed_since_beat += 1
        self.projector.admit(attempt_id, placement.decode_id, now + placement.predicted_ttft, tokens,
                             prompt_len, tbt_slo, urgent=urgent)

    def unplace(self, attempt_id: str, placement: Placement) -> None:
        """Undo what placing a request counted, for a task that was never queued."""
        self.queues.done(placement.prefill_id, attempt_id, 0, 0.0)
        self.projector.forget(attempt_id)
        self._predicted_ttft.pop(attempt_id, None)
        self._predicted_wait.pop(attempt_id, None)
