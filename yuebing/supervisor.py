"""When the local cluster restarts a service that exited: backoff, and giving up on a crash loop.

Plain logic with no I/O; the caller passes the clock. A service that exits is restarted after a
delay that doubles with each exit that follows a short run (``first_delay`` up to ``max_delay``)
and starts again from ``first_delay`` once a run has lasted ``healthy_after`` seconds. A service
that exits ``crash_limit`` times within ``window`` seconds is given up on (the rest of the cluster
keeps serving): a crash loop neither spins the CPU nor hides.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    first_delay: float = 0.5
    max_delay: float = 30.0
    healthy_after: float = 60.0
    crash_limit: int = 5
    window: float = 120.0


@dataclass
class _History:
    exits: deque = field(default_factory=deque)  # when it exited, within the window
    delay: float = 0.0  # the delay before its next restart
    restarts: int = 0
    given_up: bool = False


class Restarts:
    """Each service's exits and what follows them."""

    def __init__(self, policy: RestartPolicy | None = None):
        self.policy = policy or RestartPolicy()
        self._services: dict[str, _History] = {}

    def exited(self, name: str, started_at: float, now: float) -> float | None:
        """``name`` (running since ``started_at``) exited at ``now``: when to start it again, or
        None when it is given up on."""
        p = self.policy
        h = self._services.setdefault(name, _History())
        h.exits.append(now)
        while h.exits and h.exits[0] < now - p.window:
            h.exits.popleft()
        if len(h.exits) >= p.crash_limit:
            h.given_up = True
            return None
        h.delay = p.first_delay if now - started_at >= p.healthy_after or h.delay == 0 else min(
            p.max_delay, 2 * h.delay)
        h.restarts += 1
        return now + h.delay

    def restarts(self, name: str) -> int:
        h = self._services.get(name)
        return h.restarts if h else 0

    def given_up(self, name: str) -> bool:
        h = self._services.get(name)
        return bool(h and h.given_up)

    def recent_exits(self, name: str) -> int:
        h = self._services.get(name)
        return len(h.exits) if h else 0
