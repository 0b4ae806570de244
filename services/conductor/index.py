"""The global prefix index: which blocks each instance holds, kept current from KV events.

Plain logic. Events of an instance apply in ``seq`` order within an ``epoch`` (one run of the
instance). A gap, an epoch not seen before (a restart, or an instance first heard of, as when the
conductor replays the event stream after its own restart) puts the instance in resync: the caller
fetches a dump, events that arrive meanwhile are buffered, and those newer than the dump are
applied on top of it. Events of epochs that a dump has superseded are ignored. Epochs order by
their runs' start (``libs.kvevents.epoch_newer``): an event of a run older than the one the index
follows is ignored, and events buffered from a run newer than a dump's (the instance restarted
while its dump was on its way) keep the instance in resync for the next dump, instead of being
taken for stale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from libs.kvevents import epoch_newer
from libs.protocol import KVEvent


@dataclass
class _Holder:
    source: str
    epoch: str = ""
    seq: int = 0
    keys: set[bytes] = field(default_factory=set)
    resyncing: bool = False
    buffered: list[KVEvent] = field(default_factory=list)
    old_epochs: set[str] = field(default_factory=set)


class PrefixIndex:
    def __init__(self) -> None:
        # Each instance's keys are a set of its own (bytes keys in a set: one object for the
        # collector to track, not one per key), and the pool's a dict of counts (small ints are
        # shared): no container per key, so a full garbage collection does not walk millions of them
        self._holders: dict[str, _Holder] = {}
        self._pool: dict[bytes, int] = {}  # key -> cachestore instances holding it (kept as they change)
        self.gaps = 0

    # ---- updates
    def apply(self, ev: KVEvent) -> bool:
        """Apply one event; returns True when the instance now needs a dump (resync)."""
        h = self._holders.get(ev.instance_id)
        if h is None:
            h = self._holders[ev.instance_id] = _Holder(source=ev.source)
        if ev.epoch in h.old_epochs or epoch_newer(h.epoch, ev.epoch):
            return False  # a run the index has moved past
        if h.resyncing:
            h.buffered.append(ev)
            return False
        if ev.epoch == h.epoch and ev.seq <= h.seq:
            return False  # already applied (replay overlap)
        if ev.epoch != h.epoch or ev.seq != h.seq + 1:
            if ev.epoch == h.epoch:
                self.gaps += 1  # events lost within a run (as opposed to a new run)
            h.resyncing = True
            h.buffered.append(ev)
            return True
        self._apply(ev.instance_id, h, ev)
        return False

    def _apply(self, iid: str, h: _Holder, ev: KVEvent) -> None:
        for k in ev.stored:
            if k not in h.keys:
                h.keys.add(k)
                self._hold(k, iid, h)
        for k in ev.removed:
            if k in h.keys:
                h.keys.discard(k)
                self._forget(k, iid, h)
        h.seq = ev.seq

    def _hold(self, key: bytes, iid: str, h: _Holder) -> None:
        if h.source == "cachestore":
            self._pool[key] = self._pool.get(key, 0) + 1

    def _forget(self, key: bytes, iid: str, h: _Holder) -> None:
        if h.source == "cachestore":
            n = self._pool.get(key, 0) - 1
            if n > 0:
                self._pool[key] = n
            else:
                self._pool.pop(key, None)

    def _set_keys(self, iid: str, h: _Holder, keys: set[bytes]) -> None:
        for k in h.keys - keys:
            self._forget(k, iid, h)
        for k in keys - h.keys:
            self._hold(k, iid, h)
        h.keys = keys

    def needs_dump(self, instance_id: str) -> bool:
        h = self._holders.get(instance_id)
        return h is not None and h.resyncing

    def mark_resync(self, instance_id: str, source: str) -> None:
        h = self._holders.setdefault(instance_id, _Holder(source=source))
        h.resyncing = True

    def load_dump(self, instance_id: str, source: str, epoch: str, seq: int, keys: Sequence[bytes]) -> None:
        """Replace what the instance holds with a dump current as of (epoch, seq)."""
        h = self._holders.setdefault(instance_id, _Holder(source=source))
        self._set_keys(instance_id, h, set(keys))
        if h.epoch and h.epoch != epoch:
            h.old_epochs.add(h.epoch)
        h.epoch, h.seq, h.resyncing = epoch, seq, False
        pending, h.buffered = h.buffered, []
        newer = [e for e in pending if epoch_newer(e.epoch, epoch)]
        if newer:  # it restarted again while the dump was on its way: that run needs a dump of its own
            h.resyncing, h.buffered = True, newer
            return
        h.old_epochs.update(e.epoch for e in pending if e.epoch != epoch)
        for ev in sorted((e for e in pending if e.epoch == epoch and e.seq > seq), key=lambda e: e.seq):
            if self.apply(ev):
                break

    def drop_instance(self, instance_id: str) -> None:
        """Forget an instance that is gone; later events of the epochs seen so far are ignored."""
        h = self._holders.get(instance_id)
        if h is None:
            return
        for k in h.keys:
            self._forget(k, instance_id, h)
        old = h.old_epochs | {h.epoch} | {e.epoch for e in h.buffered}
        self._holders[instance_id] = _Holder(source=h.source, old_epochs=old - {""})

    # ---- queries
    def prefix_len(self, keys: Sequence[bytes], instance_id: str) -> int:
        """How many leading ``keys`` the instance holds."""
        h = self._holders.get(instance_id)
        if h is None:
            return 0
        n = 0
        for k in keys:
            if k not in h.keys:
                break
            n += 1
        return n

    def pool_prefix_len(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` some cachestore instance holds."""
        n = 0
        for k in keys:
            if k not in self._pool:
                break
            n += 1
        return n

    def count_of(self, instance_id: str) -> int:
        """How many blocks the instance holds (no copy of its keys)."""
        h = self._holders.get(instance_id)
        return len(h.keys) if h else 0

    def keys_of(self, instance_id: str) -> set[bytes]:
        h = self._holders.get(instance_id)
        return set(h.keys) if h else set()

    def instances(self) -> list[str]:
        return [i for i, h in self._holders.items() if h.epoch or h.resyncing]

    def pool_keys(self) -> set[bytes]:
        """Every key some cachestore instance holds."""
        return set(self._pool)

    def pool_blocks(self) -> int:
        """How many keys some cachestore instance holds (kept as events come: no scan)."""
        return len(self._pool)
