"""A prefill instance's own DRAM cache of recent KV blocks. Plain logic: a byte-bounded LRU."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch


class BlockCache:
    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.bytes = 0
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def keys(self) -> list[bytes]:
        return list(self._blocks)

    def prefix(self, keys: Sequence[bytes]) -> list[torch.Tensor]:
        """The blocks of the longest leading run of ``keys`` held here (marked recently used)."""
        out = []
        for k in keys:
            t = self._blocks.get(k)
            if t is None:
                break
            self._blocks.move_to_end(k)
            out.append(t)
        return out

    def put(self, key: bytes, block: torch.Tensor) -> tuple[bool, list[bytes]]:
        """Insert a block (a private copy); returns (newly stored, keys evicted to make room)."""
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return False, []
        size = block.numel() * block.element_size()
        if size > self.capacity:
            return False, []
        evicted = []
        while self.bytes + size > self.capacity:
            k, t = self._blocks.popitem(last=False)
            self.bytes -= t.numel() * t.element_size()
            evicted.append(k)
            self.evictions += 1
        self._blocks[key] = block.clone()
        self.bytes += size
        return True, evicted
