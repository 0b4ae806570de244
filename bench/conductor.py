"""``yuebing bench conductor``: the control plane alone, at production scale.

A real conductor process (``yuebing serve conductor``, its own bus user and permissions on a real
nats-server with JetStream, pinned to one core when the host has two or more) faces a cluster
that exists only in this process: N prefill and N decode instances (and a cachestore, unless
``--no-pool``) that beat, publish KV events, answer dumps and send the reports the conductor
learns from, exactly on the subjects and in the messages the real instances use
(``libs/protocol.py``). This process plays the gateway too, with the gateway's bus user, and asks
``yb.sched`` for placements, open loop, at swept rates. The load generator and nats-server share
the other core.

Measured, for each number of instances (``--instances``, per kind) and each size of the prefix
index (``--blocks``, entries: one block held by one instance):

- the pre-load: every block reaches the index as the instances' KV events on ``YB_KV_EVENTS``
  (``libs/kvevents.py``'s format and numbering), ``--preload-batch`` events at a time (the next
  batch once the conductor has applied the last); its time, keys and events ingested per second,
  and the conductor's resident memory growth per indexed block (psutil);
- decision latency: the request/reply round trip of ``yb.sched`` seen from the requesting side
  (p50/p99), closed loop (one request at a time) and at each offered rate (Poisson arrivals);
  the rates are fractions of the closed-loop capacity, rising until the conductor saturates (a
  reply lost, replies still coming a second after the last request, or the median past ten times
  ``--limit-ms``); the highest rate whose point and every lower one kept the p99 within
  ``--limit-ms`` (10 ms) with every reply is "sustained" (one more point is measured between it
  and the next rate), the highest it kept up with whatever its tail "kept up";
- the conductor process's CPU seconds per decision (all it does in the window: heartbeats,
  reports, KV events, maintenance, its log lines), and its share of its core;
- beside them, what makes them the host's rather than the conductor's: the load generator's
  share of its core, the host's CPU pressure (the share of the time some task waited for a core,
  ``/proc/pressure/cpu``), the instances the conductor declared lost (it, or this process, went
  three heartbeat intervals without running) and whether its index still equals what was published.

What is synthetic (everything the conductor sees is well-formed and self-consistent, but):

- prompts: the Mooncake conversation trace's hash ids (``bench/traces``), each a fixed block of
  ``512 / --token-scale`` random token ids (numpy, seeded by the id: requests that share leading
  ids share a prefix), hashed into block keys by the gateway's own ``libs.kv.keys.block_hashes``
  chain (in the namespace of a model named ``bench-conductor``); arrivals are Poisson at the swept
  rate, not the trace's timestamps; once the trace slice is used up it is offered again (those
  requests then find their whole prefix indexed);
- the index: the blocks of the first ``--warm-requests`` trace requests, as the prefill instance
  that served each (round robin) and the pool would hold them, topped up with filler keys (distinct
  16-byte names no request asks for, counters rather than digests) to ``--blocks``; ``--pool-share`` of
  it in the cachestore;
- instances: a prefill instance serves its tasks one at a time, reusing the longest prefix it or
  the pool holds, computing the rest at a per-token pace set so that the offered prompts would
  keep the prefill instances ``--prefill-util`` busy; it then reports (``PrefillReport``,
  ``PrefillDone``), keeps the prompt's blocks (a KV event storing the new keys and removing as
  many of its oldest, so the index keeps its size) and writes them to the pool (the cachestore's
  KV event); a decode instance runs ``--rows`` rows first come first served, each sequence
  decoding its trace output length (divided by ``--output-scale``) at a step time set so that the
  rows would be ``--decode-occupancy`` full (no stay longer than ``--max-stay`` seconds), lists
  its sequences in its heartbeats and reports each one that leaves (``DecodeReport``);
- the tasks the conductor queues on ``YB_PREFILL`` are purged every second: no one pulls them.

Prints a table per configuration and per rate point, and, last, the figures as one JSON line;
writes a PNG per sweep (latency over offered rate; sustained rate and CPU per decision over
instances; pre-load and memory over blocks) into ``--out-dir``. ``--profile FILE`` runs the
conductor under cProfile and prints its top costs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import heapq
import math
import os
import random
import subprocess
import sys
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import msgspec
import numpy as np

from bench.common import (DEFAULT_TRACE, ROOT, TOKEN_LO, TRACE_BLOCK_TOKENS, emit, entry, make_data_dir, ms,
                          percentile, read_trace, release_data_dir, say)
from bench.ideal_lru import leading_run
from libs.protocol import (PROTOCOL_VERSION, DecodeReport, Heartbeat, IndexSummary, KVDump, KVDumpRequest, KVEvent,
                           PrefillDone, PrefillReport, SamplingParams, ScheduleReply, SequenceProgress, Subjects,
                           decode, encode)
from yuebing.tables import format_table

DEFAULT_VOCAB = 49152  # SmolLM2's, as bench trace
MODEL_ID = "bench-conductor"  # the synthetic model whose KV namespace the keys are in
CONDUCTOR_ID = "conductor-0"
GATEWAY_ID = "gateway-bench"
# a probe instance announces its epoch after KV events: the conductor's dump request for it says it
# has applied them; each probe has an id of its own (bench-probe-N): a second epoch of one instance
# that came while the dump of the first was on its way would be taken for a stale one, and ignored
PROBE_ID = "bench-probe"
DEFAULT_INSTANCES = "8,32"
DEFAULT_BLOCKS = "1e5,1e6"
FULL_INSTANCES = "8,32,128,512"
FULL_BLOCKS = "1e5,1e6,1e7"
LADDER = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5)  # offered rates, as fractions of the closed-loop capacity
KV_BYTES_PER_TOKEN = 160 * 1024  # of the synthetic model (what a pool load of one position moves)
HANDOFF_SHARE = 0.2  # a prompt's KV hand-off after its first token, as a share of its compute


# ================================================================ prompts from the trace
def array_header(n: int) -> bytes:
    """The MessagePack header of an array of ``n`` items."""
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def packed_tokens(tokens: np.ndarray) -> bytes:
    """The MessagePack items of ``tokens`` (each in [256, 65536): a uint16, 3 bytes), as msgspec
    writes a list of those ints, without the array's header."""
    if tokens.size and (int(tokens.min()) < 256 or int(tokens.max()) >= 1 << 16):
        raise ValueError("token ids must be in [256, 65536) to be packed as uint16")
    out = np.empty((tokens.size, 3), dtype=np.uint8)
    out[:, 0] = 0xCD
    out[:, 1:] = tokens.astype(">u2").view(np.uint8).reshape(-1, 2)
    return out.tobytes()


KEY_RECORD = 18  # a 16-byte key as MessagePack: bin 8 (0xc4), its length, the key


@dataclass(frozen=True)
class Prompt:
    """One trace request as the gateway would send it: ``tokens`` prompt tokens made of the blocks
    of ``hash_ids`` (the last one possibly in part), ``max_tokens`` to decode."""

    index: int  # its line in the trace
    tokens: int
    hash_ids: tuple[int, ...]
    max_tokens: int


class TraceChains:
    """Token ids and block keys of trace requests, computed once per hash id.

    A hash id stands for ``512 / token_scale`` token ids drawn from a generator seeded by the id
    (the same tokens wherever it appears); a prompt of ``n`` tokens is the blocks of its leading
    hash ids cut at ``n``. Its block keys are the gateway's (``libs.kv.keys.block_hashes``): a
    blake2b chain over full ``block_size``-token blocks. As a key depends on its whole prefix,
    the keys of a hash id's blocks are kept per (key before it, hash id); the last, partial hash
    id of a prompt uses the leading keys of its full blocks (a key depends only on the tokens up
    to its block's end)."""

    def __init__(self, token_scale: int, block_size: int, namespace: bytes, vocab: int = DEFAULT_VOCAB,
                 seed: int = 0):
        if token_scale < 1 or TRACE_BLOCK_TOKENS % token_scale:
            raise ValueError(f"token_scale must divide {TRACE_BLOCK_TOKENS}, got {token_scale}")
        self.per_hash = TRACE_BLOCK_TOKENS // token_scale
        if block_size < 1 or self.per_hash % block_size:
            raise ValueError(f"block_size {block_size} must divide the {self.per_hash} tokens of a hash id")
        if TOKEN_LO < 256 or vocab > 1 << 16:
            raise ValueError("token ids must fit a uint16 (vocab <= 65536)")
        self.token_scale = token_scale
        self.block_size = block_size
        self.namespace = namespace
        self.vocab = vocab
        self.seed = seed
        self._packed: dict[int, bytes] = {}  # hash id -> its tokens, packed
        self._keys: dict[tuple[bytes, int], bytes] = {}  # (parent key, hash id) -> its blocks' key records

    def token_array(self, hash_id: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(hash_id)])
        return rng.integers(TOKEN_LO, self.vocab, size=self.per_hash, dtype=np.int64)

    def prompt(self, row: dict, index: int, output_scale: int = 1) -> Prompt:
        n = max(1, int(row["input_length"]) // self.token_scale)
        used = tuple(int(h) for h in row["hash_ids"][: -(-n // self.per_hash)])
        return Prompt(index, n, used, max(1, int(row["output_length"]) // output_scale))

    def tokens(self, p: Prompt) -> list[int]:
        """The prompt's token ids (for checks: requests carry them packed)."""
        ids: list[int] = []
        for h in p.hash_ids:
            ids.extend(int(t) for t in self.token_array(h))
        return ids[: p.tokens]

    def _records(self, parent: bytes, hash_id: int) -> bytes:
        got = self._keys.get((parent, hash_id))
        if got is None:
            import hashlib

            arr = self.token_array(hash_id)
            raw = arr.astype("<i4").tobytes()
            self._packed.setdefault(hash_id, packed_tokens(arr))
            step = 4 * self.block_size
            out = []
            key = parent
            for start in range(0, len(raw), step):
                key = hashlib.blake2b(key + raw[start : start + step] + self.namespace, digest_size=16).digest()
                out.append(b"\xc4\x10" + key)
            got = self._keys[(parent, hash_id)] = b"".join(out)
        return got

    def key_records(self, p: Prompt) -> bytes:
        """The prompt's block keys as MessagePack bin items, one per full block, in order."""
        parts = []
        parent = self.namespace
        full = p.tokens // self.block_size
        for h in p.hash_ids:
            rec = self._records(parent, h)
            parts.append(rec)
            parent = rec[-16:]
        return b"".join(parts)[: full * KEY_RECORD]

    def keys(self, p: Prompt) -> list[bytes]:
        rec = self.key_records(p)
        return [rec[i + 2 : i + KEY_RECORD] for i in range(0, len(rec), KEY_RECORD)]

    def packed_prompt(self, p: Prompt) -> bytes:
        """``prompt_token_ids`` of the request, as MessagePack."""
        self.key_records(p)  # (packs the tokens of its hash ids)
        parts = [self._packed[h] for h in p.hash_ids]
        return array_header(p.tokens) + b"".join(parts)[: 3 * p.tokens]

    def blocks(self, p: Prompt) -> int:
        return p.tokens // self.block_size


class _WireScheduleRequest(msgspec.Struct, kw_only=True):
    """``ScheduleRequest`` on the wire with its two long lists already packed (the conductor
    decodes it as a ``ScheduleRequest``: the same map of fields)."""

    v: int = PROTOCOL_VERSION
    attempt_id: str
    prompt_token_ids: msgspec.Raw
    sampling: SamplingParams
    block_hashes: msgspec.Raw
    arrival_time: float = 0.0
    ttft_slo: float = 0.0
    tbt_slo: float = 0.0


def schedule_request(chains: TraceChains, p: Prompt, attempt_id: str, *, ttft_slo: float, tbt_slo: float,
                     arrival_time: float = 0.0) -> bytes:
    """The ``yb.sched`` request of prompt ``p``, as the gateway makes it (its keys, its SLOs; exactly
    ``max_tokens`` tokens, as bench trace asks)."""
    rec = chains.key_records(p)
    return encode(_WireScheduleRequest(
        attempt_id=attempt_id,
        prompt_token_ids=msgspec.Raw(chains.packed_prompt(p)),
        sampling=SamplingParams(max_tokens=p.max_tokens, temperature=0.0, ignore_eos=True),
        block_hashes=msgspec.Raw(array_header(len(rec) // KEY_RECORD) + rec),
        arrival_time=arrival_time, ttft_slo=ttft_slo, tbt_slo=tbt_slo))


# ================================================================ the plan
@dataclass(frozen=True)
class Stage:
    """One configuration: ``instances`` prefill and as many decode instances, ``blocks`` in the index."""

    instances: int
    blocks: int


def parse_counts(spec: str, name: str) -> list[int]:
    """``"1e5, 1e6"`` -> [100000, 1000000] (each a positive whole number)."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise ValueError(f"{name}: {part!r} is not a number") from None
        if v < 1 or v != int(v):
            raise ValueError(f"{name}: {part!r} is not a positive whole number")
        out.append(int(v))
    if not out:
        raise ValueError(f"{name}: nothing given")
    return out


def sweep_plan(instances: Sequence[int], blocks: Sequence[int]) -> list[list[Stage]]:
    """One group per instance count (one conductor each), its index grown through ``blocks`` in
    increasing order (each pre-load adds to the last)."""
    sizes = sorted(set(blocks))
    return [[Stage(n, b) for b in sizes] for n in sorted(set(instances))]


def warm_prompts(chains: "TraceChains", warm: Sequence["Prompt"], blocks: int, prefill_ids: Sequence[str],
                 pool: bool) -> list[tuple[list[bytes], str]]:
    """The warm requests' block chains the index starts with, up to half its ``blocks`` (each held
    by the prefill instance that served it, round robin, and by the pool), with that instance."""
    budget, prompts = blocks // 2, []
    for i, p in enumerate(warm):
        keys = chains.keys(p)
        budget -= len(keys) * (2 if pool else 1)
        if budget < 0:
            break
        prompts.append((keys, prefill_ids[i % len(prefill_ids)]))
    return prompts


def quotas(blocks: int, prefills: int, pool: bool, pool_share: float) -> tuple[list[int], int]:
    """Index entries per prefill instance and in the pool adding up to ``blocks``."""
    in_pool = round(blocks * pool_share) if pool else 0
    rest = blocks - in_pool
    base, extra = divmod(rest, prefills)
    return [base + (1 if i < extra else 0) for i in range(prefills)], in_pool


def ladder(capacity: float, fractions: Sequence[float] = LADDER, max_rate: float = math.inf,
           min_rate: float = 0.5) -> list[float]:
    """Offered rates (requests/s) as ``fractions`` of the closed-loop ``capacity``, at most
    ``max_rate``, two significant digits, increasing, without repeats."""
    out: list[float] = []
    for f in fractions:
        r = min(max_rate, max(min_rate, capacity * f))
        r = float(f"{r:.2g}")
        if not out or r > out[-1]:
            out.append(r)
    return out


def passes(point: dict, limit_ms: float) -> bool:
    """A rate point is sustained when every request got its reply and their p99 is within ``limit_ms``."""
    p99 = point.get("p99_ms")
    return point.get("lost", 0) == 0 and p99 is not None and p99 <= limit_ms


def sustained(points: Iterable[dict], limit_ms: float) -> float | None:
    """The highest offered rate whose point, and every point at a lower rate, passed; None when the
    lowest did not."""
    best = None
    for p in sorted(points, key=lambda p: p["offered_rate"]):
        if not passes(p, limit_ms):
            break
        best = p["offered_rate"]
    return best


SATURATED_MEDIAN = 10.0  # a median decision this many times the p99 limit: the conductor is queueing
SATURATED_BACKLOG = 1.0  # seconds the last replies came after the last request: a backlog built up


def saturated(point: dict, limit_ms: float) -> bool:
    """The conductor no longer keeps up at this rate (higher rates only queue longer): a reply
    missing, replies still coming ``SATURATED_BACKLOG`` seconds after the last request, or the
    median decision past ``SATURATED_MEDIAN`` times ``limit_ms``."""
    p50 = point.get("p50_ms")
    return (point.get("lost", 0) > 0 or p50 is None or p50 > SATURATED_MEDIAN * limit_ms
            or point.get("backlog_s", 0.0) > SATURATED_BACKLOG)


def kept_up(points: Iterable[dict], limit_ms: float) -> float | None:
    """The highest offered rate at which the conductor, and at every lower one, kept up (not
    ``saturated``), whatever its tail; None when it did not at the lowest."""
    best = None
    for p in sorted(points, key=lambda p: p["offered_rate"]):
        if saturated(p, limit_ms):
            break
        best = p["offered_rate"]
    return best


def refine_rate(points: Sequence[dict], limit_ms: float) -> float | None:
    """A rate between the sustained one and the next one measured (which did not pass), two
    significant digits; None when there is no such pair or no rate strictly between them."""
    best = sustained(points, limit_ms)
    above = sorted(p["offered_rate"] for p in points if best is not None and p["offered_rate"] > best)
    if best is None or not above:
        return None
    mid = float(f"{math.sqrt(best * above[0]):.2g}")
    return mid if best < mid < above[0] else None


def sim_pace(rate: float, prefills: int, decodes: int, mean_prompt: float, mean_output: float, rows: int,
             prefill_util: float, decode_occupancy: float, max_stay: float) -> tuple[float, float, float]:
    """(prefill seconds per computed token, decode seconds per step, mean stay in decode) that keep
    the synthetic instances as busy as asked at ``rate`` requests/s: the offered prompts, computed
    whole (and handed off: ``HANDOFF_SHARE`` more), would keep the prefill instances
    ``prefill_util`` busy; the sequences would hold ``decode_occupancy`` of the decode rows, unless
    that makes a stay longer than ``max_stay``."""
    per_token = prefill_util * prefills / (rate * max(1.0, mean_prompt) * (1 + HANDOFF_SHARE))
    stay = min(max_stay, decode_occupancy * rows * decodes / rate)
    return per_token, stay / max(1.0, mean_output), stay


# ================================================================ the synthetic cluster (no I/O)
def filler_key(holder: int, n: int) -> bytes:
    """The ``n``-th filler key of holder ``holder``: a name no prompt's chain makes."""
    return b"\xfe\xed" + holder.to_bytes(4, "big") + n.to_bytes(10, "big")


class Holder:
    """The blocks one instance's cache holds, as its KV events tell them: filler keys (the oldest)
    and trace keys in least-recently-used order; ``capacity`` entries at most."""

    def __init__(self, iid: str, source: str, number: int):
        self.iid = iid
        self.source = source
        self.number = number
        self.epoch = uuid.uuid4().hex[:12]
        self.seq = 0
        self.keys: OrderedDict[bytes, None] = OrderedDict()
        self.filler_lo = self.filler_hi = 0
        self.capacity = 0

    def __len__(self) -> int:
        return len(self.keys) + self.filler_hi - self.filler_lo

    def all_keys(self) -> list[bytes]:
        return [filler_key(self.number, n) for n in range(self.filler_lo, self.filler_hi)] + list(self.keys)

    def prefix_len(self, keys: Sequence[bytes]) -> int:
        return leading_run(self.keys, keys)

    def event(self, stored: list[bytes], removed: list[bytes]) -> KVEvent:
        self.seq += 1
        return KVEvent(instance_id=self.iid, source=self.source, epoch=self.epoch, seq=self.seq,
                       stored=stored, removed=removed)

    def add_filler(self, n: int) -> list[bytes]:
        lo = self.filler_hi
        self.filler_hi += n
        return [filler_key(self.number, i) for i in range(lo, self.filler_hi)]

    def add(self, keys: Iterable[bytes]) -> list[bytes]:
        """Hold ``keys`` (a pre-load: no eviction); returns those new here."""
        new = [k for k in keys if k not in self.keys]
        for k in new:
            self.keys[k] = None
        return new

    def keep(self, keys: Sequence[bytes]) -> tuple[list[bytes], list[bytes]]:
        """A prompt's blocks kept: the new ones stored, the reused ones made recent, the oldest
        others evicted to stay within capacity. Returns (stored, removed), disjoint."""
        mine = dict.fromkeys(keys)
        held = 0
        for k in mine:
            if k in self.keys:
                self.keys.move_to_end(k)
                held += 1
        new = [k for k in mine if k not in self.keys]
        new = new[: max(0, self.capacity - held)]  # (a cache smaller than one prompt keeps what fits)
        removed: list[bytes] = []
        while len(self) + len(new) > self.capacity and (self.filler_hi > self.filler_lo or self.keys):
            if self.filler_hi > self.filler_lo:
                removed.append(filler_key(self.number, self.filler_lo))
                self.filler_lo += 1
                continue
            oldest = next(iter(self.keys))
            if oldest in mine:
                break
            del self.keys[oldest]
            removed.append(oldest)
        for k in new:
            self.keys[k] = None
        return new, removed


@dataclass
class Task:
    attempt_id: str
    prompt: Prompt
    keys: list[bytes]
    decode_id: str
    sent_at: float
    placed_at: float
    started_at: float = 0.0
    compute: float = 0.0
    first_at: float = 0.0
    local_blocks: int = 0
    pool_blocks: int = 0


@dataclass
class Seq:
    attempt_id: str
    tokens: int  # steps to decode
    kv: int  # positions it came with
    joined: float
    row_at: float = -1.0
    step: float = 0.0


class SimCluster:
    """The synthetic instances: plain logic, the clock passed in; every call returns the messages to
    publish as (subject, message, through JetStream)."""

    def __init__(self, prefills: int, decodes: int, pool: bool, *, block_size: int, rows: int,
                 interval: float, namespace: bytes):
        self.block_size = block_size
        self.rows = rows
        self.interval = interval
        self.namespace_hex = namespace.hex()
        self.prefill_ids = [f"prefill-{i}" for i in range(prefills)]
        self.decode_ids = [f"decode-{i}" for i in range(decodes)]
        self.holders: dict[str, Holder] = {iid: Holder(iid, "prefill", i) for i, iid in enumerate(self.prefill_ids)}
        self.pool = Holder("cachestore-0", "cachestore", prefills) if pool else None
        if self.pool is not None:
            self.holders[self.pool.iid] = self.pool
        self.queues: dict[str, deque[Task]] = {iid: deque() for iid in self.prefill_ids}
        self.busy: dict[str, Task | None] = {iid: None for iid in self.prefill_ids}
        self.running: dict[str, dict[str, Seq]] = {iid: {} for iid in self.decode_ids}
        self.waiting: dict[str, deque[Seq]] = {iid: deque() for iid in self.decode_ids}
        self.last_beat: dict[str, float] = {}
        self.per_token = 1e-5  # prefill seconds per computed token
        self.step = 0.01  # decode seconds per step
        self._events: list[tuple[float, int, str, str, str]] = []  # (when, n, what, instance, attempt)
        self._n = 0
        self.counts = {"kv_events": 0, "kv_keys": 0, "reports": 0}

    # ---- pace
    def set_pace(self, per_token: float, step: float) -> None:
        self.per_token, self.step = per_token, step

    # ---- the index content
    def resize(self, prefill_quota: Sequence[int], pool_quota: int) -> None:
        for iid, q in zip(self.prefill_ids, prefill_quota):
            self.holders[iid].capacity = q
        if self.pool is not None:
            self.pool.capacity = pool_quota

    def announce(self) -> list[tuple[str, KVEvent]]:
        """Each holder's first event of its epoch, empty (``KVEventPublisher.start``)."""
        return [(Subjects.kv_events(h.iid), h.event([], [])) for h in self.holders.values()]

    def preload(self, prompts: Iterable[tuple[list[bytes], str]], event_keys: int) -> Iterator[KVEvent]:
        """Fill every holder to its capacity: first the blocks of ``prompts`` (keys, the prefill
        instance that served it; each kept there and in the pool, one event per prompt and holder,
        while they fit), then filler keys in events of ``event_keys``; holders take turns, as
        instances publishing side by side."""
        streams = {iid: [] for iid in self.holders}
        for keys, iid in prompts:
            for h in (self.holders[iid], self.pool):
                if h is None:
                    continue
                new = [k for k in dict.fromkeys(keys) if k not in h.keys][: max(0, h.capacity - len(h))]
                if new:
                    h.add(new)
                    streams[h.iid].append(new)
        iters = [self._filling(h, streams[h.iid], event_keys) for h in self.holders.values()]
        while iters:
            for it in list(iters):
                ev = next(it, None)
                if ev is None:
                    iters.remove(it)
                else:
                    yield ev

    def _filling(self, h: Holder, stored: list[list[bytes]], event_keys: int) -> Iterator[KVEvent]:
        for keys in stored:
            yield h.event(keys, [])
        while len(h) < h.capacity:
            yield h.event(h.add_filler(min(event_keys, h.capacity - len(h))), [])

    def total_blocks(self) -> int:
        return sum(len(h) for h in self.holders.values())

    def dump(self, iid: str, offset: int, limit: int) -> KVDump:
        h = self.holders.get(iid)
        keys = h.all_keys() if h is not None else []
        if h is None:
            return KVDump(instance_id=iid, source="prefill", epoch="", seq=0, keys=[], total=0, offset=offset)
        return KVDump(instance_id=iid, source=h.source, epoch=h.epoch, seq=h.seq, keys=keys[offset : offset + limit],
                      total=len(keys), offset=offset)

    # ---- heartbeats
    def heartbeat(self, kind: str, iid: str, now: float) -> Heartbeat:
        common = dict(kind=kind, instance_id=iid, interval=self.interval, model=MODEL_ID)
        if kind == "prefill":
            q = self.queues[iid]
            busy = self.busy[iid]
            return Heartbeat(**common, kv_namespace=self.namespace_hex, device="cuda", dtype="bfloat16",
                             queued=len(q) + (busy is not None),
                             queued_tokens=sum(t.prompt.tokens for t in q) + (busy.prompt.tokens if busy else 0))
        if kind == "decode":
            run, wait = self.running[iid], self.waiting[iid]
            seqs, kv = [], 0
            for s in run.values():
                done = min(s.tokens, int((now - s.row_at) / s.step)) if s.step > 0 else 0
                kv += s.kv + done
                seqs.append(SequenceProgress(s.attempt_id, done, s.tokens - done, True))
            seqs.extend(SequenceProgress(s.attempt_id, 0, s.tokens, False) for s in wait)
            last = self.last_beat.get(iid, now)
            self.last_beat[iid] = now
            steps = int((now - last) / self.step) if run and self.step > 0 else 0
            return Heartbeat(**common, device="cuda", dtype="bfloat16", running=len(run), queued=len(wait),
                             max_running=self.rows, urgent_rows=1, kv_tokens=kv, steps=steps,
                             step_seconds=self.step if steps else 0.0, step_batch=float(len(run)) if steps else 0.0,
                             step_kv_tokens=float(kv) if steps else 0.0, sequences=seqs)
        return Heartbeat(**common)

    def instances(self) -> list[tuple[str, str]]:
        """(kind, id) of every instance that beats."""
        out = [("prefill", i) for i in self.prefill_ids] + [("decode", i) for i in self.decode_ids]
        if self.pool is not None:
            out.append(("cachestore", self.pool.iid))
        return out

    # ---- requests
    def _at(self, when: float, what: str, iid: str, attempt: str = "") -> None:
        self._n += 1
        heapq.heappush(self._events, (when, self._n, what, iid, attempt))

    def next_time(self) -> float:
        return self._events[0][0] if self._events else math.inf

    def placed(self, attempt_id: str, prompt: Prompt, keys: list[bytes], prefill_id: str, decode_id: str,
               sent_at: float, now: float) -> None:
        """The conductor placed a request here (its reply came)."""
        if prefill_id not in self.queues or decode_id not in self.running:
            raise KeyError(f"placed on an unknown instance: {prefill_id}, {decode_id}")
        self.queues[prefill_id].append(Task(attempt_id, prompt, keys, decode_id, sent_at, now))
        if self.busy[prefill_id] is None:
            self._start(prefill_id, now)

    def _start(self, iid: str, now: float) -> None:
        q = self.queues[iid]
        if not q:
            self.busy[iid] = None
            return
        t = self.busy[iid] = q.popleft()
        t.started_at = now
        cap = (t.prompt.tokens - 1) // self.block_size  # at least one token computed
        t.local_blocks = min(cap, self.holders[iid].prefix_len(t.keys))
        t.pool_blocks = min(cap, self.pool.prefix_len(t.keys)) if self.pool is not None else 0
        reused = max(t.local_blocks, t.pool_blocks) * self.block_size
        t.compute = (t.prompt.tokens - reused) * self.per_token
        t.first_at = now + t.compute
        self._at(t.first_at, "first", iid)

    def advance(self, now: float) -> list[tuple[str, msgspec.Struct, bool]]:
        """Everything due by ``now``: (subject, message, through JetStream)."""
        out: list[tuple[str, msgspec.Struct, bool]] = []
        while self._events and self._events[0][0] <= now:
            when, _, what, iid, attempt = heapq.heappop(self._events)
            if what == "first":
                out.extend(self._first_token(iid, when))
            elif what == "done":
                out.extend(self._done(iid, when))
            elif what == "leave":
                out.extend(self._leave(iid, attempt, when))
        return out

    def _first_token(self, iid: str, when: float) -> list:
        t = self.busy[iid]
        local = t.local_blocks * self.block_size
        pool = max(0, t.pool_blocks - t.local_blocks) * self.block_size
        self._at(when + HANDOFF_SHARE * t.compute, "done", iid)
        self.counts["reports"] += 1
        return [(Subjects.PREFILL_REPORT, PrefillReport(
            instance_id=iid, attempt_id=t.attempt_id, prompt_tokens=t.prompt.tokens, local_tokens=local,
            pool_tokens=pool, load_bytes=pool * KV_BYTES_PER_TOKEN, load_seconds=pool * 1e-7,
            compute_seconds=t.compute, queue_seconds=t.started_at - t.placed_at,
            kv_bytes_per_token=KV_BYTES_PER_TOKEN, ttft_seconds=max(0.0, when - t.sent_at)), False)]

    def _done(self, iid: str, when: float) -> list:
        t = self.busy[iid]
        handoff = t.prompt.max_tokens > 1
        out: list = [(Subjects.PREFILL_DONE, PrefillDone(
            instance_id=iid, attempt_id=t.attempt_id, kv_tokens=t.prompt.tokens if handoff else 0,
            tail_seconds=when - t.first_at), False)]
        self.counts["reports"] += 1
        for h in (self.holders[iid], self.pool):
            if h is None:
                continue
            stored, removed = h.keep(t.keys)
            if stored or removed:
                out.append((Subjects.kv_events(h.iid), h.event(stored, removed), True))
                self.counts["kv_events"] += 1
                self.counts["kv_keys"] += len(stored) + len(removed)
        if handoff:
            self._join(t.decode_id, Seq(t.attempt_id, t.prompt.max_tokens - 1, t.prompt.tokens, when), when)
        self._start(iid, when)
        return out

    def _join(self, iid: str, s: Seq, now: float) -> None:
        if len(self.running[iid]) < self.rows:
            self._row(iid, s, now)
        else:
            self.waiting[iid].append(s)

    def _row(self, iid: str, s: Seq, now: float) -> None:
        s.row_at, s.step = now, self.step
        self.running[iid][s.attempt_id] = s
        self._at(now + s.tokens * s.step, "leave", iid, s.attempt_id)

    def _leave(self, iid: str, attempt: str, when: float) -> list:
        s = self.running[iid].pop(attempt)
        if self.waiting[iid]:
            self._row(iid, self.waiting[iid].popleft(), when)
        self.counts["reports"] += 1
        return [(Subjects.DECODE_REPORT, DecodeReport(
            instance_id=iid, attempt_id=attempt, output_tokens=s.tokens, seconds=when - s.joined,
            finish_reason="length", waited_seconds=s.row_at - s.joined), False)]

    def in_decode(self) -> int:
        return sum(len(r) + len(self.waiting[i]) for i, r in self.running.items())

    def in_prefill(self) -> int:
        return sum(len(q) + (self.busy[i] is not None) for i, q in self.queues.items())


# ================================================================ the run (I/O)
def _cpu(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def parse_pressure(text: str) -> float | None:
    """Seconds some task waited for a CPU, from ``/proc/pressure/cpu`` (its "some" line's total, µs)."""
    for line in text.splitlines():
        if line.startswith("some "):
            for part in line.split():
                if part.startswith("total="):
                    return int(part[6:]) / 1e6
    return None


def cpu_pressure() -> float | None:
    """The host's CPU pressure so far (``parse_pressure``); None where the kernel does not say."""
    try:
        return parse_pressure(Path("/proc/pressure/cpu").read_text())
    except (OSError, ValueError):
        return None


def pressure_share(before: float | None, after: float | None, seconds: float) -> float | None:
    """The share of ``seconds`` in which some task on the host waited for a CPU (0: none ever did;
    near 1: the cores were oversubscribed throughout, and latencies measured then are the host's)."""
    if before is None or after is None or seconds <= 0:
        return None
    return round(min(1.0, (after - before) / seconds), 3)


class Bench:
    """One conductor and its synthetic cluster over a group of stages."""

    def __init__(self, args, chains: TraceChains, warm: list[Prompt], offered: list[Prompt], instances: int,
                 data_dir: Path, cores: tuple[str, str] | None):
        self.args = args
        self.chains = chains
        self.warm = warm
        self.offered = offered
        self.n = instances
        self.data_dir = data_dir
        self.cores = cores
        self.sim = SimCluster(instances, instances, args.pool, block_size=args.block_size, rows=args.rows,
                              interval=args.heartbeat_interval, namespace=chains.namespace)
        self.rng = random.Random(args.seed)
        self.next_prompt = 0
        self.pending: dict[str, tuple[float, Prompt, list[bytes], bool]] = {}
        self.samples: list[float] = []
        self.replies = self.measured_replies = 0
        self.last_reply = 0.0
        self.rejected: dict[int, int] = {}
        self.unknown: list[str] = []
        self.dumps_asked: dict[str, float] = {}
        self.probe_asked = asyncio.Event()
        self.probe = ""  # the probe awaited
        self.probes = 0
        self.js_futures: list = []
        self.js_failed = 0
        self.nats = None
        self.proc = None
        self.tasks: list[asyncio.Task] = []
        self.mean_prompt = sum(p.tokens for p in offered) / len(offered)
        self.mean_output = sum(max(0, p.max_tokens - 1) for p in offered) / len(offered)

    # ---- processes
    def start_processes(self) -> None:
        import psutil

        from libs.cpus import parse_cpu_list
        from libs.natsserver import NatsServer
        from libs.proc import die_with_parent

        a = self.args
        self.nats = NatsServer(self.data_dir / "nats", log_file=self.data_dir / "nats.log", auth=True).start()
        user = self.nats.add_user("conductor", CONDUCTOR_ID)
        self.gateway_url = self.nats.url_for(self.nats.add_user("gateway", GATEWAY_ID))
        env = dict(os.environ, YUEBING_NATS_URL=self.nats.url_for(user),
                   YUEBING_HEARTBEAT_INTERVAL=str(a.heartbeat_interval), YUEBING_ADMISSION=a.admission,
                   YUEBING_POLICY=a.policy, YUEBING_BLOCK_SIZE=str(a.block_size),
                   YUEBING_USE_POOL=str(bool(a.pool)), YUEBING_TTFT_SLO=str(a.ttft_slo),
                   YUEBING_TBT_SLO=str(a.tbt_slo), YUEBING_LOG_LEVEL=a.conductor_log_level)
        cmd = [sys.executable]
        if a.profile:
            cmd += ["-m", "cProfile", "-o", str(profile_path(a, self.n))]
        cmd += ["-m", "yuebing.cli", "serve", "conductor", "--instance-id", CONDUCTOR_ID,
                "--data-dir", str(self.data_dir), "--host", "127.0.0.1"]
        core = self.cores[0] if self.cores else ""

        def pre() -> None:
            die_with_parent()
            if core:  # (not pin_current_thread: this process is pinned to the other core, which it would check)
                os.sched_setaffinity(0, parse_cpu_list(core))

        self.log = open(self.data_dir / "conductor.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, env=env, cwd=str(ROOT),
                                     start_new_session=True, preexec_fn=pre)
        self.ps = psutil.Process(self.proc.pid)

    def stop_processes(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60 if self.args.profile else 15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.nats is not None:
            self.nats.stop()

    # ---- bus
    async def connect(self) -> None:
        from libs.bus import connect

        self.nc = await connect(self.nats.url, "bench-cluster")  # the synthetic instances (admin)
        self.js = self.nc.jetstream()
        self.gw = await connect(self.gateway_url, GATEWAY_ID, inbox_prefix=Subjects.inbox_prefix("gateway", GATEWAY_ID))
        self.reply_prefix = f"{Subjects.inbox_prefix('gateway', GATEWAY_ID)}.bench"
        await self.gw.subscribe(f"{self.reply_prefix}.*", cb=self._on_reply)
        await self.nc.subscribe("yb.kvdump.>", cb=self._on_dump)

    def lost_instances(self) -> int:
        """Instances the conductor declared lost so far (its log): a sign that it, or this process,
        stalled for three heartbeat intervals; their index entries are then gone."""
        try:
            with open(self.data_dir / "conductor.log", "rb") as f:
                return sum(line.count(b'"instance_lost"') for line in f)
        except OSError:
            return 0

    async def wait_conductor(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the conductor exited with {self.proc.returncode}; "
                                   f"see {self.data_dir}/conductor.log")
            try:
                await self.nc.request(Subjects.CONDUCTOR_STATE, b"", timeout=2)
                return
            except Exception:  # noqa: BLE001 - not yet subscribed
                if time.monotonic() > deadline:
                    raise TimeoutError("the conductor did not answer its state within "
                                       f"{timeout:.0f} s; see {self.data_dir}/conductor.log") from None
                await asyncio.sleep(0.2)

    async def state(self, timeout: float = 600.0) -> IndexSummary:
        raw = await self.nc.request(Subjects.CONDUCTOR_STATE, b"", timeout=timeout)
        return decode(raw.data, IndexSummary)

    def spawn(self, coro) -> None:
        self.tasks.append(asyncio.ensure_future(coro))

    async def _heartbeats(self) -> None:
        """Each instance beats every interval, the instances spread over it."""
        inst = self.sim.instances()
        interval = self.args.heartbeat_interval
        t0 = time.monotonic()
        due = [(t0 + interval * i / len(inst), i) for i in range(len(inst))]
        heapq.heapify(due)
        while True:
            now = time.monotonic()
            while due[0][0] <= now:
                when, i = heapq.heappop(due)
                kind, iid = inst[i]
                await self.nc.publish(Subjects.heartbeat(kind, iid), encode(self.sim.heartbeat(kind, iid, now)))
                heapq.heappush(due, (when + interval, i))
            await asyncio.sleep(max(0.0, due[0][0] - time.monotonic()))

    async def _cluster(self) -> None:
        """The synthetic instances' work as it falls due."""
        while True:
            now = time.monotonic()
            for subject, msg, js in self.sim.advance(now):
                if js:
                    await self._js_publish(subject, encode(msg))
                else:
                    await self.nc.publish(subject, encode(msg))
            await asyncio.sleep(min(0.005, max(0.0, self.sim.next_time() - time.monotonic())))

    async def _js_publish(self, subject: str, data: bytes) -> None:
        """A KV event through JetStream, acknowledged (in order: each is sent before the next)."""
        fut = await self.js.publish_async(subject, data)
        self.js_futures.append(fut)
        if len(self.js_futures) >= 512:
            await self._js_settle()

    async def _js_settle(self) -> None:
        futs, self.js_futures = self.js_futures, []
        for r in await asyncio.gather(*futs, return_exceptions=True):
            if isinstance(r, BaseException):
                self.js_failed += 1

    async def _purge(self) -> None:
        """No one pulls the prefill tasks the conductor queues: drop them."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.js.purge_stream(Subjects.PREFILL_STREAM)
            except Exception:  # noqa: BLE001 - busy: next time
                pass

    async def _on_dump(self, msg) -> None:
        iid = msg.subject.rsplit(".", 1)[1]
        req = decode(msg.data, KVDumpRequest)
        self.dumps_asked[iid] = time.monotonic()
        if iid.startswith(PROBE_ID):
            dump = KVDump(instance_id=iid, source="prefill", epoch=iid, seq=1, keys=[], total=0, offset=0)
            if iid == self.probe:
                self.probe_asked.set()
        else:
            dump = self.sim.dump(iid, req.offset, max(1, min(req.limit, 20000)))
        if msg.reply:
            await msg.respond(encode(dump))

    # ---- the index
    async def announce(self) -> None:
        self.dumps_asked.clear()
        for subject, ev in self.sim.announce():
            await self._js_publish(subject, encode(ev))
        await self._js_settle()
        deadline = time.monotonic() + 120
        while not set(self.sim.holders) <= set(self.dumps_asked):
            if time.monotonic() > deadline:
                raise TimeoutError("the conductor did not ask every instance for its dump")
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)

    async def preload(self, stage: Stage) -> dict:
        """Grow the index to ``stage.blocks`` through KV events; time it until the conductor has
        applied the last (it then asks the probe, whose new epoch was published after them)."""
        a = self.args
        prefill_q, pool_q = quotas(stage.blocks, self.n, a.pool, a.pool_share)
        self.sim.resize(prefill_q, pool_q)
        first = not any(len(h) for h in self.sim.holders.values())
        prompts = warm_prompts(self.chains, self.warm, stage.blocks, self.sim.prefill_ids, a.pool) if first else []
        rss0, cpu0 = self.ps.memory_info().rss, _cpu(self.ps)
        before = self.sim.total_blocks()
        events = keys = 0
        t0 = time.monotonic()
        for ev in self.sim.preload(prompts, a.event_keys):
            await self._js_publish(Subjects.kv_events(ev.instance_id), encode(ev))
            events += 1
            keys += len(ev.stored)
            if a.preload_batch and events % a.preload_batch == 0:
                await self.sync_index()  # the conductor has caught up: a bounded backlog
            elif events % 64 == 0:
                await asyncio.sleep(0)  # heartbeats go on
        published = time.monotonic() - t0
        await self.sync_index()
        seconds = self.dumps_asked[self.probe] - t0
        cpu = _cpu(self.ps) - cpu0
        await asyncio.sleep(1.5)  # a maintenance pass, the last dumps' replies
        rss = self.ps.memory_info().rss
        added = self.sim.total_blocks() - before
        return {"preload_seconds": round(seconds, 3), "preload_published_seconds": round(published, 3),
                "preload_events": events, "preload_keys": keys, "preload_trace_prompts": len(prompts),
                "ingest_keys_per_s": round(keys / seconds) if seconds > 0 else None,
                "ingest_events_per_s": round(events / seconds) if seconds > 0 else None,
                "preload_conductor_cpu_share": round(cpu / seconds, 3) if seconds > 0 else None,
                "rss_growth_bytes": rss - rss0, "rss_bytes": rss, "added_blocks": added,
                "js_publish_failures": self.js_failed}

    async def quiesce(self, timeout: float = 120.0) -> None:
        """Wait until no synthetic prefill has a task (so none publishes a KV event)."""
        deadline = time.monotonic() + timeout
        while self.sim.in_prefill() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self._js_settle()

    async def sync_index(self, timeout: float = 3600.0) -> None:
        """Return once the conductor has applied every KV event published so far: a new probe
        instance announces its epoch after them, and the conductor asks it for a dump once it gets
        there."""
        self.probe_asked.clear()
        self.probes += 1
        self.probe = f"{PROBE_ID}-{self.probes}"
        await self._js_publish(Subjects.kv_events(self.probe), encode(KVEvent(
            instance_id=self.probe, source="prefill", epoch=self.probe, seq=1)))
        await self._js_settle()
        await asyncio.wait_for(self.probe_asked.wait(), timeout=timeout)

    async def check_index(self) -> dict:
        """The conductor's own count of what it indexed against what the instances published."""
        await self.quiesce()
        await self.sync_index()
        await asyncio.sleep(0.2)  # the probe's dump loaded
        t0 = time.monotonic()
        s = await self.state()
        indexed = sum(s.blocks.values())
        return {"index_blocks": indexed, "published_blocks": self.sim.total_blocks(),
                "index_matches": indexed == self.sim.total_blocks() and s.gaps == 0,
                "index_gaps": s.gaps, "index_resyncs": s.resyncs,
                "state_seconds": round(time.monotonic() - t0, 3)}

    # ---- requests
    def _prompt(self) -> Prompt:
        p = self.offered[self.next_prompt % len(self.offered)]
        self.next_prompt += 1
        return p

    def _pace(self, rate: float) -> dict:
        a = self.args
        per_token, step, stay = sim_pace(rate, self.n, self.n, self.mean_prompt, self.mean_output, a.rows,
                                         a.prefill_util, a.decode_occupancy, a.max_stay)
        self.sim.set_pace(per_token, step)
        return {"sim_prefill_tokens_per_s": round(1 / per_token), "sim_step_ms": round(step * 1e3, 3),
                "sim_stay_s": round(stay, 3)}

    async def _send(self, tag: str, measured: bool) -> None:
        p = self._prompt()
        attempt = f"{tag}-{self.next_prompt}"
        keys = self.chains.keys(p)
        data = schedule_request(self.chains, p, attempt, ttft_slo=self.args.ttft_slo, tbt_slo=self.args.tbt_slo,
                                arrival_time=time.time())
        self.pending[attempt] = (time.monotonic(), p, keys, measured)
        await self.gw.publish(Subjects.SCHEDULE, data, reply=f"{self.reply_prefix}.{self.next_prompt}")

    async def _on_reply(self, msg) -> None:
        now = time.monotonic()
        if not msg.data:  # the server's "no responders" (the conductor was cut off): a lost reply
            return
        r = decode(msg.data, ScheduleReply)
        got = self.pending.pop(r.attempt_id, None)
        if got is None:
            return
        sent, p, keys, measured = got
        self.replies += 1
        if measured:
            self.measured_replies += 1
            self.last_reply = now
            self.samples.append(now - sent)
        if not r.admitted:
            self.rejected[r.status] = self.rejected.get(r.status, 0) + 1
            return
        try:
            self.sim.placed(r.attempt_id, p, keys, r.prefill_id, r.decode_id, sent, now)
        except KeyError:
            self.unknown.append(f"{r.prefill_id}/{r.decode_id}")

    async def closed_loop(self, seconds: float, most: int) -> dict:
        """One request at a time: the decision latency without queueing, and a capacity estimate."""
        self._pace(max(1.0, float(self.n)))
        lat: list[float] = []
        cpu0, t0, pr0 = _cpu(self.ps), time.monotonic(), cpu_pressure()
        while len(lat) < most and time.monotonic() - t0 < seconds:
            if len(lat) % 20 == 19:  # the instances paced for the rate this loop makes
                self._pace(len(lat) / sum(lat))
            p = self._prompt()
            attempt = f"c-{self.next_prompt}"
            keys = self.chains.keys(p)
            data = schedule_request(self.chains, p, attempt, ttft_slo=self.args.ttft_slo, tbt_slo=self.args.tbt_slo,
                                    arrival_time=time.time())
            sent = time.monotonic()
            raw = await self.gw.request(Subjects.SCHEDULE, data, timeout=60)
            now = time.monotonic()
            lat.append(now - sent)
            r = decode(raw.data, ScheduleReply)
            self.replies += 1
            if r.admitted:
                self.sim.placed(attempt, p, keys, r.prefill_id, r.decode_id, sent, now)
            else:
                self.rejected[r.status] = self.rejected.get(r.status, 0) + 1
        wall = time.monotonic() - t0
        cpu = _cpu(self.ps) - cpu0
        mean = sum(lat) / len(lat)
        return {"closed_decisions": len(lat), "closed_p50_ms": ms(percentile(lat, 50)),
                "closed_p99_ms": ms(percentile(lat, 99)), "closed_mean_ms": ms(mean),
                "closed_cpu_ms_per_decision": round(cpu / len(lat) * 1e3, 3),
                "capacity_estimate": round(1.0 / mean, 1), "closed_seconds": round(wall, 2),
                "closed_host_cpu_pressure": pressure_share(pr0, cpu_pressure(), wall)}

    async def offer(self, rate: float, warm: float, measure: float, tag: str) -> dict:
        """Open loop at ``rate``: ``warm`` seconds not measured, then ``measure`` seconds measured;
        then wait for the outstanding replies."""
        pace = self._pace(rate)
        self.samples = []
        self.measured_replies = 0
        sent_measured = 0
        lags: list[float] = []
        rng = random.Random(self.rng.random())
        t0 = time.monotonic()
        t_next = t0
        cpu0 = gen0 = None
        m0 = None
        ev0 = dict(self.sim.counts)
        decode_seen: list[int] = []
        next_sample = t0 + warm
        while True:
            now = time.monotonic()
            if now - t0 >= warm + measure:
                break
            measured = now - t0 >= warm
            if measured and m0 is None:
                m0, cpu0, gen0, pr0 = now, _cpu(self.ps), time.process_time(), cpu_pressure()
                ev0 = dict(self.sim.counts)
            if now >= next_sample:
                decode_seen.append(self.sim.in_decode())
                next_sample += 0.1
            while t_next <= now:
                await self._send(tag, measured)
                if measured:
                    sent_measured += 1
                    lags.append(now - t_next)
                t_next += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, min(t_next, next_sample, t0 + warm + measure) - time.monotonic()))
        send_end = self.last_reply = time.monotonic()
        deadline = send_end + self.args.drain_seconds
        while any(m for *_, m in self.pending.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        end = time.monotonic()
        cpu = _cpu(self.ps) - cpu0
        gen = time.process_time() - gen0
        lost = sum(1 for *_, m in self.pending.values() if m)
        for k in [k for k, v in self.pending.items() if v[3]]:
            del self.pending[k]
        got = self.measured_replies
        window = end - m0
        counts = {k: self.sim.counts[k] - ev0[k] for k in ev0}
        return {"offered_rate": rate, "sent": sent_measured, "replies": got, "lost": lost,
                "achieved_rate": round(got / (send_end - m0), 1) if got else 0.0,
                "backlog_s": round(max(0.0, self.last_reply - send_end), 3),
                "p50_ms": ms(percentile(self.samples, 50)), "p90_ms": ms(percentile(self.samples, 90)),
                "p99_ms": ms(percentile(self.samples, 99)), "max_ms": ms(max(self.samples, default=None)),
                "cpu_ms_per_decision": round(cpu / got * 1e3, 3) if got else None,
                "conductor_core_share": round(cpu / window, 3),
                "generator_core_share": round(gen / window, 3),
                "host_cpu_pressure": pressure_share(pr0, cpu_pressure(), window),
                "send_lag_p99_ms": ms(percentile(lags, 99)),
                "kv_events_per_s": round(counts["kv_events"] / window, 1),
                "kv_keys_per_s": round(counts["kv_keys"] / window),
                "reports_per_s": round(counts["reports"] / window, 1),
                "in_decode_per_instance": (round(sum(decode_seen) / len(decode_seen) / self.n, 1)
                                           if decode_seen else None),
                "in_prefill_end": self.sim.in_prefill(), **pace}

    async def sweep_rates(self, stage: Stage, capacity: float) -> list[dict]:
        """The rates of ``--rates``, or the ladder up from the closed-loop capacity until the conductor
        saturates (then one rate between the highest sustained and the next, with ``--refine``)."""
        a = self.args
        rates = [float(r) for r in a.rates.split(",")] if a.rates else ladder(capacity, max_rate=a.max_rate)
        points: list[dict] = []
        for rate in rates:
            points.append(await self._point(stage, rate, len(points)))
            if not a.rates and saturated(points[-1], a.limit_ms):
                break
        mid = refine_rate(points, a.limit_ms) if a.refine and not a.rates else None
        if mid is not None:
            points.append(await self._point(stage, mid, len(points)))
        return points

    async def _point(self, stage: Stage, rate: float, n: int) -> dict:
        a = self.args
        measure = min(a.max_measure_seconds, max(a.measure_seconds, a.min_decisions / rate))
        warm = a.warm_seconds if a.warm_seconds is not None else max(2.0, a.max_stay)
        point = await self.offer(rate, warm, measure, tag=f"r{n}-{self.n}-{stage.blocks}")
        point.update(instances=self.n, blocks=stage.blocks, passed=passes(point, a.limit_ms))
        say(f"  {self.n}+{self.n} instances, {stage.blocks} blocks, {rate:g} req/s: p50 {point['p50_ms']} ms, "
            f"p99 {point['p99_ms']} ms, conductor core {point['conductor_core_share']}, "
            f"{point['cpu_ms_per_decision']} ms CPU/decision, {point['in_decode_per_instance']} sequences per "
            f"decode instance, lost {point['lost']}")
        return point

    # ---- a group of stages
    async def run(self, stages: list[Stage]) -> tuple[list[dict], list[dict]]:
        configs: list[dict] = []
        points: list[dict] = []
        self.start_processes()
        try:
            await self.connect()
            self.spawn(self._heartbeats())
            self.spawn(self._cluster())
            self.spawn(self._purge())
            t0 = time.monotonic()
            await self.wait_conductor()
            await asyncio.sleep(1.5 * self.args.heartbeat_interval)  # every instance beaten
            startup = time.monotonic() - t0
            await self.announce()
            rss_base = self.ps.memory_info().rss
            for stage in stages:
                await self.quiesce()
                say(f"{stage.instances}+{stage.instances} instances: pre-loading the index to {stage.blocks} blocks")
                pre = await self.preload(stage)
                check = await self.check_index() if self.args.check_index else {}
                gc.collect()
                closed = await self.closed_loop(self.args.closed_seconds, self.args.closed_decisions)
                say(f"  closed loop: p50 {closed['closed_p50_ms']} ms, p99 {closed['closed_p99_ms']} ms, "
                    f"capacity ~{closed['capacity_estimate']} req/s")
                pts = await self.sweep_rates(stage, closed["capacity_estimate"])
                points.extend(pts)
                best = sustained(pts, self.args.limit_ms)
                at = next((p for p in pts if p["offered_rate"] == best), None)
                rss = self.ps.memory_info().rss
                cfg = {"instances": stage.instances, "blocks": stage.blocks, "startup_seconds": round(startup, 2),
                       **pre, **check, **closed,
                       "rss_bytes_per_block": round((pre["rss_bytes"] - rss_base) / max(1, self.sim.total_blocks()), 1),
                       "rss_after_sweep_bytes": rss,
                       "sustained_rate": best,
                       "kept_up_rate": kept_up(pts, self.args.limit_ms),
                       "sustained_p50_ms": at["p50_ms"] if at else None,
                       "sustained_p99_ms": at["p99_ms"] if at else None,
                       "sustained_cpu_ms_per_decision": at["cpu_ms_per_decision"] if at else None,
                       "sustained_conductor_core_share": at["conductor_core_share"] if at else None,
                       "rejected": dict(self.rejected), "unknown_instances": len(self.unknown),
                       "instances_lost": self.lost_instances(),
                       "replies": self.replies}
                if self.args.check_index:
                    cfg.update({f"end_{k}": v for k, v in (await self.check_index()).items()})
                configs.append(cfg)
            return configs, points
        finally:
            for t in self.tasks:
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for c in ("gw", "nc"):
                conn = getattr(self, c, None)
                if conn is not None:
                    try:
                        await asyncio.wait_for(conn.close(), 5)
                    except Exception:  # noqa: BLE001 - closing anyway
                        pass
            self.stop_processes()


# ================================================================ figures
CONFIG_COLS = ["instances", "blocks", "preload_seconds", "ingest_keys_per_s", "ingest_events_per_s",
               "rss_bytes_per_block", "index_matches", "instances_lost", "closed_p50_ms", "closed_p99_ms",
               "closed_cpu_ms_per_decision", "sustained_rate", "sustained_p50_ms", "sustained_p99_ms",
               "sustained_cpu_ms_per_decision", "kept_up_rate"]
POINT_COLS = ["instances", "blocks", "offered_rate", "achieved_rate", "p50_ms", "p99_ms", "lost", "backlog_s",
              "cpu_ms_per_decision", "conductor_core_share", "generator_core_share", "host_cpu_pressure",
              "kv_events_per_s", "in_decode_per_instance", "passed"]


def plot(configs: list[dict], points: list[dict], out_dir: Path, limit_ms: float) -> list[Path]:
    """A PNG per sweep: latency over offered rate; sustained rate and CPU per decision over
    instances; pre-load rate and memory per block over blocks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    def plain(*axes, x: bool = True) -> None:  # 20, 50, 100 on log axes rather than 2x10^1
        for ax in axes:
            for axis in (ax.xaxis, ax.yaxis) if x else (ax.yaxis,):
                if axis.get_scale() == "log":
                    axis.set_major_formatter(ScalarFormatter())
                    axis.set_minor_formatter(ScalarFormatter())

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for key in sorted({(p["instances"], p["blocks"]) for p in points}):
        pts = sorted((p for p in points if (p["instances"], p["blocks"]) == key), key=lambda p: p["offered_rate"])
        xs = [p["offered_rate"] for p in pts]
        line, = ax.plot(xs, [p["p99_ms"] for p in pts], marker="o", label=f"{key[0]}+{key[0]}, {key[1]:.0e} blocks p99")
        ax.plot(xs, [p["p50_ms"] for p in pts], marker=".", linestyle="--", color=line.get_color())
    ax.axhline(limit_ms, color="grey", linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlabel="offered schedule requests/s", ylabel="decision latency, ms (-- p50)",
           title="conductor decision latency over offered rate")
    plain(ax)
    ax.legend(fontsize=7)
    paths.append(out_dir / "conductor-rates.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for b in sorted({c["blocks"] for c in configs}):
        cs = sorted((c for c in configs if c["blocks"] == b), key=lambda c: c["instances"])
        xs = [c["instances"] for c in cs]
        line, = a1.plot(xs, [c["sustained_rate"] or 0 for c in cs], marker="o", label=f"{b:.0e} blocks")
        a1.plot(xs, [c["kept_up_rate"] or 0 for c in cs], marker=".", linestyle="--", color=line.get_color())
        a2.plot(xs, [c["closed_cpu_ms_per_decision"] for c in cs], marker="o", label=f"{b:.0e} blocks")
    a1.set(xscale="log", xlabel="instances per kind", ylabel=f"req/s with p99 <= {limit_ms:g} ms (-- kept up)",
           title="sustained decision rate")
    a2.set(xscale="log", yscale="log", xlabel="instances per kind", ylabel="conductor CPU ms per decision",
           title="CPU per decision (closed loop)")
    plain(a1, a2)
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    paths.append(out_dir / "conductor-instances.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for n in sorted({c["instances"] for c in configs}):
        cs = sorted((c for c in configs if c["instances"] == n), key=lambda c: c["blocks"])
        xs = [c["blocks"] for c in cs]
        a1.plot(xs, [c["ingest_keys_per_s"] / 1e6 for c in cs], marker="o", label=f"{n}+{n} instances")
        a2.plot(xs, [c["rss_bytes_per_block"] for c in cs], marker="o", label=f"{n}+{n} instances")
    a1.set(xscale="log", yscale="log", xlabel="indexed blocks", ylabel="million keys ingested/s (pre-load)",
           title="KV-event ingest")
    a2.set(xscale="log", xlabel="indexed blocks", ylabel="conductor RSS growth per block, bytes",
           title="index memory")
    plain(a1, x=False)  # (blocks in powers of ten: 10^5, not a label at every minor tick)
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    paths.append(out_dir / "conductor-blocks.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


IDLE = ("<method 'poll' of 'select.epoll' objects>", "<method 'select' of 'select.select' objects>")


def top_costs(profile: Path, n: int = 25, by: str = "own_s", under: tuple[str, ...] = ()) -> list[dict]:
    """The conductor's top functions by own time, from its cProfile file (its whole run, start
    included); ``own_share`` is of its busy time (the event loop's waits in epoll left out)."""
    import pstats

    st = pstats.Stats(str(profile))
    idle = sum(tt for (_, _, fn), (_, _, tt, _, _) in st.stats.items() if fn in IDLE)
    busy = (st.total_tt - idle) or 1.0
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():
        if fn in IDLE:
            continue
        where = os.path.relpath(file, ROOT) if file.startswith(str(ROOT)) else file
        if under and not where.startswith(under):
            continue
        rows.append({"function": f"{where}:{line}({fn})", "calls": nc, "own_s": round(tt, 3),
                     "own_share": round(tt / busy, 4), "cum_s": round(ct, 3), "cum_share": round(ct / busy, 4),
                     "cum_ms_per_call": round(ct / nc * 1e3, 4) if nc else None})
    rows.sort(key=lambda r: -r[by])
    return rows[:n]


# ================================================================ main
def load_prompts(args, chains: TraceChains) -> tuple[list[Prompt], list[Prompt]]:
    rows = read_trace(Path(args.trace), start=args.start, limit=args.warm_requests + args.requests)
    if len(rows) <= args.warm_requests:
        raise ValueError(f"the trace has {len(rows)} requests from line {args.start}: fewer than --warm-requests + 1")
    prompts = [chains.prompt(r, args.start + i, args.output_scale) for i, r in enumerate(rows)]
    t0 = time.monotonic()
    for p in prompts:
        chains.key_records(p)  # every chain now, not while measuring
    say(f"{len(prompts)} trace requests hashed in {time.monotonic() - t0:.1f} s "
        f"({len(chains._keys)} hash-id blocks, token scale {args.token_scale})")
    return prompts[: args.warm_requests], prompts[args.warm_requests :]


def profile_path(args, instances: int) -> Path:
    """Where the conductor of ``instances`` writes its profile: ``--profile``, suffixed by the
    instance count when the sweep has several."""
    several = len(set(parse_counts(args.instances, "--instances"))) > 1
    return Path(f"{args.profile}.{instances}" if several else args.profile).resolve()


def pick_cores(pin: bool) -> tuple[str, str] | None:
    """(the conductor's core, the load generator's) when pinning and two or more cores are there."""
    from libs.cpus import available_cores, format_cpu_list

    cores = available_cores()
    if not pin or len(cores) < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    return str(cores[-1]), format_cpu_list(cores[:-1])


async def _run_all(args, chains, warm, offered, data_dir: Path, cores) -> tuple[list[dict], list[dict]]:
    configs, points = [], []
    for group in sweep_plan(parse_counts(args.instances, "--instances"), parse_counts(args.blocks, "--blocks")):
        n = group[0].instances
        d = data_dir / f"n{n}"
        d.mkdir(parents=True, exist_ok=True)
        b = Bench(args, chains, warm, offered, n, d, cores)
        c, p = await b.run(group)
        configs.extend(c)
        points.extend(p)
    return configs, points


def _bench(args) -> int:
    from libs.cpus import pin_current_thread
    from libs.kv.keys import namespace_digest

    if args.full:
        args.instances, args.blocks = FULL_INSTANCES, FULL_BLOCKS
    cores = pick_cores(args.pin)
    if cores:
        pin_current_thread(cores[1])  # this process, and nats-server started from it
    chains = TraceChains(args.token_scale, args.block_size, namespace_digest(MODEL_ID, "bfloat16", args.block_size),
                         seed=args.seed)
    warm, offered = load_prompts(args, chains)
    gc.collect()
    gc.freeze()  # the chains live to the end: out of the collector's way while measuring
    data_dir, own = make_data_dir(args, "yuebing-bench-conductor-")
    clean = False
    try:
        configs, points = asyncio.run(_run_all(args, chains, warm, offered, data_dir, cores))
        clean = not args.keep_data
    finally:
        release_data_dir(own, clean, "the conductor's and nats-server's logs")
    out_dir = Path(args.out_dir)
    pngs = plot(configs, points, out_dir, args.limit_ms) if configs else []
    profile = []
    if args.profile:
        for n in parse_counts(args.instances, "--instances"):
            path = profile_path(args, n)
            if path.exists():
                rows = top_costs(path)
                cum = top_costs(path, 20, by="cum_s", under=("services/", "libs/"))
                profile.append({"instances": n, "top_own": rows, "top_cumulative": cum})
                cols = ["function", "calls", "own_s", "own_share", "cum_s", "cum_share", "cum_ms_per_call"]
                print(f"\nconductor profile ({n}+{n} instances; cProfile: {path}), top functions by own time")
                print(format_table(rows, cols))
                print("the conductor's own code by cumulative time")
                print(format_table(cum, cols))
    print("\nrate points")
    print(format_table(points, POINT_COLS))
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    figures = {"bench": "conductor", "cores": {"conductor": cores[0], "generator": cores[1]} if cores else None,
               "settings": settings, "configs": configs, "points": points, "pngs": [str(p) for p in pngs],
               "profile": profile}
    bad = [c for c in configs if c.get("unknown_instances") or c.get("index_matches") is False
           or c.get("end_index_matches") is False or c.get("instances_lost")]
    emit(f"conductor under synthetic instances (token scale {args.token_scale}, {args.block_size}-token blocks, "
         f"heartbeats every {args.heartbeat_interval:g} s, admission {args.admission}); sustained = highest offered "
         f"rate with p99 <= {args.limit_ms:g} ms; conductor pinned to core {cores[0] if cores else '-'}",
         configs, CONFIG_COLS, figures, args.out)
    return 1 if bad else 0


def main(args) -> int:
    """``yuebing bench conductor``."""
    return entry(_bench, args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instances", default=DEFAULT_INSTANCES,
                   help=f"prefill (and as many decode) instances, a list (default {DEFAULT_INSTANCES}; "
                   f"--full: {FULL_INSTANCES})")
    p.add_argument("--blocks", default=DEFAULT_BLOCKS,
                   help=f"index entries to pre-load, a list (default {DEFAULT_BLOCKS}; --full: {FULL_BLOCKS})")
    p.add_argument("--full", action="store_true", help="the whole sweep: instances 8..512, blocks 1e5..1e7 (hours)")
    p.add_argument("--rates", default=None, help="offered rates, req/s (default: fractions of the closed-loop "
                   f"capacity {','.join(map(str, LADDER))}, until the conductor saturates: a reply lost, a backlog "
                   "of a second, or the median past ten times --limit-ms)")
    p.add_argument("--limit-ms", type=float, default=10.0, help="p99 decision latency a sustained rate keeps")
    p.add_argument("--max-rate", type=float, default=5000.0, help="no offered rate above this (req/s)")
    p.add_argument("--no-refine", dest="refine", action="store_false",
                   help="no extra point between the sustained rate and the next one measured")
    p.add_argument("--warm-seconds", type=float, default=None, help="at each rate, seconds offered before measuring "
                   "(default: --max-stay, at least 2: the decode rows fill up)")
    p.add_argument("--measure-seconds", type=float, default=3.0, help="at each rate, seconds measured (at least)")
    p.add_argument("--min-decisions", type=int, default=300, help="at each rate, measure at least this many "
                   "requests (within --max-measure-seconds)")
    p.add_argument("--max-measure-seconds", type=float, default=15.0)
    p.add_argument("--drain-seconds", type=float, default=10.0, help="after each rate, wait this long for replies")
    p.add_argument("--closed-seconds", type=float, default=3.0, help="closed-loop probe: at most this long")
    p.add_argument("--closed-decisions", type=int, default=300, help="closed-loop probe: at most this many")
    p.add_argument("--trace", default=str(DEFAULT_TRACE), help="Mooncake JSONL trace")
    p.add_argument("--start", type=int, default=0, help="first trace line used")
    p.add_argument("--warm-requests", type=int, default=1000,
                   help="trace requests whose blocks the index holds at the start (up to half of it)")
    p.add_argument("--requests", type=int, default=4000,
                   help="trace requests offered after those, cycled (each one's chain is computed up front)")
    p.add_argument("--token-scale", type=int, default=1, help="divides prompt lengths: 512/scale tokens per hash id "
                   "(default 1: the trace's own lengths, about 750 blocks a prompt)")
    p.add_argument("--output-scale", type=int, default=1, help="divides output lengths")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block (the deployment's default)")
    p.add_argument("--no-pool", dest="pool", action="store_false", help="no cachestore (nothing in the pool)")
    p.add_argument("--pool-share", type=float, default=0.5, help="share of the index entries held by the pool")
    p.add_argument("--event-keys", type=int, default=512,
                   help="keys per filler KV event of the pre-load (about one prompt's new blocks)")
    p.add_argument("--preload-batch", type=int, default=128,
                   help="pre-load events published before waiting for the conductor to have applied them (0: all "
                   "at once; a backlog of seconds delays the heartbeats queued behind it on the conductor's "
                   "connection, and past three intervals it declares every instance lost)")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds (the deployment's default)")
    p.add_argument("--rows", type=int, default=32, help="decode rows per instance (max_running)")
    p.add_argument("--prefill-util", type=float, default=0.7, help="prefill busy share the offered prompts would make")
    p.add_argument("--decode-occupancy", type=float, default=0.75, help="share of decode rows the sequences would fill")
    p.add_argument("--max-stay", type=float, default=3.0, help="longest mean decode stay, seconds")
    p.add_argument("--admission", choices=("none", "early", "predictive"), default="predictive")
    p.add_argument("--policy", default="global_cache_aware")
    p.add_argument("--ttft-slo", type=float, default=30.0)
    p.add_argument("--tbt-slo", type=float, default=1.0)
    p.add_argument("--conductor-log-level", default="INFO",
                   help="the conductor's log level (INFO: a line per decision)")
    p.add_argument("--no-check-index", dest="check_index", action="store_false",
                   help="do not compare the conductor's index summary with the blocks published (the summary "
                   "copies the whole index: seconds at 1e7)")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the conductor to one core")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default=None, help="run the conductor under cProfile into this file (.N per "
                   "instance count when several) and print its top costs")
    p.add_argument("--data-dir", default=None, help="where nats-server and the conductor keep files and logs "
                   "(default: a temporary one, deleted after a clean run)")
    p.add_argument("--keep-data", action="store_true")
    p.add_argument("--out-dir", default="bench-conductor", help="the PNGs")
    p.add_argument("--out", default=None, help="also write the JSON figures here")
