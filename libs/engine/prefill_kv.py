"""One request's KV during its prefill: a preallocated buffer whose past may still be arriving
(a pool load streamed layer by layer) while its layers are computed and leave for decode."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import torch

from libs.engine.arena import KVArena

if TYPE_CHECKING:
    from libs.engine.loading import ModelShape
    from libs.engine.offload import LayerOffload


class PastNotLoaded(RuntimeError):
    """The past of a ``PrefillKV`` did not arrive (the load failed or timed out)."""


class PrefillKV:
    """One request's KV during its prefill: ``kv`` in the wire layout ``[L, 2, H, total, D]``,
    preallocated for the whole prompt. Positions ``[0, past_len)`` are the reused past, the rest
    the layers write as they compute.

    The past may be filled while the prompt runs (a pool load streamed layer by layer): the loader
    calls ``layer_ready(i)`` once layer ``i``'s past is in place, or ``fail`` when it cannot be, and
    the model thread waits in ``wait_layer(i)`` before layer ``i`` first reads it. A buffer made
    with its past already copied in is ready throughout.

    The other way round, the model marks each layer ``computed`` once its last new position is
    written, so the request's KV can leave for decode layer by layer while the later layers still
    run (layer ``i``'s bytes are one contiguous range of ``kv``). A layer is ``sendable`` when it is
    computed and the whole past is verified: a pool past counts only once every block's checksum has
    checked, so bytes computed over a past that later proves corrupt never leave. ``watch`` sets a
    callback for every change of state (called on the thread that made it).

    On a GPU (``offload`` given), ``kv`` is pinned host memory and the model computes in ``dev``, a
    GPU buffer of the same layout: each layer's past goes up just before the layer first reads it,
    and each computed layer comes down on its own stream (``libs.engine.offload``); a layer counts
    as computed once its bytes are in ``kv``. On a CPU ``dev`` is ``kv``.
    """

    def __init__(self, kv: torch.Tensor, past_len: int, *, ready: bool = True, timeout: float = 30.0,
                 arena: KVArena | None = None, storage: torch.Tensor | None = None,
                 offload: "LayerOffload | None" = None):
        self.kv = kv
        self._offload = offload
        self.dev = kv if offload is None else torch.empty(kv.shape, dtype=kv.dtype, device=offload.device)
        self._arena, self._storage = arena, storage  # where ``release`` returns kv's memory
        self.past_len = past_len
        self.total = kv.shape[3]
        self.timeout = timeout
        layers = kv.shape[0]
        self._cond = threading.Condition()
        self.layers = layers
        self._ready = layers if ready else 0  # layers 0.._ready-1 are in place (layers arrive in order)
        self._computed = 0  # layers 0.._computed-1 hold every new position
        self._error: str | None = None
        self._watchers: list = []
        self.waited = 0.0  # seconds the model spent waiting for the past

    @classmethod
    def with_past(cls, shape: "ModelShape", new_tokens: int, past=None, pending: int = 0, *,
                  arena: KVArena | None = None, offload: "LayerOffload | None" = None) -> "PrefillKV":
        """A buffer for ``past`` (copied in: a KV tensor or blocks), then ``pending`` past positions
        still to arrive (a loader fills them and releases the layers), then ``new_tokens``; taken
        from ``arena`` when given (``release`` gives it back), pinned when ``offload`` is given."""
        blocks = [] if past is None else ([past] if isinstance(past, torch.Tensor) else list(past))
        have = sum(b.shape[3] for b in blocks)
        dims = shape.kv_dims(have + pending + new_tokens)
        storage = None
        if offload is not None:
            arena = None
            kv = torch.empty(dims, dtype=shape.dtype, pin_memory=True)
        elif arena is not None:
            storage, kv = arena.take(dims, shape.dtype)
        else:
            kv = torch.empty(dims, dtype=shape.dtype)
        off = 0
        for b in blocks:
            kv[:, :, :, off : off + b.shape[3]] = b
            off += b.shape[3]
        return cls(kv, have + pending, ready=pending == 0, arena=arena, storage=storage, offload=offload)

    def release(self) -> None:
        """Nothing reads or writes ``kv`` any more (the model, a loader, a hand-off, a pool
        write): its memory may serve the next prompt. Idempotent; ``kv`` must not be used after."""
        arena, storage = self._arena, self._storage
        self._arena = self._storage = None
        if arena is not None and storage is not None:
            arena.give(storage)

    def watch(self, callback) -> None:
        """Call ``callback()`` (no arguments, on the changing thread) whenever layers become ready,
        computed, or the buffer fails (every callback set, in turn)."""
        self._watchers.append(callback)
        callback()

    def _changed(self) -> None:
        for callback in self._watchers:
            callback()

    def layer_ready(self, upto: int) -> None:
        """Layers ``0..upto-1`` hold their past."""
        with self._cond:
            self._ready = max(self._ready, upto)
            self._cond.notify_all()
        self._changed()

    def layer_computed(self, index: int) -> None:
        """Layer ``index`` (and every layer before it) holds all its new positions."""
        with self._cond:
            self._computed = max(self._computed, index + 1)
            self._cond.notify_all()
        self._changed()

    def layer_written(self, index: int) -> None:
        """The model wrote layer ``index``'s last position (in ``dev``): on a CPU it is computed
        now; on a GPU once its copy to host memory is done."""
        if self._offload is None:
            self.layer_computed(index)
        else:
            self._offload.copy_layer(self, index)

    def upload_past(self, index: int) -> None:
        """Layer ``index``'s past, in place in ``kv``, into ``dev`` (a GPU; nothing on a CPU)."""
        if self.dev is not self.kv and self.past_len:
            self.dev[index, :, :, : self.past_len].copy_(self.kv[index, :, :, : self.past_len], non_blocking=True)

    def wait_offloaded(self) -> None:
        """Block until every layer is in ``kv`` (a GPU) or the buffer failed."""
        if self._offload is None:
            return
        with self._cond:
            self._cond.wait_for(lambda: self._computed >= self.layers or self._error is not None)
        if self._error is not None:
            raise PastNotLoaded(self._error)

    def drop_device(self) -> None:
        """Free the GPU copy once the prompt has run (copies in flight keep their memory)."""
        if self.dev is not self.kv:
            self.dev = None

    def computed_layers(self) -> int:
        """Leading layers that hold every new position (their past was in place when they ran)."""
        with self._cond:
            return self._computed

    def sendable_layers(self) -> int:
        """Leading layers whose bytes are final: computed, over a past that is all verified."""
        with self._cond:
            if self._error is not None or self._ready < self.layers:
                return 0
            return self._computed

    def fail(self, error: str) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()
        self._changed()

    @property
    def failed(self) -> str | None:
        return self._error

    def wait_layer(self, index: int) -> None:
        if self.past_len == 0 or self._ready > index:
            return
        started = time.monotonic()
        try:
            with self._cond:
                if not self._cond.wait_for(lambda: self._ready > index or self._error is not None, self.timeout):
                    raise PastNotLoaded(f"the past of layer {index} did not arrive within {self.timeout}s")
                if self._ready <= index:
                    raise PastNotLoaded(self._error or "the past did not arrive")
        finally:
            self.waited += time.monotonic() - started
