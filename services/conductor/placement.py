"""Placement policies: which prefill and decode instance serve a request, and what it reuses.

Plain logic with no I/O, unit-tested directly. ``global_cache_aware`` is Algorithm 1 of the
Mooncake paper: for every prefill instance, predicted TTFT = queue + prefill of the part not
reused, or the transfer of the blocks to load when that is slower (the prefill streams them in
layer by layer while it computes), where the reused part is the instance's own prefix hit or,
when loading it beats recomputing, a longer hit elsewhere: the pool's, or (``peer_fetch``) the
own cache of the other prefill instance holding the longest prefix, from which the chosen instance
pulls the blocks (and keeps them: hot prefixes spread to where they are served).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from services.conductor.prefillcost import PrefillCostModel

POLICIES = ("random", "round_robin", "least_loaded", "local_cache_aware", "global_cache_aware")


@dataclass(frozen=True)
class RequestView:
    prompt_len: int
    block_size: int
    pool_blocks: int  # leading blocks present in the pool
    tbt_slo: float = 0.0  # seconds; 0 = none
    # the key that breaks ties between instances: the prompt's first block no holder has (its last
    # if all are held; "" for a prompt shorter than a block)
    affinity: bytes = b""
    # the longest run of leading blocks one holder in the cluster has: the pool (when used) or a
    # prefill instance's own cache
    held_blocks: int = 0

    @property
    def max_reuse_blocks(self) -> int:
        # at least one prompt token is always computed: its logits give the first output token
        return max(0, (self.prompt_len - 1) // self.block_size)

    @property
    def cluster_hit_tokens(self) -> int:
        """Prompt tokens the cluster holds the KV of, whichever instance the prompt goes to: what a
        placement can reuse at best (the conductor's cluster hit rate, whatever the policy does)."""
        return min(self.held_blocks, self.max_reuse_blocks) * self.block_size


@dataclass(frozen=True)
class PrefillView:
    instance_id: str
    queue_seconds: float
    local_blocks: int  # leading blocks in the instance's own DRAM cache


@dataclass(frozen=True)
class DecodeView:
    instance_id: str
    sequences: int  # running + waiting + placed since the last heartbeat
    kv_tokens: int
    # predicted time between tokens with this request added: to the load now, and to the load
    # projected to when the request would join; and seconds until the instance sheds load
    current_tbt: float = 0.0
    predicted_tbt: float = 0.0
    sheds_in: float = float("inf")
    # predicted wait from the request's first token to a row here (KV hand-off tail and queue for a
    # row, before any learnt margin): with the load now, and projected
    wait_now: float = 0.0
    wait_then: float = 0.0
    # admitted requests this one would push past their TBT objective, as projected: it would take
    # a row before them (it reaches decode first, though admitted later)
    delays: int = 0
    # every admitted request it would make wait longer for a row here, with the seconds it adds
    delayed: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Placement:
    admitted: bool
    prefill_id: str = ""
    decode_id: str = ""
    status: int = 200
    reason: str = ""
    retry_after: float = 0.0
    reuse_blocks: int = -1
    use_pool: bool = True
    pool_blocks: int = -1  # leading blocks the index has in the pool (-1: unknown)
    peer_id: str = ""  # the prefill instance to load the reused blocks from ("": own cache or pool)
    predicted_ttft: float = 0.0
    predicted_prefill: float = 0.0  # seconds the prompt holds its instance to its first token (compute or load)
    cached_blocks: int = 0  # blocks the plan expects to reuse
    predicted_tbt: float = 0.0  # on the chosen decode instance, with this request added
    cause: str = ""  # why not admitted by the SLO check: "ttft" | "tbt"
    # the parts of predicted_prefill: the compute past the reused prefix, and the load of the
    # reused prefix running under it (0: none); predicted_prefill is the slower of the two
    predicted_compute: float = 0.0
    predicted_load: float = 0.0
    stages: int = 1  # prefill instances the prompt is split over (a pipeline: more than one)

    @property
    def peer_blocks(self) -> int:
        """Leading blocks the peer holds and the chosen instance loads from it (0: no peer)."""
        return self.cached_blocks if self.peer_id else 0

    @property
    def plan(self) -> str:
        """Where the reused prefix comes from: "local" (the instance's own cache), "pool" or "peer";
        "pipeline" for a prompt split over several instances."""
        if self.stages > 1:
            return "pipeline"
        return "peer" if self.peer_id else "pool" if self.use_pool else "local"


@dataclass(frozen=True)
class _Choice:
    view: PrefillView
    reuse_blocks: int
    use_pool: bool
    ttft: float
    prefill: float  # the compute
    peer_id: str = ""
    load: float = 0.0


def affinity_rank(affinity: bytes, instance_id: str) -> int:
    """Rendezvous hashing: among instances a policy finds equally good, the one whose hash with the
    prompt's ``affinity`` block (the first no instance holds) is highest. Prompts that differ after a
    shared prefix (conversations after one system prompt) spread over the instances; the same
    prompt lands on the same instance while nothing else tells the instances apart."""
    return -xxhash.xxh3_64_intdigest(affinity + instance_id.encode())


def cache_candidates(req: RequestView, prefills: list[PrefillView], keep: Sequence[PrefillView] = ()) -> list[PrefillView]:
    """The prefill instances a cache-aware choice can pick: of the instances holding the same
    number of the prompt's leading blocks (whose estimates differ only by their queues: the same
    prefix to reuse, the pool's or a peer's, the same plan) the one with the shortest queue, ties
    to the prompt's affinity; and ``keep`` (instances whose estimate differs otherwise: a peer's
    own holders). The choice among these is the choice among all, at the cost of a few estimates
    instead of one per instance (a system prompt every instance holds makes them one group)."""
    kept = {p.instance_id for p in keep}
    best: dict[int, tuple[float, int | None, PrefillView]] = {}  # local blocks -> (queue, affinity rank, view)
    for p in prefills:
        if p.instance_id in kept:
            continue
        b = best.get(p.local_blocks)
        if b is None or p.queue_seconds < b[0]:
            best[p.local_blocks] = (p.queue_seconds, None, p)
        elif p.queue_seconds == b[0]:  # (ranks are hashes: computed for ties only)
            rank_b = b[1] if b[1] is not None else affinity_rank(req.affinity, b[2].instance_id)
            rank_p = affinity_rank(req.affinity, p.instance_id)
            best[p.local_blocks] = (p.queue_seconds, rank_p, p) if rank_p < rank_b else (b[0], rank_b, b[2])
    return list(keep) + [b[2] for b in best.values()]


class Policy:
    """Base: the estimate for a given instance and reuse plan; subclasses pick.

    With ``use_pool`` the chosen instance also loads a longer prefix from the pool when that beats
    recomputing it; local_cache_aware never does (it reuses only the instance's own DRAM)."""

    name = "base"
    # the decode instance is chosen by its predicted TBT (``choose_decode``): the scheduler may
    # predict only for the least loaded few (random and round robin choose among all)
    decode_by_prediction = True

    def __init__(self, model: PrefillCostModel, use_pool: bool = True, seed: int | None = None,
                 colocated: bool = False, peer_fetch: bool = False):
        self.model = model
        self.use_pool = use_pool
        self.peer_fetch = peer_fetch
        self.colocated = colocated  # decode where the request was prefilled (instances do both)
        self.rng = random.Random(seed)
        self._rr = 0

    def estimate(self, req: RequestView, p: PrefillView, use_pool: bool, peer: PrefillView | None = None) -> _Choice:
        """Predicted TTFT on ``p`` reusing its own prefix, or the pool's or ``peer``'s (another
        instance's own cache) when loading that longer prefix is faster."""
        local = min(p.local_blocks, req.max_reuse_blocks)
        prefill = self.model.prefill_seconds(req.prompt_len, local * req.block_size)
        best = _Choice(p, local, False, p.queue_seconds + prefill, prefill)
        sources = []
        if use_pool:
            sources.append((min(req.pool_blocks, req.max_reuse_blocks), ""))
        if peer is not None and peer.instance_id != p.instance_id:
            sources.append((min(peer.local_blocks, req.max_reuse_blocks), peer.instance_id))
        for held, peer_id in sources:
            if held <= local:
                continue
            prefill = self.model.prefill_seconds(req.prompt_len, held * req.block_size)
            # the load streams layer by layer under the compute: the slower of the two sets the pace
            load = self.model.load_seconds((held - local) * req.block_size)
            ttft = p.queue_seconds + max(prefill, load)
            if ttft < best.ttft:  # the kvcache-balancing threshold: load only when it beats recompute
                best = _Choice(p, held, not peer_id, ttft, prefill, peer_id, load)
        return best

    def choose_prefill(self, req: RequestView, prefills: list[PrefillView]) -> _Choice:
        raise NotImplementedError

    def choose_decode(self, req: RequestView, decodes: list[DecodeView]) -> DecodeView:
        """The instance whose predicted time between tokens, with this request added, is lowest
        (an instance within the TBT SLO, and where it would delay no admitted request past its own,
        whenever there is one; ties to the fewer sequences)."""
        def key(d: DecodeView):
            over = (req.tbt_slo > 0 and d.predicted_tbt > req.tbt_slo) or d.delays > 0
            return (over, d.predicted_tbt, d.sequences, d.kv_tokens, d.instance_id)

        return min(decodes, key=key)

    def place(self, req: RequestView, prefills: list[PrefillView], decodes: list[DecodeView]) -> Placement:
        if not prefills or not decodes:
            missing = " and ".join(k for k, v in (("prefill", prefills), ("decode", decodes)) if not v)
            return Placement(False, status=503, reason=f"no {missing} instance is alive", retry_after=2.0)
        prefills = sorted(prefills, key=lambda p: p.instance_id)
        decodes = sorted(decodes, key=lambda d: d.instance_id)
        if self.colocated:
            # an instance prefills and decodes its own requests: only those that do both qualify
            both = {d.instance_id: d for d in decodes}
            prefills = [p for p in prefills if p.instance_id in both]
            if not prefills:
                return Placement(False, status=503, reason="no instance that both prefills and decodes is alive",
                                 retry_after=2.0)
            c = self.choose_prefill(req, prefills)
            d = both[c.view.instance_id]
        else:
            c = self.choose_prefill(req, prefills)
            d = self.choose_decode(req, decodes)
        return Placement(
            True,
            prefill_id=c.view.instance_id,
            decode_id=d.instance_id,
            use_pool=c.use_pool,
            pool_blocks=req.pool_blocks,
            peer_id=c.peer_id,
            predicted_ttft=c.ttft,
            predicted_prefill=c.ttft - c.view.queue_seconds,
            cached_blocks=c.reuse_blocks,
            predicted_tbt=d.predicted_tbt,
            predicted_compute=c.prefill,
            predicted_load=c.load,
        )


class RandomPolicy(Policy):
    name = "random"
    decode_by_prediction = False

    def choose_prefill(self, req, prefills):
        return self.estimate(req, self.rng.choice(prefills), self.use_pool)

    def choose_decode(self, req, decodes):
        return self.rng.choice(decodes)


class RoundRobinPolicy(Policy):
    name = "round_robin"
    decode_by_prediction = False

    def choose_prefill(self, req, prefills):
        p = prefills[self._rr % len(prefills)]
        self._rr += 1
        return self.estimate(req, p, self.use_pool)

    def choose_decode(self, req, decodes):
        return decodes[(self._rr - 1) % len(decodes)]


class LeastLoadedPolicy(Policy):
    name = "least_loaded"

    def choose_prefill(self, req, prefills):
        # ties (idle instances) at random: load balancing that knows nothing of caches
        return self.estimate(req, min(prefills, key=lambda p: (p.queue_seconds, self.rng.random())), self.use_pool)


class LocalCacheAwarePolicy(Policy):
    """Minimum of queue + prefill given each instance's own cache; never loads from the pool."""

    name = "local_cache_aware"

    def choose_prefill(self, req, prefills):
        return min((self.estimate(req, p, False) for p in cache_candidates(req, prefills)),
                   key=lambda c: (c.ttft, affinity_rank(req.affinity, c.view.instance_id)))


class GlobalCacheAwarePolicy(Policy):
    """Algorithm 1: minimum predicted TTFT over instances, reusing the own prefix, the pool's, or
    (``peer_fetch``) that of the other instance holding the longest one."""

    name = "global_cache_aware"

    def choose_prefill(self, req, prefills):
        holders = heapq.nsmallest(2, (p for p in prefills if p.local_blocks > 0), key=lambda p: -p.local_blocks)

        def peer(p: PrefillView) -> PrefillView | None:
            if not self.peer_fetch:
                return None
            return next((q for q in holders if q.instance_id != p.instance_id), None)

        # the two longest holders load from each other, the others from the longest: kept apart
        keep = holders if self.peer_fetch else ()
        # on a tie, the plan that moves no blocks, then the prompt's affinity
        return min((self.estimate(req, p, self.use_pool, peer(p)) for p in cache_candidates(req, prefills, keep)),
                   key=lambda c: (c.ttft, c.use_pool or bool(c.peer_id), affinity_rank(req.affinity, c.view.instance_id)))


def make_policy(name: str, model: PrefillCostModel, use_pool: bool = True, seed: int | None = None,
                colocated: bool = False, peer_fetch: bool = False) -> Policy:
    classes = {c.name: c for c in (RandomPolicy, RoundRobinPolicy, LeastLoadedPolicy, LocalCacheAwarePolicy,
                                   GlobalCacheAwarePolicy)}
    if name not in classes:
        raise ValueError(f"unknown placement policy {name!r}; choose one of {', '.join(POLICIES)}")
    return classes[name](model, use_pool=use_pool, seed=seed, colocated=colocated, peer_fetch=peer_fetch)
