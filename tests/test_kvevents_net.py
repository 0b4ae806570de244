"""KV events name each key's net change: the conductor's index stays equal to a prefill's own cache
when keeping a prompt's blocks evicts some of that prompt's later blocks and stores them again."""

from __future__ import annotations

import pytest
import torch

from libs.kvevents import net_changes
from libs.protocol import KVEvent
from services.conductor.index import PrefixIndex
from services.prefill.blockcache import BlockCache


def test_net_changes_keeps_disjoint_lists_as_they_are():
    held_asked = []

    def held():
        held_asked.append(True)
        return []

    assert net_changes([b"a", b"b"], [b"c"], held) == ([b"a", b"b"], [b"c"])
    assert not held_asked  # the current keys are asked only when a key is in both lists


def test_net_changes_puts_a_key_in_both_lists_where_its_current_state_says():
    # c: evicted, then stored again (held now); d: stored, then evicted (not held now)
    stored, removed = net_changes([b"b", b"c", b"d"], [b"c", b"a", b"d"], lambda: [b"b", b"c", b"x"])
    assert stored == [b"b", b"c"] and removed == [b"a", b"d"]


A, B, C, D = (bytes([ord(c)]) * 16 for c in "ABCD")  # block keys are 16 bytes


def _keep(cache: BlockCache, keys: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """What the prefill does with a prompt's blocks (services/prefill/service.py _keep_blocks)."""
    stored, removed = [], []
    for k in keys:
        new, evicted = cache.put(k, torch.zeros(1))
        if new:
            stored.append(k)
        removed.extend(evicted)
    return stored, removed


def test_index_matches_the_cache_after_a_prompt_evicts_its_own_later_blocks():
    cache = BlockCache(3 * 4)  # three float32 blocks of one element
    index = PrefixIndex()
    ep = "e1"
    index.load_dump("prefill-0", "prefill", ep, 0, [])
    seq = 0

    def publish(stored, removed):
        nonlocal seq
        stored, removed = net_changes(stored, removed, cache.keys)
        seq += 1
        assert not index.apply(KVEvent(instance_id="prefill-0", source="prefill", epoch=ep, seq=seq,
                                       stored=stored, removed=removed))

    publish(*_keep(cache, [C, D]))
    publish(*_keep(cache, [A]))  # least recently used first: C, D, A
    # the prompt A B C D: A is its reused prefix (touched), then B evicts C, C evicts D, D evicts A
    chain = [A, B, C, D]
    assert len(cache.prefix(chain)) == 1
    stored, removed = _keep(cache, chain)
    assert stored == [B, C, D] and removed == [C, D, A]
    publish(stored, removed)
    assert set(cache.keys()) == {B, C, D}
    assert index.keys_of("prefill-0") == set(cache.keys())
    assert index.prefix_len([B, C, D], "prefill-0") == 3


def test_an_event_or_dump_with_a_key_that_is_not_a_block_key_is_refused_when_decoded():
    import msgspec

    from libs.protocol import KVDump, decode, encode

    good = KVEvent(instance_id="p", source="prefill", epoch="e", seq=1, stored=[A], removed=[B])
    assert decode(encode(good), KVEvent) == good
    for bad in ([b"short"], [A + b"x"]):
        with pytest.raises(msgspec.ValidationError):
            decode(encode(KVEvent(instance_id="p", source="prefill", epoch="e", seq=1, stored=bad)), KVEvent)
        with pytest.raises(msgspec.ValidationError):
            decode(encode(KVDump(instance_id="p", source="prefill", epoch="e", seq=1, keys=bad, total=1, offset=0)),
                   KVDump)
