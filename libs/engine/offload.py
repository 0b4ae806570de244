"""A prompt's KV leaving the GPU layer by layer while later layers compute.

The model writes a prompt's KV in GPU memory (``PrefillKV.dev``); everything downstream (the
hand-off to decode, pool writes, the instance's own cache) reads the host copy (``PrefillKV.kv``,
pinned). As soon as a layer holds its last position, ``copy_layer`` queues that layer's copy to the
host on a CUDA stream of its own, ordered after the compute that wrote it, so the copy overlaps the
next layers' compute; a thread waits for each copy and only then marks the layer computed, which
lets the hand-off send it. The event loop never waits on a copy.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from libs.engine.prefill_kv import PrefillKV


class LayerOffload:
    """GPU-to-host copies of computed KV layers on their own stream (one per model runner)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kv-offload", daemon=True)
        self._thread.start()

    def copy_layer(self, buf: "PrefillKV", index: int) -> None:
        """On the model thread, right after layer ``index``'s last write: copy it to ``buf.kv``."""
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(compute)  # after the kernels that wrote the layer
            src = buf.dev[index]
            buf.kv[index].copy_(src, non_blocking=True)
            src.record_stream(self.stream)  # its memory is not reused before the copy is done
            done = torch.cuda.Event()
            done.record(self.stream)
        self._done.put((buf, index, done))

    def _run(self) -> None:
        while True:
            buf, index, done = self._done.get()
            try:
                done.synchronize()
            except RuntimeError as e:  # a failed copy fails the buffer, not the thread
                buf.fail(f"copying layer {index} to host memory failed: {e}")
                continue
            buf.layer_computed(index)
