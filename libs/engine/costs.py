"""Calibrated compute costs of one model on one machine. Plain logic; no I/O but load/save.

Two linear cost models, each over three features:

- prefill of ``new`` tokens after ``reused`` cached ones:
  ``T = c0 + c1 * new + c2 * new * (reused + new / 2)`` (the last term is attention: each new token
  attends to every earlier one);
- one decode step of a batch of ``batch`` rows holding ``kv_tokens`` KV positions in total:
  ``T = d0 + d1 * batch + d2 * kv_tokens``.

The coefficients are fitted by non-negative least squares (``fit``) on times measured with the real
model (``libs.engine.calibrate``), kept as a ``CostProfile`` JSON file per (model, threads) under
``<data_dir>/calibration`` (``profile_path``). The simulated engine (``libs.engine.simengine``)
sleeps these times instead of computing; the conductor can start its online cost models from them.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np

# Rate at which a prefill instance loads prefix KV from the pool over the bus, in bytes/s: the
# pool's measured get_blocks throughput on the 2-core dev machine (docs/benchmarks.md, "Pool
# transfer vs raw NATS": ~287 MB/s; a prefix hit loaded 91 MB in ~0.44 s), rounded down.
DEFAULT_LOAD_BYTES_PER_SECOND = 250e6


def prefill_features(new: float, reused: float) -> tuple[float, float, float]:
    """Features of a prefill computing ``new`` tokens after ``reused`` cached ones."""
    return (1.0, float(new), float(new) * (float(reused) + float(new) / 2.0))


def decode_features(batch: float, kv_tokens: float) -> tuple[float, float, float]:
    """Features of one decode step of ``batch`` rows holding ``kv_tokens`` KV positions in total."""
    return (1.0, float(batch), float(kv_tokens))


class PrefillPoint(msgspec.Struct, tag="prefill", tag_field="kind"):
    """One measured prefill: ``new`` tokens computed after ``reused`` cached ones took ``seconds``
    (the fastest of ``runs``; ``median`` of them for the record). ``used``: the fit used it (a
    point measured far slower than the fit of the others was taken while the machine was busy)."""

    new: int
    reused: int
    seconds: float
    runs: int = 1
    median: float = 0.0
    used: bool = True
    times: list[float] = []  # every run, in seconds (the spread: libs.engine.costnoise)


class DecodePoint(msgspec.Struct, tag="decode", tag_field="kind"):
    """One measured decode step: ``batch`` rows of ``context`` positions each (``kv_tokens`` in
    total, averaged over the measured steps) took ``seconds`` (the fastest of ``runs`` steps;
    ``median`` of them for the record; ``used`` as for ``PrefillPoint``)."""

    batch: int
    context: int
    kv_tokens: float
    seconds: float
    runs: int = 1
    median: float = 0.0
    used: bool = True
    times: list[float] = []  # every run, in seconds


class CostProfile(msgspec.Struct, kw_only=True):
    """Calibrated costs of one model (``model``: its identity digest, ``model_identity``) on one
    machine with ``threads`` torch threads. Times are in seconds."""

    model: str
    threads: int
    prefill: tuple[float, float, float]  # coefficients of prefill_features
    decode: tuple[float, float, float]  # coefficients of decode_features
    load_tokens_per_second: float = 50_000.0  # prefix KV loaded from the pool over the bus
    device: str = "cpu"  # what the model was measured on, and in
    dtype: str = "float32"
    # a CPU's dtype auto: the compute of one typical request in each dtype measured, in seconds
    # (libs.engine.dtypechoice); empty when the dtype was configured
    dtype_seconds: dict[str, float] = {}
    created: str = ""  # ISO 8601, UTC
    host: str = ""
    points: list[PrefillPoint | DecodePoint] = []  # the measured samples (``used``: kept by the fit)

    def prefill_seconds(self, prompt_len: int, reused_len: int) -> float:
        """Time to prefill a prompt of ``prompt_len`` tokens whose first ``reused_len`` have KV.

        At least the last token is computed (its logits give the first output token), so a fully
        cached prompt costs one new token after ``prompt_len - 1`` reused ones.
        """
        reused = max(0, min(int(reused_len), int(prompt_len) - 1))
        new = max(1, int(prompt_len) - reused)
        return max(0.0, float(np.dot(prefill_features(new, reused), self.prefill)))

    def step_seconds(self, batch: int, kv_tokens: int) -> float:
        """Time of one decode step of ``batch`` rows holding ``kv_tokens`` KV positions in total."""
        if batch <= 0:
            return 0.0
        return max(0.0, float(np.dot(decode_features(batch, max(0, kv_tokens)), self.decode)))

    def load_seconds(self, tokens: int) -> float:
        """Time to load ``tokens`` positions of prefix KV from the pool."""
        return tokens / self.load_tokens_per_second if tokens > 0 and self.load_tokens_per_second > 0 else 0.0

    def save(self, path: Path | str) -> Path:
        """Write as JSON (atomically: a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(msgspec.json.format(msgspec.json.encode(self), indent=2) + b"\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> "CostProfile":
        return msgspec.json.decode(Path(path).read_bytes(), type=cls)


# Conservative figures for SmolLM2-135M (fp32) on a 2-core CPU with 2 torch threads: `yuebing
# calibrate` on the dev machine, rounded up (it predicts 6.6 s for a cold 2,048-token prompt and
# 0.43 s for 64 tokens after 1,984 cached, against 6.65 s and 0.41 s measured by `yuebing bench
# prefix`; ~60 ms per decode step at batch 1, ~250 ms at batch 32 of 1,024 positions). Pool loads
# at ~250 MB/s of its 46,080 bytes of KV per token.
DEFAULT = CostProfile(
    model="default",
    threads=2,
    prefill=(0.125, 1.6e-3, 1.6e-6),
    decode=(0.06, 5.2e-3, 1.2e-6),
    load_tokens_per_second=5_400.0,
)


class Refits:
    """When an online fit over a window of recent samples is redone: after every sample while
    the window holds fewer than ``share`` of them, then after every ``len(window) // share`` new
    ones. A fit of ``n`` samples moves little for the next ``n / share`` (they are that share of
    it), and refitting on each sample cost a conductor a millisecond per report and per decode
    heartbeat: at 128 + 128 instances, a third of its core."""

    def __init__(self, share: int = 16):
        self.share = share
        self._new = 0

    def due(self, samples: int) -> bool:
        """One sample more in a window now holding ``samples``: whether to fit now."""
        self._new += 1
        if self._new >= max(1, samples // self.share):
            self._new = 0
            return True
        return False


def fit(features_rows: Sequence[Sequence[float]], seconds: Sequence[float], relative: bool = False) -> tuple[float, ...]:
    """Non-negative least squares: coefficients ``c >= 0`` minimising ``|features @ c - seconds|``.

    With ``relative=True`` each row is weighted by ``1 / seconds``, so the fit minimises relative
    errors (samples spanning milliseconds to seconds count alike). Exact for a few features: the
    optimum is the unconstrained least-squares solution on some subset of the columns, so every
    subset is solved and the best one whose coefficients are all non-negative is kept.
    """
    a = np.asarray(features_rows, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != y.shape[0] or a.shape[0] == 0:
        raise ValueError(f"fit needs rows of features and one time per row, got {a.shape} and {y.shape}")
    n = a.shape[1]
    if n > 12:
        raise ValueError("fit is exact for a few features only")
    if relative:
        w = 1.0 / np.maximum(np.abs(y), 1e-12)
        a, y = a * w[:, None], y * w
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    a = a / scale  # columns of comparable size: the features span orders of magnitude
    best, best_res = np.zeros(n), float(np.sum(y * y))
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            idx = list(cols)
            sol, *_ = np.linalg.lstsq(a[:, idx], y, rcond=None)
            if np.any(sol < 0):
                continue
            c = np.zeros(n)
            c[idx] = sol
            r = y - a @ c
            res = float(r @ r)
            if res < best_res * (1 - 1e-12):
                best, best_res = c, res
    return tuple(float(v) for v in best / scale)


def profile_path(data_dir: Path, model_identity: str, threads: int, dtype: str = "float32",
                 device: str = "cpu") -> Path:
    """Where the calibration of a model for a number of torch threads, a dtype and a device lives."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", model_identity).strip("._-")[:80] or "model"
    where = re.sub(r"[^A-Za-z0-9]+", "", str(device)) or "cpu"
    return Path(data_dir) / "calibration" / f"{name}-{where}-{dtype}-t{int(threads)}.json"
