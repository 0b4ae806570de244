"""Pieces shared by the prefill and decode workers: the model thread, tasks, token events."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import msgspec
import nats
import torch
from nats.js.errors import BadRequestError

from libs.kv.keys import namespace_digest
from libs.bus import work_subscription
from libs.config import Settings
from libs.engine.device import resolve
from libs.engine.grammar import Constraint, tokenizer_for as grammar_tokenizer
from libs.engine.modelpath import resolve_model
from libs.engine.loading import check_load_format, model_identity
from libs.log import get_logger
from libs.protocol import Abort, SamplingParams, Subjects, TokenEvent, decode, encode
from libs.service import Service

log = get_logger("worker")

class RecentIds:
    """A bounded set of request ids (done or aborted), oldest forgotten first."""

    def __init__(self, capacity: int = 10000):
        self._ids: OrderedDict[str, float] = OrderedDict()
        self._capacity = capacity

    def add(self, rid: str) -> None:
        self._ids[rid] = time.monotonic()
        self._ids.move_to_end(rid)
        while len(self._ids) > self._capacity:
            self._ids.popitem(last=False)

    def __contains__(self, rid: str) -> bool:
        return rid in self._ids


def finish_reason(token: int, n_out: int, params: SamplingParams, eos_ids: tuple[int, ...]) -> str | None:
    """Why a sequence stops after emitting ``token`` as its ``n_out``-th output token, if it does."""
    if not params.ignore_eos and token in eos_ids:
        return "stop"
    if token in params.stop_token_ids:
        return "stop"
    if n_out >= params.max_tokens:
        return "length"
    return None


ENGINES = ("model", "sim")


class _Engine:
    """The model thread and the runner on it; shared by the prefill and decode halves of a
    colocated worker (one engine does both, so a prompt holds up the decode steps)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.runner = None
        self.path = None
        self._lock = asyncio.Lock()
        # a colocated worker's prefills take turns: one chunk at a time goes to the model thread,
        # so a decode step waits for at most one chunk however many prompts are being prefilled
        self.chunk_turn = asyncio.Lock()
        self.users = 0

    async def load(self):
        async with self._lock:
            if self.runner is None:
                s = self.settings
                if s.engine not in ENGINES:
                    raise ValueError(f"unknown engine {s.engine!r}; choose one of {', '.join(ENGINES)}")
                self.path = await asyncio.to_thread(resolve_model, s.model, s.resolved_models_dir())
                check_load_format(self.path, s.load_format)
                loop = asyncio.get_running_loop()
                if s.engine == "sim":
                    from libs.engine.costnoise import CostNoise
                    from libs.engine.costs import DEFAULT as DEFAULT_PROFILE, CostProfile
                    from libs.engine.simengine import SimRunner

                    # the simulated engine computes nothing: its KV is in the configured dtype (float32
                    # for auto), and no dtype is measured for it
                    self.placement = resolve("cpu", s.dtype)
                    profile = CostProfile.load(s.calibration) if s.calibration else DEFAULT_PROFILE
                    noise = CostNoise(profile, s.sim_seed, enabled=s.sim_noise)
                    self.runner = await loop.run_in_executor(
                        self.executor, partial(SimRunner, self.path, profile, self.placement.dtype, noise=noise,
                                               instance=s.instance_id))
                else:
                    self.placement, self.runner = await loop.run_in_executor(self.executor, self._load_model)
            self.users += 1
            return self.runner

    def _load_model(self):
        """On the model thread (its cores and threads): resolve the device and dtype, then load."""
        from libs.cpus import pin_current_thread
        from libs.engine.dtypechoice import placement_for

        s = self.settings
        threads = s.threads or len(pin_current_thread(s.cpus)) or None
        if threads:
            torch.set_num_threads(threads)
        placement = placement_for(self.path, s.device, s.dtype, s.resolved_data_dir(), threads, s.load_format,
                                  announce=lambda text: log.info("dtype_measure", what=text))
        from libs.engine.runner import ModelRunner  # imports transformers: not in a simulated engine's process

        runner = ModelRunner(self.path, threads, s.cpus, device=placement.device, dtype=placement.dtype,
                             load_format=s.load_format)
        return placement, runner

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.executor.shutdown(wait=False, cancel_futures=True)


_shared_engines: dict[str, _Engine] = {}


class ModelWorker(Service):
    """A service that runs the model on one dedicated thread and streams tokens to gateways."""

    async def setup(self) -> None:
        if self.settings.colocated:
            # the prefill and decode services of one colocated worker process share one engine
            engine = _shared_engines.setdefault(self.instance_id, _Engine(self.settings))
        else:
            engine = _Engine(self.settings)
        self._engine = engine
        self._executor = engine.executor
        self.runner = await engine.load()  # a ModelRunner, or the simulated engine's SimRunner
        path = self.model_path = engine.path
        self.shape = self.runner.shape
        self.placement = engine.placement
        self.namespace = namespace_digest(model_identity(path, self.settings.load_format), self.shape.dtype_name,
                                          self.settings.block_size)
        self.aborted = RecentIds()
        self.done = RecentIds()
        await self.nc.subscribe(Subjects.ABORT, cb=self._on_abort)
        self.log.info("model_loaded", path=str(path), layers=self.shape.num_layers, engine=self.settings.engine,
                      device=self.placement.device_name, dtype=self.placement.dtype_name, why=self.placement.why,
                      load_format=self.settings.load_format,
                      threads=getattr(self.runner, "threads", None), cpus=self.settings.cpus or "any")

    def identity(self) -> dict:
        return {"kv_namespace": self.namespace.hex(), "device": self.placement.device_name,
                "dtype": self.placement.dtype_name}

    async def constraint(self, grammar: str, consumed: list[int]):
        """A sequence's structured-output constraint, after the tokens it has (the model's grammar
        vocabulary is built on first use, off the event loop)."""
        tokenizer = await asyncio.to_thread(grammar_tokenizer, self.model_path, self.shape.eos_token_ids)
        return Constraint(tokenizer, grammar, consumed)

    async def compute(self, fn, *args, **kwargs):
        """Run blocking model work on the model thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))

    async def teardown(self) -> None:
        # Drop the task subscription before the connection drains: a drain waits for every message
        # a subscription holds to be handled, and nothing fetches from a stopped instance's pull
        # subscription any more (a task that came after the last fetch is redelivered elsewhere once
        # its ack wait ends), so the drain would wait out its whole timeout.
        if getattr(self, "sub", None) is not None:
            try:
                await self.sub.unsubscribe()
            except Exception as e:  # noqa: BLE001 - the connection is closing anyway
                self.log.warning("task_unsubscribe_failed", error=str(e) or type(e).__name__)
        self._engine.release()

    async def _on_abort(self, msg) -> None:
        try:
            abort = decode(msg.data, Abort)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        self.aborted.add(abort.attempt_id)
        self.on_abort(abort.attempt_id)

    def on_abort(self, attempt_id: str) -> None:
        pass

    async def emit(self, event: TokenEvent) -> None:
        await self.nc.publish(Subjects.output(event.output_id), encode(event))

    async def emit_error(self, output_id: str, seq: int, error: str, retry: bool = False, index: int = 0) -> None:
        await self.emit(TokenEvent(output_id=output_id, seq=seq, token_ids=[], finish_reason="error", error=error,
                                   retry=retry, index=index))

    async def subscribe_tasks(self, stream: str, subject: str, wait: float = 30.0) -> None:
        """This instance's durable pull consumer on its task subject.

        A work queue allows one consumer per subject: while the conductor is moving this instance's
        tasks away (it took the instance for dead), creating the consumer fails; wait for it.
        """
        self._task_source = (stream, subject)
        deadline = time.monotonic() + wait
        while True:
            try:
                self.sub = await work_subscription(self.js, stream, subject, durable=self.instance_id,
                                                   ack_wait=self.settings.task_ack_wait)
                return
            except BadRequestError as e:
                if time.monotonic() > deadline:
                    raise
                self.log.info("task_consumer_busy", error=str(e))
                await asyncio.sleep(1.0)

    async def pull(self, batch: int = 1, timeout: float = 1.0) -> list:
        """Next tasks, or [] after ``timeout``. Survives the consumer being deleted (the conductor
        does that when it took this instance for dead) or the server restarting: it re-creates it."""
        try:
            return await self.sub.fetch(batch, timeout=timeout)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            return []
        except Exception as e:  # noqa: BLE001
            self.log.warning("task_fetch_failed", error=str(e) or type(e).__name__)
            await asyncio.sleep(1.0)
            try:
                await self.subscribe_tasks(*self._task_source)
            except Exception as e2:  # noqa: BLE001 - try again on the next pull
                self.log.warning("task_resubscribe_failed", error=str(e2) or type(e2).__name__)
            return []
