"""``yuebing bench eviction``: the prefix reuse each eviction policy of the cachestore reaches on the
conversation trace, offline, against plain LRU of the same capacity.

The requests are those ``bench trace`` replays (``bench.cache_trace``: the trace's first
``--requests`` rows scaled by ``--token-scale``, a block key per full KV block of ``--block-size``
tokens, as the cluster names them), served in order by one cache of 100/50/25/10 % of the working
set (the distinct full blocks of those requests), in blocks. Per request, as ``bench.ideal_lru``
counts: it reuses the leading run of its blocks the cache holds (all but one token at most), then
every block of it is used (held ones) or inserted (the others, each with the block before it as
its parent), the cache evicting by its policy (``services.cachestore.eviction``, the classes the
cachestore runs) whenever it holds more than its capacity. Plain LRU is ``bench.ideal_lru`` itself.

With ``--watermarks HIGH,LOW`` every policy runs a second time evicting as the cachestore does:
after a request's blocks are in, a cache above HIGH x capacity evicts down to LOW x capacity (and
never holds more than its capacity).

Hit ratio = reused prompt tokens / prompt tokens. It prints a table and a final JSON line (also
written to ``--out``), and draws the hit ratios over the cache size (``--plot``). No cluster, no I/O
but the trace: plain logic in ``PolicyCache`` and ``compare``.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from pathlib import Path

from bench.common import DEFAULT_TRACE, emit, entry, ratio, read_trace, say
from bench.ideal_lru import IdealLRU, PrefixCache, prefix_hits
from services.cachestore.eviction import DEFAULT_EVICT_HIGH, DEFAULT_EVICT_LOW, POLICIES, make_policy

DEFAULT_FRACTIONS = (1.0, 0.5, 0.25, 0.1)
DEFAULT_WATERMARKS = (DEFAULT_EVICT_HIGH, DEFAULT_EVICT_LOW)  # the cachestore's
VOCAB = 32000  # token ids of the scaled prompts: any vocabulary names the same blocks apart


class PolicyCache(PrefixCache):
    """A cache of ``capacity`` blocks evicting by ``policy`` (``services.cachestore.eviction``),
    served as ``IdealLRU`` is (``request``). With ``high`` < 1, after each request a cache above
    ``high * capacity`` blocks evicts down to ``low * capacity``; at any time it holds at most
    ``capacity``."""

    def __init__(self, policy: str, capacity: int, high: float = 1.0, low: float = 1.0):
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        if not 0 < low <= high <= 1:
            raise ValueError("watermarks: 0 < low <= high <= 1")
        self.capacity = capacity
        self.policy = make_policy(policy, capacity)
        self.high = int(high * capacity)
        self.low = int(low * capacity)
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.policy)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.policy

    def _evict_to(self, n: int) -> None:
        while len(self.policy) > n:
            if self.policy.evict() is None:
                break
            self.evictions += 1

    def touch_all(self, chain: Sequence[Hashable]) -> None:
        if self.capacity == 0:
            return
        parent = None
        for k in chain:
            if k in self.policy:
                self.policy.access(k)
            else:
                self.policy.insert(k, parent)
                self._evict_to(self.capacity)
            parent = k
        if len(self.policy) > self.high:
            self._evict_to(self.low)


def trace_chains(path: Path, limit: int | None, token_scale: int, block_size: int,
                 max_context: int) -> tuple[list[list[bytes]], list[int], int, int]:
    """The trace's requests as ``bench trace`` sends them: per request its block keys and how many
    of them it may reuse; the prompt tokens in all; how many requests did not fit ``max_context``."""
    from bench.cache_trace import build_trace_requests, prompt_chains

    requests, skipped = build_trace_requests(read_trace(path, limit=limit), token_scale, VOCAB, max_context)
    chains, reusable = prompt_chains(requests, block_size, b"\0" * 16)
    return chains, reusable, sum(len(r.prompt) for r in requests), skipped


def capacities(distinct_blocks: int, fractions: Sequence[float]) -> dict[float, int]:
    """Blocks a cache of each fraction of the working set holds (as ``bench trace`` sizes its pools)."""
    return {f: max(1, round(f * distinct_blocks)) for f in fractions}


def run_name(policy: str, watermarks: tuple[float, float] | None) -> str:
    return policy if watermarks is None else f"{policy}@{round(watermarks[0] * 100)}/{round(watermarks[1] * 100)}"


def compare(chains: Sequence[Sequence[Hashable]], reusable: Sequence[int], block_size: int,
            fractions: Sequence[float] = DEFAULT_FRACTIONS, policies: Sequence[str] = POLICIES,
            watermarks: tuple[float, float] | None = DEFAULT_WATERMARKS) -> dict[str, dict[float, int]]:
    """Reused prompt tokens per run (``ideal_lru``: ``bench.ideal_lru``; each policy at its
    capacity; each again under ``watermarks``, if given) and per fraction of the working set."""
    distinct = len({k for c in chains for k in c})
    caps = capacities(distinct, fractions)
    out: dict[str, dict[float, int]] = {"ideal_lru": {}}
    for f, cap in caps.items():
        out["ideal_lru"][f] = block_size * sum(prefix_hits(IdealLRU(cap), chains, reusable))
    marks = [None] + ([tuple(watermarks)] if watermarks else [])
    for wm in marks:
        for p in policies:
            name = run_name(p, wm)
            out[name] = {}
            for f, cap in caps.items():
                cache = PolicyCache(p, cap) if wm is None else PolicyCache(p, cap, *wm)
                out[name][f] = block_size * sum(prefix_hits(cache, chains, reusable))
    return out


def plot(reused: dict[str, dict[float, int]], prompt_tokens: int, path: Path, title: str) -> Path:
    """Hit ratio over the cache size (fraction of the working set), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import textwrap

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    try:
        base = reused["ideal_lru"]
        colors = plt.get_cmap("tab20").colors
        for i, (name, by_f) in enumerate(reused.items()):
            xs = sorted(by_f)
            kw = dict(linestyle="--" if "@" in name else "-", marker="o", label=name, color=colors[i % len(colors)])
            axes[0].plot([x * 100 for x in xs], [by_f[x] / prompt_tokens for x in xs], **kw)
            axes[1].plot([x * 100 for x in xs], [by_f[x] / base[x] if base[x] else 1.0 for x in xs], **kw)
        axes[0].set_ylabel("hit ratio (reused / prompt tokens)")
        axes[1].set_ylabel("hit ratio / plain LRU's")
        for ax in axes:
            ax.set_xlabel("cache size, % of the working set")
            ax.set_xscale("log")
            ax.set_xticks([x * 100 for x in sorted(base)], [f"{x * 100:g}" for x in sorted(base)])
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)
    return Path(path)


def _floats(spec) -> list[float]:
    return [float(x) for x in str(spec).replace(" ", "").split(",") if x]


def main(args) -> int:
    return entry(_eviction, args)


def _eviction(args) -> int:
    from bench.cache_trace import TINY_CONTEXT

    started = time.perf_counter()
    trace = Path(getattr(args, "trace", None) or DEFAULT_TRACE)
    limit = None if getattr(args, "all", False) else int(getattr(args, "requests", 1000))
    token_scale = int(getattr(args, "token_scale", 32))
    block_size = int(getattr(args, "block_size", 16))
    fractions = _floats(getattr(args, "fractions", None) or ",".join(map(str, DEFAULT_FRACTIONS)))
    policies = [p for p in str(getattr(args, "policies", None) or ",".join(POLICIES)).split(",") if p]
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise SystemExit(f"--policies: unknown {', '.join(sorted(unknown))} (known: {', '.join(POLICIES)})")
    wm = getattr(args, "watermarks", ",".join(map(str, DEFAULT_WATERMARKS)))
    watermarks = tuple(_floats(wm)) if wm else None
    if watermarks is not None and (len(watermarks) != 2 or not 0 < watermarks[1] <= watermarks[0] <= 1):
        raise SystemExit("--watermarks: HIGH,LOW with 0 < LOW <= HIGH <= 1")

    chains, reusable, prompt_tokens, skipped = trace_chains(trace, limit, token_scale, block_size, TINY_CONTEXT)
    distinct = len({k for c in chains for k in c})
    caps = capacities(distinct, fractions)
    say(f"bench eviction: {len(chains)} requests of {trace.name} (skipped {skipped} longer than {TINY_CONTEXT} "
        f"tokens), token_scale {token_scale}, block size {block_size}: {prompt_tokens} prompt tokens, working set "
        f"{distinct} blocks; caches of {', '.join(str(c) for c in caps.values())} blocks")
    reused = compare(chains, reusable, block_size, fractions, policies, watermarks)
    base = reused["ideal_lru"]
    pct = {f: f"{round(f * 100)}pct" for f in fractions}
    rows = []
    figures: dict = {"trace": trace.name, "requests": len(chains), "skipped": skipped, "token_scale": token_scale,
                     "block_size": block_size, "prompt_tokens": prompt_tokens, "distinct_blocks": distinct,
                     "fractions": fractions, "capacity_blocks": {pct[f]: c for f, c in caps.items()},
                     "watermarks": list(watermarks) if watermarks else None}
    worst: dict[str, float] = {}  # per run, its lowest ratio to plain LRU over the sizes
    for name, by_f in reused.items():
        row = {"policy": "lru (ideal_lru)" if name == "ideal_lru" else name}
        for f in fractions:
            hit = by_f[f] / prompt_tokens if prompt_tokens else 0.0
            row[f"hit {pct[f]}"] = round(hit, 4)
            row[f"x lru {pct[f]}"] = ratio(by_f[f], base[f])
            figures[f"{name}_{pct[f]}_hit"] = round(hit, 4)
            figures[f"{name}_{pct[f]}_tokens"] = by_f[f]
            figures[f"{name}_{pct[f]}_vs_lru"] = ratio(by_f[f], base[f])
        worst[name] = min((by_f[f] / base[f] for f in fractions if base[f]), default=1.0)
        row["min x lru"] = figures[f"{name}_min_vs_lru"] = round(worst[name], 4)
        rows.append(row)
    # the best policy at each size (at the capacity bound, not the watermark runs)
    at_bound = [n for n in reused if "@" not in n and n != "ideal_lru"]
    for f in fractions:
        if at_bound:
            best = max(at_bound, key=lambda n: reused[n][f])
            figures[f"best_{pct[f]}"] = best
    if at_bound:
        figures["best_mean_vs_lru"] = max(
            at_bound, key=lambda n: sum(reused[n][f] / base[f] for f in fractions if base[f]))
    cols = ["policy"] + [c for f in fractions for c in (f"hit {pct[f]}", f"x lru {pct[f]}")] + ["min x lru"]
    title = (f"eviction policies on {len(chains)} requests of {trace.name}, token_scale {token_scale}: hit ratio "
             f"(reused / prompt tokens) of one cache of each size (% of the {distinct}-block working set) and its "
             f"ratio to plain LRU (ideal_lru)"
             + ("; name@H/L: evicting from H % down to L % after each request" if watermarks else ""))
    if getattr(args, "plot", None):
        figures["plot"] = str(plot(reused, prompt_tokens, Path(args.plot), title))
    figures["seconds"] = round(time.perf_counter() - started, 1)
    emit(title, rows, cols, figures, getattr(args, "out", None))
    return 0


def add_arguments(p) -> None:
    p.add_argument("--trace", default=None, help="the trace (default: the conversation trace shipped with bench)")
    p.add_argument("--requests", type=int, default=1000, help="the trace's first N requests (default 1000)")
    p.add_argument("--all", action="store_true", help="the whole trace")
    p.add_argument("--token-scale", type=int, default=32, help="as bench trace's (default 32)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--fractions", default=",".join(map(str, DEFAULT_FRACTIONS)),
                   help="cache sizes as fractions of the working set (default 1,0.5,0.25,0.1)")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"a subset of {','.join(POLICIES)}")
    p.add_argument("--watermarks", default=",".join(map(str, DEFAULT_WATERMARKS)),
                   help="HIGH,LOW: also run every policy evicting from HIGH down to LOW of the capacity after "
                   "each request, as the cachestore does (default: the cachestore's, %(default)s; \"\" for none)")
    p.add_argument("--out", default=None, help="also write the JSON figures here")
    p.add_argument("--plot", default=None, help="also draw the hit ratios as a PNG here")
