"""Decode wiring: receive KV, join sequences to the running batch, step, stream tokens, and write
each sequence's full blocks back to the pool as they fill (``writeback.py``)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import msgspec
import torch
from prometheus_client import Counter, Gauge, Histogram

from libs.bus import BULK_PENDING_BYTES, BlobAssembler, BlobData, uninitialized
from libs.kv.client import CacheClient, CacheError
from libs.engine.arena import kv_arena_for
from libs.engine.logprobs import logprobs_rows
from libs.engine.grammar import GrammarError
from libs.engine.sampling import sample_token, split_resumed_prompt
from libs.protocol import (DecodeReport, DecodeTask, KVMeta, SequenceProgress, Subjects, TokenEvent, decode,
                                   encode)
from libs.worker import ModelWorker

from services.decode.batcher import Batcher, Group, Sequence, fork_ids
from services.decode.writeback import Chain

KV_WAIT_SECONDS = 30.0
PROGRESS_EVERY = 15.0
CACHE_TIMEOUT = 5.0

WRITTEN_BLOCKS = Counter("yuebing:decode_pool_written_blocks", "Blocks of prompts and outputs decode wrote to the pool")
WRITE_SKIPPED = Counter("yuebing:decode_pool_write_skipped_blocks",
                        "Blocks decode did not write to the pool, by why: budget (the backlog of blocks on "
                        "their way was full), failed (the pool refused or did not answer)", ["reason"])

# vLLM's names where it has one: its running and waiting requests are a batch's rows and its queue
RUNNING = Gauge("yuebing:num_requests_running", "Sequences in the running decode batch (its rows)")
WAITING = Gauge("yuebing:num_requests_waiting", "Sequences with their KV in hand, waiting for a row of the batch")
KV_TOKENS = Gauge("yuebing:decode_kv_tokens", "KV positions the running batch holds")
KV_USAGE = Gauge("yuebing:kv_cache_usage_perc", "KV positions the running batch holds, as a fraction of the most it "
                 "can hold: its rows (max_running + urgent_rows) at the model's whole context; 1 = full")
STEP_SECONDS = Histogram("yuebing:decode_step_seconds", "One decode step: planning, the batch's forward, sampling "
                         "and emitting its tokens (the gap between two tokens of a sequence it holds)",
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                                  0.75, 1.0, 2.5))
ITERATION_TOKENS = Histogram("yuebing:iteration_tokens_total", "Tokens per decode step: its batch size, a token per row",
                             buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
HANDBACKS = Counter("yuebing:decode_handbacks", "Sequences handed back to their gateway, which resumes them "
                    "elsewhere (nothing preempts a row here), by reason: drain (stopping), step_failed, kv_missing",
                    ["reason"])


class DecodeService(ModelWorker):
    kind = "decode"
    streams = (Subjects.DECODE_STREAM,)

    async def setup(self) -> None:
        await super().setup()
        self.batch = self.runner.new_batch()
        # since the last heartbeat: steps, seconds, rows, KV positions. A step's seconds are its whole
        # round of the engine loop (plan, compute, emitting the tokens), i.e. the gap between two
        # tokens of a sequence it holds: what the conductor's decode cost model predicts
        self._steps = [0, 0.0, 0, 0]
        self._step_kv = 0  # KV positions of the last step's batch
        self.batcher = Batcher(self.settings.max_running, self.shape.eos_token_ids, self.settings.urgent_rows)
        self._kv: dict[str, tuple[KVMeta, BlobData, float]] = {}  # request id -> KV waiting for its task
        self._kv_ready: dict[str, asyncio.Event] = {}
        self._wake = asyncio.Event()
        # received KV is written into ranges of a slab paged in at start, given back once the
        # sequence joined the batch (a fresh buffer of tens of MB per hand-off is page-faulted in
        # on the event loop)
        s = self.settings
        self.recv_arena = kv_arena_for(self.shape, s.decode_kv_arena_bytes) if s.decode_kv_arena_bytes else None
        if self.recv_arena is not None:
            await asyncio.to_thread(self.recv_arena.commit)  # its slab paged in now, not under load
            self.track_arena("decode", self.recv_arena)
        # request id -> [its KV's buffer, sequences yet to join from it] (a task's forks share one)
        self._recv_bufs: dict[str, list] = {}
        self._groups: dict[str, Group] = {}  # attempt id -> its forks (n > 1) still running
        alloc = self.recv_arena.take_bytes if self.recv_arena is not None else uninitialized
        self._assembler = BlobAssembler(self.nc, self._on_kv, alloc=alloc)
        await self.nc.subscribe(
            Subjects.kv(self.instance_id), cb=self._assembler.handle, pending_bytes_limit=BULK_PENDING_BYTES
        )
        await self.subscribe_tasks(Subjects.DECODE_STREAM, Subjects.decode_task(self.instance_id))
        # each sequence's full blocks go back to the pool as they fill: the next turn of a chat, or
        # this request resumed elsewhere, loads them instead of recomputing them
        self.cache = None
        if s.use_pool and s.decode_write_back:
            self.cache = CacheClient(self.nc, timeout=CACHE_TIMEOUT, replicas=s.cache_replicas)
            await self.cache.start()
        self.write_backlog = 0  # bytes of blocks on their way to the pool
        self._step_blocks: list = []  # (sequence, its first block due, blocks due, their KV) of the last step
        self._export_load()
        self.spawn(self._pull_loop(), essential=True)
        self.spawn(self._engine_loop(), essential=True)
        self.spawn(self._progress_loop())

    async def teardown(self) -> None:
        if self.cache is not None:
            await self.cache.close()
        await super().teardown()

    def load(self):
        b = self.batcher
        n, seconds, rows, kv = self._steps
        self._steps = [0, 0.0, 0, 0]
        held = self.batch.kv_tokens()
        return self.heartbeat(
            queued=len(b.waiting), running=len(b.running), max_running=b.max_running, urgent_rows=b.urgent_rows,
            kv_tokens=held, kv_bytes=held * self.shape.kv_bytes_per_token(),
            steps=n, step_seconds=seconds / n if n else 0.0, step_batch=rows / n if n else 0.0,
            step_kv_tokens=kv / n if n else 0.0,
            sequences=[SequenceProgress(s.attempt_id, len(s.output) - s.initial_outputs,
                                        max(0, s.params.max_tokens - len(s.output)), running)
                       for running, seqs in ((True, b.running.values()), (False, b.waiting))
                       for s in seqs if s.finish is None],
        )

    def _export_load(self) -> None:
        """The batch's gauges, read when scraped (from the metrics server's thread: sizes only)."""
        b = self.batcher
        rows = (b.max_running + b.urgent_rows) * self.shape.max_context
        RUNNING.set_function(lambda: len(b.running))
        WAITING.set_function(lambda: len(b.waiting))
        KV_TOKENS.set_function(lambda: self.batch.kv_tokens())
        KV_USAGE.set_function(lambda: self.batch.kv_tokens() / rows if rows else 0.0)

    # ---- KV arrival
    def _on_kv(self, transfer_id: str, meta: bytes, data: BlobData) -> None:
        try:
            m = decode(meta, KVMeta)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.log.warning("bad_kv_meta", transfer_id=transfer_id, error=str(e))
            return
        rid = m.attempt_id
        if rid in self.done or rid in self.batcher.running or rid in self._groups:
            return  # a second copy (the prefill was redone after a failure)
        self._kv[rid] = (m, data, time.monotonic())
        self._kv_ready.setdefault(rid, asyncio.Event()).set()

    def _take_kv(self, meta: KVMeta, data: BlobData) -> torch.Tensor:
        s = self.shape
        if (meta.num_layers, meta.num_kv_heads, meta.head_dim, meta.dtype) != (
            s.num_layers, s.num_kv_heads, s.head_dim, s.dtype_name
        ):
            raise ValueError(f"KV shape {meta} does not match this model")
        t = torch.frombuffer(data, dtype=s.dtype)
        return t.view(s.kv_dims(meta.length))

    # ---- tasks
    async def _pull_loop(self) -> None:
        # every task is taken up at once and queued by the batcher, which orders the rows
        while not self.stopping:
            for msg in await self.pull():
                try:
                    task = decode(msg.data, DecodeTask)
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    self.log.warning("bad_decode_task", error=str(e))
                    await msg.term()
                    continue
                self.spawn(self._admit(task, msg))

    async def _admit(self, task: DecodeTask, msg) -> None:
        rid = task.attempt_id
        log = self.log.bind(request_id=rid)
        if rid in self.done or rid in self.aborted or rid in self.batcher.running or rid in self._groups:
            self._drop_kv(rid)
            await msg.ack()
            return
        event = self._kv_ready.setdefault(rid, asyncio.Event())
        taken_at = time.monotonic()
        try:
            await asyncio.wait_for(event.wait(), KV_WAIT_SECONDS)
            meta, data, _ = self._kv.pop(rid)
            kv = self._take_kv(meta, data)
        except (asyncio.TimeoutError, KeyError, ValueError) as e:
            log.error("kv_missing", error=repr(e))
            HANDBACKS.labels(reason="kv_missing").inc()
            await self.emit_error(task.output_id, task.seq_base + len(task.output_token_ids),
                                  "decode did not receive the KV cache", retry=True)
            self._drop_kv(rid)
            await msg.ack()
            return
        finally:
            self._kv_ready.pop(rid, None)
        if rid in self.aborted:
            if self.recv_arena is not None:
                self.recv_arena.give_bytes(data)
            await msg.ack()
            return
        # one sequence, or (n > 1) a fork per choice that goes on: each copies the one KV into its row
        if task.forks:  # not those whose client already has all it wants of them (a stop string)
            starts = [(f.index, [f.token], task.sampling.choice(f.index)) for f in task.forks
                      if f"{rid}#{f.index}" not in self.aborted]
        else:
            starts = [(task.first_index, list(task.output_token_ids), task.sampling)]
        if not starts:
            if self.recv_arena is not None:
                self.recv_arena.give_bytes(data)
            await msg.ack()
            return
        ids = fork_ids(rid, [index for index, _, _ in starts])
        group = Group(rid, {index: sid for (index, _, _), sid in zip(starts, ids)}) if task.forks else None
        if group is not None:
            self._groups[rid] = group
        self._recv_bufs[rid] = [data, len(ids)]
        sampling = task.sampling
        history = (split_resumed_prompt(task.prompt_token_ids, task.seq_base)
                   if sampling.penalized or sampling.grammar is not None else None)
        constraints = {}
        if sampling.grammar is not None:  # each sequence's place in the grammar, after its output so far
            try:
                for index, output, _ in starts:
                    constraints[index] = await self.constraint(sampling.grammar, history[1] + output)
            except ValueError as e:
                log.error("grammar_failed", error=str(e))
                await self.emit_error(task.output_id, task.seq_base + len(task.output_token_ids),
                                      f"structured output failed: {e}")
                if self.recv_arena is not None:
                    self.recv_arena.give_bytes(data)
                await msg.ack()
                return
        # the prompt's chain, hashed once for the task's forks
        chain = (Chain.start(task.prompt_token_ids, self.settings.block_size, self.namespace)
                 if self.cache is not None else None)
        now = time.monotonic()
        for sid, (index, output, params) in zip(ids, starts):
            seq = Sequence(
                attempt_id=sid,
                params=params,
                prompt_len=len(task.prompt_token_ids),
                output=output,
                kv=kv,
                handle=msg,
                output_id=task.output_id,
                seq_base=task.seq_base,
                joined_at=now,
                kv_wait=now - taken_at,
                initial_outputs=len(output),
                index=index,
                group=group,
                kv_key=rid,
                constraint=constraints.get(index),
                chain=replace(chain) if chain is not None else None,  # the forks part after the prompt
            )
            if history is not None and sampling.penalized:  # the penalties look at the prompt's tokens and the earlier outputs
                seq.prompt, seq.earlier_outputs = history
            self.batcher.submit(seq)
        self._wake.set()
        log.debug("decode_admitted", kv_len=task.kv_len, sequences=len(ids))

    def _drop_kv(self, rid: str) -> None:
        self._kv.pop(rid, None)
        self._recv_bufs.pop(rid, None)
        self._kv_ready.pop(rid, None)

    def _release_kv(self, seq: Sequence) -> None:
        """``seq`` no longer needs its received KV (joined: copied into its row; or leaving before
        it joined); the buffer goes back to the arena once no fork of its task needs it."""
        key, seq.kv_key, seq.kv = seq.kv_key, "", None
        entry = self._recv_bufs.get(key) if key else None
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self._recv_bufs[key]
            if self.recv_arena is not None:
                self.recv_arena.give_bytes(entry[0])

    def on_abort(self, attempt_id: str) -> None:
        """Abort a sequence, every fork of a task (its attempt id) or one fork (``<attempt>#<choice>``)."""
        group = self._groups.get(attempt_id.rpartition("#")[0] or attempt_id) or self._groups.get(attempt_id)
        ids = group.sequences(attempt_id) if group is not None else None
        for sid in ids if ids is not None else [attempt_id]:
            seq = self.batcher.abort(sid)
            if seq is not None and seq.attempt_id not in self.batcher.running:
                self.spawn(self._finish(seq))

    # ---- the engine
    def _step(self, plan):
        """On the model thread: apply joins/leaves, run one step, sample every row."""
        if plan.leaves:
            self.batch.remove(plan.leaves)
        for seq in plan.joins:
            # copies it: its buffer is free again once the step is over (``_release_kv``)
            self.batch.add(seq.attempt_id, seq.kv)
        if not plan.rows:
            return [], None
        kv = self.batch.kv_tokens()
        by_id = {s.attempt_id: s for s in plan.rows}
        rows = [by_id[rid] for rid in self.batch.ids]  # the batch keeps its own row order
        assert len(rows) == len(by_id)
        logits = self.batch.step([s.output[-1] for s in rows])
        tokens = {s.attempt_id: self._sample(logits[i], s) for i, s in enumerate(rows)}
        self._step_kv = kv
        self._step_blocks = self._blocks_due(rows)
        # log-probabilities only for the rows that asked: nothing more for a batch where none did
        asked = [i for i, s in enumerate(rows) if s.params.logprobs is not None]
        if not asked:
            return [tokens[s.attempt_id] for s in plan.rows], None
        got = logprobs_rows(logits[asked], [tokens[rows[i].attempt_id] for i in asked],
                            [rows[i].params.logprobs for i in asked])
        lps = {rows[i].attempt_id: lp for i, lp in zip(asked, got)}
        return [tokens[s.attempt_id] for s in plan.rows], [lps.get(s.attempt_id) for s in plan.rows]

    def _blocks_due(self, rows: list[Sequence]) -> list:
        """On the model thread, after a step: the KV of the blocks the step completed, per sequence."""
        due = []
        bs = self.settings.block_size
        for s, length in zip(rows, self.batch.lengths):
            chain = s.chain
            n = chain.due(length) if chain is not None else 0
            if n:
                start = chain.next_block * bs
                due.append((s, n, self.batch.block_kv(s.attempt_id, start, start + n * bs)))
        return due

    def _write_blocks(self, due: list) -> None:
        """Send the blocks a step completed to the pool, off the engine loop's path, within the
        backlog budget; a sequence that loses a block writes none after it (unreachable then)."""
        items, parents, sequences, nbytes = [], {}, [], 0
        bs = self.settings.block_size
        for seq, n, kv in due:
            blocks = seq.chain.take(n, seq.output)
            if self.write_backlog + kv.nbytes > self.settings.pool_write_backlog_bytes:
                seq.chain.stopped = True
                WRITE_SKIPPED.labels(reason="budget").inc(len(blocks))
                continue
            for i, (_, key, parent) in enumerate(blocks):
                items.append((key, kv[:, :, :, i * bs : (i + 1) * bs]))
                if parent is not None:
                    parents[key] = parent
            sequences.append(seq)
            nbytes += kv.nbytes
            self.write_backlog += kv.nbytes
        if items:
            self.spawn(self._put_blocks(items, parents, sequences, nbytes))

    async def _put_blocks(self, items: list, parents: dict, sequences: list[Sequence], nbytes: int) -> None:
        try:
            await self.cache.put_blocks(items, parents=parents)
            WRITTEN_BLOCKS.inc(len(items))
        except CacheError as e:
            for seq in sequences:
                seq.chain.stopped = True
            WRITE_SKIPPED.labels(reason="failed").inc(len(items))
            self.log.warning("decode_pool_write_failed", blocks=len(items), error=str(e))
        finally:
            self.write_backlog -= nbytes

    def _sample(self, logits, seq: Sequence) -> int:
        """One row's next token; a structured output's among those its grammar allows."""
        if seq.constraint is None:
            return sample_token(logits, seq.params, seq.next_seq, *seq.penalty_history())
        token = sample_token(logits, seq.params, seq.next_seq, *seq.penalty_history(),
                             allowed=seq.constraint.allowed(logits.shape[-1]))
        try:
            seq.constraint.advance(token)
        except GrammarError as e:  # cannot happen for a token drawn from the allowed ones
            self.log.error("grammar_rejected_token", request_id=seq.attempt_id, error=str(e))
            token = self.shape.eos_token_ids[0]
        return token

    async def drain(self) -> None:
        """Finish running sequences for up to ``drain_seconds``; hand the rest back: each gets a
        retryable error event, on which its gateway resumes it on another instance."""
        # an instance whose engine loop died finishes nothing more: hand everything back at once
        deadline = time.monotonic() + (0.0 if self.failed.is_set() else self.settings.drain_seconds)
        while (self.batcher.running or self.batcher.waiting) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self.batcher.running.values()) + list(self.batcher.waiting)
        HANDBACKS.labels(reason="drain").inc(len(left))
        for seq in left:
            self.batcher.abort(seq.attempt_id)
            await self.emit_error(seq.output_id, seq.next_seq, "decode instance is shutting down", retry=True,
                                  index=seq.index)
            await self._finish(seq)
        if left:
            self.log.info("drain_handed_back", sequences=len(left))

    async def _engine_loop(self) -> None:
        while not self.stopping or self.batcher.running or self.batcher.waiting:
            if not self.batcher.running and not self.batcher.waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            started = time.perf_counter()
            plan = self.batcher.plan()
            for seq in plan.joins:
                seq.row_at = time.monotonic()
            try:
                tokens, lps = await self.compute(self._step, plan)
            except Exception as e:  # noqa: BLE001 - fail the batch's requests, keep serving
                self.log.error("decode_step_failed", error=repr(e), exc_info=True)
                HANDBACKS.labels(reason="step_failed").inc(len(plan.rows))
                for seq in plan.joins:
                    self._release_kv(seq)
                for seq in plan.rows:
                    await self.emit_error(seq.output_id, seq.next_seq, f"decode step failed: {e}", retry=True,
                                          index=seq.index)
                    self.batcher.abort(seq.attempt_id)
                    await self._ack(seq)
                self.batch = self.runner.new_batch()
                self.batcher.plan()
                continue
            for seq in plan.joins:
                self._release_kv(seq)
            if self._step_blocks:
                due, self._step_blocks = self._step_blocks, []
                self._write_blocks(due)
            finished = {s.attempt_id for s in self.batcher.record(plan.rows, tokens)}
            stepped = time.monotonic()
            for k, (seq, tok) in enumerate(zip(plan.rows, tokens)):
                if seq.finish == "abort":
                    continue
                first = len(seq.output) - seq.initial_outputs == 1  # its first token made here
                await self.emit(
                    TokenEvent(
                        output_id=seq.output_id,
                        seq=seq.next_seq - 1,
                        token_ids=[tok],
                        finish_reason=seq.finish if seq.attempt_id in finished else None,
                        index=seq.index,
                        logprobs=[lps[k]] if lps is not None and lps[k] is not None else None,
                        since_kv_seconds=stepped - seq.joined_at if first and seq.joined_at else None,
                    )
                )
                if seq.attempt_id in finished:
                    await self._finish(seq)
            for seq in plan.rows:
                if seq.finish == "abort":
                    await self._finish(seq)
            if plan.rows:
                seconds = time.perf_counter() - started
                st = self._steps
                st[0] += 1
                st[1] += seconds
                st[2] += len(plan.rows)
                st[3] += self._step_kv
                STEP_SECONDS.observe(seconds)
                ITERATION_TOKENS.observe(len(plan.rows))

    async def _finish(self, seq: Sequence) -> None:
        self.done.add(seq.attempt_id)
        self._release_kv(seq)  # one that leaves before joining (aborted while waiting for a row)
        await self._ack(seq)
        if seq.joined_at:
            now = time.monotonic()
            report = DecodeReport(instance_id=self.instance_id, attempt_id=seq.attempt_id,
                                  output_tokens=len(seq.output) - seq.initial_outputs,
                                  seconds=now - seq.joined_at, finish_reason=seq.finish or "",
                                  waited_seconds=(seq.row_at or now) - seq.joined_at)
            seq.joined_at = 0.0  # reported once
            self.log.info("decoded", request_id=seq.attempt_id, output_tokens=report.output_tokens,
                          finish=report.finish_reason, kv_wait_s=round(seq.kv_wait, 4),
                          row_wait_s=round(report.waited_seconds, 4), seconds=round(report.seconds, 4))
            try:
                await self.nc.publish(Subjects.DECODE_REPORT, encode(report))
            except Exception as e:  # noqa: BLE001 - a lost report only blurs the conductor's projection
                self.log.warning("decode_report_failed", error=str(e))

    async def _ack(self, seq: Sequence) -> None:
        """Ack ``seq``'s task message; a fork's, once the last fork of its task is finished."""
        if seq.handle is not None:
            handle, seq.handle = seq.handle, None
            group = seq.group
            if group is not None:
                if not group.leave(seq.attempt_id):
                    return  # other forks of the task still run
                self._groups.pop(group.attempt_id, None)
                self.done.add(group.attempt_id)
            try:
                await handle.ack()
            except Exception:  # noqa: BLE001 - already acked or connection gone; redelivery is idempotent
                pass

    async def _progress_loop(self) -> None:
        """Keep long-running sequences' task messages from being redelivered; drop KV whose task
        never came (its prefill failed after sending it, and the request went elsewhere)."""
        while not self.stopping:
            await asyncio.sleep(min(PROGRESS_EVERY, self.settings.task_ack_wait / 3))
            now = time.monotonic()
            for rid in [r for r, (_, _, t) in self._kv.items() if now - t > 4 * KV_WAIT_SECONDS]:
                self._drop_kv(rid)
                self.log.warning("kv_dropped_unclaimed", request_id=rid)
            for seq in list(self.batcher.running.values()) + list(self.batcher.waiting):
                if seq.handle is not None:
                    try:
                        await seq.handle.in_progress()
                    except Exception:  # noqa: BLE001
                        pass
