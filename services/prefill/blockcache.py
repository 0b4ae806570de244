"""A prefill instance's own DRAM cache of recent KV blocks. Plain logic: a byte-bounded LRU over
a slab of fixed block slots.

Blocks of one model all have one shape, so the cache holds them in a single tensor of
``capacity // block bytes`` slots, made on the first put or up front by ``reserve``. ``commit``
writes every page of the slab once, so that a put never page-faults fresh memory in: on a host
that hands freed memory back to its hypervisor (a balloon's free page reporting), a first touch
costs a round trip to the host, and measured at tens of MB/s under load it made the copies of a
768 MB cache's first fill the largest cost of a prefill instance's event loop. A block cloned
into its own allocation each time would leave the allocator's heap full of holes as the LRU
keeps some blocks and drops others: a cache of 768 MB grew its process by twice that. The slab's
footprint is its capacity, whatever the churn.

Blocks being sent to a peer instance are pinned (``pin``/``unpin``): eviction passes over them,
so their slots are not rewritten while their bytes are on the way. When every slot is pinned, a
new block is not kept.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch


class BlockCache:
    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.bytes = 0
        self.evictions = 0
        self._slots: OrderedDict[bytes, int] = OrderedDict()  # key -> slot, least recently used first
        self._slab: torch.Tensor | None = None
        self._free: list[int] = []
        self._block_bytes = 0
        self._pins: dict[bytes, int] = {}  # key -> senders reading its slot

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: bytes) -> bool:
        return key in self._slots

    def keys(self) -> list[bytes]:
        return list(self._slots)

    def prefix(self, keys: Sequence[bytes]) -> list[torch.Tensor]:
        """The blocks of the longest leading run of ``keys`` held here (marked recently used).

        They are views of the slab: valid until the next ``put``, which may reuse their slots."""
        out = self.peek(keys)
        for k in keys[: len(out)]:
            self._slots.move_to_end(k)
        return out

    def peek(self, keys: Sequence[bytes]) -> list[torch.Tensor]:
        """As ``prefix``, without marking the blocks used: a peer reading them is not a use here."""
        out = []
        for k in keys:
            slot = self._slots.get(k)
            if slot is None:
                break
            out.append(self._slab[slot])
        return out

    def pin(self, keys: Sequence[bytes]) -> None:
        """Keep the slots of ``keys`` (held here) from eviction until ``unpin``."""
        for k in keys:
            if k in self._slots:
                self._pins[k] = self._pins.get(k, 0) + 1

    def unpin(self, keys: Sequence[bytes]) -> None:
        for k in keys:
            n = self._pins.get(k, 0) - 1
            if n > 0:
                self._pins[k] = n
            else:
                self._pins.pop(k, None)

    def _victim(self) -> bytes | None:
        """The least recently used key that is not pinned (None: all are)."""
        for k in self._slots:
            if k not in self._pins:
                return k
        return None

    def reserve(self, block_shape: Sequence[int], dtype: torch.dtype) -> bool:
        """Make the slab for blocks of ``block_shape`` and ``dtype`` now (False: no slot fits, or
        the slab exists already)."""
        if self._slab is not None:
            return False
        size = math.prod(block_shape) * dtype.itemsize
        n = self.capacity // size if size else 0
        if n == 0:
            return False
        self._slab = torch.empty((n, *block_shape), dtype=dtype)
        self._free = list(range(n - 1, -1, -1))
        self._block_bytes = size
        return True

    def commit(self) -> None:
        """Write every page of the slab (zeros). Slow (it faults the whole capacity in) and free of
        the GIL: for a worker thread, before the first put."""
        if self._slab is not None:
            self._slab.zero_()

    def _make_slab(self, block: torch.Tensor) -> bool:
        return self.reserve(tuple(block.shape), block.dtype)

    def put(self, key: bytes, block: torch.Tensor) -> tuple[bool, list[bytes]]:
        """Copy a block in; returns (newly stored, keys evicted to make room). A block of another
        shape or dtype than the first one stored is not kept."""
        if key in self._slots:
            self._slots.move_to_end(key)
            return False, []
        if self._slab is None and not self._make_slab(block):
            return False, []
        slab = self._slab
        if tuple(block.shape) != tuple(slab.shape[1:]) or block.dtype != slab.dtype:
            return False, []
        evicted = []
        if not self._free:
            k = self._victim()
            if k is None:
                return False, []
            slot = self._slots.pop(k)
            self._free.append(slot)
            self.bytes -= self._block_bytes
            evicted.append(k)
            self.evictions += 1
        slot = self._free.pop()
        slab[slot].copy_(block)
        self._slots[key] = slot
        self.bytes += self._block_bytes
        return True, evicted
