"""Prefill wiring: reuse cached prefix blocks, run the rest of the prompt, stream the first token,
hand the KV to decode, and keep the new blocks (own DRAM cache, then the pool).

A prompt's reused prefix comes from the instance's own DRAM cache, then from the pool or, when the
conductor names one, from a peer prefill instance that holds it in its own cache: each instance
answers layered gets of its cached blocks on ``Subjects.prefill_blocks`` (the pool's protocol,
``serve_layers``), pinning them until they are sent. A block so loaded is kept here too, so hot
prefixes spread to the instances that serve them.

The KV leaves for decode while the prompt runs: each layer's bytes go as soon as the model has
written the layer's last position (and any pool past under it has verified), so by the first
token only the last layers are still on the way and the instance is free for its next prompt
soon after, instead of a whole prompt's KV transfer later.

A long prompt may be split over several instances in a pipeline (chunked pipeline parallelism):
each stage computes a chunk in one forward, its past streamed in live, layer by layer, from the
instance computing the chunk before it (``services/prefill/stages.py``), so the stages' layers run
side by side. Only the last stage draws the first token and hands the KV to decode. A stage whose
live past does not arrive computes it itself; one before the last then leaves that to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import NamedTuple

import msgspec
import torch
from prometheus_client import Counter, Gauge, Histogram

from libs.kv.client import CacheClient, CacheError
from libs.kv.codec import block_view, tensor_bytes
from libs.kv.layers import serve_layers, serve_live_layers
from libs.bus import TransferError, keep_in_progress, send_blob
from libs.kvevents import KVEventPublisher
from libs.engine.arena import kv_arena_for, KVArena
from libs.engine.prefill_kv import PastNotLoaded, PrefillKV
from libs.engine.logprobs import PromptScores, logprobs_at
from libs.engine.sampling import sample_token, split_resumed_prompt
from libs.protocol import (
    CacheGetReply,
    CacheGetRequest,
    DecodeTask,
    Fork,
    KVMeta,
    PrefillDone,
    PrefillReport,
    PrefillTask,
    PromptLogprobs,
    Subjects,
    TokenEvent,
    decode,
    encode,
)
from libs.worker import ModelWorker, finish_reason

from services.prefill.blockcache import BlockCache
from services.prefill.handoff import HANDOFF_WINDOW_CHUNKS, stream_kv
from services.prefill.stages import LiveStages, Stage

CACHE_TIMEOUT = 5.0

QUERY_TOKENS = Counter("yuebing:prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
HIT_TOKENS = Counter("yuebing:prefix_cache_hits", "Prompt tokens whose KV was reused", ["source"])
COMPUTED_TOKENS = Counter("yuebing:prefill_computed_tokens", "Prompt tokens computed")
PREFILL_SECONDS = Histogram("yuebing:prefill_compute_seconds", "Model time of one prompt")
LOAD_SECONDS = Histogram("yuebing:prefill_pool_load_seconds", "Time to load prefix blocks from the pool or a peer",
                         ["source"])
PEER_SERVED = Counter("yuebing:prefill_peer_blocks_served", "Blocks of the own cache sent to a peer instance")
STAGES = Counter("yuebing:prefill_pipeline_stages", "Pipeline stages run (a long prompt split over instances)",
                 ["role", "outcome"])
LOCAL_BYTES = Gauge("yuebing:prefill_local_cache_bytes", "Bytes in the instance's own block cache")
LOCAL_EVICTIONS = Counter("yuebing:prefill_local_cache_evictions", "Blocks evicted from the instance's own cache")
HANDOFF_TAIL_SECONDS = Histogram("yuebing:prefill_kv_handoff_tail_seconds",
                                 "From a prompt's first token until its KV is all with decode (sent while it ran)",
                                 buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
POOL_WRITES_SKIPPED = Counter("yuebing:prefill_pool_writes_skipped",
                              "Prompts whose new blocks were not written to the pool: its write backlog was full")


class Prefilled(NamedTuple):
    logits: torch.Tensor
    buf: PrefillKV  # the prompt's KV (``kv``): released once nothing reads it
    local: int  # blocks reused from the own DRAM cache
    pool: int  # blocks loaded from the pool, or from a peer instance
    peer: str  # the peer instance they came from ("": the pool)
    load_seconds: float  # the load (overlapping the compute)
    compute_seconds: float  # the model's time on the prompt (waits for the past's layers excluded)
    handoff: "asyncio.Future | None"  # the KV on its way to decode as the layers ran (None: not sent yet)
    prompt_logprobs: PromptLogprobs | None = None  # asked for (an echo with logprobs)
    staged: bool = False  # ``pool`` blocks came live from the pipeline stage before (not a cache)
    cached_tokens: int = 0  # positions reused from a cache, anywhere in the pipeline
    recomputed: bool = False  # the past did not all arrive: the prompt was computed past what did

    @property
    def kv(self) -> torch.Tensor:
        return self.buf.kv


class PrefillService(ModelWorker):
    kind = "prefill"
    streams = (Subjects.PREFILL_STREAM, Subjects.KV_EVENTS_STREAM)

    async def setup(self) -> None:
        await super().setup()
        s = self.settings
        self.blocks = BlockCache(s.prefill_cache_bytes)
        if self.blocks.reserve(self.shape.kv_dims(s.block_size), self.shape.dtype):
            await asyncio.to_thread(self.blocks.commit)  # pages in now, not on the first prompts' path
        if s.prefill_kv_arena_bytes and self.runner.arena is None:
            self.runner.arena = kv_arena_for(self.shape, s.prefill_kv_arena_bytes)
        if self.runner.arena is not None:
            await asyncio.to_thread(self.runner.arena.commit)  # its slab paged in now, not under load
            self.track_arena("prefill", self.runner.arena)
        self.cache = CacheClient(self.nc, timeout=CACHE_TIMEOUT, replicas=s.cache_replicas)
        await self.cache.start()
        await self.cache.wait_for_pool(2 * s.heartbeat_interval + 1)  # a pool may not exist: go on
        self.events = KVEventPublisher(self.nc, self.js, self.instance_id, "prefill", self.blocks.keys)
        await self.events.start()
        self.queued = 0
        self.queued_tokens = 0
        self.prompt_tokens = 0  # since start, and those reused by source (in the heartbeat)
        self.reused_tokens = {"own": 0, "peer": 0, "pool": 0}
        self.write_backlog = 0  # bytes of prompts' KV held until their blocks are in the pool
        self.write_budget = pool_write_budget(s.pool_write_backlog_bytes, self.runner.arena)
        self.stages = LiveStages(s.pipeline_stage_timeout)
        await self.nc.subscribe(Subjects.prefill_blocks(self.instance_id), cb=self._on_peer_get)
        await self.subscribe_tasks(Subjects.PREFILL_STREAM, Subjects.prefill_task(self.instance_id))
        self._loop_task = self.spawn(self._loop(), essential=True)

    async def drain(self) -> None:
        """Finish the prompt in hand; queued tasks go to other instances (the conductor moves
        them once this one stops beating)."""
        await asyncio.wait({self._loop_task}, timeout=self.settings.drain_seconds)

    async def teardown(self) -> None:
        await self.events.stop()
        await self.cache.close()
        await super().teardown()

    def load(self):
        return self.heartbeat(queued=self.queued, queued_tokens=self.queued_tokens, kv_bytes=self.blocks.bytes,
                              kv_capacity_bytes=self.blocks.capacity, prompt_tokens=self.prompt_tokens,
                              reused_tokens=dict(self.reused_tokens))

    async def _loop(self) -> None:
        while not self.stopping:
            msgs = await self.pull()
            for msg in msgs:
                try:
                    task = decode(msg.data, PrefillTask)
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    self.log.warning("bad_prefill_task", error=str(e))
                    await msg.term()
                    continue
                self.queued, self.queued_tokens = 1, len(task.prompt_token_ids)
                handed: tuple[int, float | None] = (0, None)
                # the task stays in progress however long the prompt runs: never redelivered mid-run
                progress = asyncio.ensure_future(keep_in_progress(msg, self.settings.task_ack_wait / 3))
                try:
                    handed = await self._run(task, msg)
                finally:
                    progress.cancel()
                    self.queued, self.queued_tokens = 0, 0
                    await self._report_done(task.attempt_id, *handed)

    async def _report_done(self, rid: str, kv_tokens: int, first_token_at: float | None) -> None:
        """Tell the conductor this instance is free of the task, and how long the hand-off after
        its first token held it (the conductor counts that in the queue ahead of new prompts)."""
        tail = time.monotonic() - first_token_at if first_token_at is not None else 0.0
        try:
            await self.nc.publish(Subjects.PREFILL_DONE, encode(PrefillDone(
                instance_id=self.instance_id, attempt_id=rid, kv_tokens=kv_tokens, tail_seconds=tail)))
        except Exception as e:  # noqa: BLE001 - the conductor forgets the task later on its own
            self.log.warning("done_report_failed", request_id=rid, error=str(e))

    # ---- prefix reuse
    def _local_prefix(self, task: PrefillTask) -> tuple[list[bytes], list[torch.Tensor]]:
        """The keys worth reusing (all full blocks but one token) and those in the own DRAM cache."""
        n = reusable_blocks(len(stage_prompt(task)), self.settings.block_size, task.reuse_blocks,
                            task.sampling.prompt_logprobs is not None)
        keys = task.block_hashes[:n]
        return keys, self.blocks.prefix(keys)

    def _peer(self, task: PrefillTask, want: list[bytes], local: int) -> tuple[str, int]:
        """The peer instance to load from and how many leading blocks of ``want`` (the keys after the
        ``local`` ones) it holds, when the conductor named one with more than this instance has."""
        if not task.peer_id or task.peer_id == self.instance_id or task.peer_blocks <= local:
            return "", 0
        return task.peer_id, min(len(want), task.peer_blocks - local)

    async def _pool_blocks(self, task: PrefillTask, want: list[bytes], local: int) -> int:
        """How many leading blocks of ``want`` (the keys after the ``local`` ones) to load from the pool.

        When the conductor says how many leading blocks its index has in the pool, that is the
        answer, with no lookup round trip to the cachestore before the compute starts (a block
        the pool has lost since fails the load, and the prompt is computed from the verified
        prefix). Otherwise the pool is asked (0 when it is down or slow)."""
        if not (task.use_pool and want):
            return 0
        if task.pool_blocks >= 0:
            return min(len(want), max(0, task.pool_blocks - local))
        try:
            return await self.cache.lookup(want)
        except CacheError as e:
            self.log.warning("pool_lookup_failed", request_id=task.attempt_id, error=str(e))
            return 0

    async def _compute_prefill(self, tokens: list[int], chunk: int, buf, scores: PromptScores | None = None):
        """The prompt's forward on the model thread. A colocated worker shares that thread with its
        decode steps: there each chunk is a job of its own, so the running sequences take a step
        between two chunks instead of waiting for the whole prompt (chunked prefill), and the
        prompts being prefilled take turns, a chunk at a time."""
        if not self.settings.colocated:
            return await self.compute(self.runner.prefill, tokens, chunk=chunk, buffer=buf, scores=scores)
        steps = self.runner.prefill_steps(tokens, chunk=chunk, buffer=buf, scores=scores)
        try:
            while True:
                async with self._engine.chunk_turn:
                    out = await self.compute(next, steps)
                if out is not None:
                    return out
        finally:
            # on the model thread, after a chunk still running there: a generator cannot be
            # closed while it executes
            try:
                self._executor.submit(steps.close)
            except RuntimeError:
                pass  # the model thread has stopped

    async def _prefill(self, task: PrefillTask, log, stream: bool, stage: bool = False) -> "Prefilled":
        """Reuse what is cached, compute the rest.

        Own DRAM blocks are copied into the request's KV buffer; pool blocks stream into it layer by
        layer while the prompt runs (layer ``i`` waits only for its own past). A pool block that is
        missing, corrupt or late stops the run: the prompt is computed again from the verified prefix.
        With ``stream`` the KV is sent to decode layer by layer as the model computes it (the
        returned ``handoff``); after a recompute it is sent afterwards instead.

        A pipeline stage (``task.stage_from``) loads its past live from the stage before it instead
        of from the pool or a peer, and computes its chunk in one forward, so that each layer waits
        only for its own past. ``stage``: a stage before the last, registered for the next stage
        to read; a past of it that does not arrive is then not computed here (the next stage,
        whose load fails with it, computes the prompt so far itself).
        """
        bs = self.settings.block_size
        prompt, chunk = stage_prompt(task), self.settings.prefill_chunk
        keys, blocks = self._local_prefix(task)
        local = len(blocks)
        staged = bool(task.stage_from)
        if staged:
            peer, found = task.stage_from, max(0, min(len(keys), task.stage_past // bs) - local)
        else:
            peer, found = self._peer(task, keys[local:], local)
            if not peer:
                found = await self._pool_blocks(task, keys[local:], local)
        reused = (local + found) * bs
        if staged or stage:
            chunk = max(chunk, len(prompt) - reused)  # one forward: layer i of every stage runs side by side
        k = task.sampling.prompt_logprobs
        scores = PromptScores(prompt, k) if k is not None else None  # then nothing is reused
        buf = self.runner.kv_buffer(len(prompt) - reused, blocks, pending=found * bs)
        live: Stage | None = None
        if stage:
            live = self.stages.open(task.attempt_id, buf, task.block_hashes[: len(prompt) // bs])
            live.reused_tokens = local * bs if staged else reused
            if not (staged and found):  # nothing to hear from a stage before: the next may be answered
                live.known.set()
        if staged:
            buf.timeout = self.settings.pipeline_stage_timeout  # the stage before may still be queued
        handoff = asyncio.ensure_future(self._stream_kv(task, buf)) if stream else None
        try:
            t0 = time.monotonic()
            run = asyncio.ensure_future(self._compute_prefill(prompt[reused:], chunk, buf, scores))
            pool, seconds, upstream_cached = 0, 0.0, 0

            def answered(reused: int) -> None:
                """The stage before has answered: the next stage may be answered too, with what of
                this stage's past came from a cache (not once all of it is in: the stages would
                then start one after the other instead of a layer apart)."""
                if live is not None:
                    live.reused_tokens += reused
                    live.known.set()

            if found:
                started = time.monotonic()
                try:
                    if staged:
                        pool, upstream_cached = await self.cache.load_live(
                            keys[local : local + found], buf, local * bs, peer=peer, attempt=task.stage_attempt,
                            timeout=self.settings.pipeline_stage_timeout, on_reply=answered)
                    else:
                        pool = await self.cache.load_layers(keys[local : local + found], buf, local * bs, peer=peer)
                except Exception as e:  # noqa: BLE001 - a load that fails is a recompute, never a failed request
                    buf.fail(f"{'stage' if staged else 'peer' if peer else 'pool'} load failed: {e}")
                    log.warning("pool_load_failed", peer=peer, error=repr(e))
                seconds = time.monotonic() - started
                if pool and not staged:
                    LOAD_SECONDS.labels(source="peer" if peer else "pool").observe(seconds)
                if live is not None:
                    live.known.set()  # a load that failed before its answer: the next stage is told now
            cached = (local + pool) * bs if not staged else local * bs + (upstream_cached if pool else 0)
            recomputed = False
            try:
                logits, _ = await run
            except PastNotLoaded as e:
                good = (local + pool) * bs
                log.warning("pool_load_incomplete", peer=peer, wanted_blocks=found, loaded_blocks=pool, error=str(e))
                if stage:
                    raise  # the next stage computes it, with this chunk, itself
                recomputed = True
                # what the stream sent (never a layer over an unverified past) is forgotten by decode;
                # the recomputed KV goes afterwards, under a transfer id of its own
                await _cancel(handoff)
                handoff = None
                failed = buf
                lost_wait = failed.waited  # waiting for a past that never came is not compute
                buf = self.runner.kv_buffer(len(prompt) - good, failed.kv[:, :, :, :good] if good else None)
                failed.release()  # its verified past is copied over, and nothing else reads it
                logits, _ = await self._compute_prefill(prompt[good:], chunk, buf, scores)
            else:
                lost_wait = 0.0
            return Prefilled(logits, buf, local, pool, peer, 0.0 if staged else seconds,
                             time.monotonic() - t0 - buf.waited - lost_wait, handoff,
                             scores.message() if scores is not None else None, staged, cached, recomputed)
        except BaseException as e:
            await _cancel(handoff)  # the prompt failed: nothing of it goes to decode
            if live is not None:
                if buf.failed is None:
                    buf.fail(f"the stage failed: {e!r}")  # a serve under way stops now, not at its timeout
                self.stages.end(task.attempt_id)
            raise

    async def _run(self, task: PrefillTask, msg) -> tuple[int, float | None]:
        """Serve one task; returns the positions of KV handed to decode (0: none) and when the
        first token was reported (None: the task ended before it)."""
        rid = task.attempt_id
        log = self.log.bind(request_id=rid)
        if rid in self.done or rid in self.aborted:
            await msg.ack()  # a redelivery of finished work, or the client has gone
            return 0, None
        if task.stage_end:
            return await self._run_stage(task, msg, log)
        started = time.monotonic()
        queue_seconds = max(0.0, time.time() - task.arrival_time) if task.arrival_time else 0.0
        prompt = task.prompt_token_ids
        bs = self.settings.block_size
        # a prompt that may go on past its first token sends its KV while it runs
        stream = task.sampling.max_tokens > 1 and rid not in self.aborted
        try:
            done = await self._prefill(task, log, stream)
        except Exception as e:  # noqa: BLE001 - report, never hang the client
            log.error("prefill_failed", error=repr(e))
            await self.emit_error(task.output_id, task.seq_base, f"prefill failed: {e}", index=task.first_index)
            await msg.ack()
            return 0, None
        computed = time.monotonic()
        logits, kv, local, pool = done.logits, done.kv, done.local, done.pool
        load_seconds, compute_seconds = done.load_seconds, done.compute_seconds
        reused = (local + pool) * bs
        nbytes = 0 if done.staged else pool * bs * self.shape.kv_bytes_per_token()
        params, first = task.sampling, task.first_index
        try:
            history = split_resumed_prompt(prompt, task.seq_base) if params.penalized else ((), ())
            allowed = None
            if params.grammar is not None and params.max_tokens > 0:  # after the output so far (a resume's)
                constraint = await self.constraint(params.grammar, split_resumed_prompt(prompt, task.seq_base)[1])
                allowed = constraint.allowed(logits.shape[-1])
            # n choices from the one distribution, each with its own seed (none at max_tokens 0:
            # an echo that only scores the prompt)
            tokens = [sample_token(logits, params.choice(i), task.seq_base, *history, allowed=allowed)
                      for i in range(params.n)] if params.max_tokens > 0 else []
            lps = logprobs_at(logits, tokens, params.logprobs) if params.logprobs is not None and tokens else None
        except Exception as e:  # noqa: BLE001 - one request's bad draw must not stop the instance
            await _cancel(done.handoff)
            done.buf.release()
            log.error("sampling_failed", error=repr(e))
            await self.emit_error(task.output_id, task.seq_base, f"sampling failed: {e}", index=task.first_index)
            await msg.ack()
            return 0, None
        reasons = ([finish_reason(t, 1, params, self.shape.eos_token_ids) for t in tokens] if tokens
                   else ["length"] * params.n)
        for i, reason in enumerate(reasons):
            await self.emit(TokenEvent(output_id=task.output_id, seq=task.seq_base, token_ids=tokens[i : i + 1],
                                       finish_reason=reason, prompt_tokens=len(prompt),
                                       cached_tokens=done.cached_tokens,
                                       index=first + i, logprobs=[lps[i]] if lps is not None else None,
                                       prompt_logprobs=done.prompt_logprobs if i == 0 else None,
                                       prefill_seconds=time.monotonic() - started))
        going = [i for i, reason in enumerate(reasons) if reason is None]  # the choices decode goes on with
        ttft = max(0.0, time.time() - task.arrival_time) if task.arrival_time else 0.0
        emit_seconds = time.monotonic() - computed  # the draw and handing the token to the bus
        self._count_reuse(prompt, local, 0 if done.staged else pool, len(prompt) - reused, done.peer,
                          compute_seconds)
        if done.staged:
            STAGES.labels(role="last", outcome="past_recomputed" if done.recomputed else "ok").inc()
        log.info("prefilled", prompt_tokens=len(prompt), choices=params.n, local_tokens=local * bs,
                 pool_tokens=pool * bs, peer=done.peer, staged=done.staged or None,
                 load_s=round(load_seconds, 4), compute_s=round(compute_seconds, 4),
                 predicted_s=round(task.predicted_seconds, 4), waited_s=round(queue_seconds, 4),
                 emit_s=round(emit_seconds, 4), total_s=round(time.monotonic() - started, 4))
        await self.nc.publish(Subjects.PREFILL_REPORT, encode(PrefillReport(
            instance_id=self.instance_id, attempt_id=rid, prompt_tokens=len(prompt), local_tokens=local * bs,
            pool_tokens=pool * bs, load_bytes=nbytes, load_seconds=load_seconds, compute_seconds=compute_seconds,
            queue_seconds=queue_seconds, kv_bytes_per_token=self.shape.kv_bytes_per_token(), ttft_seconds=ttft,
            num_layers=self.shape.num_layers)))
        first_token_at, handed = time.monotonic(), 0
        if going and rid not in self.aborted:
            try:
                if done.handoff is not None:
                    await done.handoff  # the last layers' bytes
                else:
                    await self._send_kv(task, kv, f"{rid}@{self.instance_id}/full")
                await self._publish_decode_task(task, tokens, going, kv.shape[3])
                handed = kv.shape[3]
                HANDOFF_TAIL_SECONDS.observe(time.monotonic() - first_token_at)
            except (TransferError, Exception) as e:  # noqa: BLE001
                log.error("handoff_failed", decode=task.decode_id, error=repr(e))
                for i in going:
                    await self.emit_error(task.output_id, task.seq_base + 1, f"KV hand-off to decode failed: {e}",
                                          retry=True, index=first + i)
        else:
            await _cancel(done.handoff)  # finished at its first token, or the client has gone
        self.done.add(rid)
        await msg.ack()
        if task.block_hashes:
            await self._keep_blocks(task.block_hashes, kv)
        # a deployment without the pool writes none to it; the conductor may say how many leading
        # blocks are worth writing (the others are taken not to be read again)
        writable = task.block_hashes if task.pool_write_blocks < 0 else task.block_hashes[: task.pool_write_blocks]
        # blocks loaded from the pool are there already; those from a stage before are written by it
        from_pool = set() if done.peer and not done.staged else set(task.block_hashes[local : local + pool])
        to_write = [k for k in writable if k not in from_pool]
        if to_write and self.settings.use_pool:
            if self.write_backlog + kv.nbytes > self.write_budget:
                # the pool takes blocks slower than prompts make them: drop this prompt's rather than
                # hold every waiting prompt's KV until the next prompts find no memory ready for them
                POOL_WRITES_SKIPPED.inc()
                log.warning("pool_write_skipped", backlog_bytes=self.write_backlog, kv_bytes=kv.nbytes)
            else:
                self.write_backlog += kv.nbytes
                self.spawn(self._store_blocks(rid, to_write, done.buf, task.block_hashes))
                return handed, first_token_at
        done.buf.release()
        return handed, first_token_at

    def _count_reuse(self, prompt: list[int], local: int, pool: int, computed: int, peer: str,
                     compute_seconds: float) -> None:
        """The prefix-cache metrics of one prompt (or one pipeline stage's part of it)."""
        bs = self.settings.block_size
        QUERY_TOKENS.inc(len(prompt))
        HIT_TOKENS.labels(source="local").inc(local * bs)
        HIT_TOKENS.labels(source="peer" if peer else "pool").inc(pool * bs)
        COMPUTED_TOKENS.inc(computed)
        self.prompt_tokens += len(prompt)
        self.reused_tokens["own"] += local * bs
        self.reused_tokens["peer" if peer else "pool"] += pool * bs
        PREFILL_SECONDS.observe(compute_seconds)

    async def _run_stage(self, task: PrefillTask, msg, log) -> tuple[int, float | None]:
        """A pipeline stage before the last: compute the prompt up to ``task.stage_end`` while the
        next stage reads it live; report the compute (a sample of the cost model), keep the
        blocks. Nothing goes to the client or to decode: a stage that fails is the next stage's
        to compute, and a client never hears of it."""
        rid = task.attempt_id
        try:
            done = await self._prefill(task, log, stream=False, stage=True)
        except Exception as e:  # noqa: BLE001 - the next stage's live load fails with it and computes
            log.warning("stage_failed", error=repr(e))
            STAGES.labels(role="before", outcome="failed").inc()
            self.done.add(rid)
            await msg.ack()
            return 0, None
        computed_at = time.monotonic()
        try:
            bs = self.settings.block_size
            prompt = stage_prompt(task)
            local, past = done.local, done.pool
            reused = (local + past) * bs
            self._count_reuse(prompt, local, 0 if done.staged else past, len(prompt) - reused, done.peer,
                              done.compute_seconds)
            STAGES.labels(role="before", outcome="ok").inc()
            log.info("stage_prefilled", prompt_tokens=len(prompt), local_tokens=local * bs, past_tokens=past * bs,
                     staged=done.staged or None, compute_s=round(done.compute_seconds, 4))
            await self.nc.publish(Subjects.PREFILL_REPORT, encode(PrefillReport(
                instance_id=self.instance_id, attempt_id=rid, prompt_tokens=len(prompt), local_tokens=local * bs,
                pool_tokens=past * bs, load_bytes=0 if done.staged else past * bs * self.shape.kv_bytes_per_token(),
                load_seconds=done.load_seconds, compute_seconds=done.compute_seconds, queue_seconds=0.0,
                kv_bytes_per_token=self.shape.kv_bytes_per_token(), num_layers=self.shape.num_layers)))
            self.done.add(rid)
            await msg.ack()
            if task.block_hashes:
                await self._keep_blocks(task.block_hashes, done.kv)
        finally:
            self.spawn(self._after_stage(task, done))  # the next stage's read, then the pool write
        return 0, computed_at

    async def _after_stage(self, task: PrefillTask, done: Prefilled) -> None:
        """Hold a stage's KV until the next stage has read it, then write its blocks to the pool."""
        await self.stages.close(task.attempt_id)
        kv, bs = done.kv, self.settings.block_size
        keys = task.block_hashes[: kv.shape[3] // bs]
        writable = keys if task.pool_write_blocks < 0 else keys[: task.pool_write_blocks]
        skip = set() if done.peer and not done.staged else set(keys[done.local : done.local + done.pool])
        to_write = [k for k in writable if k not in skip]
        if to_write and self.settings.use_pool and self.write_backlog + kv.nbytes <= self.write_budget:
            self.write_backlog += kv.nbytes
            await self._store_blocks(task.attempt_id, to_write, done.buf, task.block_hashes)
        else:
            done.buf.release()

    # ---- blocks for a peer
    async def _on_peer_get(self, msg) -> None:
        """A peer's layered get of blocks in this instance's own cache: the leading run of the keys
        held here, sent as the pool sends them. Malformed requests are logged and dropped."""
        try:
            req = decode(msg.data, CacheGetRequest)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.log.warning("peer_get_dropped", error=str(e))
            return
        if not msg.reply or not req.reply_subject or not req.by_layer:
            self.log.warning("peer_get_dropped", error="a peer get is layered, with a reply subject")
            return
        self.spawn(self._serve_stage(msg, req) if req.live else self._serve_peer(msg, req))

    async def _serve_stage(self, msg, req: CacheGetRequest) -> None:
        """The next pipeline stage's live get of a stage running (or queued) here: each layer of the
        blocks asked for, as it is computed. A stage not started within the stage timeout, ended,
        or not holding those blocks answers with nothing found (the reader computes them)."""
        stage = await self.stages.find(req.live, self.settings.pipeline_stage_timeout)
        keys = list(req.keys)
        first = stage.span(keys) if stage is not None and not stage.ended else -1
        if stage is None or first < 0:
            await msg.respond(encode(CacheGetReply(found=[])))
            return
        stage.serving = True  # from here its buffer is kept until this serve ends, however long
        bs = self.settings.block_size
        try:
            await stage.known.wait()
            start = first * bs
            await serve_live_layers(msg, self.nc, req.reply_subject, keys, stage.buf, start, bs,
                                    self.shape.dtype_name, stage.reused_in(start, start + len(keys) * bs),
                                    timeout=self.settings.pipeline_stage_timeout)
        except (TransferError, Exception) as e:  # noqa: BLE001 - the reader computes what did not arrive
            self.log.warning("stage_serve_aborted", request_id=req.live, blocks=len(keys), error=repr(e))
        finally:
            stage.served.set()

    async def _serve_peer(self, msg, req: CacheGetRequest) -> None:
        held = self.blocks.peek(req.keys)
        keys = list(req.keys[: len(held)])
        self.blocks.pin(keys)  # their slots are not reused until the bytes are out
        try:
            sent = await serve_layers(msg, self.nc, req.reply_subject,
                                      [(k, block_view(k, t)) for k, t in zip(keys, held)])
            PEER_SERVED.inc(len(sent))
        except (TransferError, Exception) as e:  # noqa: BLE001 - the reader went away, or the bus did
            self.log.warning("peer_get_aborted", keys=len(keys), error=repr(e))
        finally:
            self.blocks.unpin(keys)

    # ---- hand-off to decode
    def _kv_meta(self, task: PrefillTask, length: int) -> bytes:
        shape = self.shape
        return encode(KVMeta(attempt_id=task.attempt_id, length=length, num_layers=shape.num_layers,
                             num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim, dtype=shape.dtype_name))

    async def _send_kv(self, task: PrefillTask, kv, transfer_id: str) -> None:
        """Send a computed prompt's KV (wire layout) to its decode instance. Transfer ids name the
        sender, so a prompt redone elsewhere (or sent again after a recompute) never mixes with a
        copy left half sent."""
        data = tensor_bytes(kv)
        await send_blob(self.nc, Subjects.kv(task.decode_id), transfer_id, data, self._kv_meta(task, kv.shape[3]),
                        window=HANDOFF_WINDOW_CHUNKS)

    async def _stream_kv(self, task: PrefillTask, buf: PrefillKV) -> None:
        await stream_kv(self.nc, Subjects.kv(task.decode_id), f"{task.attempt_id}@{self.instance_id}", buf,
                        self._kv_meta(task, buf.total))

    async def _publish_decode_task(self, task: PrefillTask, tokens: list[int], going: list[int], kv_len: int) -> None:
        """The decode task of the choices in ``going`` (indices into ``tokens``, the first tokens):
        one sequence, or (n > 1) a fork per choice of the one KV sent."""
        first = task.first_index
        dtask = DecodeTask(
            attempt_id=task.attempt_id,
            prompt_token_ids=task.prompt_token_ids,
            output_token_ids=[tokens[going[0]]],
            sampling=task.sampling,
            kv_len=kv_len,
            prefill_id=self.instance_id,
            resume=task.resume,
            forks=[Fork(first + i, tokens[i]) for i in going] if task.sampling.n > 1 else [],
        )
        await self.js.publish(
            Subjects.decode_task(task.decode_id), encode(dtask), headers={"Nats-Msg-Id": task.attempt_id}
        )

    # ---- keeping blocks
    async def _keep_blocks(self, keys: list[bytes], kv) -> None:
        """Own DRAM cache: every full block of the prompt, so the next request here reuses it."""
        bs = self.settings.block_size
        stored, removed = [], []
        for i, key in enumerate(keys[: kv.shape[3] // bs]):
            new, evicted = self.blocks.put(key, kv[:, :, :, i * bs : (i + 1) * bs])
            if new:
                stored.append(key)
            removed.extend(evicted)
        LOCAL_BYTES.set(self.blocks.bytes)
        LOCAL_EVICTIONS.inc(len(removed))
        if stored or removed:
            await self.events.publish(stored, removed)

    async def _store_blocks(self, rid: str, keys: list[bytes], buf: PrefillKV, chain: list[bytes]) -> None:
        """Write the prompt's full blocks that the pool lacks, off the critical path. Best effort."""
        try:
            await self._write_blocks(rid, keys, buf.kv, chain)
        finally:
            self.write_backlog -= buf.kv.nbytes
            buf.release()

    async def _write_blocks(self, rid: str, keys: list[bytes], kv, chain: list[bytes]) -> None:
        bs = self.settings.block_size
        index = {k: i for i, k in enumerate(chain[: kv.shape[3] // bs])}
        keys = [k for k in keys if k in index]
        if not keys:
            return
        try:
            present = await self.cache.exists(keys)
            missing = [(k, kv[:, :, :, index[k] * bs : (index[k] + 1) * bs])
                       for k, have in zip(keys, present) if not have]
            # each cachestore instance gets its share as a few blobs, one transaction each; with each
            # block its parent, the block before it in the prompt (the stores' eviction keeps parents)
            await self.cache.put_blocks(missing, parents={k: chain[index[k] - 1] for k, _ in missing if index[k]})
            self.log.debug("blocks_stored", request_id=rid, stored=len(missing), present=len(keys) - len(missing))
        except CacheError as e:
            self.log.warning("block_store_failed", request_id=rid, error=str(e))


def pool_write_budget(backlog_bytes: int, arena: KVArena | None) -> int:
    """Bytes of prompts' KV an instance may hold for pool writes: ``backlog_bytes``, and no more
    than half its KV arena's slab. A prompt's KV is taken from the slab; held past that, the slab
    has no range left for the next long prompt, whose buffer is then fresh memory, page-faulted in
    on the event loop before its compute starts (about a second for 100 MB on a host that hands
    freed memory back to its hypervisor), which its time to first token pays."""
    if arena is None or not arena.size:
        return backlog_bytes
    return min(backlog_bytes, arena.size // 2)


def stage_prompt(task: PrefillTask) -> list[int]:
    """The tokens a task computes to: the whole prompt, or a pipeline stage's part of it."""
    return task.prompt_token_ids[: task.stage_end] if task.stage_end else task.prompt_token_ids


def reusable_blocks(prompt_len: int, block_size: int, cap: int, scored: bool) -> int:
    """Leading blocks of a prompt worth reusing instead of computing: every full block but one
    token (at least one is computed, for the first token's logits), at most ``cap`` (-1: no cap).

    None for a prompt whose logprobs are asked for (``scored``): token ``p``'s logprob is a
    softmax of position ``p - 1``'s logits, which only that position's forward gives, and that
    forward computes the position's KV anyway. A cached copy of the KV would save nothing for
    those positions, and every position but the last is one of them."""
    if scored:
        return 0
    n = max(0, (prompt_len - 1) // block_size)
    return min(n, cap) if cap >= 0 else n


async def _cancel(fut: "asyncio.Future | None") -> None:
    """Stop a hand-off in progress (its half-sent blob is forgotten by the receiver) and wait for it."""
    if fut is None:
        return
    fut.cancel()
    with contextlib.suppress(BaseException):
        await fut
