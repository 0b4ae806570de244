"""``bench.ideal_lru``: the prefix reuse an ideal LRU cache of a given size reaches, on hand-made chains."""

from __future__ import annotations

import pytest

from bench.ideal_lru import IdealLRU, lru_prefix_hits


def test_unbounded_cache_reuses_every_leading_block_seen_before():
    chains = [["a", "b", "c"], ["a", "b", "d"], ["a", "b", "d", "e"], ["x", "b"], ["a", "b", "d", "e", "f"]]
    # "x b": "b" is held but "x" is not, so nothing leads: prefix semantics, not a set lookup
    assert lru_prefix_hits(chains, capacity=100) == [0, 2, 3, 0, 4]


def test_zero_capacity_reuses_nothing():
    assert lru_prefix_hits([["a"], ["a"], ["a", "b"]], capacity=0) == [0, 0, 0]


def test_eviction_is_least_recently_used_and_chains_touch_in_order():
    # capacity 3: after [a b c] the cache is a<b<c (c most recent); [d] evicts a
    assert lru_prefix_hits([["a", "b", "c"], ["d"], ["a", "b"]], capacity=3) == [0, 0, 0]
    # reusing [a b] makes them recent: [d] then evicts c, and [a b c] reuses a, b only
    assert lru_prefix_hits([["a", "b", "c"], ["a", "b"], ["d"], ["a", "b", "c"]], capacity=3) == [0, 2, 0, 2]


def test_a_chain_longer_than_the_cache_keeps_only_its_tail():
    # [a b c d e] in a cache of 2 leaves d, e: the same chain again finds no leading block, [d e] both
    assert lru_prefix_hits([list("abcde"), list("abcde"), list("de")], capacity=2) == [0, 0, 2]
    cache = IdealLRU(2)
    cache.request(list("abcde"))
    assert "d" in cache and "e" in cache and "a" not in cache and len(cache) == 2 and cache.evictions == 3


def test_reusable_caps_the_blocks_reused_but_not_what_is_cached():
    chains = [["a", "b"], ["a", "b"], ["a", "b", "c"], ["a", "b", "c"]]
    # a prompt of exactly two blocks reuses at most one (one token is always computed)
    assert lru_prefix_hits(chains, capacity=10, reusable=[1, 1, 2, 2]) == [0, 1, 2, 2]
    assert lru_prefix_hits(chains, capacity=10, reusable=[1, 1, 2, 3]) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        lru_prefix_hits(chains, capacity=10, reusable=[1])


def test_a_conversation_against_a_competing_stream():
    # one conversation growing turn by turn, interleaved with one-off prompts of two fresh blocks each
    chains = []
    for turn in range(4):
        chains.append([f"c{i}" for i in range(turn + 2)])  # turn t: the conversation's first t + 2 blocks
        chains.append([f"x{turn}a", f"x{turn}b"])
    # with 8 blocks: turn t reuses its t + 1 earlier blocks (at most 5 + 2 one-off blocks in the cache)
    assert lru_prefix_hits(chains, capacity=8) == [0, 0, 2, 0, 3, 0, 4, 0]
    # with 3 blocks: the one-off prompt after each turn evicts the conversation's two oldest blocks,
    # so each turn finds no leading block (c0 is gone) and reuses nothing
    assert lru_prefix_hits(chains, capacity=3) == [0, 0, 0, 0, 0, 0, 0, 0]
    # with 4: after turn 0 (c0 c1) and x0a x0b all four are held, so turn 1 reuses c0 c1; its c2 and
    # the next one-off's two blocks then evict x0a x0b and c0, and no later turn finds c0
    assert lru_prefix_hits(chains, capacity=4) == [0, 0, 2, 0, 0, 0, 0, 0]


def test_negative_capacity_is_an_error():
    with pytest.raises(ValueError):
        IdealLRU(-1)
