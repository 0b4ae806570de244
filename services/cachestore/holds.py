"""Blocks the disk tier may not evict for now: leases and pins. Plain logic, no I/O.

* A *lease* is held by a load while it reads blocks from the disk tier outside the store's lock:
  a block being read is not evicted under the reader (which would turn a hit into a recompute).
  Leases are counted: several loads may hold the same block.
* A *pin* is an operator's: the blocks of a prefix (a system prompt) stay in the pool until a time
  to live runs out. A key may be pinned before its block arrives; the pin applies when it does.
  Pins are bounded (``max_pins``): pinned blocks cannot make room for others.

``Holds`` counts the leases and pins of an eviction policy's keys (``services.cachestore.eviction``) and holds a key
there (``EvictionPolicy.hold``) from its first lease or pin to the end of its last: no victim is
ever a held key, whichever path evicts, and the policy keeps following its uses meanwhile: a block
read often is still ranked as one when its read ends (were it to re-enter as a new key, every read
would reset what the policy knows, and LFU with ageing would behave as plain LRU in the pool).
"""

from __future__ import annotations

from collections.abc import Iterable

from services.cachestore.eviction import EvictionPolicy, Key


class PinLimit(ValueError):
    """A pin that would take the store past its bound on pinned blocks."""


class Holds:
    """The leases and pins of the keys of an eviction policy, which holds each such key (never a victim)."""

    def __init__(self, inner: EvictionPolicy, max_pins: int):
        self.inner = inner
        self.max_pins = max_pins
        self._leases: dict[Key, int] = {}
        self._pins: dict[Key, float] = {}  # key -> when its pin ends

    # ---- holds
    def _held(self, key: Key) -> bool:
        return key in self._leases or key in self._pins

    def lease(self, keys: Iterable[Key]) -> None:
        for key in keys:
            if not self._held(key):
                self.inner.hold(key)
            self._leases[key] = self._leases.get(key, 0) + 1

    def release(self, keys: Iterable[Key]) -> None:
        for key in keys:
            n = self._leases.get(key, 0) - 1
            if n > 0:
                self._leases[key] = n
                continue
            if self._leases.pop(key, None) is not None and key not in self._pins:
                self.inner.unhold(key)

    def pin(self, keys: Iterable[Key], until: float) -> int:
        """Pin ``keys`` until ``until`` (a key pinned already keeps the later end); raises
        ``PinLimit`` (pinning none of them) if the pins would exceed ``max_pins``. Returns how many
        of the keys the store holds now."""
        keys = list(dict.fromkeys(keys))
        new = sum(1 for k in keys if k not in self._pins)
        if len(self._pins) + new > self.max_pins:
            raise PinLimit(f"{len(self._pins)} blocks are pinned; {new} more would exceed the bound of "
                           f"{self.max_pins}")
        for key in keys:
            if not self._held(key):
                self.inner.hold(key)
            self._pins[key] = max(until, self._pins.get(key, until))
        return sum(1 for k in keys if k in self.inner)

    def unpin(self, keys: Iterable[Key]) -> int:
        """End the pins of ``keys`` now; returns how many were pinned."""
        n = 0
        for key in keys:
            if self._pins.pop(key, None) is not None:
                n += 1
                if key not in self._leases:
                    self.inner.unhold(key)
        return n

    def expire(self, now: float) -> int:
        """End the pins whose time has come; returns how many."""
        return self.unpin([k for k, until in self._pins.items() if until <= now])

    @property
    def pinned(self) -> int:
        """Keys pinned (held by the store or not)."""
        return len(self._pins)

    @property
    def pinned_held(self) -> int:
        """Pinned keys the store holds."""
        return sum(1 for k in self._pins if k in self.inner)
