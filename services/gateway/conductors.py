"""Which conductor a gateway asks to place a request, when several share the cluster. Plain logic.

Each conductor places work only on its own share of the instances (``services/conductor/partition.py``);
gateways spread requests over the live conductors in turn, so each conductor gets a share of the
requests about the size of its share of the instances. A request whose conductor is lost before it
answers (gone from the bus, silent for three heartbeats, or beating as another process: restarted)
is asked of another; one that said "elsewhere" (no share now) too.

A conductor is asked by name whenever one is live, even one with no share (it answers "elsewhere"
at once): the gateway watches the conductor it named for its loss, while a request taken from the
queue group by a conductor that dies holding it is only known lost when its time is up.
"""

from __future__ import annotations

from collections.abc import Iterable

from libs.protocol import Heartbeat


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

    def target(self, live: Iterable[Heartbeat], avoid: dict[str, str]) -> str:
        """The conductor to ask next among the ``live`` ones (their last heartbeats): those placing
        work on instances of both kinds first, else any; never one in ``avoid`` (conductor -> the
        process of it that was lost or said "elsewhere") still beating as that process. "" when
        none is left: the queue group."""
        asked = [hb for hb in live if hb.kind == "conductor" and not hb.draining
                 and not (hb.instance_id in avoid and avoid[hb.instance_id] == hb.incarnation)]
        placing = [hb.instance_id for hb in asked if all(hb.instances.values())]
        return self.pick(placing or [hb.instance_id for hb in asked])
