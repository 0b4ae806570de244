"""Which cachestore instances hold a block: rendezvous (highest random weight) hashing over the
live instances, so a change of membership moves only the keys it must."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def _hrw_score(key: bytes, instance_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(instance_id.encode() + b"\x00" + key, digest_size=8).digest(), "big")


def rank(key: bytes, instance_ids: Iterable[str]) -> list[str]:
    """Every instance in rendezvous (highest random weight) order for ``key``; deterministic."""
    return sorted(set(instance_ids), key=lambda iid: (_hrw_score(key, iid), iid), reverse=True)


def owners(key: bytes, instance_ids: Iterable[str], replicas: int = 1) -> list[str]:
    """The ``replicas`` instances that hold ``key``: the top of its rendezvous ranking.

    Removing an instance only moves the keys it owned (each to its next-ranked instance); adding
    one only moves keys to the new instance. Keys spread evenly over the instances.
    """
    return rank(key, instance_ids)[: max(0, replicas)]
