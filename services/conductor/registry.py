"""Live instances, from heartbeats. Plain logic: the caller passes the clock.

An instance is lost when its heartbeats stop coming, not when the conductor is slow to take them
in: a conductor behind on its subscriptions (a burst of KV events, a slow host) would otherwise
declare every instance lost at once. Its own heartbeats travel the same way, through the same
subscription, so how late they are taken in (``BeatClock``) is how far behind it is, and the
registry judges liveness at that many seconds before now.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from libs.protocol import Heartbeat

MISSED_BEATS = 3


@dataclass
class Instance:
    kind: str
    instance_id: str
    last_seen: float
    beat: Heartbeat
    # work placed here since its last heartbeat, not yet visible in what it reported
    placed_since_beat: int = 0

    def alive(self, now: float) -> bool:
        return now - self.last_seen <= MISSED_BEATS * self.beat.interval


class BeatClock:
    """How far behind the conductor is in taking heartbeats in, from its own: ``sent`` when it
    publishes one (its ``sent_at``), ``received`` when it takes one of its own in. Behind by the
    last one's delay, or by the age of the oldest one not yet taken in if that is more; at most
    ``cap`` seconds. One taken in settles every one sent before it (those were lost on the way).

    A conductor that stalls (a long computation, a garbage collection) sends no beat meanwhile:
    while its next beat is overdue it is behind by as much, and a beat sent more than
    ``interval`` after the one before counts the excess as well until it is taken in, since the
    instances' beats queued during the stall come in before it does."""

    def __init__(self, cap: float, interval: float = 0.0):
        self.cap = cap
        self.interval = interval
        self._sent: deque[tuple[float, float]] = deque()  # (sent at, the stall before it)
        self._last_sent: float | None = None
        self.lag = 0.0

    def sent(self, at: float) -> None:
        stall = 0.0
        if self.interval > 0 and self._last_sent is not None:
            stall = max(0.0, at - self._last_sent - self.interval)
        self._last_sent = at
        self._sent.append((at, stall))

    def received(self, at: float, sent_at: float) -> None:
        while self._sent and self._sent[0][0] <= sent_at:
            self._sent.popleft()
        self.lag = max(0.0, at - sent_at)

    def behind(self, now: float) -> float:
        waiting = max((now - at + stall for at, stall in self._sent), default=0.0)
        overdue = now - self._last_sent - self.interval if self.interval > 0 and self._last_sent is not None else 0.0
        return min(self.cap, max(self.lag, waiting, overdue))


class Registry:
    def __init__(self, lag_cap: float = 30.0, interval: float = 0.0) -> None:
        self._kinds: dict[str, dict[str, Instance]] = {}  # kind -> instance id -> instance
        self.clock = BeatClock(lag_cap, interval)
        # ``alive``'s answers for one clock reading, until a beat or a prune changes them (a
        # decision asks it several times of each kind, at one time)
        self._alive: dict[str, list[Instance]] = {}
        self._alive_at: float | None = None

    def beat(self, hb: Heartbeat, now: float) -> Instance:
        self._alive_at = None
        of_kind = self._kinds.setdefault(hb.kind, {})
        inst = of_kind.get(hb.instance_id)
        if inst is None:
            inst = of_kind[hb.instance_id] = Instance(hb.kind, hb.instance_id, now, hb)
        else:
            inst.last_seen = now
            inst.beat = hb
            inst.placed_since_beat = 0
        return inst

    def alive(self, kind: str, now: float) -> list[Instance]:
        """Instances that can take new work: beating, and not draining (a list not to be changed)."""
        seen = now - self.clock.behind(now)
        if seen != self._alive_at:
            self._alive, self._alive_at = {}, seen
        got = self._alive.get(kind)
        if got is None:
            # (``Instance.alive``, inline: a decision asks this of every instance)
            got = self._alive[kind] = [i for i in self._kinds.get(kind, {}).values()
                                       if seen - i.last_seen <= MISSED_BEATS * i.beat.interval and not i.beat.draining]
        return got

    def prune(self, now: float) -> list[Instance]:
        """Forget instances that missed their beats; returns them."""
        seen = now - self.clock.behind(now)
        gone = [i for of_kind in self._kinds.values() for i in of_kind.values() if not i.alive(seen)]
        for i in gone:
            del self._kinds[i.kind][i.instance_id]
        self._alive_at = None
        return gone

    def get(self, kind: str, instance_id: str) -> Instance | None:
        return self._kinds.get(kind, {}).get(instance_id)
