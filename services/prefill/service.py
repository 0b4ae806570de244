"""Prefill wiring: take a task, run the prompt, stream the first token, hand KV to decode."""

from __future__ import annotations

import asyncio
import time

import msgspec

from yuebing.libs.blocks import CacheClient, CacheError
from yuebing.libs.bus import TransferError, send_blob, work_subscription
from yuebing.libs.model import sample_token
from yuebing.libs.protocol import DecodeTask, KVMeta, PrefillTask, Subjects, TokenEvent, decode, encode
from yuebing.libs.worker import ModelWorker, finish_reason


CACHE_TIMEOUT = 5.0


class PrefillService(ModelWorker):
    kind = "prefill"

    async def setup(self) -> None:
        await super().setup()
        self.cache = CacheClient(self.nc, timeout=CACHE_TIMEOUT)
        self.queued = 0
        self.queued_tokens = 0
        self.sub = await work_subscription(
            self.js, Subjects.PREFILL_STREAM, Subjects.prefill_task(self.instance_id), durable=self.instance_id
        )
        self.spawn(self._loop())

    def load(self):
        return self.heartbeat(queued=self.queued, queued_tokens=self.queued_tokens)

    async def _loop(self) -> None:
        while not self.stopping:
            msgs = await self.pull(self.sub)
            for msg in msgs:
                try:
                    task = decode(msg.data, PrefillTask)
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    self.log.warning("bad_prefill_task", error=str(e))
                    await msg.term()
                    continue
                self.queued, self.queued_tokens = 1, len(task.prompt_token_ids)
                try:
                    await self._run(task, msg)
                finally:
                    self.queued, self.queued_tokens = 0, 0

    async def _run(self, task: PrefillTask, msg) -> None:
        rid = task.request_id
        log = self.log.bind(request_id=rid)
        if rid in self.done or rid in self.aborted:
            await msg.ack()  # a redelivery of finished work, or the client has gone
            return
        started = time.monotonic()
        try:
            logits, kv = await self.compute(self.runner.prefill, task.prompt_token_ids, None, self.settings.prefill_chunk)
        except Exception as e:  # noqa: BLE001 - report, never hang the client
            log.error("prefill_failed", error=repr(e))
            await self.emit_error(rid, 0, f"prefill failed: {e}")
            await msg.ack()
            return
        prompt_len = len(task.prompt_token_ids)
        token = sample_token(logits, task.sampling, 0)
        reason = finish_reason(token, 1, task.sampling, self.shape.eos_token_ids)
        await self.emit(
            TokenEvent(request_id=rid, seq=0, token_ids=[token], finish_reason=reason, prompt_tokens=prompt_len)
        )
        log.info("prefilled", prompt_tokens=prompt_len, seconds=round(time.monotonic() - started, 4))
        if reason is None and rid not in self.aborted:
            try:
                await self._hand_off(task, token, kv)
            except (TransferError, Exception) as e:  # noqa: BLE001
                log.error("handoff_failed", decode=task.decode_id, error=repr(e))
                await self.emit_error(rid, 1, f"KV hand-off to decode failed: {e}")
        self.done.add(rid)
        await msg.ack()
        if task.block_hashes:
            self.spawn(self._store_blocks(rid, task.block_hashes, kv))

    async def _store_blocks(self, rid: str, keys: list[bytes], kv) -> None:
        """Write the prompt's full blocks to the pool, off the critical path. Best effort."""
        bs = self.settings.block_size
        keys = keys[: kv.shape[3] // bs]
        try:
            present = await self.cache.exists(keys)
            stored = 0
            for i, (key, have) in enumerate(zip(keys, present)):
                if not have:
                    await self.cache.put_block(key, kv[:, :, :, i * bs : (i + 1) * bs])
                    stored += 1
            self.log.debug("blocks_stored", request_id=rid, stored=stored, present=len(keys) - stored)
        except CacheError as e:
            self.log.warning("block_store_failed", request_id=rid, error=str(e))

    async def _hand_off(self, task: PrefillTask, token: int, kv) -> None:
        shape = self.shape
        meta = KVMeta(
            request_id=task.request_id,
            length=kv.shape[3],
            num_layers=shape.num_layers,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            dtype=shape.dtype_name,
        )
        data = memoryview(kv.numpy()).cast("B")
        await send_blob(self.nc, Subjects.kv(task.decode_id), task.request_id, data, encode(meta))
        dtask = DecodeTask(
            request_id=task.request_id,
            prompt_token_ids=task.prompt_token_ids,
            output_token_ids=[token],
            sampling=task.sampling,
            kv_len=kv.shape[3],
            prefill_id=self.instance_id,
        )
        await self.js.publish(
            Subjects.decode_task(task.decode_id), encode(dtask), headers={"Nats-Msg-Id": task.request_id}
        )
