"""The prefill cost model, fitted online from the workers' own reports. Plain logic, no I/O."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from libs.engine.costs import DEFAULT_LOAD_BYTES_PER_SECOND, CostProfile, Refits, fit, prefill_features


@dataclass(frozen=True)
class PrefillCalibration:
    """T_prefill(new, reused) = fixed + per_token * new + per_pair * new * (reused + new / 2).

    The last term is attention: each new token attends to every earlier one. The starting point
    comes from the calibrated cost profile (`yuebing calibrate`); reports refine it.
    """

    fixed: float = 0.02
    per_token: float = 2e-3
    per_pair: float = 2e-7
    load_tokens_per_second: float = 50_000.0  # until the model's KV bytes per token are known
    load_bytes_per_second: float = DEFAULT_LOAD_BYTES_PER_SECOND


class PrefillCostModel:
    MIN_SAMPLES = 8
    REPRICE_SHIFT = 0.1

    def __init__(self, calibration: PrefillCalibration | None = None, window: int = 512):
        self.cal = calibration or PrefillCalibration()
        self.coef = np.array([self.cal.fixed, self.cal.per_token, self.cal.per_pair])
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._load_rate = self.cal.load_tokens_per_second
        # a load = fixed + per_byte * bytes (the fixed part: request round trips), fitted on loads seen
        self.load_coef = (0.0, 1.0 / self.cal.load_bytes_per_second)
        self._loads: deque[tuple[float, float]] = deque(maxlen=window)  # (bytes, seconds)
        self._refits, self._load_refits = Refits(), Refits()
        self.kv_bytes_per_token = 0  # of the served model, from the workers' reports (0: not known yet)
        self.layers = 0  # of the served model, from the workers' reports (0: not known yet)
        self.fits = 0
        # counts the fits that moved prices: the first, and each that changed the predicted total of
        # the window's samples by more than REPRICE_SHIFT since the last one counted (work priced
        # before such a fit is priced again)
        self.revision = 0
        self._priced_coef = self.coef.copy()

    @classmethod
    def from_profile(cls, profile: CostProfile, window: int = 512) -> "PrefillCostModel":
        fixed, per_token, per_pair = profile.prefill
        return cls(PrefillCalibration(fixed, per_token, per_pair, profile.load_tokens_per_second), window)

    def prefill_seconds(self, prompt_len: int, reused_len: int) -> float:
        new = max(1, prompt_len - reused_len)
        return float(np.dot(prefill_features(new, reused_len), self.coef))

    def load_seconds(self, tokens: int) -> float:
        """Time to stream ``tokens`` positions of KV from the pool, priced in their bytes once the
        model's KV size is known: a fixed part plus a per-byte part, fitted on the loads seen (a
        rate in tokens would carry one model's KV size over to another: a profile of a large model
        made every load of a small one look slow, and a load never chosen is never measured; a
        rate without a fixed part makes small loads' round trips look like a slow bus)."""
        if tokens <= 0:
            return 0.0
        if self.kv_bytes_per_token:
            fixed, per_byte = self.load_coef
            return fixed + per_byte * tokens * self.kv_bytes_per_token
        return tokens / self._load_rate

    def observe_kv_size(self, bytes_per_token: int) -> None:
        if bytes_per_token > 0:
            self.kv_bytes_per_token = int(bytes_per_token)

    def observe_prefill(self, new_tokens: int, reused_tokens: int, seconds: float) -> None:
        self._samples.append((float(max(1, new_tokens)), float(reused_tokens), float(seconds)))
        if len(self._samples) >= self.MIN_SAMPLES and self._refits.due(len(self._samples)):
            self._fit()

    def observe_load(self, tokens: int, seconds: float, nbytes: int = 0) -> None:
        if tokens > 0 and seconds > 0:
            rate = tokens / seconds
            self._load_rate = 0.8 * self._load_rate + 0.2 * rate
            if nbytes > 0:
                self.observe_kv_size(nbytes // tokens)
                self._loads.append((float(nbytes), float(seconds)))
                if self._load_refits.due(len(self._loads)):
                    self._fit_load()

    def _fit_load(self) -> None:
        nominal = 1.0 / self.cal.load_bytes_per_second
        sizes = [b for b, _ in self._loads]
        if len(self._loads) >= self.MIN_SAMPLES and max(sizes) >= 4 * min(sizes):
            fixed, per_byte = fit([(1.0, b) for b, _ in self._loads], [t for _, t in self._loads])
            if per_byte > 0:  # a fitted intercept below zero would price small loads at nothing
                self.load_coef = (max(0.0, float(fixed)), float(per_byte))
                return
        # Too few loads, or sizes too alike to show the slope: the bus's nominal rate per byte, and
        # what the loads took beyond it as the fixed part (small loads are mostly round trips).
        over = sorted(t - b * nominal for b, t in self._loads)
        self.load_coef = (max(0.0, over[len(over) // 2]), nominal)

    def _fit(self) -> None:
        rows = [prefill_features(n, r) for n, r, _ in self._samples]
        y = [t for _, _, t in self._samples]
        x = np.array(rows)
        if np.linalg.matrix_rank(x) < x.shape[1]:
            # not enough variety yet (e.g. every prompt the same length): fit the slope only
            per_token = float(np.sum(y) / max(1e-9, float(np.sum(x[:, 1]))))
            self.coef = np.array([0.0, max(per_token, 1e-6), self.coef[2]])
        else:
            coef = np.array(fit(rows, y), dtype=float)
            self.coef = np.maximum(coef, [0.0, 1e-6, 0.0])
        self.fits += 1
        before = float(np.sum(x @ self._priced_coef))
        if self.fits == 1 or abs(float(np.sum(x @ self.coef)) / max(before, 1e-12) - 1.0) > self.REPRICE_SHIFT:
            self.revision += 1
            self._priced_coef = self.coef.copy()
