"""The ``yuebing`` command: run the local cluster, run one service, convert the model, benchmark."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time

from services.cachestore.eviction import POLICIES as EVICTION_POLICIES
from yuebing.args import add_common, count

SERVICES = {
    "gateway": ("services.gateway.service", "GatewayService"),
    "conductor": ("services.conductor.service", "ConductorService"),
    "prefill": ("services.prefill.service", "PrefillService"),
    "decode": ("services.decode.service", "DecodeService"),
    "cachestore": ("services.cachestore.service", "CacheStoreService"),
}
# a colocated worker: prefill and decode in one process on one engine (the goodput baseline)
COLOCATED = ("prefill", "decode")

HELP = """\
yuebing: KVCache-centric, disaggregated LLM serving over NATS JetStream.

Start everything on this machine (a NATS server and one instance of each service):
    yuebing up                         # default model, http://127.0.0.1:8000/v1
    yuebing up --prefill 2 --decode 2  # more workers

Scale across machines: run a NATS server with JetStream, then on each machine
    yuebing serve prefill --nats nats://HOST:4222
    yuebing serve decode  --nats nats://HOST:4222   (and gateway, conductor, cachestore)

Talk to it with any OpenAI client: base_url=http://127.0.0.1:8000/v1, model=smollm2-135m-instruct.
"""


def _settings(args, **extra):
    from libs.config import from_env

    return from_env(
        nats_url=getattr(args, "nats", None),
        instance_id=getattr(args, "instance_id", None),
        model=args.model,
        data_dir=args.data_dir,
        models_dir=args.models_dir,
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        block_size=getattr(args, "block_size", None),
        threads=getattr(args, "threads", None),
        device=getattr(args, "device", None),
        dtype=getattr(args, "dtype", None),
        load_format=getattr(args, "load_format", None),
        cpus=getattr(args, "cpus", None),
        policy=getattr(args, "policy", None),
        api_keys=",".join(args.api_key) if getattr(args, "api_key", None) else None,
        no_auth=True if getattr(args, "no_auth", False) else None,
        dashboard=getattr(args, "dashboard", None),
        served_model_name=getattr(args, "served_model_name", None),
        engine=getattr(args, "engine", None),
        calibration=getattr(args, "calibration", None),
        admission=getattr(args, "admission", None),
        pool_writes=getattr(args, "pool_writes", None),
        pool_eviction=getattr(args, "pool_eviction", None),
        peer_fetch=False if getattr(args, "no_peer_fetch", False) else None,
        pipeline_max_stages=getattr(args, "pipeline_stages", None),
        ttft_slo=getattr(args, "ttft_slo", None),
        tbt_slo=getattr(args, "tbt_slo", None),
        slo_classes=",".join(args.slo_class) if getattr(args, "slo_class", None) else None,
        max_running=getattr(args, "max_running", None),
        urgent_rows=getattr(args, "urgent_rows", None),
        **extra,
    )


def _auth_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", action="append", default=None,
                   help="an API key the gateway accepts (repeatable; default for `up`: one is generated)")
    p.add_argument("--no-auth", action="store_true", help="serve without API keys (local use only)")
    p.add_argument("--dashboard", choices=("on", "open", "off"), default=None,
                   help="the live dashboard at /dashboard: on (default; its data behind the API keys), open "
                   "(its data without a key), off")


def _served_name_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients send in \"model\" and /v1/models lists (default: the model's "
                   "own name); requests naming another model get a 404")


def _serving(p: argparse.ArgumentParser) -> None:
    """Flags of the engine, the SLOs and admission (shared by `up` and `serve`)."""
    p.add_argument("--engine", choices=("model", "sim"), default=None,
                   help="model: run the model (default); sim: replace compute with the calibrated cost profile "
                   "(same services, bus, pool and KV bytes), for scheduling experiments with many instances")
    p.add_argument("--calibration", default=None,
                   help="cost profile JSON from `yuebing calibrate` (default: DATA_DIR/calibration/<model>, if present)")
    p.add_argument("--admission", choices=("none", "early", "predictive"), default=None,
                   help="reject at arrival what would miss its SLOs: none; early (predicted TTFT and the decode "
                   "load now); predictive (default: the decode load projected to when the request reaches it)")
    p.add_argument("--pool-writes", choices=("all", "seen"), default=None,
                   help="new blocks prefills write to the cachestore pool: all (default), or seen (a block on its "
                   "second sight: only the leading blocks an earlier request also had)")
    p.add_argument("--no-peer-fetch", action="store_true",
                   help="global_cache_aware never loads a prefix from another prefill instance's own cache")
    p.add_argument("--pipeline-stages", type=int, default=None, metavar="N",
                   help="the most prefill instances one long prompt (4,096 tokens or more to compute) may be split "
                   "over when the conductor predicts its first token sooner (default 4; 1: never split)")
    p.add_argument("--pool-eviction", choices=EVICTION_POLICIES, default=None,
                   help="which blocks leave the cachestore pool first: lfuda_leaf (default: LFU with ageing, a "
                   "block kept while the pool holds a block after it in a prompt), lfuda, lru_leaf, lru, s3fifo, "
                   "s3fifo_leaf (`yuebing bench eviction` compares them)")
    p.add_argument("--ttft-slo", type=float, default=None, help="time-to-first-token objective, seconds (default 30)")
    p.add_argument("--tbt-slo", type=float, default=None,
                   help="time-between-tokens objective (a request's 90th percentile gap), seconds (default 1)")
    p.add_argument("--slo-class", action="append", default=None, metavar="NAME=TTFT:TBT",
                   help="a request class with its own SLOs, chosen by the request body's \"slo_class\" (repeatable)")
    p.add_argument("--max-running", type=count(1), default=None,
                   help="sequences in a decode instance's batch (default 32)")
    p.add_argument("--urgent-rows", type=count(0), default=None,
                   help="rows beyond --max-running that only requests of ten output tokens or fewer take, whose "
                        "wait for a row is their TBT (default 1)")


def cmd_up(args) -> int:
    from yuebing.cluster import LocalCluster
    from libs.engine.device import EngineConfigError
    from libs.log import configure

    configure("up")
    settings = _settings(args)
    cluster = LocalCluster(settings, prefill=args.prefill, decode=args.decode, cachestore=args.cachestore,
                           conductor=args.conductor,
                           colocated=args.colocated, nats_port=args.nats_port, pin_cores=args.pin_cores)

    def on_signal(signum, frame):
        # stop at any moment, startup included: at the next safe point (between two services, in
        # the wait for readiness, in the supervision loop), or at once while the model converts;
        # a second signal does not interrupt the stopping
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop_requested = True
        if cluster.interruptible:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"starting yuebing (model {settings.model}); logs in {cluster.log_dir}", flush=True)
    try:
        try:
            cluster.start()
        except (EngineConfigError, FileNotFoundError) as e:  # before any service started
            print(f"yuebing up: error: {e}", file=sys.stderr, flush=True)
            return 2
        key = cluster.api_key
        auth_header = f"-H 'Authorization: Bearer {key}' " if key else ""
        lines = [
            "",
            f"yuebing is ready: {cluster.url}/v1  (model: {_model_id(settings)})",
            f"  NATS: {cluster.nats.public_url} (a user per instance)   " + (
                f"colocated workers x{args.colocated}" if args.colocated
                else f"prefill x{args.prefill}, decode x{args.decode}") + f"   engine: {settings.engine}, "
            f"{cluster.placement.device_name} {cluster.placement.dtype_name}",
            "  metrics: " + ", ".join(f"{n} {u}" for n, u in cluster.metrics_urls.items()),
            *([f"  dashboard: {cluster.url}/dashboard" + (f"?key={key}" if key and settings.dashboard == "on" else "")]
              if settings.dashboard != "off" else []),
            f"  cores: {cluster.describe_cores()}",
            (f"  API key: {key}   (send 'Authorization: Bearer <key>'; kept in {cluster.data_dir / 'api_key'})"
             if key else "  API keys: off (--no-auth)"),
            f"  try:  curl {cluster.url}/v1/chat/completions -H 'Content-Type: application/json' {auth_header}"
            f"-d '{{\"model\": \"{_model_id(settings)}\", \"messages\": [{{\"role\": \"user\", "
            f"\"content\": \"What is the capital of France?\"}}]}}'",
            "  a service that exits is restarted (with backoff); Ctrl-C stops everything.",
        ]
        print("\n".join(lines), flush=True)
        while not cluster.stop_requested:
            for line in cluster.supervise(time.monotonic()):
                print(line, file=sys.stderr, flush=True)
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping...", flush=True)
        cluster.stop()
        print("stopped.", flush=True)
    return 0


def _model_id(settings) -> str:
    return settings.served_name()


def cmd_serve(args) -> int:
    from libs.service import run

    if args.service == "worker":
        # one instance id for both halves: the conductor decodes a request where it was prefilled
        settings = _settings(args, metrics_port=args.metrics_port, colocated=True).with_instance("worker")
        classes = [getattr(importlib.import_module(SERVICES[k][0]), SERVICES[k][1]) for k in COLOCATED]
        run(classes, settings, name="worker")
        return 0
    module, cls = SERVICES[args.service]
    settings = _settings(args, metrics_port=args.metrics_port)
    if args.service == "gateway" and (problem := settings.gateway_auth_error()):
        print(f"yuebing serve gateway: {problem}", file=sys.stderr)  # before the model's libraries load
        return 2
    run(getattr(importlib.import_module(module), cls), settings)
    return 0


def cmd_convert(args) -> int:
    from libs.log import configure
    from libs.engine.modelpath import resolve_model

    configure("convert")
    settings = _settings(args)
    print(resolve_model(settings.model, settings.resolved_models_dir()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yuebing", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the local cluster (NATS + all services) and wait for Ctrl-C")
    add_common(up)
    up.add_argument("--host", default=None, help="gateway address (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=None, help="gateway port (default 8000)")
    up.add_argument("--prefill", type=int, default=1, help="prefill instances (default 1)")
    up.add_argument("--decode", type=int, default=1, help="decode instances (default 1)")
    _auth_flags(up)
    _served_name_flag(up)
    up.add_argument("--cachestore", type=int, default=1, help="cachestore instances (default 1)")
    up.add_argument("--conductor", type=int, default=1,
                    help="conductors (default 1); several split the prefill and decode instances between "
                         "them and take over a lost one's share")
    up.add_argument("--policy", default=None, help="placement: random, round_robin, least_loaded, "
                    "local_cache_aware, global_cache_aware (default)")
    up.add_argument("--pin-cores", action="store_true",
                    help="pin each model worker to its own share of the cores (default: split the threads, "
                    "let the kernel place them)")
    up.add_argument("--colocated", type=int, default=0, metavar="N",
                    help="instead of separate prefill and decode instances, N workers that each prefill and "
                    "decode their own requests on one engine (a baseline for comparison; implies no pool)")
    up.add_argument("--nats-port", type=int, default=None, help="NATS port (default: a free port)")
    _serving(up)
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help="run one service against a NATS server (how yuebing scales across machines)")
    serve.add_argument("service", choices=sorted([*SERVICES, "worker"]),
                       help="one of the five services, or worker: prefill and decode colocated on one engine")
    add_common(serve)
    serve.add_argument("--nats", default=None, help="NATS URL (default nats://127.0.0.1:4222)")
    serve.add_argument("--instance-id", default=None, help="stable id of this instance (default: host + random)")
    serve.add_argument("--host", default=None, help="listen address of the gateway (and metrics)")
    serve.add_argument("--port", type=int, default=None, help="gateway port (default 8000)")
    _auth_flags(serve)
    _served_name_flag(serve)
    serve.add_argument("--policy", default=None, help="conductor placement policy (default global_cache_aware)")
    serve.add_argument("--metrics-port", type=int, default=None, help="Prometheus port of a worker (default: off)")
    serve.add_argument("--cpus", default=None,
                       help="cores of a model worker, e.g. 0-3 (pins its model thread; threads default to their "
                       "count). Give the workers of one host disjoint sets")
    _serving(serve)
    serve.set_defaults(func=cmd_serve)

    from yuebing import calibrate

    calibrate.add_parser(sub)

    conv = sub.add_parser("convert", help="convert the model to a cached safetensors directory and print its path")
    add_common(conv)
    conv.set_defaults(func=cmd_convert)

    bench = sub.add_parser("bench", help="benchmarks (see docs/benchmarks.md)")
    from bench.cli import add_parsers  # the benchmarks live apart from the product, in bench/

    add_parsers(bench.add_subparsers(dest="bench", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
