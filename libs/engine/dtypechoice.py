"""The dtype ``auto`` on a CPU: bfloat16 or float32, whichever serves a request faster on this machine.

Which one wins depends on the CPU (bfloat16 matmuls are fast where the cores have AMX or AVX-512
BF16 units, and slower than float32 where torch emulates them), so it is measured, once per model
and thread count, and kept in ``DATA_DIR/calibration/dtype-<model>-t<threads>.json``. The measure
is the compute of one typical request: a ``PROMPT``-token prefill plus its share of ``OUTPUT``
decode steps in a batch of ``BATCH`` rows of ``CONTEXT`` positions
(``prefill + OUTPUT * step / BATCH``), each the fastest of a few runs.
"""

from __future__ import annotations

import random
import re
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import msgspec
import torch

from libs.engine.device import DTYPES, dtype_name

CANDIDATES = ("bfloat16", "float32")
PROMPT = 512
BATCH = 16
CONTEXT = 512
OUTPUT = 64
RUNS = 3  # each figure is the fastest of this many runs


class DtypeTiming(msgspec.Struct, kw_only=True):
    dtype: str
    prefill_seconds: float  # a PROMPT-token prefill
    step_seconds: float  # one decode step of BATCH rows of CONTEXT positions
    request_seconds: float  # prefill + OUTPUT * step / BATCH


class DtypeChoice(msgspec.Struct, kw_only=True):
    model: str  # model identity
    threads: int
    chosen: str
    timings: list[DtypeTiming]
    created: str = ""
    host: str = ""

    def why(self) -> str:
        figures = ", ".join(f"{t.dtype} {t.request_seconds:.3f} s" for t in self.timings)
        return f"dtype auto: {self.chosen} measured faster on this CPU (compute of a request: {figures})"


def choice_path(data_dir: Path, model_identity: str, threads: int) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", model_identity).strip("._-")[:80] or "model"
    return Path(data_dir) / "calibration" / f"dtype-{name}-t{int(threads)}.json"


def time_dtype(path: Path, dtype: torch.dtype, threads: int | None = None, load_format: str = "auto") -> DtypeTiming:
    """Measure one request's compute (see the module) with the model in ``dtype`` on the CPU."""
    from libs.engine.runner import ModelRunner

    runner = ModelRunner(path, threads, dtype=dtype, load_format=load_format)
    shape = runner.shape
    rng = random.Random(0)
    lo = min(1000, shape.vocab_size // 2)
    prompt = min(PROMPT, shape.max_context - OUTPUT)
    context = min(CONTEXT, shape.max_context - RUNS - 2)
    ids = [rng.randrange(lo, shape.vocab_size) for _ in range(max(prompt, context))]
    runner.prefill(ids[:32])  # warm-up
    prefill = []
    kv = None
    for _ in range(RUNS):
        t0 = time.perf_counter()
        _, kv = runner.prefill(ids[:prompt])
        prefill.append(time.perf_counter() - t0)
    if context != prompt:
        _, kv = runner.prefill(ids[:context])
    batch = runner.new_batch()
    for r in range(BATCH):
        batch.add(f"row{r}", kv)
    tokens = ids[:BATCH]
    batch.step(tokens)  # warm-up
    steps = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        batch.step(tokens)
        steps.append(time.perf_counter() - t0)
    p, s = min(prefill), min(steps)
    return DtypeTiming(dtype=dtype_name(dtype), prefill_seconds=p, step_seconds=s,
                       request_seconds=p + OUTPUT * s / BATCH)


def measure(path: Path, model_identity: str, threads: int | None = None, load_format: str = "auto") -> DtypeChoice:
    timings = [time_dtype(path, DTYPES[name], threads, load_format) for name in CANDIDATES]
    best = min(timings, key=lambda t: t.request_seconds)
    return DtypeChoice(model=model_identity, threads=threads or torch.get_num_threads(), chosen=best.dtype,
                       timings=timings, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       host=socket.gethostname())


def load(path: Path) -> DtypeChoice | None:
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=DtypeChoice)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def save(choice: DtypeChoice, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(choice)))
    tmp.replace(path)
    return path


def cpu_auto(path: Path, data_dir: Path, model_identity: str, threads: int, load_format: str = "auto",
             measure_now: bool = True, announce=None):
    """The ``cpu_auto`` of ``libs.engine.device.resolve``: the measured choice for this model and
    thread count, measuring it now (and keeping it) when none is kept and ``measure_now``; else
    float32. ``announce(text)`` is told before a measurement starts."""
    def choose() -> tuple[torch.dtype, str]:
        where = choice_path(data_dir, model_identity, threads)
        choice = load(where)
        if choice is None and measure_now:
            if announce is not None:
                announce(f"measuring bfloat16 against float32 on this CPU (once; kept in {where})")
            choice = measure(path, model_identity, threads, load_format)
            save(choice, where)
        if choice is None:
            return torch.float32, "dtype auto: float32, nothing measured on this CPU yet (yuebing calibrate measures it)"
        return DTYPES[choice.chosen], choice.why()

    return choose


def placement_for(path: Path, device: str, dtype: str, data_dir: Path, threads: int | None = None,
                  load_format: str = "auto", measure_now: bool = True, announce=None):
    """``libs.engine.device.resolve`` for the model at ``path``, answering a CPU's dtype ``auto``
    from the measured choice (measured now if none is kept and ``measure_now``)."""
    from libs.engine.device import resolve
    from libs.engine.loading import model_identity

    threads = threads or torch.get_num_threads()
    identity = model_identity(path, load_format)
    return resolve(device, dtype, cpu_auto(path, data_dir, identity, threads, load_format, measure_now, announce))
