"""Several conductors share a cluster without double-booking an instance: the live prefill
instances, sorted by id, are dealt out to the live conductors, sorted by id, in turn (the ``j``-th
to conductor ``j mod C``), and the decode instances the same way, so each conductor that gets any
gets both kinds while there are at least as many of each as conductors; a conductor places work
only on its own. Every conductor computes the same split from the same heartbeats. When a
conductor stops beating the split is dealt again over those left (its instances go to the others,
within the time its heartbeats take to be missed); a conductor that joins takes a share. With more
conductors than instances of a kind, the last conductors get none and place nothing: they say so
in their heartbeat (``Heartbeat.instances``) and gateways send them no request. Plain logic, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class Partition:
    def __init__(self, own: str):
        self.own = own

    def conductors(self, live: Iterable[str]) -> tuple[str, ...]:
        """The conductors sharing the cluster: the live ones and this one, sorted."""
        return tuple(sorted(set(live) | {self.own}))

    @staticmethod
    def owner(instance_id: str, instances: Iterable[str], conductors: Sequence[str]) -> str:
        """The conductor of ``instance_id`` among ``instances`` (every instance of its kind, it
        included) while ``conductors`` (sorted) share the cluster."""
        ids = sorted(set(instances) | {instance_id})
        return conductors[ids.index(instance_id) % len(conductors)]

    def mine(self, instances: Sequence[str], conductors: Sequence[str]) -> list[str]:
        """Those of ``instances`` (every live instance of one kind) this conductor places work on."""
        if len(conductors) == 1:
            return list(instances)
        me = conductors.index(self.own)
        return [iid for j, iid in enumerate(sorted(set(instances))) if j % len(conductors) == me]
