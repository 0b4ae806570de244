"""Settings shared by every service, from CLI flags or ``YUEBING_*`` environment variables."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import msgspec

from libs.engine.modelpath import default_data_dir, DEFAULT_MODEL, model_name

# 16 tokens per block: fine-grained prefix reuse (a block is the unit of a hit), and one block
# of the default model (30 layers x K,V x 3 heads x 64 dims x fp32 = 46 KiB/token, 720 KiB per
# block) fits in a single bus message under NATS' default 1 MiB max_payload.
DEFAULT_BLOCK_SIZE = 16


class SLO(msgspec.Struct, frozen=True):
    """Latency objectives of a request, in seconds; 0 = none."""

    ttft: float = 0.0  # time to the first token
    tbt: float = 0.0  # time between tokens: a request's 90th percentile gap (see libs.metrics.request_tbt)


def parse_slo_classes(spec: str) -> dict[str, SLO]:
    """``"interactive=2:0.1,batch=60:1"`` -> {name: SLO(ttft, tbt)}."""
    classes: dict[str, SLO] = {}
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            continue
        name, sep, values = item.partition("=")
        ttft, sep2, tbt = values.partition(":")
        try:
            if not (sep and sep2 and name.strip()):
                raise ValueError
            slo = SLO(float(ttft), float(tbt))
        except ValueError:
            raise ValueError(f"bad SLO class {item!r}: expected NAME=TTFT_SECONDS:TBT_SECONDS") from None
        if slo.ttft < 0 or slo.tbt < 0:
            raise ValueError(f"bad SLO class {item!r}: seconds must be >= 0")
        classes[name.strip()] = slo
    return classes


class Settings(msgspec.Struct, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    instance_id: str = ""
    model: str = DEFAULT_MODEL
    data_dir: str = ""
    models_dir: str = ""  # converted models; default <data_dir>/models
    block_size: int = DEFAULT_BLOCK_SIZE
    heartbeat_interval: float = 1.0
    # JetStream replicas of the task and KV-event streams (the conductor creates them): 3 on a NATS
    # cluster of three or more servers survives the loss of any one; 1 on a single server
    stream_replicas: int = 1
    # a worker's task is redelivered if it is not acked within this many seconds; a worker reports
    # progress on a task it is still working on every third of it, so a long prompt is not
    task_ack_wait: float = 60.0
    drain_seconds: float = 30.0  # on SIGTERM, time to finish work in flight before handing it back
    metrics_port: int = 0  # 0 = no separate metrics server (the gateway serves /metrics itself)
    threads: int = 0  # torch threads; 0 = torch's default (or the number of `cpus`)
    cpus: str = ""  # a model worker's cores, e.g. "0-3" (its model thread is pinned there); "" = any
    # free C heap a service keeps for reuse instead of handing it back to the kernel at once
    # (glibc; libs/heap.py); 0 = the C library's defaults
    heap_keep_bytes: int = 256 << 20
    restarts: int = 0  # times a supervisor (`yuebing up`) has restarted this instance; in its heartbeat
    # gateway
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 1024 * 1024
    api_keys: str = ""  # comma-separated Bearer keys the gateway accepts
    served_model_name: str = ""  # the model name clients send and responses carry; "" = the model's own
    no_auth: bool = False  # serve without API keys: only when explicitly configured (local use)
    request_timeout: float = 600.0
    # the operator's live dashboard at /dashboard (services/gateway/dashboard.py): "on" (its data
    # behind the API keys, when there are any), "open" (its data without a key), "off"
    dashboard: str = "on"
    # engine of the prefill and decode workers: "model" runs the model; "sim" replaces compute with
    # the calibrated cost profile (same bus, same pool, real KV bytes), for scheduling experiments
    engine: str = "model"
    # the sim's call times scatter around the profile's predictions as the real engine's did when
    # it was calibrated (libs/engine/costnoise.py), drawn from this seed; False: exactly the profile
    sim_noise: bool = True
    sim_seed: int = 0
    # where the model runs and its number format (libs/engine/device.py): "auto" takes a GPU when
    # torch sees one; the dtype "auto" is bfloat16 on a GPU and, on a CPU, whichever of bfloat16 and
    # float32 was measured faster on this machine. KV blocks are in the model dtype.
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    load_format: str = "auto"  # auto (the directory's safetensors) | safetensors | dummy (random weights)
    calibration: str = ""  # cost profile JSON (`yuebing calibrate`); default: DATA_DIR/calibration/<model>
    # conductor
    policy: str = "global_cache_aware"  # random | round_robin | least_loaded | local_cache_aware | global_cache_aware
    use_pool: bool = True  # False: each prefill reuses only its own DRAM cache (no cachestore pool)
    # which new blocks prefills write to the pool: "all", or "seen" (a block on its second sight:
    # only the leading blocks an earlier request also had)
    pool_writes: str = "all"
    colocated: bool = False  # each request decodes on the instance that prefilled it (a colocated baseline)
    # global_cache_aware may have a prompt's prefix loaded from the prefill instance whose own DRAM
    # cache holds it (a peer), when that beats the pool's hit and recomputing
    peer_fetch: bool = True
    # chunked pipeline parallelism: a prompt with at least ``pipeline_min_tokens`` to compute may be
    # split over up to ``pipeline_max_stages`` prefill instances (1: never), when the cost model
    # predicts the pipeline's first token sooner; a stage waits at most ``pipeline_stage_timeout``
    # seconds for the one before it, then computes that part itself
    pipeline_min_tokens: int = 4096
    pipeline_max_stages: int = 4
    pipeline_stage_timeout: float = 60.0
    # SLOs (seconds; 0 = none) and admission: "none" admits everything, "early" rejects on the
    # best predicted TTFT and the decode pool's current load, "predictive" projects the decode load
    # to when the request would reach it (Mooncake's prediction-based early rejection)
    ttft_slo: float = 30.0
    tbt_slo: float = 1.0
    admission: str = "predictive"
    slo_classes: str = ""  # per request class: "name=TTFT:TBT,..." chosen by the request's "slo_class"
    # prefill
    prefill_chunk: int = 512
    prefill_cache_bytes: int = 256 << 20  # the instance's own DRAM cache of recent blocks
    cache_replicas: int = 1
    pool_write_backlog_bytes: int = 512 << 20  # prompts' KV awaiting pool writes; past it, writes are skipped
    # decode writes each sequence's full blocks (prompt tail and output) to the pool as they fill,
    # so a chat's next turn and a resumed request load them (services/decode/writeback.py)
    decode_write_back: bool = True
    prefill_kv_arena_bytes: int = 512 << 20  # slab for prompts' KV, paged in at start (capped by the model; 0: none)
    # decode
    max_running: int = 32
    # rows beyond max_running that only urgent sequences take: those whose every gap counts in
    # their TBT (ten output tokens or fewer), for which the wait for a row is the TBT itself
    urgent_rows: int = 1
    decode_kv_arena_bytes: int = 256 << 20  # slab for received KV, paged in at start (capped by the model; 0: none)
    # cachestore
    dram_bytes: int = 1 << 30
    disk_bytes: int = 4 << 30
    disk_sync_seconds: float = 1.0  # blocks on disk are flushed to the device this often (0 = only at stop)
    # which blocks leave the pool first (services/cachestore/eviction.py POLICIES): lfuda_leaf (LFU
    # with ageing, a block kept while a block after it in a prompt is), lfuda, lru_leaf, lru,
    # s3fifo, s3fifo_leaf; `bench eviction` compares them on the conversation trace
    pool_eviction: str = "lfuda_leaf"
    # the disk tier evicts once it holds more than pool_evict_high of disk_bytes, down to
    # pool_evict_low of it, after puts (a put itself evicts only what keeps it within disk_bytes)
    pool_evict_high: float = 0.99
    pool_evict_low: float = 0.97
    # blocks an operator may pin at once on each cachestore instance (POST /cache/pins); pinned
    # blocks are never evicted, so pins beyond this are refused
    pool_max_pinned_blocks: int = 65536
    # hot blocks (services/cachestore/hot.py): a block read more than pool_hot_reads_per_second per
    # copy gets extra copies on the next cachestore instances of its ranking, at most
    # pool_hot_replicas (0: off), readers spread over them; the rate decays with this half-life
    pool_hot_replicas: int = 2
    pool_hot_reads_per_second: float = 4.0
    pool_hot_half_life_seconds: float = 10.0
    # a session's blocks (prompt and answers of its turns so far, at most session_max_blocks of them)
    # stay pinned in the pool this long after its last turn (services/gateway/sessions.py); 0: off
    session_ttl_seconds: float = 600.0
    session_max_blocks: int = 2048

    def served_name(self) -> str:
        """The model's name as clients send it and the metrics' ``model_name`` label carries it."""
        return self.served_model_name or model_name(self.model, self.resolved_models_dir())

    def api_key_list(self) -> list[str]:
        """The Bearer keys the gateway accepts, in the order given."""
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    def gateway_auth_error(self) -> str | None:
        """Why a gateway must not start with these settings (no API key and no explicit
        ``--no-auth``), or None: checked before anything is loaded."""
        if self.api_key_list() or self.no_auth:
            return None
        return "the gateway needs API keys (--api-key / YUEBING_API_KEYS) or an explicit --no-auth for local use"

    def slo(self) -> SLO:
        """The deployment's SLOs (requests without a class)."""
        return SLO(self.ttft_slo, self.tbt_slo)

    def slo_class_map(self) -> dict[str, SLO]:
        return parse_slo_classes(self.slo_classes)

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir).expanduser() if self.data_dir else default_data_dir()

    def resolved_models_dir(self) -> Path:
        return Path(self.models_dir).expanduser() if self.models_dir else self.resolved_data_dir() / "models"

    def with_instance(self, kind: str) -> "Settings":
        if self.instance_id:
            return self
        host = socket.gethostname().split(".")[0]
        # A cachestore owns files on disk: its default id is stable so a restart finds them again.
        # Workers may run several to a host, so theirs get a random suffix.
        iid = f"{kind}-{host}" if kind == "cachestore" else f"{kind}-{host}-{uuid.uuid4().hex[:6]}"
        return msgspec.structs.replace(self, instance_id=iid.replace(".", "-"))


def from_env(**overrides) -> Settings:
    """Settings from ``YUEBING_<FIELD>`` variables, then explicit (non-None) overrides."""
    values = {}
    for field in msgspec.structs.fields(Settings):
        env = os.environ.get(f"YUEBING_{field.name.upper()}")
        if env is not None:
            values[field.name] = env
    values.update({k: v for k, v in overrides.items() if v is not None})
    return msgspec.convert(values, Settings, strict=False)
