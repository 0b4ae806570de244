"""How far a real engine's times scatter around the cost profile's predictions, and seeded draws of
that scatter for the simulated engine. Plain logic; no I/O.

A calibration measures every point several times (``libs.engine.calibrate``); the fit goes through
the fastest runs, so a real call is usually a little slower than predicted and sometimes much
slower. ``residuals`` summarises that as the mean and standard deviation of ``log(measured /
predicted)`` over the runs of the points the fit used (a profile written before the runs were kept
has each point's fastest and median run, and those two stand in). ``CostNoise`` draws a factor
``exp(N(mean, std))``, clipped at three deviations, for each call of the simulated engine, so the
conductor's online cost models face the error a real engine would give them.

Draws are a pure function of a seed and the call's identity: a prefill's factor of its prompt's
tokens and cached length (the same request costs the same on whichever instance it lands, so
placement policies compared on one trace face the same draws), a decode step's of its instance and
step number. Runs with the same seed and the same trace draw the same factors.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
from array import array

import msgspec

from libs.engine.costs import CostProfile, DecodePoint, PrefillPoint

CLIP_DEVIATIONS = 3.0


class Residual(msgspec.Struct, frozen=True):
    """Log residuals of one cost model: ``mean`` and ``std`` of ``log(measured / predicted)`` over
    ``samples`` measured runs."""

    mean: float = 0.0
    std: float = 0.0
    samples: int = 0


def _runs(point: PrefillPoint | DecodePoint) -> list[float]:
    if point.times:
        return list(point.times)
    return [t for t in (point.seconds, point.median) if t > 0]


def residuals(profile: CostProfile, kind: str) -> Residual:
    """The spread of ``kind`` ("prefill" or "decode") runs around ``profile``'s predictions."""
    logs: list[float] = []
    for p in profile.points:
        if not p.used:
            continue
        if kind == "prefill" and isinstance(p, PrefillPoint):
            predicted = profile.prefill_seconds(p.new + p.reused, p.reused)
        elif kind == "decode" and isinstance(p, DecodePoint):
            predicted = profile.step_seconds(p.batch, round(p.kv_tokens))
        else:
            continue
        if predicted > 0:
            logs += [math.log(t / predicted) for t in _runs(p)]
    if len(logs) < 2:
        return Residual(samples=len(logs))
    return Residual(mean=statistics.fmean(logs), std=statistics.stdev(logs), samples=len(logs))


def _digest(*parts: bytes) -> int:
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(len(part).to_bytes(4, "little"))
        h.update(part)
    return int.from_bytes(h.digest(), "little")


class CostNoise:
    """Seeded multiplicative factors for the simulated engine's calls (see the module docstring)."""

    def __init__(self, profile: CostProfile, seed: int = 0, enabled: bool = True):
        self.prefill = residuals(profile, "prefill") if enabled else Residual()
        self.decode = residuals(profile, "decode") if enabled else Residual()
        self.seed = int(seed)

    @staticmethod
    def _factor(r: Residual, key: int) -> float:
        if r.std <= 0 and r.mean == 0:
            return 1.0
        z = random.Random(key).gauss(0.0, 1.0)
        z = max(-CLIP_DEVIATIONS, min(CLIP_DEVIATIONS, z))
        return math.exp(r.mean + r.std * z)

    def prefill_factor(self, token_ids: list[int], reused: int) -> float:
        """The factor of a prefill of ``token_ids`` (the new tokens) after ``reused`` cached ones."""
        key = _digest(b"prefill", self.seed.to_bytes(8, "little", signed=True), int(reused).to_bytes(8, "little"),
                      array("q", token_ids).tobytes())
        return self._factor(self.prefill, key)

    def step_factor(self, instance: str, step: int) -> float:
        """The factor of decode step number ``step`` of ``instance``."""
        key = _digest(b"decode", self.seed.to_bytes(8, "little", signed=True), instance.encode(),
                      int(step).to_bytes(8, "little"))
        return self._factor(self.decode, key)
