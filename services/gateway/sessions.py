"""Sessions: a conversation's blocks kept in the pool between its turns. Plain logic, no I/O.

A request may name its session (``session_id`` in the body, or the ``X-Session-Id`` header). When a
turn of it finishes, the gateway pins the blocks of its prompt and answer (those decode wrote back:
``services/decode/writeback.py``) on the cachestores for ``session_ttl_seconds``, so the next turn
finds them however busy the pool has been meanwhile; the conductor places that turn where they are
cheapest to reach, as it does any cached prefix. Each turn renews the pin of the whole chain and
ends the pins of blocks the new chain no longer has (a conversation edited or restarted).

Bounds: a session pins at most ``max_blocks`` leading blocks; at most ``max_sessions`` sessions are
followed (past it, the one idle longest is forgotten, its pins left to expire); each cachestore
bounds the blocks pinned on it in all (``pool_max_pinned_blocks``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

MAX_SESSION_ID = 128  # characters


@dataclass
class Renewal:
    """What a finished turn asks of the pool: pin ``pin`` (for the session's time to live), end the
    pins of ``unpin``."""

    pin: list[bytes]
    unpin: list[bytes]


class Sessions:
    def __init__(self, ttl_seconds: float, max_blocks: int, max_sessions: int = 100_000):
        self.ttl = ttl_seconds
        self.max_blocks = max_blocks
        self.max_sessions = max_sessions
        self._pinned: OrderedDict[str, tuple[list[bytes], float]] = OrderedDict()  # session -> (keys, expiry)

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 and self.max_blocks > 0

    def __len__(self) -> int:
        return len(self._pinned)

    def turn(self, session: str, keys: list[bytes], now: float) -> Renewal:
        """A turn of ``session`` finished whose prompt and answer have the block ``keys``."""
        self.expire(now)
        keys = keys[: self.max_blocks]
        old, _ = self._pinned.pop(session, ([], 0.0))
        self._pinned[session] = (keys, now + self.ttl)
        kept = set(keys)
        renewal = Renewal(pin=keys, unpin=[k for k in old if k not in kept])
        while len(self._pinned) > self.max_sessions:
            self._pinned.popitem(last=False)  # its pins expire on their own
        return renewal

    def expire(self, now: float) -> None:
        """Forget the sessions whose pins have expired (the cachestores ended them already)."""
        while self._pinned:
            session, (_, until) = next(iter(self._pinned.items()))
            if until > now:
                break
            del self._pinned[session]

    def pinned(self, session: str) -> list[bytes]:
        keys, _ = self._pinned.get(session, ([], 0.0))
        return keys
