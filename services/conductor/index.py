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

Each instance's keys are a ``KeySet`` (``keyset.py``: 16 bytes a key in numpy arrays, 24 to 68
bytes with the table's slack, against about 100 for a Python set of ``bytes``); the pool is the
union of the cachestore instances' sets, and its number of distinct keys is kept as events come.
Every decision walks the prompt's chain in every prefill instance's keys, and the blocks of a
shared system prompt are in all of them: a ``KeySet`` lookup is Python (about 400 ns, against 50
for a set), which doubled a decision's time at 128 prefill instances. So each prefill instance
also remembers, in a small set (``HOT_KEYS``), the keys it was last found holding; a walk costs a
set lookup a key and one ``KeySet`` probe where the instance's prefix ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from libs.kvevents import epoch_newer
from libs.protocol import KVEvent

from services.conductor.keyset import KeyBatch, KeySet, leading, words

HOT_KEYS = 4096  # per prefill instance: keys lately found held, looked up in a set (cleared when full)
# a decision's walk past this many instances still holding the prompt takes each key's holders
# from a cache (``_holders_of``) and checks them all at once
WIDE = 8
HOLDER_KEYS = 65_536  # keys whose prefill holders are cached (cleared when full)
# past this many keys left to walk, the few instances still holding the prompt (at most ``WIDE``),
# and the pool, each finish their prefix in one compiled walk instead of key by key in Python: a
# conversation of 5,000 blocks that two instances held most of cost a decision 10-17 ms
WALK_KEYS = 32


@dataclass
class _Holder:
    source: str
    epoch: str = ""
    seq: int = 0
    keys: KeySet = field(default_factory=KeySet)
    hot: set[bytes] = field(default_factory=set)  # keys lately found held here (a subset of ``keys``)
    resyncing: bool = False
    buffered: list[KVEvent] = field(default_factory=list)
    old_epochs: set[str] = field(default_factory=set)

    @property
    def pooled(self) -> bool:
        return self.source == "cachestore"

    def prefix_len(self, keys: Sequence[bytes]) -> int:
        hot, n = self.hot, 0
        for k in keys:
            if k not in hot and not self.holds_new(k):
                break
            n += 1
        return n

    def holds_new(self, k: bytes) -> bool:
        """Whether the instance holds ``k``, which is not among its hot keys (it becomes one)."""
        if not self.keys.holds(k):
            return False
        if len(self.hot) >= HOT_KEYS:
            self.hot.clear()
        self.hot.add(k)
        return True


class PrefixIndex:
    def __init__(self) -> None:
        self._holders: dict[str, _Holder] = {}
        self._pool_blocks = 0  # distinct keys some cachestore instance holds (kept as they change)
        self.gaps = 0
        # key -> the prefill instances holding it, for keys a walk found held by many (a shared
        # system prompt's): kept current by events, cleared by a dump or a drop of a prefill instance
        self._wide: dict[bytes, set[str]] = {}
        # the prefill instances' holders and the cachestores' (kept until an instance comes or goes)
        self._split: tuple[list[tuple[str, _Holder]], list[tuple[str, _Holder]]] | None = None

    def _holder(self, instance_id: str, source: str) -> _Holder:
        h = self._holders.get(instance_id)
        if h is None:
            h = self._holders[instance_id] = _Holder(source=source)
            self._split = None
        return h

    def _holders_split(self) -> tuple[list[tuple[str, _Holder]], list[tuple[str, _Holder]]]:
        if self._split is None:
            self._split = ([(iid, h) for iid, h in self._holders.items() if not h.pooled],
                           [(iid, h) for iid, h in self._holders.items() if h.pooled])
        return self._split

    # ---- updates
    def apply(self, ev: KVEvent) -> bool:
        """Apply one event; returns True when the instance now needs a dump (resync)."""
        h = self._holder(ev.instance_id, ev.source)
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
        if ev.stored:
            self._held(iid, h, h.keys.add(KeyBatch.of(ev.stored)))
        if ev.removed:
            self._dropped(iid, h, h.keys.remove(KeyBatch.of(ev.removed)))
            h.hot.difference_update(ev.removed)
        if self._wide and not h.pooled:  # (stored, then removed: an event's order)
            wide = self._wide
            for k in wide.keys() & set(ev.stored):
                wide[k].add(iid)
            for k in wide.keys() & set(ev.removed):
                wide[k].discard(iid)
        h.seq = ev.seq

    def _elsewhere(self, iid: str, b: KeyBatch) -> np.ndarray:
        """Per key, whether a cachestore instance other than ``iid`` holds it."""
        held = np.zeros(len(b), bool)
        for other, h in self._holders_split()[1]:
            if other != iid and len(h.keys):
                held |= h.keys.contains(b)
        return held

    def _held(self, iid: str, h: _Holder, new: KeyBatch) -> None:
        """``new`` keys are now held by ``iid`` (and were not before)."""
        if h.pooled and len(new):
            self._pool_blocks += int(np.count_nonzero(~self._elsewhere(iid, new)))

    def _dropped(self, iid: str, h: _Holder, gone: KeyBatch) -> None:
        """``gone`` keys are no longer held by ``iid`` (and were before)."""
        if h.pooled and len(gone):
            self._pool_blocks -= int(np.count_nonzero(~self._elsewhere(iid, gone)))

    def _set_keys(self, iid: str, h: _Holder, keys: Sequence[bytes]) -> None:
        h.hot.clear()
        if not h.pooled:
            self._wide.clear()
        new = KeyBatch.of(keys)
        new = new.unique() if len(new) > 1 else new
        added = new.take(~h.keys.contains(new))
        now = KeySet.of(new)
        old = h.keys.batch()
        gone = old.take(~now.contains(old))
        h.keys = now
        self._dropped(iid, h, gone)
        self._held(iid, h, added)

    def needs_dump(self, instance_id: str) -> bool:
        h = self._holders.get(instance_id)
        return h is not None and h.resyncing

    def mark_resync(self, instance_id: str, source: str) -> None:
        h = self._holder(instance_id, source)
        h.resyncing = True

    def load_dump(self, instance_id: str, source: str, epoch: str, seq: int, keys: Sequence[bytes]) -> None:
        """Replace what the instance holds with a dump current as of (epoch, seq)."""
        h = self._holder(instance_id, source)
        self._set_keys(instance_id, h, keys)
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
        gone, h.keys = h.keys.batch(), KeySet()
        self._dropped(instance_id, h, gone)
        if not h.pooled:
            self._wide.clear()
        old = h.old_epochs | {h.epoch} | {e.epoch for e in h.buffered}
        self._holders[instance_id] = _Holder(source=h.source, old_epochs=old - {""})
        self._split = None

    # ---- queries
    def prefix_len(self, keys: Sequence[bytes], instance_id: str) -> int:
        """How many leading ``keys`` the instance holds."""
        h = self._holders.get(instance_id)
        return h.prefix_len(keys) if h is not None else 0

    def prefix_lens(self, keys: Sequence[bytes], instance_ids: Sequence[str]) -> list[int]:
        """``prefix_len`` of each (prefill) instance, walking the chain once for all of them: at each
        key only the instances holding every key before it are looked at. While more than ``WIDE``
        are, the key's holders come from a cache and are checked at once (a set operation): the
        blocks of a system prompt every instance holds cost a lookup each, not one an instance."""
        out = [0] * len(instance_ids)
        going = {iid: j for j, iid in enumerate(instance_ids)
                 if (h := self._holders.get(iid)) is not None and len(h.keys)}
        for n, k in enumerate(keys):
            if len(going) <= 1:
                if going:  # one left: the rest of its prefix at once (``KeySet.prefix_len``)
                    ((iid, j),) = going.items()
                    out[j] = n + self._holders[iid].keys.prefix_len(keys[n:])
                return out
            if len(going) > WIDE:
                holders = self._holders_of(k)
                if going.keys() <= holders:
                    continue
                ended = [iid for iid in going if iid not in holders]
            elif len(keys) - n > WALK_KEYS:  # the few still going: each one's prefix at once
                rest = KeyBatch.of(keys[n:])
                for iid, j in going.items():
                    out[j] = n + self._holders[iid].keys.batch_prefix_len(rest)
                return out
            else:
                ended = [iid for iid in going if k not in (h := self._holders[iid]).hot and not h.holds_new(k)]
            for iid in ended:
                out[going.pop(iid)] = n
        for j in going.values():
            out[j] = len(keys)
        return out

    def _holders_of(self, key: bytes) -> set[str]:
        """The prefill instances holding ``key`` (cached; see ``_wide``)."""
        got = self._wide.get(key)
        if got is None:
            if len(self._wide) >= HOLDER_KEYS:
                self._wide.clear()
            hi, lo = words(key)
            got = self._wide[key] = {iid for iid, h in self._holders_split()[0]
                                     if key in h.hot or h.keys.has(hi, lo)}
        return got

    def pool_prefix_len(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` some cachestore instance holds."""
        stores = [h.keys for _, h in self._holders_split()[1] if len(h.keys)]
        if len(stores) == 1:
            return stores[0].prefix_len(keys)
        if len(keys) > WALK_KEYS:  # each store's holdings of the whole chain at once
            b = KeyBatch.of(keys)
            held = np.zeros(len(b), bool)
            for st in stores:
                held |= st.contains(b)
            return leading(held)
        n = 0
        for k in keys:
            if not any(s.holds(k) for s in stores):
                break
            n += 1
        return n

    def count_of(self, instance_id: str) -> int:
        """How many blocks the instance holds (no copy of its keys)."""
        h = self._holders.get(instance_id)
        return len(h.keys) if h else 0

    def keys_of(self, instance_id: str) -> set[bytes]:
        h = self._holders.get(instance_id)
        return set(h.keys.keys()) if h is not None else set()

    def instances(self) -> list[str]:
        return [i for i, h in self._holders.items() if h.epoch or h.resyncing]

    def pool_keys(self) -> set[bytes]:
        """Every key some cachestore instance holds."""
        out: set[bytes] = set()
        for h in self._holders.values():
            if h.pooled:
                out.update(h.keys.keys())
        return out

    def pool_blocks(self) -> int:
        """How many keys some cachestore instance holds (kept as events come: no scan)."""
        return self._pool_blocks

    def nbytes(self) -> int:
        """Bytes of the instances' key tables (the index's bulk)."""
        return sum(h.keys.nbytes for h in self._holders.values())
