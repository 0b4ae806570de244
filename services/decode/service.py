"""Decode wiring: receive KV, join sequences to the running batch, step, stream tokens."""

from __future__ import annotations

import asyncio
import time

import msgspec
import torch

from libs.bus import BULK_PENDING_BYTES, BlobAssembler, BlobData, uninitialized
from libs.engine.arena import kv_arena_for
from libs.engine.sampling import sample_token, split_resumed_prompt
from libs.protocol import (DecodeReport, DecodeTask, KVMeta, SequenceProgress, Subjects, TokenEvent, decode,
                                   encode)
from libs.worker import ModelWorker

from services.decode.batcher import Batcher, Sequence

KV_WAIT_SECONDS = 30.0
PROGRESS_EVERY = 15.0


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
        self._recv_bufs: dict[str, BlobData] = {}  # request id -> its KV's buffer, until it joins
        alloc = self.recv_arena.take_bytes if self.recv_arena is not None else uninitialized
        self._assembler = BlobAssembler(self.nc, self._on_kv, alloc=alloc)
        await self.nc.subscribe(
            Subjects.kv(self.instance_id), cb=self._assembler.handle, pending_bytes_limit=BULK_PENDING_BYTES
        )
        await self.subscribe_tasks(Subjects.DECODE_STREAM, Subjects.decode_task(self.instance_id))
        self.spawn(self._pull_loop(), essential=True)
        self.spawn(self._engine_loop(), essential=True)
        self.spawn(self._progress_loop())

    def load(self):
        b = self.batcher
        n, seconds, rows, kv = self._steps
        self._steps = [0, 0.0, 0, 0]
        return self.heartbeat(
            queued=len(b.waiting), running=len(b.running), max_running=b.max_running, urgent_rows=b.urgent_rows,
            kv_tokens=self.batch.kv_tokens(),
            steps=n, step_seconds=seconds / n if n else 0.0, step_batch=rows / n if n else 0.0,
            step_kv_tokens=kv / n if n else 0.0,
            sequences=[SequenceProgress(s.attempt_id, len(s.output) - s.initial_outputs,
                                        max(0, s.params.max_tokens - len(s.output)), running)
                       for running, seqs in ((True, b.running.values()), (False, b.waiting))
                       for s in seqs if s.finish is None],
        )

    # ---- KV arrival
    def _on_kv(self, transfer_id: str, meta: bytes, data: BlobData) -> None:
        try:
            m = decode(meta, KVMeta)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.log.warning("bad_kv_meta", transfer_id=transfer_id, error=str(e))
            return
        rid = m.attempt_id
        if rid in self.done or rid in self.batcher.running:
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
        if rid in self.done or rid in self.aborted or rid in self.batcher.running:
            self._drop_kv(rid)
            await msg.ack()
            return
        event = self._kv_ready.setdefault(rid, asyncio.Event())
        taken_at = time.monotonic()
        try:
            await asyncio.wait_for(event.wait(), KV_WAIT_SECONDS)
            meta, data, _ = self._kv.pop(rid)
            kv = self._take_kv(meta, data)
            self._recv_bufs[rid] = data
        except (asyncio.TimeoutError, KeyError, ValueError) as e:
            log.error("kv_missing", error=repr(e))
            await self.emit_error(task.output_id, task.seq_base + len(task.output_token_ids),
                                  "decode did not receive the KV cache", retry=True)
            self._drop_kv(rid)
            await msg.ack()
            return
        finally:
            self._kv_ready.pop(rid, None)
        if rid in self.aborted:
            await msg.ack()
            return
        seq = Sequence(
            attempt_id=rid,
            params=task.sampling,
            prompt_len=len(task.prompt_token_ids),
            output=list(task.output_token_ids),
            kv=kv,
            handle=msg,
            output_id=task.output_id,
            seq_base=task.seq_base,
            joined_at=time.monotonic(),
            kv_wait=time.monotonic() - taken_at,
            initial_outputs=len(task.output_token_ids),
        )
        if task.sampling.penalized:  # the penalties look at the prompt's tokens and the earlier outputs
            seq.prompt, seq.earlier_outputs = split_resumed_prompt(task.prompt_token_ids, task.seq_base)
        self.batcher.submit(seq)
        self._wake.set()
        log.debug("decode_admitted", kv_len=task.kv_len)

    def _drop_kv(self, rid: str) -> None:
        self._kv.pop(rid, None)
        self._recv_bufs.pop(rid, None)
        self._kv_ready.pop(rid, None)

    def on_abort(self, attempt_id: str) -> None:
        seq = self.batcher.abort(attempt_id)
        if seq is not None and seq.attempt_id not in self.batcher.running:
            self.spawn(self._finish(seq))

    # ---- the engine
    def _step(self, plan):
        """On the model thread: apply joins/leaves, run one step, sample every row."""
        if plan.leaves:
            self.batch.remove(plan.leaves)
        for seq in plan.joins:
            self.batch.add(seq.attempt_id, seq.kv)  # copies it: its buffer is free again
            seq.kv = None
            data = self._recv_bufs.pop(seq.attempt_id, None)
            if data is not None and self.recv_arena is not None:
                self.recv_arena.give_bytes(data)
        if not plan.rows:
            return []
        kv = self.batch.kv_tokens()
        by_id = {s.attempt_id: s for s in plan.rows}
        rows = [by_id[rid] for rid in self.batch.ids]  # the batch keeps its own row order
        assert len(rows) == len(by_id)
        logits = self.batch.step([s.output[-1] for s in rows])
        tokens = {s.attempt_id: sample_token(logits[i], s.params, s.next_seq, *s.penalty_history())
                  for i, s in enumerate(rows)}
        self._step_kv = kv
        return [tokens[s.attempt_id] for s in plan.rows]

    async def drain(self) -> None:
        """Finish running sequences for up to ``drain_seconds``; hand the rest back: each gets a
        retryable error event, on which its gateway resumes it on another instance."""
        # an instance whose engine loop died finishes nothing more: hand everything back at once
        deadline = time.monotonic() + (0.0 if self.failed.is_set() else self.settings.drain_seconds)
        while (self.batcher.running or self.batcher.waiting) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self.batcher.running.values()) + list(self.batcher.waiting)
        for seq in left:
            self.batcher.abort(seq.attempt_id)
            await self.emit_error(seq.output_id, seq.next_seq, "decode instance is shutting down", retry=True)
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
                tokens = await self.compute(self._step, plan)
            except Exception as e:  # noqa: BLE001 - fail the batch's requests, keep serving
                self.log.error("decode_step_failed", error=repr(e), exc_info=True)
                for seq in plan.rows:
                    await self.emit_error(seq.output_id, seq.next_seq, f"decode step failed: {e}", retry=True)
                    self.batcher.abort(seq.attempt_id)
                    await self._ack(seq)
                self.batch = self.runner.new_batch()
                self.batcher.plan()
                continue
            finished = {s.attempt_id for s in self.batcher.record(plan.rows, tokens)}
            for seq, tok in zip(plan.rows, tokens):
                if seq.finish == "abort":
                    continue
                await self.emit(
                    TokenEvent(
                        output_id=seq.output_id,
                        seq=seq.next_seq - 1,
                        token_ids=[tok],
                        finish_reason=seq.finish if seq.attempt_id in finished else None,
                    )
                )
                if seq.attempt_id in finished:
                    await self._finish(seq)
            for seq in plan.rows:
                if seq.finish == "abort":
                    await self._finish(seq)
            if plan.rows:
                st = self._steps
                st[0] += 1
                st[1] += time.perf_counter() - started
                st[2] += len(plan.rows)
                st[3] += self._step_kv

    async def _finish(self, seq: Sequence) -> None:
        self.done.add(seq.attempt_id)
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

    @staticmethod
    async def _ack(seq: Sequence) -> None:
        if seq.handle is not None:
            handle, seq.handle = seq.handle, None
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
