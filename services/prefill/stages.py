"""The pipeline stages a prefill instance is computing, for the next stage to read live.

A long prompt split over several instances (chunked pipeline parallelism) runs as one task per
stage. A stage before the last registers its KV buffer here when it starts; the next stage's live
get (``CacheGetRequest.live``) finds it, waiting for it while the stage is still queued, and is
sent each layer as it is computed (``libs.kv.layers.serve_live_layers``). The stage keeps its
buffer until that get is over, or until ``hold_seconds`` pass without one (the next stage's
instance died, or gave up and computed the prompt itself).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from libs.engine.prefill_kv import PrefillKV


@dataclass
class Stage:
    buf: PrefillKV
    keys: list[bytes]  # the prompt's blocks up to the stage's end, in order
    # positions from the start the stage reused from a cache rather than computed (its own DRAM,
    # the pool, or, through its own live past, the stages before it); ``known`` once settled
    reused_tokens: int = 0
    known: asyncio.Event = field(default_factory=asyncio.Event)
    served: asyncio.Event = field(default_factory=asyncio.Event)
    serving: bool = False  # the next stage's get is being served: the buffer is read
    ended: bool = False  # forgotten here: a get that found it before must not read its buffer

    def reused_in(self, start: int, end: int) -> int:
        """Of positions ``[start, end)``, how many came from a cache."""
        return max(0, min(self.reused_tokens, end) - start)

    def span(self, keys: list[bytes]) -> int:
        """Where ``keys`` start among the stage's blocks (-1: they are not a run of them)."""
        if not keys or keys[0] not in self.keys:
            return -1
        first = self.keys.index(keys[0])
        return first if self.keys[first : first + len(keys)] == keys else -1


class LiveStages:
    """Stages by task id; those ended are remembered a while so a late get is answered at once."""

    def __init__(self, hold_seconds: float, remember: int = 1024):
        self.hold_seconds = hold_seconds
        self._stages: dict[str, Stage] = {}
        self._opened: dict[str, asyncio.Event] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._remember = remember

    def open(self, attempt_id: str, buf: PrefillKV, keys: list[bytes]) -> Stage:
        stage = self._stages[attempt_id] = Stage(buf, list(keys))
        self._opened.setdefault(attempt_id, asyncio.Event()).set()
        return stage

    async def find(self, attempt_id: str, timeout: float) -> Stage | None:
        """The stage, once it has started (None: it ended, or did not start within ``timeout``)."""
        if attempt_id in self._ended:
            return None
        opened = self._opened.setdefault(attempt_id, asyncio.Event())
        try:
            await asyncio.wait_for(opened.wait(), timeout)
        except asyncio.TimeoutError:
            if not self._stages.get(attempt_id):
                self._opened.pop(attempt_id, None)
            return None
        return self._stages.get(attempt_id)

    async def close(self, attempt_id: str) -> None:
        """The stage's compute is over: wait for the next stage's get to end (for ``hold_seconds``
        if none has begun; a get under way reads the buffer to its end, bounded by its own
        timeouts), then forget it (its buffer is the caller's again)."""
        stage = self._stages.get(attempt_id)
        if stage is not None:
            stage.known.set()
            try:
                await asyncio.wait_for(stage.served.wait(), self.hold_seconds)
            except asyncio.TimeoutError:
                if stage.serving:
                    await stage.served.wait()
        self.end(attempt_id)

    def end(self, attempt_id: str) -> None:
        """Forget the stage now (it failed, or was never started here)."""
        stage = self._stages.pop(attempt_id, None)
        if stage is not None:
            stage.ended = True
            stage.known.set()
        opened = self._opened.pop(attempt_id, None)
        if opened is not None:
            opened.set()  # a get still waiting finds it ended
        self._ended[attempt_id] = None
        while len(self._ended) > self._remember:
            self._ended.popitem(last=False)
