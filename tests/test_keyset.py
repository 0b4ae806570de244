"""The prefix index's compact key tables, against Python sets (plain logic)."""

import random

import pytest

from libs.protocol import KVEvent
from services.conductor import index, keyset
from services.conductor.index import PrefixIndex
from services.conductor.keyset import KeyBatch, KeySet


def _keys(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.getrandbits(128).to_bytes(16, "little") for _ in range(n)]


@pytest.mark.parametrize("prefix, move, clustered", [(16, None, False), (2, None, False), (10**9, None, False),
                                                     (4, 8, False), (16, 64, False), (4, None, True)])
def test_a_key_set_does_what_a_python_set_does_through_growth_removal_and_shrinking(prefix, move, clustered,
                                                                                    monkeypatch):
    """As a Python set would, whether a prefix is probed one by one or in a batch past its first
    keys (``prefix``), a table is replaced at once or its keys moved to the next one ``move`` slots
    an add or remove, and when every key has the same first slot (``clustered``: one probe
    sequence through live keys and tombstones)."""
    monkeypatch.setattr(keyset, "PREFIX_KEYS", prefix)
    if move is not None:
        monkeypatch.setattr(keyset, "MOVE_AT_ONCE", 0)
        monkeypatch.setattr(keyset, "MOVE_SLOTS", move)
    moving = 0
    rng = random.Random(1)
    universe = _keys(3000, 2)
    if clustered:  # the two words' XOR, which the first slot is taken from, the same for all
        universe = [k[:8] + (int.from_bytes(k[:8], "little") ^ 12345).to_bytes(8, "little") for k in universe[:600]]
    ref: set[bytes] = set()
    ks = KeySet()
    capacities = set()
    for step in range(400):
        grow = step < 250  # then mostly removals, so the table shrinks again
        add = [rng.choice(universe) for _ in range(rng.randint(0, 120 if grow else 10))]
        rem = [rng.choice(universe) for _ in range(rng.randint(0, 40 if grow else 120))]
        assert set(ks.add(KeyBatch.of(add)).keys()) == set(add) - ref  # the keys new to it, once each
        ref |= set(add)
        assert set(ks.remove(KeyBatch.of(rem)).keys()) == set(rem) & ref
        ref -= set(rem)
        assert len(ks) == len(ref)
        probe = [rng.choice(universe) for _ in range(50)]
        assert list(ks.contains(KeyBatch.of(probe))) == [k in ref for k in probe]
        assert [ks.holds(k) for k in probe[:5]] == [k in ref for k in probe[:5]]
        chain = rng.sample(sorted(ref), min(len(ref), rng.randint(0, 40))) + probe[:3]
        assert ks.prefix_len(chain) == next((i for i, k in enumerate(chain) if k not in ref), len(chain))
        capacities.add(ks.capacity)
        moving += ks.moving
        if len(ks) > 64 and not ks.moving:
            assert len(ks) >= 0.25 * ks.capacity - 1  # never mostly empty
            assert ks.nbytes / len(ks) <= 17 / 0.25  # a slot of 17 bytes, never under a quarter full
    assert set(ks.keys()) == ref
    assert len(capacities) >= 3  # it grew and shrank
    assert (moving > 0) == (move is not None)  # (lookups, adds and removes happened while moving)


def test_a_prefix_is_the_leading_run_of_keys_held():
    chain = _keys(10, 3)
    ks = KeySet.of(chain[:4] + chain[5:8])
    assert ks.prefix_len(chain) == 4
    assert ks.prefix_len(chain[:3]) == 3
    assert KeySet().prefix_len(chain) == 0
    long = _keys(40, 6)  # past the keys probed one by one: the rest go as a batch
    ks = KeySet.of(long[:25] + long[26:])
    assert ks.prefix_len(long) == 25 and ks.prefix_len(long[:9]) == 9 and ks.prefix_len(long[:25]) == 25
    assert KeyBatch.of([]).keys() == [] and len(KeySet.of([])) == 0


@pytest.mark.parametrize("wide, walk", [(8, 32), (0, 32), (8, 0), (8, 3)])
def test_the_index_matches_a_set_model_of_every_instance_and_the_pool(wide, walk, monkeypatch):
    """Events, dumps and drops on prefill and cachestore instances in any order: every query
    answers as sets of the same keys would, the pool's size among them; a walk over all prefill
    instances at once too, by the instances (8) or by its cache of each key's holders (0), key
    by key or, past ``walk`` keys left, each instance's rest in one compiled walk."""
    monkeypatch.setattr(index, "WIDE", wide)
    monkeypatch.setattr(index, "WALK_KEYS", walk)
    rng = random.Random(4)
    universe = _keys(400, 5)
    idx = PrefixIndex()
    model: dict[str, set[bytes]] = {}
    kinds = {"p0": "prefill", "p1": "prefill", "c0": "cachestore", "c1": "cachestore", "c2": "cachestore"}
    seqs = {iid: 0 for iid in kinds}
    epochs = {iid: 0 for iid in kinds}
    for step in range(600):
        iid = rng.choice(list(kinds))
        what = rng.random()
        if what < 0.05:  # gone: forgotten, until a dump of its next run
            idx.drop_instance(iid)
            model.pop(iid, None)
            continue
        if what < 0.12 or iid not in model:  # a dump, as after a restart
            keys = set(rng.sample(universe, rng.randint(0, 120)))
            epochs[iid] += 1
            seqs[iid] = 3
            idx.load_dump(iid, kinds[iid], f"{epochs[iid]:04d}", seqs[iid], list(keys))
            model[iid] = keys
            continue
        stored = [rng.choice(universe) for _ in range(rng.randint(0, 20))]
        removed = [rng.choice(universe) for _ in range(rng.randint(0, 20))]
        seqs[iid] += 1
        assert not idx.apply(KVEvent(instance_id=iid, source=kinds[iid], epoch=f"{epochs[iid]:04d}", seq=seqs[iid],
                                     stored=stored, removed=removed))
        model[iid] = (model[iid] | set(stored)) - set(removed)
        pool = set().union(*(model.get(c, set()) for c in ("c0", "c1", "c2")))
        assert idx.pool_blocks() == len(pool)
        chain = rng.sample(sorted(pool), min(rng.choice((3, 12)), len(pool))) + rng.sample(universe, 3)
        want = next((i for i, k in enumerate(chain) if k not in pool), len(chain))
        assert idx.pool_prefix_len(chain) == want
        own = sorted(model.get("p0", set()) & model.get("p1", set())) or sorted(model.get("p0", set()))
        for ch in (chain, rng.sample(own, min(len(own), rng.randint(0, 8))) + rng.sample(universe, 2)):
            wants = []
            for p in ("p0", "p1"):
                held = model.get(p, set())
                wants.append(next((i for i, k in enumerate(ch) if k not in held), len(ch)))
                assert idx.prefix_len(ch, p) == wants[-1]
                assert idx.count_of(p) == len(held)
            # every instance's at once, an unknown one among them
            assert idx.prefix_lens(ch, ["p0", "nobody", "p1"]) == [wants[0], 0, wants[1]]
    assert idx.pool_keys() == set().union(*(model.get(c, set()) for c in ("c0", "c1", "c2")))
    assert all(idx.keys_of(i) == model.get(i, set()) for i in kinds)


def test_keys_that_are_not_digests_are_held_too():
    """Counters (names whose bits are not spread) and the all-zero key behave like any key."""
    counters = [b"\xfe\xed" + (7).to_bytes(4, "big") + n.to_bytes(10, "big") for n in range(5000)]
    zero = bytes(16)
    ks = KeySet.of(counters[:4000] + [zero])
    assert len(ks) == 4001 and ks.holds(zero) and ks.holds(counters[3999])
    assert not ks.holds(counters[4000])
    assert list(ks.contains(KeyBatch.of(counters[3990:4010]))) == [True] * 10 + [False] * 10
    ks.remove(KeyBatch.of([zero] + counters[:2000]))
    assert not ks.holds(zero) and ks.prefix_len(counters[2000:4001]) == 2000
    assert set(ks.keys()) == set(counters[2000:4000])
