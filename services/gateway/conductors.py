"""Which conductor a gateway asks to place a request, when several share the cluster. Plain logic.

Each conductor places work only on its own share of the instances (``services/conductor/partition.py``);
gateways spread requests over the live conductors in turn, so each conductor gets a share of the
requests about the size of its share of the instances. A request whose conductor is lost before it
answers (gone from the bus, or silent for three heartbeats) is asked of another.
"""

from __future__ import annotations

from collections.abc import Iterable


class ConductorChoice:
    def __init__(self) -> None:
        self._turn = 0

    def pick(self, live: Iterable[str], avoid: Iterable[str] = ()) -> str:
        """The next of the ``live`` conductors not in ``avoid``, in turn; "" when there is none
        (then the request goes to whichever conductor listens: the queue group)."""
        options = sorted(set(live) - set(avoid))
        if not options:
            return ""
        self._turn += 1
        return options[self._turn % len(options)]
