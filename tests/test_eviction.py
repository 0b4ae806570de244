"""``services.cachestore.eviction`` (the policies) and ``bench.eviction`` (the offline comparison),
on hand-made chains whose evictions are known exactly."""

from __future__ import annotations

import random

import pytest

from bench.eviction import PolicyCache, capacities, compare
from bench.ideal_lru import lru_prefix_hits, prefix_hits
from services.cachestore.eviction import (DEFAULT_EVICT_HIGH, DEFAULT_EVICT_LOW, DEFAULT_POLICY, POLICIES,
                                          LFUDAPolicy, LRUPolicy, S3FIFOPolicy, insert_chain, make_policy)


def drain(policy) -> list:
    """Every victim in turn, until the policy holds nothing."""
    out = []
    while (k := policy.evict()) is not None:
        out.append(k)
    return out


# ---------------------------------------------------------------- LRU, leaf first or not
def test_lru_lets_the_least_recently_used_go_first_and_leaf_first_its_least_recent_leaf():
    # [a b] then [x] then [a c]: uses a1 b2 x3 a4 c5; a is the parent of b and c
    for leaf_first, order in ((False, list("bxac")), (True, list("bxca"))):
        p = LRUPolicy(leaf_first)
        insert_chain(p, "ab")
        insert_chain(p, "x")
        insert_chain(p, "ac")  # a held: used again; c new, child of a
        assert p.parent("c") == "a" and p.has_child("a")
        # plain: a (used at 4) goes before c (5), leaving nothing after it; leaf first: a waits
        # for its last child, then goes with its own (older) time
        assert drain(p) == order


def test_lru_leaf_first_keeps_a_long_chain_from_its_head_and_evicts_it_from_its_tail():
    p = LRUPolicy(leaf_first=True)
    insert_chain(p, "abcd")
    insert_chain(p, "x")
    assert p.victim() == "d"  # plain LRU would take a, and b c d could never be reused
    plain = LRUPolicy()
    insert_chain(plain, "abcd")
    insert_chain(plain, "x")
    assert drain(plain) == list("abcdx") and drain(p) == list("dcbax")


def test_a_child_may_arrive_before_its_parent():
    p = LRUPolicy(leaf_first=True)
    p.insert("b", parent="a")  # e.g. its parent lives on another instance, or comes later
    p.insert("a")
    p.insert("x")
    assert p.has_child("a") and drain(p) == ["b", "a", "x"]  # a waits for b, though older than x
    p.insert("b", parent="a")
    p.remove("b")
    assert not p.has_child("a") and len(p) == 0


def test_lru_policy_is_the_ideal_lru_on_random_chains():
    rng = random.Random(3)
    roots = [[f"r{j}-{i}" for i in range(12)] for j in range(8)]
    chains = [roots[rng.randrange(8)][: rng.randrange(1, 13)] + [f"u{n}-{i}" for i in range(rng.randrange(3))]
              for n in range(400)]
    for cap in (0, 1, 5, 20, 60, 200):
        assert prefix_hits(PolicyCache("lru", cap), chains) == lru_prefix_hits(chains, cap)


# ---------------------------------------------------------------- LFU with dynamic ageing
def test_lfuda_ranks_by_uses_plus_the_age_of_the_cache_ties_to_the_least_recent():
    p = LFUDAPolicy()
    for k in "abc":
        p.insert(k)
    p.access("a")
    p.access("a")  # a: 3 uses; b, c: 1
    assert p.evict() == "b" and p.age == 1  # rank 1, older than c
    p.insert("d")  # rank age + 1 = 2
    assert p.evict() == "c" and p.age == 1  # rank 1
    assert p.evict() == "d" and p.age == 2  # rank 2 < a's 3
    assert p.evict() == "a" and p.age == 3


def test_lfuda_ages_out_a_block_used_often_long_ago():
    p = LFUDAPolicy()
    p.insert("hot")
    for _ in range(3):
        p.access("hot")  # rank 4 at age 0
    gone = []
    for i in range(6):  # one block at a time through a cache of two
        p.insert(f"n{i}")
        gone.append(p.evict())
    # each eviction ages the cache by one: n_i enters with rank i + 1 and goes at once, until the
    # newcomer's rank reaches the hot block's (n3 ties it at 4, and the hot block is older)
    assert gone == ["n0", "n1", "n2", "hot", "n3", "n4"]


@pytest.mark.parametrize("name", POLICIES)
def test_a_held_key_is_never_the_victim_and_keeps_its_rank_and_uses(name):
    p = make_policy(name, 8)
    insert_chain(p, ["a", "b"])  # b is a's child
    p.insert("c")
    for _ in range(3):
        p.access("a")
        p.access("b")
    p.hold("b")
    p.hold("z")  # not held yet: held from when it arrives
    p.insert("z")
    p.access("b")  # a use while held still counts
    victims = []
    while (k := p.evict()) is not None:
        victims.append(k)
    # b and z are never victims; c (used least) before a (leaf first: a has a held child, and goes
    # only when nothing else can)
    assert victims == ["c", "a"]
    p.unhold("b")
    p.unhold("z")
    assert sorted(drain(p)) == ["b", "z"]


@pytest.mark.parametrize("name", ["lru", "lru_leaf", "lfuda", "lfuda_leaf"])
def test_holding_a_key_while_it_is_read_changes_nothing_of_the_order(name):
    """A block used often and held for a read ranks after the blocks used once when the read ends,
    as if it had never been held (a held key re-entering as new would go before a block inserted
    after it under LFU, and before the blocks used after it under LRU)."""
    p, q = make_policy(name, 8), make_policy(name, 8)
    for pol in (p, q):
        insert_chain(pol, ["a", "b"])
        for _ in range(3):
            pol.access("a")
    p.hold("a")
    for pol in (p, q):
        pol.access("a")
        pol.access("b")
        pol.insert("c")
    p.unhold("a")
    assert drain(p) == drain(q)


def test_lfuda_leaf_first_never_leaves_a_used_block_without_its_parent():
    for leaf_first, order in ((False, ["a", "x", "b"]), (True, ["x", "b", "a"])):
        p = LFUDAPolicy(leaf_first)
        insert_chain(p, "ab")  # a, b: rank 1
        for _ in range(3):
            p.access("b")  # b: rank 4
        p.insert("x")  # rank 1
        assert drain(p) == order  # plain: a first (rank 1, oldest), which makes b useless


# ---------------------------------------------------------------- S3-FIFO
def test_s3fifo_small_queue_main_queue_and_ghosts():
    p = S3FIFOPolicy(capacity=10)  # small queue: 1 block, ghosts: 9
    for k in "abc":
        p.insert(k)
    assert p.evict() == "a"  # never used again in the small queue: out, its key a ghost
    p.access("b")
    assert p.evict() == "c"  # b was used: moved to the main queue; c was not
    p.insert("a")  # a ghost: straight to the main queue, behind b
    assert p._main and list(p._main) == ["b", "a"] and not p._small
    p.access("b")
    assert p.evict() == "a"  # b used since it entered the main queue: round again; a was not
    assert p.evict() == "b"


def test_s3fifo_leaf_first_evicts_a_chain_from_its_tail():
    for leaf_first, order in ((False, list("abcx")), (True, list("cbax"))):
        p = S3FIFOPolicy(capacity=10, leaf_first=leaf_first)
        insert_chain(p, "abc")
        p.insert("x")
        assert drain(p) == order


# ---------------------------------------------------------------- the offline comparison
def test_policy_cache_serves_prefixes_and_evicts_between_watermarks():
    cache = PolicyCache("lru", 10, high=0.8, low=0.5)
    assert cache.request(list("abcdefg")) == 0 and len(cache) == 7  # 7 <= 8: nothing evicted
    assert cache.request(list("abcdefgh"), reusable=7) == 7 and len(cache) == 8
    assert cache.request(list("xy")) == 0 and len(cache) == 5  # 10 > 8: down to 5, least recent first
    assert [k in cache for k in "abcdefghxy"] == [False] * 5 + [True] * 5 and cache.evictions == 5
    full = PolicyCache("lru", 3)  # at its bound: one block out for each block in
    assert full.request(list("abcd")) == 0 and len(full) == 3 and "a" not in full


def test_compare_reports_each_policy_against_the_ideal_lru():
    chains = [list("abc"), list("x"), list("abd"), list("y"), list("abc")]
    reused = compare(chains, [3] * len(chains), block_size=16, fractions=(1.0, 0.5),
                     policies=("lru", "lru_leaf"), watermarks=None)
    caps = capacities(6, (1.0, 0.5))  # a b c x d y
    assert caps == {1.0: 6, 0.5: 3}
    assert reused["ideal_lru"] == reused["lru"] == {1.0: 16 * (2 + 3), 0.5: 0}
    # three blocks: LRU lets a go for [x], and every later request finds its chain without a head;
    # leaf first lets c go for [x] (a leaf, older than x), so [a b d] reuses a b; then x for d, d
    # for y, and the last [a b c] reuses a b again
    assert reused["lru_leaf"] == {1.0: 16 * 5, 0.5: 16 * (2 + 2)}
    with_marks = compare(chains, [3] * len(chains), 16, (1.0,), ("lru",), watermarks=(0.5, 0.5))
    assert set(with_marks) == {"ideal_lru", "lru", "lru@50/50"}


def test_policy_names_and_defaults():
    from libs.config import Settings

    assert set(POLICIES) == {"lru", "lru_leaf", "lfuda", "lfuda_leaf", "s3fifo", "s3fifo_leaf"}
    assert {make_policy(n, 10).name for n in POLICIES} == set(POLICIES)
    with pytest.raises(ValueError):
        make_policy("mru", 10)
    s = Settings()
    assert (s.pool_eviction, s.pool_evict_high, s.pool_evict_low) == (DEFAULT_POLICY, DEFAULT_EVICT_HIGH,
                                                                      DEFAULT_EVICT_LOW)
    with pytest.raises(ValueError):
        PolicyCache("lru", 10, high=0.5, low=0.9)


def test_the_setting_flows_from_the_command_line_to_the_cachestore():
    from yuebing.cli import _settings, build_parser
    from yuebing.cluster import FORWARDED

    assert {"pool_eviction", "pool_evict_high", "pool_evict_low"} <= set(FORWARDED)
    args = build_parser().parse_args(["up", "--pool-eviction", "lru"])
    assert _settings(args).pool_eviction == "lru"
    assert _settings(build_parser().parse_args(["up"])).pool_eviction == DEFAULT_POLICY
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--pool-eviction", "fifo"])
    args = build_parser().parse_args(["bench", "eviction", "--all", "--policies", "lru,lfuda_leaf"])
    assert args.all and args.policies == "lru,lfuda_leaf"
