"""Live instances, from heartbeats. Plain logic: the caller passes the clock."""

from __future__ import annotations

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


class Registry:
    def __init__(self) -> None:
        self._instances: dict[tuple[str, str], Instance] = {}

    def beat(self, hb: Heartbeat, now: float) -> Instance:
        key = (hb.kind, hb.instance_id)
        inst = self._instances.get(key)
        if inst is None:
            inst = self._instances[key] = Instance(hb.kind, hb.instance_id, now, hb)
        else:
            inst.last_seen = now
            inst.beat = hb
            inst.placed_since_beat = 0
        return inst

    def alive(self, kind: str, now: float) -> list[Instance]:
        """Instances that can take new work: beating, and not draining."""
        return [i for (k, _), i in self._instances.items() if k == kind and i.alive(now) and not i.beat.draining]

    def prune(self, now: float) -> list[Instance]:
        """Forget instances that missed their beats; returns them."""
        gone = [i for i in self._instances.values() if not i.alive(now)]
        for i in gone:
            del self._instances[(i.kind, i.instance_id)]
        return gone

    def get(self, kind: str, instance_id: str) -> Instance | None:
        return self._instances.get((kind, instance_id))
