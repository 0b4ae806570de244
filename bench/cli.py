"""The ``yuebing bench`` subcommands: their arguments and the benchmark each one runs.

``yuebing/cli.py`` calls :func:`add_parsers` when it builds its parser (the product imports nothing
else of bench). The benchmark modules are light to import: each loads its heavy dependencies (torch,
aiohttp, the cluster) only when it runs.
"""

from __future__ import annotations

import argparse

from bench import (cache_trace, conductor, decisions, engine, eviction, hotblocks, multiturn, peer, pipeline, prefix,
                   replay, sched, serve, transfer)
from bench.common import DEFAULT_TRACE, shown
from yuebing.args import add_common, add_engine, count


def add_parsers(bench_sub) -> None:
    """The benchmarks as subcommands of ``bench_sub`` (the subparsers of ``yuebing bench``)."""
    _serve(bench_sub)
    _prefix(bench_sub)
    _transfer(bench_sub)
    _hotblocks(bench_sub)
    _pipeline(bench_sub)
    _trace(bench_sub)
    _eviction(bench_sub)
    _sched(bench_sub)
    _engine(bench_sub)
    _peer(bench_sub)
    _conductor(bench_sub)
    _decisions(bench_sub)
    _multiturn(bench_sub)


def trace_main(args) -> int:
    """``yuebing bench trace``: with ``--url``, replay the trace against that server (``bench.replay``);
    without, the cache experiment on clusters it starts (``bench.cache_trace``; the trace: ``FILE`` or
    ``--trace``)."""
    if getattr(args, "url", None):
        return replay.main(args)
    return cache_trace.main(args)


def _serve(bench_sub) -> None:
    """``bench serve``: the cluster against plain transformers generate."""
    serve_b = bench_sub.add_parser("serve", help="cluster vs plain transformers at 1, 8 and 16 concurrent streams")
    add_common(serve_b)
    serve_b.add_argument("--concurrency", default="1,8,16")
    serve_b.add_argument("--requests-per-level", type=int, default=0, help="default: 2x concurrency")
    serve_b.add_argument("--max-tokens", type=int, default=128)
    serve_b.add_argument("--rounds", type=int, default=1,
                         help="repeat the top level and the batch-16 baseline this many times (median ratio)")
    serve_b.add_argument("--out", default=None, help="also write the JSON figures here")
    serve_b.set_defaults(func=serve.main)


def _prefix(bench_sub) -> None:
    """``bench prefix``: TTFT with the prefix in the pool against cold TTFT."""
    prefix_b = bench_sub.add_parser("prefix", help="TTFT of a prompt whose prefix is in the pool vs cold TTFT")
    add_common(prefix_b)
    prefix_b.add_argument("--prompt-tokens", type=int, default=2048)
    prefix_b.add_argument("--shared-tokens", type=int, default=1984, help="prefix in the pool (a multiple of the block size)")
    prefix_b.add_argument("--cold", type=int, default=3, help="cold prompts measured")
    prefix_b.add_argument("--repeats", type=int, default=3, help="pool hits measured, each with a fresh prefix")
    prefix_b.add_argument("--out", default=None, help="also write the JSON figures here")
    prefix_b.set_defaults(func=prefix.main)


def _transfer(bench_sub) -> None:
    """``bench transfer``: the pool's transfers against raw NATS."""
    transfer_b = bench_sub.add_parser("transfer", help="KV blocks from the pool over NATS vs raw NATS pub/sub")
    transfer_b.add_argument("--blocks", type=int, default=124, help="blocks per get (default 124)")
    transfer_b.add_argument("--block-shape", default=",".join(map(str, transfer.DEFAULT_BLOCK_SHAPE)),
                            help="layers,2,kv_heads,block_size,head_dim")
    transfer_b.add_argument("--repeats", type=int, default=5, help="rounds of each")
    transfer_b.add_argument("--put-batch", type=int, default=16,
                            help="blocks per call in the batched put rounds (default 16, about one prompt's)")
    transfer_b.add_argument("--data-dir", default=None, help="NATS store, cachestore files and logs (default: a temp dir)")
    transfer_b.add_argument("--out", default=None, help="also write the JSON figures here")
    transfer_b.set_defaults(func=transfer.main)


def _hotblocks(bench_sub) -> None:
    """``bench hotblocks``: a prefix read by many prefills at once, with and without hot-block copies."""
    hot_b = bench_sub.add_parser("hotblocks", help="pool load time of a prefix many prefills read at once, "
                                                   "hot-block copies off vs on")
    hot_b.add_argument("--shards", type=int, default=4, help="cachestore instances (default 4)")
    hot_b.add_argument("--readers", type=int, default=8, help="prefill instances loading at once (default 8)")
    hot_b.add_argument("--prefix-tokens", type=int, default=1024, help="the shared prefix (default 1024)")
    hot_b.add_argument("--bursts", type=int, default=20, help="bursts a run (default 20)")
    hot_b.add_argument("--warmup", type=int, default=3, help="first bursts of a run not counted (default 3)")
    hot_b.add_argument("--repeats", type=int, default=2, help="runs with copies off and on each (default 2)")
    hot_b.add_argument("--gap", type=float, default=0.2, help="seconds between bursts (default 0.2)")
    hot_b.add_argument("--data-dir", default=None, help="NATS store, cachestore files and logs (default: a temp dir)")
    hot_b.add_argument("--out", default=None, help="also write the JSON figures here")
    hot_b.set_defaults(func=hotblocks.main)


def _pipeline(bench_sub) -> None:
    """``bench pipeline``: TTFT of long prompts split over several prefill instances (bench/pipeline.py)."""
    p = bench_sub.add_parser("pipeline", help="TTFT of long prompts split over 1, 2, 4 prefill instances "
                                              "(chunked pipeline parallelism), real model and simulated engine")
    p.add_argument("--engine", choices=("real", "sim", "both"), default="both")
    p.add_argument("--instances", default="1,2,4", help="the most stages a prompt may be split into, one run each "
                   "(real: also the prefill instances started)")
    p.add_argument("--sim-prefill", type=int, default=8, help="prefill instances of every simulated run (default 8)")
    p.add_argument("--prompts", type=int, default=3, help="prompts per run, sent one at a time (default 3)")
    p.add_argument("--prompt-tokens", type=int, default=8000, help="tokens per prompt (default 8000)")
    p.add_argument("--output-tokens", type=int, default=8, help="tokens generated per prompt (default 8)")
    p.add_argument("--min-tokens", type=int, default=4096, help="pipeline_min_tokens of the clusters (default 4096)")
    p.add_argument("--model", default=None)
    p.add_argument("--models-dir", default=None)
    p.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16"),
                   help="the real model's number format (default float32, the calibration profile's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each real model worker (default: "
                   "the host's cores split between them, as `yuebing up` does)")
    p.add_argument("--calibration", default=None, help="cost profile (default: the model's, calibrated if missing)")
    p.add_argument("--keep-data", action="store_true", help="keep each run's cluster files and logs")
    p.add_argument("--out", default=None, help="also write the JSON figures here")
    p.set_defaults(func=pipeline.main)


def _trace(bench_sub) -> None:
    """``bench trace``: the replay against a server (``--url``) or the cache experiment."""
    trace_b = bench_sub.add_parser(
        "trace", help="replay a Mooncake trace: with --url against a server (SLOs, goodput); without, "
        "the KV-cache hit-ratio experiment", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Replay a Mooncake-format trace (FILE, default {shown(DEFAULT_TRACE)}).\n\n"
        "  yuebing bench trace FILE --url URL [options]\n"
        "      open-loop replay against any OpenAI-compatible server: TTFT, TBT, SLO attainment, goodput,\n"
        "      prefix hit ratio, rejections; a table, a JSON line, a JSON file and a PNG (bench/replay.py)\n"
        "  yuebing bench trace [FILE] [options]\n"
        "      without --url: the KV-cache experiment on clusters it starts itself: prefix hit ratio of\n"
        "      the pool (global) against local-only caches of the same total size, at 100/50/25/10 % of the\n"
        "      working set, each next to an ideal LRU cache of that size and the unbounded-cache bound\n"
        "      (bench/cache_trace.py)")
    replay.add_arguments(trace_b)  # FILE, --url; --model, --token-scale, --requests, --max-context, --out serve both
    cache_b = trace_b.add_argument_group("the cache experiment (without --url)")
    cache_b.add_argument("--data-dir", default=None, help="clusters' data and logs (default: a temporary directory)")
    cache_b.add_argument("--models-dir", default=None, help="converted models (default DATA_DIR/models)")
    cache_b.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default 16)")
    cache_b.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 1)")
    cache_b.add_argument("--trace", default=None, help="the trace file (same as FILE)")
    cache_b.add_argument("--concurrency", type=int, default=1, help="requests in flight (default 1: sequential)")
    cache_b.add_argument("--pool-fractions", default=cache_trace.DEFAULT_FRACTIONS,
                         help="cache sizes, as fractions of the working set: a global row (the pool of that "
                         f"size) and a local-only row (own caches adding up to it) for each (default "
                         f"{cache_trace.DEFAULT_FRACTIONS})")
    cache_b.add_argument("--configs", default=None,
                         help="rows to run, by name (global_50pct, local_10pct, ...) or kind (global, local); "
                         "default: all")
    cache_b.add_argument("--no-settle", dest="settle", action="store_false",
                         help="send the next request without waiting for the previous one's pool writes")
    trace_b.set_defaults(func=trace_main)  # it dispatches: --url -> replay.main


def _eviction(bench_sub) -> None:
    """``bench eviction``: the cachestore's eviction policies on the trace, offline (bench/eviction.py)."""
    p = bench_sub.add_parser("eviction", help="the cachestore's eviction policies against plain LRU on the "
                             "conversation trace, offline: prefix hit ratio at 100/50/25/10 % of the working set",
                             description="Replays the block chains of the trace's requests (as bench trace sends "
                             "them) through one cache per policy and size, no cluster (bench/eviction.py).")
    eviction.add_arguments(p)
    p.set_defaults(func=eviction.main)


def _sched(bench_sub) -> None:
    """``bench sched``: the scheduling experiments."""
    p = bench_sub.add_parser("sched", help="scheduling experiments as curves over load: placement (Fig. 5), "
                             "disaggregated vs colocated capacity, overload (Table 3)")
    p.add_argument("--experiments", default=",".join(sched.EXPERIMENTS),
                   help=f"subset of {','.join(sched.EXPERIMENTS)}")
    p.add_argument("--policies", default=None,
                   help=f"placement runs to make, a subset of {','.join(sched.PLACEMENT_POLICIES)} (default: all)")
    p.add_argument("--trace", default=str(DEFAULT_TRACE), help="Mooncake JSONL trace")
    p.add_argument("--start", type=int, default=0, help="first trace line replayed")
    p.add_argument("--requests", type=int, default=300, help="requests per slice of the trace (simulated engine)")
    p.add_argument("--slices", type=int, default=2, help="disjoint consecutive slices of the trace, each a point")
    p.add_argument("--loads", default="0.25,0.5,0.75,1,1.25,1.5",
                   help="offered loads of placement and architecture, as multiples of the measured capacity")
    p.add_argument("--overload-loads", default="1,1.5,2,3", help="offered loads of the overload runs")
    p.add_argument("--repeats", type=int, default=3, help="repeats of every placement and architecture point")
    p.add_argument("--overload-repeats", type=int, default=4, help="repeats of every overload point")
    p.add_argument("--capacity", type=float, default=None,
                   help="the unit of load in req/s (default: measured first, the first slice sent at --capacity-rate)")
    p.add_argument("--capacity-rate", type=float, default=1000.0, help="arrival rate of the capacity probe (req/s)")
    p.add_argument("--resume", action="store_true", help="keep the runs (and capacity) an earlier invocation "
                   "left in --out-dir and make only the missing ones")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated engine's time draws")
    p.add_argument("--token-scale", type=int, default=32)
    p.add_argument("--output-scale", type=int, default=None,
                   help="divides output lengths instead of --token-scale (longer outputs load decode)")
    p.add_argument("--admissions", default=",".join(sched.ADMISSIONS),
                   help=f"admission modes of the overload runs, a subset of {','.join(sched.ADMISSIONS)}")
    p.add_argument("--arch-admissions", default="none,predictive",
                   help="the admission control of both sides of the architecture runs, one pair per mode")
    p.add_argument("--colocated-chunk", type=int, default=0,
                   help="tokens of the colocated baseline's prefill chunks (default: the most whose prefill and a "
                   "decode step fit the TBT objective, from the cost profile)")
    p.add_argument("--real-admission", choices=sched.ADMISSIONS, default="predictive",
                   help="the admission control of both sides of the real-model pair")
    p.add_argument("--ttft-slo", type=float, default=None, help="default: 10x a mean prompt's calibrated TTFT")
    p.add_argument("--tbt-slo", type=float, default=None, help="default: 5x a calibrated decode step")
    p.add_argument("--max-running", type=count(1), default=None, help="rows of a decode batch (default 32)")
    p.add_argument("--urgent-rows", type=count(0), default=None,
                   help="rows beyond --max-running for requests of ten output tokens or fewer (default 1)")
    p.add_argument("--prefill", type=int, default=8)
    p.add_argument("--decode", type=int, default=8)
    p.add_argument("--prefill-cache-mb", type=int, default=256, help="each prefill instance's own block cache")
    p.add_argument("--pool-writes", choices=("all", "seen"), default=None,
                   help="which new blocks the runs with the pool write to it (default: the deployment's, all)")
    p.add_argument("--no-peer-fetch", action="store_true",
                   help="global_cache_aware loads prefixes from the pool only, never from another prefill's cache")
    p.add_argument("--pool-dram-mb", type=int, default=None, help="the cachestore's DRAM tier (default: its own)")
    p.add_argument("--pool-disk-mb", type=int, default=None, help="the cachestore's disk tier (default: its own)")
    p.add_argument("--real-prefill", type=int, default=2)
    p.add_argument("--real-decode", type=int, default=1)
    p.add_argument("--real-requests", type=int, default=60)
    p.add_argument("--real-rate", type=float, default=0.5, help="arrival rate of the real-model runs (req/s)")
    p.add_argument("--model", default=None)
    p.add_argument("--models-dir", default=None)
    p.add_argument("--calibration", default=None, help="cost profile (default: the model's, calibrated if missing)")
    p.add_argument("--out-dir", default="bench-sched", help="runs/, capacity.json, curves.json, a PNG per experiment")
    p.add_argument("--keep-data", action="store_true", help="keep each run's cluster files and logs")
    p.add_argument("--keep-records", action="store_true", help="also write each run's per-request records and plot")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=sched.main)


def _engine(bench_sub) -> None:
    """``bench engine``: the engine against the machine's bandwidth and matmul FLOP/s."""
    p = bench_sub.add_parser("engine", help="the engine against the machine's limits: copy bandwidth, matmul "
                             "FLOP/s, decode steps, prefill, decode joins")
    add_engine(p)
    engine.add_arguments(p)
    p.set_defaults(func=engine.main)


def _peer(bench_sub) -> None:
    """``bench peer``: the cluster against ``transformers serve --continuous-batching`` (bench/peer.py)."""
    p = bench_sub.add_parser("peer", help="cluster vs transformers serve --continuous-batching: tokens/s, TTFT, TPOT "
                             "closed and open loop",
                             description="The cluster against transformers serve --continuous-batching on the "
                             "same weights, one after the other (bench/peer.py).")
    add_common(p)
    p.add_argument("--concurrency", default=peer.DEFAULT_CONCURRENCY, help="closed-loop streams (default %(default)s)")
    p.add_argument("--output-tokens", default=peer.DEFAULT_OUTPUT_TOKENS,
                   help="output tokens per request, forced (default %(default)s)")
    p.add_argument("--rate", default=peer.DEFAULT_RATE,
                   help="open-loop Poisson arrival rates, requests/s (default %(default)s; \"\" for none)")
    p.add_argument("--requests", type=count(1), default=None,
                   help=f"requests per point (default: max(8, 2 x streams) closed, {peer.OPEN_LOOP_REQUESTS} open)")
    p.add_argument("--dtypes", default=None,
                   help=f"dtype configurations: best (yuebing auto, peer bfloat16), same[:DTYPE], YUEBING/PEER "
                   f"(default {peer.DEFAULT_DTYPES}; --dtype X alone means same:X)")
    p.add_argument("--admission", choices=("none", "early", "predictive"), default="none",
                   help="the cluster's admission control (default none: like the peer, serve every request)")
    p.add_argument("--seed", type=int, default=peer.SEED, help="prompt lengths and arrivals (default %(default)s)")
    p.add_argument("--peer-venv", default=None, help="the peer's virtualenv (default .venv-peer; bench/peer_env.sh)")
    p.add_argument("--peer-threads", type=count(1), default=None, help="OMP_NUM_THREADS of the peer (default: unset)")
    p.add_argument("--peer-cb-num-blocks", type=count(0), default=None,
                   help="the peer's KV blocks (default: sized to the workload; 0: the peer's own sizing)")
    p.add_argument("--peer-cb-max-batch-tokens", type=count(0), default=None,
                   help=f"the peer's tokens per step (default {peer.PEER_MAX_BATCH_TOKENS}; 0: the peer's own)")
    p.add_argument("--peer-args", default=None, help="more arguments for transformers serve, one string "
                   "(e.g. --peer-args=--no-continuous-batching)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds each server may take to start")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", default=None, help="also write the JSON figures here")
    p.add_argument("--plot", default=None, help="also draw both servers over load as a PNG here")
    p.set_defaults(func=peer.main)


def _decisions(bench_sub) -> None:
    """``bench decisions``: the conductor's scheduler alone, without the bus (bench/decisions.py)."""
    p = bench_sub.add_parser("decisions", help="the conductor's decisions without the bus: CPU per decision and per "
                             "request's reports, heartbeats and KV events, in one process",
                             description="The conductor's Scheduler fed by bench conductor's synthetic cluster on a "
                             "virtual clock, in this process (bench/decisions.py).")
    decisions.add_arguments(p)
    p.set_defaults(func=decisions.main)


def _conductor(bench_sub) -> None:
    """``bench conductor``: one real conductor under synthetic instances (bench/conductor.py)."""
    p = bench_sub.add_parser("conductor", help="the conductor alone under synthetic instances: decision latency, "
                             "sustained rate, KV-event ingest and index memory over instances, blocks and rate",
                             description="A real conductor (pinned to one core) driven by synthetic prefill, decode "
                             "and cachestore instances and a synthetic gateway over a real nats-server "
                             "(bench/conductor.py says what is synthetic).")
    conductor.add_arguments(p)
    p.set_defaults(func=conductor.main)


def _multiturn(bench_sub) -> None:
    """``bench multiturn``: decode's write-back against none, on conversations and resumptions."""
    p = bench_sub.add_parser("multiturn", help="later turns' reuse and TTFT, and a killed decode's resumption, with "
                             "and without decode's write-back of blocks to the pool",
                             description="Conversations replayed turn by turn with their answers fed back, and "
                             "streams whose decode instance is killed, on a cluster with decode's write-back and on "
                             "one without (bench/multiturn.py).")
    add_common(p)
    p.add_argument("--conversations", type=count(1), default=4, help="(default %(default)s)")
    p.add_argument("--turns", type=count(2), default=4, help="per conversation (default %(default)s)")
    p.add_argument("--history-tokens", type=count(1), default=2048,
                   help="the first message, and a resumed stream's prompt (default %(default)s)")
    p.add_argument("--question-tokens", type=count(1), default=64, help="each later message (default %(default)s)")
    p.add_argument("--answer-tokens", type=count(1), default=128, help="answers' max_tokens (default %(default)s)")
    p.add_argument("--resumes", type=count(0), default=3, help="streams whose decode is killed (default %(default)s)")
    p.add_argument("--resume-tokens", type=count(1), default=256, help="each one's tokens (default %(default)s)")
    p.add_argument("--kill-after", type=count(1), default=128,
                   help="tokens streamed before the kill (default %(default)s)")
    p.add_argument("--seed", type=int, default=17, help="messages and prompts (default %(default)s)")
    p.add_argument("--out", default=None, help="also write the JSON figures here")
    p.set_defaults(func=multiturn.main)
