"""KV memory of the prompts in flight: one slab allocated and paged in once, carved into buffers."""

from __future__ import annotations

import math
import threading
import weakref
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from libs.engine.loading import ModelShape


class KVArena:
    """The KV memory of an instance's prompts in flight, allocated once and kept, as a serving
    engine keeps its KV cache: one slab of ``max_bytes`` that ``commit`` pages in at start, carved
    into buffers of whole ``granule``s. A buffer taken fresh from the kernel for every prompt is
    page-faulted in on first touch, which on a host that hands freed memory back to its hypervisor
    costs up to tens of microseconds a page.

    ``take`` carves the smallest free range that fits (best fit; the slab is made on first use if
    ``reserve`` was not called); when none does, the buffer is fresh memory, freed as usual. A
    range is free again when its buffer is given back (``give``: once nothing reads or writes it
    any more, though references may remain) or, if it never is, once the last reference to it is
    gone (views included): a buffer a failure path drops is not lost to the slab. Free neighbours
    merge. ``take`` and ``give`` may be called from different threads.
    """

    def __init__(self, max_bytes: int, granule: int = 4 << 20):
        if max_bytes < 0 or granule <= 0:
            raise ValueError("max_bytes must be >= 0 and granule > 0")
        self.max_bytes = max_bytes
        self.granule = granule
        self._units = max_bytes // granule  # the slab's size in granules
        self._slab: np.ndarray | None = None
        self._free: list[list[int]] = [[0, self._units]] if self._units else []  # [start, length], by start
        self._out: dict[int, tuple[int, int, weakref.finalize]] = {}  # address given out -> range, finalizer
        self._freed = _Freed()  # fresh buffers whose memory is gone
        self._committed = False
        self.size = self._units * granule  # the slab's bytes
        self.bytes = self.size  # free in the slab
        self.reused = 0  # takes served by the slab
        self.allocated = 0  # takes that needed fresh memory (paged in on first touch)
        self.allocated_bytes = 0
        self._lock = threading.RLock()  # a finalizer may run on a thread that holds it

    def reserve(self) -> bool:
        """Make the slab now (False: it exists already, or the budget is under one granule)."""
        with self._lock:
            if self._slab is not None or not self._units:
                return False
            self._slab = np.empty(self._units * self.granule, dtype=np.uint8)
            return True

    def commit(self) -> None:
        """Write every page of the slab (zeros): slow, it faults the whole of it in, and free of
        the GIL; for a worker thread at start, so that prompts find the memory in place."""
        self.reserve()
        if self._slab is not None and not self._committed:
            self._committed = True
            torch.from_numpy(self._slab).zero_()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(storage, a tensor of ``shape`` and ``dtype`` over its first bytes); contents undefined."""
        need = math.prod(shape) * dtype.itemsize
        flat = torch.from_numpy(self._take(need))
        return flat, flat[:need].view(dtype).view(shape)

    def take_bytes(self, n: int) -> memoryview:
        """A writable buffer of ``n`` bytes, contents undefined, for ``give_bytes``."""
        return memoryview(self._take(n)).cast("B")[:n]

    def give_bytes(self, buf: memoryview) -> None:
        """Give back a buffer from ``take_bytes`` (a slice of one gives back the whole of it)."""
        whole = buf.obj if isinstance(buf, memoryview) else None
        if isinstance(whole, np.ndarray) and whole.dtype == np.uint8 and whole.ndim == 1:
            self._give(whole.ctypes.data, whole.nbytes)

    def give(self, flat: torch.Tensor) -> None:
        """Give back a buffer from ``take``: its range is free again (fresh memory goes with its
        last reference, as any)."""
        self._give(flat.data_ptr(), flat.numel() * flat.element_size())

    def _take(self, need: int) -> np.ndarray:
        units = max(-(-need // self.granule), 1)
        with self._lock:
            self.reserve()
            best = None
            for i, (_, length) in enumerate(self._free):
                if length >= units and (best is None or length < self._free[best][1]):
                    best = i
            if best is not None:
                start, length = self._free[best]
                if length == units:
                    del self._free[best]
                else:
                    self._free[best] = [start + units, length - units]
                # a numpy view: every buffer, tensor or memoryview made from it keeps it alive, so
                # its finalizer runs only once none is left
                arr = self._slab[start * self.granule:(start + units) * self.granule]
                addr = arr.ctypes.data
                self._out[addr] = (start, units, weakref.finalize(arr, self._give, addr, 0))
                self.bytes -= units * self.granule
                self.reused += 1
                return arr
            self.allocated += 1
            self.allocated_bytes += units * self.granule
        # a numpy array, as a slab range is: every view made from it keeps it alive, and it is
        # counted freed once the last one is gone, given back or not (the finalizer holds the
        # counter, not the arena, which may go first)
        arr = np.empty(units * self.granule, dtype=np.uint8)
        weakref.finalize(arr, self._freed.add, arr.nbytes)
        return arr

    def _give(self, addr: int, nbytes: int) -> None:
        with self._lock:
            taken = self._out.pop(addr, None)
            if taken is None:  # fresh memory (freed with its last reference), or not the arena's
                return
            start, units, fin = taken
            fin.detach()
            self.bytes += units * self.granule
            i = 0
            while i < len(self._free) and self._free[i][0] < start:
                i += 1
            self._free.insert(i, [start, units])
            if i + 1 < len(self._free) and start + units == self._free[i + 1][0]:  # the next one
                self._free[i][1] += self._free.pop(i + 1)[1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:  # the previous one
                self._free[i - 1][1] += self._free.pop(i)[1]

    @property
    def dropped(self) -> int:
        """Fresh buffers freed (their last reference gone)."""
        return self._freed.count

    @property
    def dropped_bytes(self) -> int:
        return self._freed.bytes

    def stats(self) -> dict[str, int]:
        """Counts since start: takes served by the slab or fresh, fresh buffers freed, bytes free."""
        with self._lock:
            return {"reused": self.reused, "allocated": self.allocated, "allocated_bytes": self.allocated_bytes,
                    "dropped": self.dropped, "dropped_bytes": self.dropped_bytes, "kept_bytes": self.bytes}


class _Freed:
    """Count of an arena's fresh buffers whose memory is gone (their finalizers add to it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.bytes = 0

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.count += 1
            self.bytes += nbytes


ARENA_PROMPTS = 16  # full-context prompts in flight that an arena's slab is sized for at most


def kv_arena_for(shape: "ModelShape", max_bytes: int) -> KVArena:
    """An instance's KV arena: ``max_bytes`` of slab, but no more than ``ARENA_PROMPTS`` prompts
    of the model's whole context could use (a small model's arena pages in what it can fill, not
    the deployment's budget), in granules of 4 MB or one such prompt's KV if that is less."""
    per_prompt = max(shape.kv_bytes_per_token() * shape.max_context, 1)
    granule = min(4 << 20, -(-per_prompt // (64 << 10)) * (64 << 10))
    return KVArena(min(max_bytes, ARENA_PROMPTS * per_prompt), granule)
