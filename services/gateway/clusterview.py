"""The cluster as the gateway's heartbeats tell it, for the dashboard: plain logic with no I/O.

``instances`` lists every instance heard from by kind (live, draining or silent); ``pool`` sums
the cachestore instances' tiers; ``ReuseWindow`` turns the counters the instances report since
they started (prompt tokens and those reused by source at the prefill instances, blocks found per
tier at the cachestore instances) into their increase over the last minutes, and ``hit_ratio``
into the share of prompt tokens each source gave.
"""

from __future__ import annotations

from collections import deque

from libs.protocol import Heartbeat

KINDS = ("conductor", "prefill", "decode", "cachestore")
TIERS = ("dram", "disk")
SOURCES = ("own", "peer", "pool")


def instance_row(hb: Heartbeat, silent: float) -> dict:
    """One instance: what its last heartbeat said and how long ago (``silent``, seconds)."""
    state = "down" if silent > 3 * hb.interval else "draining" if hb.draining else "live"
    row = {"kind": hb.kind, "id": hb.instance_id, "state": state, "last_heartbeat": round(silent, 2),
           "queued": hb.queued, "queued_tokens": hb.queued_tokens, "running": hb.running,
           "max_running": hb.max_running, "kv_tokens": hb.kv_tokens, "kv_bytes": hb.kv_bytes,
           "kv_capacity_bytes": hb.kv_capacity_bytes, "draining": hb.draining, "restarts": hb.restarts,
           "device": hb.device, "dtype": hb.dtype}
    if hb.tiers:
        row["tiers"] = {t: {"bytes": u.bytes, "capacity_bytes": u.capacity_bytes, "blocks": u.blocks}
                        for t, u in hb.tiers.items()}
        # a cachestore's memory in use is its DRAM tier
        dram = hb.tiers.get("dram")
        if dram is not None:
            row["kv_bytes"], row["kv_capacity_bytes"] = dram.bytes, dram.capacity_bytes
    return row


def instances(heard: list[tuple[float, Heartbeat]], forget_after: float) -> dict[str, list[dict]]:
    """Instances by kind, each sorted by id, from (seconds since its last beat, that beat); one
    silent longer than ``forget_after`` seconds is left out, one that said it was stopping
    (draining) and then fell silent too (it stopped as told)."""
    out: dict[str, list[dict]] = {k: [] for k in KINDS}
    for silent, hb in sorted(heard, key=lambda v: (v[1].kind, v[1].instance_id)):
        gone = silent > 3 * hb.interval
        if silent > forget_after or (gone and hb.draining):
            continue
        out.setdefault(hb.kind, []).append(instance_row(hb, silent))
    return out


def pool(beats: list[Heartbeat]) -> dict:
    """The pool by tier, summed over the live cachestore instances: bytes used of capacity, blocks;
    the hot blocks with extra copies; and what the blocks went through since each instance started
    (promoted, demoted, evicted by reason, dropped as corrupt) with the pins held now."""
    tiers = {t: {"bytes": 0, "capacity_bytes": 0, "blocks": 0} for t in TIERS}
    events = {"promoted": 0, "demoted": 0, "evicted": {}, "corrupt": 0, "pinned": 0, "pinned_held": 0}
    n = hot = 0
    for hb in beats:
        if hb.kind != "cachestore":
            continue
        n += 1
        hot += hb.hot_blocks
        if (e := hb.pool_events) is not None:
            for name in ("promoted", "demoted", "corrupt", "pinned", "pinned_held"):
                events[name] += getattr(e, name)
            for reason, count in e.evicted.items():
                events["evicted"][reason] = events["evicted"].get(reason, 0) + count
        for t, u in hb.tiers.items():
            s = tiers.setdefault(t, {"bytes": 0, "capacity_bytes": 0, "blocks": 0})
            s["bytes"] += u.bytes
            s["capacity_bytes"] += u.capacity_bytes
            s["blocks"] += u.blocks
    return {"instances": n, "tiers": tiers, "hot_blocks": hot, "events": events}


def counters(hb: Heartbeat) -> dict[str, int]:
    """The counters since start a heartbeat carries that the hit ratio is made of."""
    if hb.kind == "prefill":
        return {"prompt": hb.prompt_tokens, **{s: hb.reused_tokens.get(s, 0) for s in SOURCES}}
    if hb.kind == "cachestore":
        return {f"hits_{t}": u.hit_blocks for t, u in hb.tiers.items()}
    return {}


class ReuseWindow:
    """Increases of counters each instance reports since it started, over the last ``window``
    seconds, summed over instances. An instance whose counters went down has restarted: they
    count from 0 again. An instance's first sample is its baseline (what it did before the
    gateway heard it is not counted)."""

    def __init__(self, window: float = 300.0):
        self.window = window
        self._samples: dict[str, deque[tuple[float, dict[str, int]]]] = {}

    def observe(self, source: str, values: dict[str, int], now: float) -> None:
        if not values:
            return
        q = self._samples.setdefault(source, deque())
        q.append((now, dict(values)))
        self._prune(q, now)

    def _prune(self, q: deque, now: float) -> None:
        # keep one sample at or before the window's start: the baseline of the increase
        cutoff = now - self.window
        while len(q) > 1 and q[1][0] <= cutoff:
            q.popleft()

    def increase(self, now: float) -> dict[str, int]:
        total: dict[str, int] = {}
        for source, q in list(self._samples.items()):
            self._prune(q, now)
            if q[-1][0] < now - self.window:  # nothing heard from it in the window: gone
                del self._samples[source]
                continue
            for (_, before), (_, after) in zip(q, list(q)[1:]):
                restarted = any(v < before.get(k, 0) for k, v in after.items())
                for k, v in after.items():
                    total[k] = total.get(k, 0) + (v if restarted else v - before.get(k, 0))
        return total


def hit_ratio(inc: dict[str, int]) -> dict:
    """The share of prompt tokens whose KV came from each source, from ``ReuseWindow.increase``:
    the prefill instance's own cache, a peer's, the pool's DRAM and disk tiers (the pool's tokens
    split as the pool's gets found blocks in each tier), and computed. Shares are None when no
    prompt was prefilled; the pool's tiers are None when the pool gave tokens but no cachestore
    reported a get that found blocks (then only the pool's total share is known)."""
    prompt = inc.get("prompt", 0)
    tokens = {s: inc.get(s, 0) for s in SOURCES}
    hits = {t: inc.get(f"hits_{t}", 0) for t in TIERS}
    found = sum(hits.values())
    # nothing from the pool: none from either tier; from the pool but no get heard of: tiers unknown
    split = {f"pool_{t}": (tokens["pool"] * hits[t] / found if found else 0 if not tokens["pool"] else None)
             for t in TIERS}
    computed = max(0, prompt - sum(tokens.values()))

    def share(x):
        return None if not prompt or x is None else x / prompt

    return {"prompt_tokens": prompt, "tokens": {**tokens, "computed": computed},
            "ratio": {"own": share(tokens["own"]), "peer": share(tokens["peer"]), "pool": share(tokens["pool"]),
                      **{k: share(v) for k, v in split.items()}, "computed": share(computed)},
            "pool_hit_blocks": hits}
