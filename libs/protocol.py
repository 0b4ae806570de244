"""Every message that crosses the bus, and every subject it travels on.

All messages are msgspec Structs encoded as MessagePack. Messages that cross service
boundaries carry ``v`` (the protocol version); a receiver drops messages of a version it does
not speak. Nothing else is ever deserialised from the bus.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

# a block key (``libs.kv.keys``): schedule requests, KV events and dumps with any other are refused
# when decoded
BlockKey = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]

PROTOCOL_VERSION = 2  # 2: attempt_id and output_id named apart (1: request_id for both)

# NATS' default max_payload is 1 MiB; a chunk of binary data leaves room for its header.
MAX_PAYLOAD = 1024 * 1024
CHUNK_DATA_BYTES = MAX_PAYLOAD - 4096


# ---------------------------------------------------------------- subjects
class Subjects:
    """Subject names, in one place. ``<id>`` parts are instance or request ids."""

    SCHEDULE = "yb.sched"  # gateway -> any conductor (a queue group), request/reply
    ABORT = "yb.abort"  # gateway -> workers, core
    HEARTBEAT_PREFIX = "yb.hb"  # yb.hb.<kind>.<instance>
    PREFILL_STREAM = "YB_PREFILL"
    DECODE_STREAM = "YB_DECODE"

    @staticmethod
    def schedule_to(conductor_id: str) -> str:
        """Gateway -> one conductor, request/reply (several conductors share the cluster)."""
        return f"yb.sched.{conductor_id}"

    @staticmethod
    def heartbeat(kind: str, instance_id: str) -> str:
        return f"yb.hb.{kind}.{instance_id}"

    @staticmethod
    def inbox_prefix(kind: str, instance_id: str) -> str:
        """An instance's inboxes (replies, streams it asked for): only it may subscribe there."""
        return f"_INBOX.{kind}.{instance_id}"

    @staticmethod
    def prefill_task(instance_id: str) -> str:
        return f"yb.task.prefill.{instance_id}"

    @staticmethod
    def decode_task(instance_id: str) -> str:
        return f"yb.task.decode.{instance_id}"

    @staticmethod
    def kv(decode_id: str) -> str:
        return f"yb.kv.{decode_id}"

    @staticmethod
    def output(output_id: str) -> str:
        return f"yb.out.{output_id}"

    @staticmethod
    def prefill_blocks(instance_id: str) -> str:
        """A prefill instance's layered get of blocks in its own DRAM cache (a peer's load)."""
        return f"yb.prefill.{instance_id}.blocks"

    @staticmethod
    def cache(instance_id: str, op: str) -> str:
        """Per-instance cachestore subjects (op: put, get, exists, stats), for sharded pools."""
        return f"yb.cache.{instance_id}.{op}"

    KV_EVENTS_STREAM = "YB_KV_EVENTS"

    @staticmethod
    def kv_events(instance_id: str) -> str:
        return f"yb.kvev.{instance_id}"

    @staticmethod
    def kv_dump(instance_id: str) -> str:
        return f"yb.kvdump.{instance_id}"

    PREFILL_REPORT = "yb.report.prefill"
    PREFILL_DONE = "yb.report.prefill_done"
    DECODE_REPORT = "yb.report.decode"
    CONDUCTOR_STATE = "yb.conductor.state"  # request/reply: IndexSummary


# ---------------------------------------------------------------- requests
class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    # as OpenAI and vLLM: presence and frequency penalties on the output tokens so far, the
    # repetition penalty (1 = off) on every token of the prompt and the output so far
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # choices drawn from the one prompt, whose KV is computed once (choice i samples with
    # ``libs.engine.sampling.choice_params``: a seed derived from ``seed`` and i)
    n: int = 1
    # per output token: its log-probability and this many most likely alternatives (None: none);
    # per prompt token from the second (an echo's), the same from the prompt's own logits
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # structured output: an llguidance grammar (libs/engine/grammar.py) every sampled token must
    # continue; built and checked by the gateway
    grammar: str | None = None

    @property
    def greedy(self) -> bool:
        # below this, logits / temperature overflows float32: the distribution is the argmax anyway
        return self.temperature < 1e-4

    @property
    def penalized(self) -> bool:
        """Whether sampling needs the tokens of the prompt and the output so far."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def choice(self, index: int) -> "SamplingParams":
        """The sampling of choice ``index`` of a request with ``n`` of them: the request's own, one
        choice, its seed derived (``choice_seed``). A choice resumed alone samples with these."""
        if self.n == 1 and index == 0:
            return self
        return msgspec.structs.replace(self, n=1, seed=choice_seed(self.seed, index))


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed choice ``index`` of a request with ``seed`` draws with: the seed itself for choice
    0 (so n=1 draws as before), a 63-bit hash of (seed, index) for the others (no seed: none)."""
    if seed is None or index == 0:
        return seed
    import hashlib

    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class Resume(msgspec.Struct, kw_only=True):
    """Set when a request is resumed on other instances after one failed mid-stream.

    ``attempt_id`` of the task is then a new attempt's; token events go to the client's original
    ``output_id`` and are numbered from ``seq_base`` (the events the client already has). The
    prompt of the attempt is the original prompt plus the tokens already streamed.
    """

    output_id: str
    seq_base: int
    # the choice (of a request with n > 1) the attempt goes on with: each choice is resumed alone
    index: int = 0
    # the decode instance the failed attempt was handed to: placed elsewhere while another is
    # alive (the conductor may not have noticed yet that it is gone)
    failed_decode: str = ""


class _Resumable(msgspec.Struct, kw_only=True):
    """A task that may belong to a resumed request: where its token events go, numbered from where.

    Two ids travel apart: ``attempt_id`` names one attempt at serving a request (tasks, reports,
    aborts, the conductor's bookkeeping); ``output_id`` names the client's stream of token events,
    which a resumed request keeps across its attempts. They are equal on a first attempt."""

    attempt_id: str
    resume: Resume | None = None

    @property
    def output_id(self) -> str:
        return self.resume.output_id if self.resume else self.attempt_id

    @property
    def seq_base(self) -> int:
        return self.resume.seq_base if self.resume else 0

    @property
    def first_index(self) -> int:
        """The choice index of the attempt's first (or only) choice: a resumed choice's own index."""
        return self.resume.index if self.resume else 0


class ScheduleRequest(msgspec.Struct, kw_only=True):
    """gateway -> conductor: place this request (and, if admitted, dispatch it)."""

    v: int = PROTOCOL_VERSION
    attempt_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    block_hashes: list[BlockKey] = []
    arrival_time: float = 0.0
    resume: Resume | None = None
    # the request's SLOs in seconds (its class's, or the deployment's); 0 = none
    ttft_slo: float = 0.0
    tbt_slo: float = 0.0


class PackedTokens:
    """Token ids as the MessagePack array they arrived in: counted (``len``) and passed on as they
    are, never decoded. The conductor forwards a prompt's ids from the gateway's schedule request
    to a prefill instance's task: decoding a prompt of 14,000 ids and encoding it again cost it
    half a millisecond a request, a tenth of all it did. The prefill instance decodes (and checks)
    them as ``PrefillTask.prompt_token_ids``; ``encode`` writes them back byte for byte."""

    __slots__ = ("raw", "count")

    def __init__(self, raw: msgspec.Raw):
        head = memoryview(raw)[:5]
        if not head:
            raise msgspec.ValidationError("token ids: empty")
        b0 = head[0]
        if 0x90 <= b0 <= 0x9F:
            count = b0 & 0x0F
        elif b0 == 0xDC and len(head) >= 3:
            count = int.from_bytes(head[1:3], "big")
        elif b0 == 0xDD and len(head) >= 5:
            count = int.from_bytes(head[1:5], "big")
        else:
            raise msgspec.ValidationError("token ids: expected an array")
        self.raw, self.count = raw, count

    def __len__(self) -> int:
        return self.count


class ScheduleRequestPacked(ScheduleRequest, kw_only=True):
    """A ``ScheduleRequest`` as the conductor reads it: its token ids left packed (``packed``)."""

    prompt_token_ids: msgspec.Raw

    def packed(self) -> ScheduleRequest:
        """The request, its ``prompt_token_ids`` a ``PackedTokens`` (a sequence of their count)."""
        return msgspec.structs.replace(self, prompt_token_ids=PackedTokens(self.prompt_token_ids))


class Prediction(msgspec.Struct, kw_only=True):
    """What the conductor predicted of a request it placed (seconds), so that a gateway can show
    the decision beside what happened: TTFT = queue + the slower of compute and load."""

    ttft: float
    queue: float  # for the prefill instance to be free
    compute: float  # the prompt's compute past the reused prefix
    load: float  # loading the reused prefix from the pool or a peer (under the compute); 0: none
    tbt: float  # on the chosen decode instance, with the request added
    plan: str = "local"  # where the reused prefix comes from: local (own cache) | pool | peer; or pipeline
    peer_id: str = ""
    reused_tokens: int = 0  # prompt tokens the plan reuses instead of computing


class ScheduleReply(msgspec.Struct, kw_only=True):
    """conductor -> gateway. ``status`` is the HTTP status to surface when not admitted."""

    v: int = PROTOCOL_VERSION
    attempt_id: str
    admitted: bool
    prefill_id: str = ""
    decode_id: str = ""
    status: int = 200
    reason: str = ""
    retry_after: float = 0.0
    cause: str = ""  # not admitted by the SLO check: "ttft" | "tbt"; "elsewhere": another conductor places it
    prediction: Prediction | None = None  # admitted: what its placement predicted


class PrefillTask(_Resumable, kw_only=True):
    """conductor -> prefill instance (JetStream work queue).

    ``reuse_blocks`` caps how many leading blocks the instance reuses instead of computing
    (-1: as many as it finds); ``use_pool`` allows loading them from the cachestore pool when its
    own DRAM cache does not have them; ``pool_blocks`` is how many leading blocks the conductor's
    index has in the pool (-1: unknown, the instance asks the pool); ``pool_write_blocks`` how many
    leading blocks the instance may write to the pool afterwards (-1: every one the pool lacks).
    ``peer_id`` names another prefill instance whose own DRAM cache holds the first ``peer_blocks``
    blocks: the instance loads those past its own from that peer instead of the pool.

    A long prompt split over several instances in a pipeline (chunked pipeline parallelism) is one
    task per stage. ``stage_end`` > 0: this task is a stage before the last: it computes the
    prompt's positions up to ``stage_end`` (a multiple of the block size) and serves their KV, layer
    by layer as it computes them, to the next stage; it emits nothing to the client and hands
    nothing to decode. ``stage_from`` (with ``stage_attempt``, the previous stage's task) names the
    instance computing the positions before ``stage_past``: this task loads them from it live,
    layer by layer while both run, instead of from a cache.
    """

    v: int = PROTOCOL_VERSION
    attempt_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    decode_id: str
    block_hashes: list[bytes] = []
    arrival_time: float = 0.0
    reuse_blocks: int = -1
    use_pool: bool = True
    pool_blocks: int = -1
    predicted_seconds: float = 0.0
    pool_write_blocks: int = -1
    peer_id: str = ""
    peer_blocks: int = 0
    stage_end: int = 0
    stage_from: str = ""
    stage_attempt: str = ""
    stage_past: int = 0


class Fork(msgspec.Struct, array_like=True):
    """One choice of a request with n > 1 that goes on in decode: its index and its first token."""

    index: int
    token: int


class DecodeTask(_Resumable, kw_only=True):
    """prefill -> decode instance (JetStream work queue), published after the KV is delivered.

    ``forks`` (a request with n > 1): the choices that go on, each from its own first token; the
    KV, sent once, is copied into a row per fork. Empty: one sequence from ``output_token_ids``."""

    v: int = PROTOCOL_VERSION
    attempt_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens already streamed to the client (the first token)
    sampling: SamplingParams
    kv_len: int  # number of positions whose KV was transferred
    cached_tokens: int = 0
    prefill_id: str = ""
    forks: list[Fork] = []


class TokenLogprobs(msgspec.Struct, array_like=True):
    """An output token's log-probability and the ``k`` most likely tokens at its position, most
    likely first (the request's ``logprobs``), from the model's raw distribution."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class PromptLogprobs(msgspec.Struct, array_like=True):
    """Prompt tokens 1 .. L-1's log-probabilities given the tokens before each, and the ``k`` most
    likely tokens at each position: little-endian float32 / int32 arrays (L-1 values, and
    (L-1) x k row by row), compact for long prompts."""

    k: int
    logprobs: bytes
    top_ids: bytes
    top_logprobs: bytes

    def rows(self) -> list[tuple[float, list[int], list[float]]]:
        """(logprob, top ids, top logprobs) of prompt tokens 1 .. L-1, in order."""
        import sys
        from array import array

        arrays = [array("f", self.logprobs), array("i", self.top_ids), array("f", self.top_logprobs)]
        if sys.byteorder != "little":
            for a in arrays:
                a.byteswap()
        lps, ids, tops = arrays
        k = self.k
        if len(ids) != len(lps) * k or len(tops) != len(lps) * k:
            raise ValueError("prompt logprobs arrays do not match")
        return [(lps[i], ids[i * k : (i + 1) * k].tolist(), tops[i * k : (i + 1) * k].tolist())
                for i in range(len(lps))]


class TokenEvent(msgspec.Struct, kw_only=True):
    """prefill/decode -> gateway, on ``Subjects.output(output_id)``: the client's stream, the same
    across the attempts of a resumed request.

    ``seq`` numbers the events of one choice (``index``; a request has ``n`` of them) from 0
    without gaps, across the prefill and decode instances that produce them, so the gateway can
    order them and detect loss.
    """

    v: int = PROTOCOL_VERSION
    output_id: str
    seq: int
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str = ""
    retry: bool = False  # with "error": the request can be resumed elsewhere from where it stands
    prompt_tokens: int = 0
    cached_tokens: int = 0
    index: int = 0
    # only for a request that asked: one per token of ``token_ids``; the prompt's on choice 0's first event
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: PromptLogprobs | None = None
    # the request's phases, each timed on one host, for the gateway's metrics (None: not this
    # event's, or a sender that predates them). A prefill's first-token events: seconds from the
    # instance taking the prompt up to this event. A decode instance's first event of a sequence:
    # seconds from the sequence's KV and task both in hand to this event (its wait for a row, its step)
    prefill_seconds: float | None = None
    since_kv_seconds: float | None = None


class PrefillReport(msgspec.Struct, kw_only=True):
    """prefill -> conductor after each prompt: what was reused and what it cost (cost-model input)."""

    v: int = PROTOCOL_VERSION
    instance_id: str
    attempt_id: str
    prompt_tokens: int
    local_tokens: int  # reused from the instance's own DRAM cache
    pool_tokens: int  # reused from the cachestore pool, or from a peer prefill instance's cache
    load_bytes: int
    load_seconds: float  # the load (pool or peer), which overlaps the compute (layer by layer)
    compute_seconds: float  # the model's own time on the prompt, waits for loading layers excluded
    queue_seconds: float
    kv_bytes_per_token: int = 0  # of the model served (what a load of one position moves)
    ttft_seconds: float = 0.0  # from the request's arrival at the gateway to its first token (0: unknown)
    num_layers: int = 0  # of the model served (a pipeline's stages run one layer apart)


class PrefillDone(msgspec.Struct, kw_only=True):
    """prefill -> conductor when a task no longer holds the instance: its KV handed to decode and
    its blocks kept, or it ended at the first token or failed. Frees its place in the conductor's
    view of the instance's queue, and times the hand-off that follows the first token."""

    v: int = PROTOCOL_VERSION
    instance_id: str
    attempt_id: str
    kv_tokens: int = 0  # positions of KV handed to decode (0: no hand-off)
    tail_seconds: float = 0.0  # from the first token's report to the instance being free


class DecodeReport(msgspec.Struct, kw_only=True):
    """decode -> conductor when a sequence leaves the batch (finished, aborted or handed back):
    the admitted load it no longer adds, and how long its decode took."""

    v: int = PROTOCOL_VERSION
    instance_id: str
    attempt_id: str
    output_tokens: int  # tokens made by this decode instance
    seconds: float  # from joining the batch to leaving it
    finish_reason: str = ""
    waited_seconds: float = 0.0  # of those, waiting for a row of the running batch


class KVEvent(msgspec.Struct, kw_only=True):
    """Blocks stored in / removed from one instance's cache (JetStream ``YB_KV_EVENTS``).

    ``seq`` counts from 1 within an ``epoch`` (one run of the instance) without gaps; a receiver
    that sees a gap or a new epoch asks the instance for a dump of what it holds.
    """

    v: int = PROTOCOL_VERSION
    instance_id: str
    source: str  # "prefill" | "cachestore"
    epoch: str
    seq: int
    stored: list[BlockKey] = []
    removed: list[BlockKey] = []


class KVDumpRequest(msgspec.Struct, kw_only=True):
    v: int = PROTOCOL_VERSION
    offset: int = 0
    limit: int = 20000


class KVDump(msgspec.Struct, kw_only=True):
    """One page of the keys an instance holds, and the event ``seq`` they are current as of."""

    v: int = PROTOCOL_VERSION
    instance_id: str
    source: str
    epoch: str
    seq: int
    keys: list[BlockKey]
    total: int
    offset: int


class IndexSummary(msgspec.Struct, kw_only=True):
    """What the conductor's prefix index holds: blocks per instance and a digest of the pool's keys
    (blake2b-16 over the sorted keys), so an operator or a test can compare it with the pool."""

    v: int = PROTOCOL_VERSION
    blocks: dict[str, int]
    pool_blocks: int
    pool_digest: bytes
    gaps: int
    resyncs: int


def keys_digest(keys) -> bytes:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for k in sorted(keys):
        h.update(k)
    return h.digest()


class Abort(msgspec.Struct, kw_only=True):
    v: int = PROTOCOL_VERSION
    attempt_id: str
    reason: str = ""


class SequenceProgress(msgspec.Struct, array_like=True):
    """A sequence a decode instance holds, as of its heartbeat."""

    attempt_id: str
    decoded: int  # steps run for it here
    left: int  # steps to its length limit (max_tokens)
    running: bool  # in the running batch (else waiting for a row)


class TierUsage(msgspec.Struct, kw_only=True):
    """One tier of a cachestore instance: what it holds, its bound, and the blocks gets found there
    since the instance started."""

    bytes: int = 0
    capacity_bytes: int = 0
    blocks: int = 0
    hit_blocks: int = 0


class PoolEvents(msgspec.Struct, kw_only=True):
    """What a cachestore instance's blocks went through since it started (counters), and its pins now."""

    promoted: int = 0  # disk hits copied back into DRAM
    demoted: int = 0  # blocks DRAM let go to the disk tier
    evicted: dict[str, int] = {}  # blocks gone from the disk tier, by reason (watermark, capacity, ...)
    corrupt: int = 0  # blocks dropped because their bytes failed verification
    pinned: int = 0  # keys pinned (held or awaited)
    pinned_held: int = 0  # pinned keys the instance holds


class Heartbeat(msgspec.Struct, kw_only=True):
    """Every instance announces itself and its load once per ``interval`` seconds."""

    v: int = PROTOCOL_VERSION
    kind: str  # prefill | decode | cachestore
    instance_id: str
    interval: float
    model: str = ""
    # a model worker's KV block namespace (hex; model, dtype, block size): the gateway hashes
    # prompts in the namespace its prefill instances announce
    kv_namespace: str = ""
    device: str = ""  # a model worker's device and dtype, e.g. "cpu", "bfloat16"
    dtype: str = ""
    queued: int = 0  # tasks waiting
    queued_tokens: int = 0  # prompt tokens waiting (prefill)
    running: int = 0  # sequences in the running batch (decode)
    max_running: int = 0
    urgent_rows: int = 0  # decode: rows beyond ``max_running`` for urgent sequences only
    kv_tokens: int = 0  # KV positions held by the running batch (decode)
    draining: bool = False  # stopping: finishes what it has, takes nothing new
    restarts: int = 0  # times its supervisor has restarted this instance
    # a random id of the sending process: another one under the same instance id is a restart, and
    # whatever the earlier process was asked and had not answered is lost ("": not given)
    incarnation: str = ""
    # the sender's monotonic clock when it sent the beat (a conductor times its own beats' way back
    # to it: how far behind it is on heartbeats); 0: not given
    sent_at: float = 0.0
    # decode: the steps run since the previous beat (cost-model input): count, mean seconds,
    # mean rows and mean KV positions per step
    steps: int = 0
    step_seconds: float = 0.0
    step_batch: float = 0.0
    step_kv_tokens: float = 0.0
    # decode: every sequence it holds, running ones first then those waiting, in the order they
    # take rows; lets the conductor project when rows free up from where each sequence is
    sequences: list[SequenceProgress] = []
    # KV memory in use: a decode instance's running batch, a prefill instance's own block cache;
    # and the most it holds (0: no fixed bound)
    kv_bytes: int = 0
    kv_capacity_bytes: int = 0
    # prefill, since it started: prompt tokens, and those reused by where their KV came from ("own":
    # its own DRAM cache, "peer": another prefill instance's, "pool": the cachestore pool)
    prompt_tokens: int = 0
    reused_tokens: dict[str, int] = {}
    # cachestore: its tiers ("dram", "disk"), and the blocks it is the primary of that have extra
    # copies readers are told of (hot blocks)
    tiers: dict[str, TierUsage] = {}
    hot_blocks: int = 0
    pool_events: PoolEvents | None = None
    # conductor: the prefill and decode instances it places work on (several conductors split them)
    instances: dict[str, int] = {}


# ---------------------------------------------------------------- binary transfers
NO_BLOB_CHECKSUM = -1


class Chunk(msgspec.Struct, kw_only=True, array_like=True):
    """One piece of a binary blob (KV of a request, a cache block) at most ``CHUNK_DATA_BYTES``.

    ``meta`` travels on chunk 0 only: the msgpack of the Struct that describes the blob.
    ``checksum`` is the XXH3-64 of the whole blob, checked by the receiver after reassembly, or
    ``NO_BLOB_CHECKSUM`` for a blob whose content carries its own (KV blocks: their checksum is
    checked end to end by whoever decodes them), so the bytes are not checksummed twice. The
    receiver checks the value of the last chunk: a blob sent while it is still being produced (a
    prompt's KV, layer by layer) knows its checksum only then and carries ``NO_BLOB_CHECKSUM`` before.
    """

    transfer_id: str
    index: int
    count: int
    offset: int
    total_bytes: int
    checksum: int
    data: memoryview
    meta: bytes = b""


class ChunkAck(msgspec.Struct, kw_only=True, array_like=True):
    transfer_id: str
    received: int  # number of chunks received so far
    ok: bool = True
    error: str = ""


class KVMeta(msgspec.Struct, kw_only=True):
    """Describes a request's KV sent from prefill to decode.

    Layout of the blob: ``[num_layers, 2 (K, V), num_kv_heads, length, head_dim]`` in ``dtype``.
    """

    v: int = PROTOCOL_VERSION
    attempt_id: str
    length: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str


class BlocksMeta(msgspec.Struct, kw_only=True):
    """Meta of a blob of encoded KV blocks: those of ``keys`` concatenated in that order, block
    ``i`` being ``sizes[i]`` bytes long. Puts to a cachestore travel as such blobs (the store keeps
    every valid block and refuses the blob, naming the bad keys, if any is not a valid block for
    its key), and so do the blocks a get finds (one or more blobs, in any order).

    ``parents`` (puts; empty: none known, as from a writer that predates it): per block, the key
    of the block before it in its prompt, ``b""`` for a prompt's first block; the store's eviction
    keeps a block whose child it holds (``services.cachestore.eviction``)."""

    v: int = PROTOCOL_VERSION
    keys: list[bytes]
    sizes: list[int]
    parents: list[bytes] = []

    def parent_map(self) -> dict[bytes, bytes]:
        """key -> its parent's key, for the blocks that name one."""
        return {k: p for k, p in zip(self.keys, self.parents) if p}

    def pieces(self, data: bytes | bytearray | memoryview) -> list[tuple[bytes, memoryview]]:
        """(key, that block's bytes as a view into ``data``); ``ValueError`` if they do not match."""
        if len(self.keys) != len(self.sizes) or min(self.sizes, default=0) < 0 or sum(self.sizes) != len(data):
            raise ValueError("blocks meta does not match the blob")
        if self.parents and len(self.parents) != len(self.keys):
            raise ValueError("blocks meta names parents for some blocks only")
        view, out, offset = memoryview(data), [], 0
        for key, size in zip(self.keys, self.sizes):
            out.append((key, view[offset : offset + size]))
            offset += size
        return out


CachePutMeta = CacheGetMeta = BlocksMeta


class CacheGetRequest(msgspec.Struct, kw_only=True):
    v: int = PROTOCOL_VERSION
    keys: list[bytes]
    reply_subject: str  # blocks are streamed here as chunked transfers, one per found key
    # Stream layer by layer instead of block by block (``LayerPiece`` messages): the reader can
    # start computing layer 0 while the later layers are still on the way.
    by_layer: bool = False
    # A pipeline stage's KV as it is computed (a prefill instance's task ``attempt_id``, a stage
    # before the last): ``keys`` are blocks of that task's prompt, each layer is sent once computed
    live: str = ""


class BlockHeader(msgspec.Struct, kw_only=True, array_like=True):
    """A stored block's description without its data (a layered get sends the data in pieces)."""

    shape: list[int]
    dtype: str
    checksum: int  # XXH3-64 of the block's whole data, as stored


class CacheGetReply(msgspec.Struct, kw_only=True):
    v: int = PROTOCOL_VERSION
    found: list[bytes]  # the keys that will be streamed, in order
    headers: list[BlockHeader] = []  # by_layer: one per found key
    transfer_id: str = ""  # by_layer: the id its LayerPieces carry
    # per found key, when the answering instance is the key's primary: the extra copies of the
    # block on the next instances of its ranking that readers may use (0: read it here only)
    replicas: list[int] = []
    # a live get's answer: the pieces carry their own checksums (the blocks' are not known before
    # they are computed); ``reused_tokens`` of the positions sent came from a cache, not a forward
    live: bool = False
    reused_tokens: int = 0


class LayerPiece(msgspec.Struct, kw_only=True, array_like=True):
    """Part of a layered get: layer ``layer`` of the found blocks ``first .. first + count - 1``,
    their ``[2, num_kv_heads, block_size, head_dim]`` slices one after another (each a contiguous
    range of its block's data). A sender's pieces go layer by layer, so a block's slices arrive in
    layer order and its checksum can be checked once its last layer is in. The last piece of each
    window is sent as a request: the sender waits for the reader's ``ChunkAck`` before going on.
    ``checksum``: XXH3-64 of ``data``, in a live get's pieces (None in a stored block's). A piece of
    no blocks (``count`` 0) is its sender's abort: what it still owed will not come."""

    transfer_id: str
    layer: int
    first: int
    count: int
    checksum: int | None = None
    data: memoryview


class CacheExistsRequest(msgspec.Struct, kw_only=True):
    v: int = PROTOCOL_VERSION
    keys: list[bytes]


class CacheExistsReply(msgspec.Struct, kw_only=True):
    v: int = PROTOCOL_VERSION
    present: list[bool]
    tier: list[str] = []  # "dram" | "disk" | "" per key


class CacheStats(msgspec.Struct, kw_only=True):
    v: int = PROTOCOL_VERSION
    instance_id: str
    dram_bytes: int
    dram_blocks: int
    disk_bytes: int
    disk_blocks: int
    evictions_dram: int
    evictions_disk: int


class CachePinRequest(msgspec.Struct, kw_only=True):
    """Keep these blocks in the pool for ``ttl_seconds`` (an operator's pin of a prefix), or end
    their pins (``unpin``). Every cachestore instance takes every key: a block is kept wherever the
    sharding puts it, before and after the pool's membership changes."""

    v: int = PROTOCOL_VERSION
    keys: list[bytes]
    ttl_seconds: float = 0.0
    unpin: bool = False


class CachePinReply(msgspec.Struct, kw_only=True):
    v: int = PROTOCOL_VERSION
    instance_id: str
    held: int = 0  # of the keys, how many this instance holds now
    pinned: int = 0  # keys pinned on this instance in all, after the request
    error: str = ""  # the pin was refused (none of its keys pinned): its bound on pinned blocks


def _enc_hook(obj):
    if isinstance(obj, PackedTokens):
        return obj.raw
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


_EMPTY_BIN = b"\xc4\x00"  # MessagePack bin 8 of length 0


def encode_with_data(msg: msgspec.Struct, parts) -> bytes:
    """``encode(msg)`` with its last field (an empty ``bytes``/``memoryview``) set to the
    concatenation of ``parts``, joined once straight into the message (no intermediate copy of
    the data). Only for array-like Structs whose last field is that binary field."""
    head = _encoder.encode(msg)
    if not head.endswith(_EMPTY_BIN):
        raise ValueError(f"{type(msg).__name__} does not end with an empty binary field")
    size = sum(len(p) for p in parts)
    return b"".join([head[:-2], b"\xc6", size.to_bytes(4, "big"), *parts])  # bin 32 + the data


_decoders: dict[type, msgspec.msgpack.Decoder] = {}

# Size bounds per message type: anything larger is dropped (and counted) before it is parsed.
# Control messages are small; tasks carry token lists; chunks carry up to a bus message of data.
SMALL_MESSAGE_BYTES = 64 * 1024
MESSAGE_BOUNDS: dict[str, int] = {
    "ScheduleRequest": MAX_PAYLOAD,
    "ScheduleRequestPacked": MAX_PAYLOAD,
    "PrefillTask": MAX_PAYLOAD,
    "DecodeTask": MAX_PAYLOAD,
    "Chunk": MAX_PAYLOAD,
    "LayerPiece": MAX_PAYLOAD,
    "KVEvent": MAX_PAYLOAD,
    "KVDump": MAX_PAYLOAD,
    "CacheGetRequest": MAX_PAYLOAD,
    "CacheExistsRequest": MAX_PAYLOAD,
    "CacheExistsReply": MAX_PAYLOAD,
    "CacheGetReply": MAX_PAYLOAD,
    "TokenEvent": MAX_PAYLOAD,  # a first event may carry the prompt's logprobs
    "Heartbeat": MAX_PAYLOAD,  # a decode instance's heartbeat lists every sequence it holds
}

try:
    from prometheus_client import Counter as _Counter

    DROPPED = _Counter("yuebing:bus_messages_dropped", "Bus messages refused before use", ["type", "reason"])
except ImportError:  # pragma: no cover
    DROPPED = None


class Oversized(msgspec.ValidationError):
    pass


def decode(data: bytes | memoryview, typ: type[msgspec.Struct]):
    """Decode ``data`` as ``typ``; raises ``msgspec.ValidationError``/``DecodeError`` on garbage,
    on a message over its size bound, or on a protocol version this build does not speak.
    Every refusal is counted in ``yuebing:bus_messages_dropped``."""
    bound = MESSAGE_BOUNDS.get(typ.__name__, SMALL_MESSAGE_BYTES)
    if len(data) > bound:
        DROPPED.labels(type=typ.__name__, reason="oversized").inc()
        raise Oversized(f"{typ.__name__} of {len(data)} bytes exceeds its bound of {bound}")
    try:
        return _decode(data, typ)
    except (msgspec.DecodeError, msgspec.ValidationError):
        DROPPED.labels(type=typ.__name__, reason="invalid").inc()
        raise


def _decode(data, typ):
    dec = _decoders.get(typ)
    if dec is None:
        dec = _decoders[typ] = msgspec.msgpack.Decoder(typ)
    msg = dec.decode(data)
    v = getattr(msg, "v", PROTOCOL_VERSION)
    if v != PROTOCOL_VERSION:
        raise msgspec.ValidationError(f"unsupported protocol version {v} for {typ.__name__}")
    return msg
