"""Calibration: measure the real model on this machine and fit a ``CostProfile``.

Prefill is timed at a grid of (new tokens, reused tokens), with the reused prefix's KV taken from
a real earlier prefill (a prefix of a causal prompt's KV is that prefix's KV). Decode steps are
timed with a real ``DecodeBatch`` at a grid of (batch, context), every row holding ``context``
positions (a few more after the steps already taken: the points record the KV held), a few steps
per point.

Made for a machine shared with other work, whose noise only ever adds time: the grids run in
several passes, each point once per pass (a busy stretch spoils one pass, not every run of a
point); a point's figure is the fastest of its runs (the median is kept for the record); and the
fit drops, one at a time, points measured far slower than the fit of the rest predicts
(``OUTLIER``), marking them ``used=False``. Both grids are fitted by non-negative least squares
on relative error (``libs.engine.costs.fit``). The default grids take about two minutes for
SmolLM2-135M on 2 shared cores (129 s with other work running); ``quick`` uses a few small points
(seconds on a tiny model).
"""

from __future__ import annotations

import random
import socket
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from libs.engine.costs import (
    DEFAULT_LOAD_BYTES_PER_SECOND,
    CostProfile,
    DecodePoint,
    PrefillPoint,
    decode_features,
    fit,
    prefill_features,
)
from libs.engine.loading import model_identity
from libs.engine.runner import ModelRunner

PREFILL_NEW = (16, 64, 256, 1024)
PREFILL_REUSED = (0, 512, 2048)
DECODE_BATCH = (1, 4, 16, 32)
DECODE_CONTEXT = (64, 256, 1024)
PASSES = 3  # each point is measured once per pass; its figure is the fastest over the passes
DECODE_STEPS = 3  # decode steps measured per point and pass

QUICK_PREFILL_NEW = (8, 32)
QUICK_PREFILL_REUSED = (0, 32)
QUICK_DECODE_BATCH = (1, 4)
QUICK_DECODE_CONTEXT = (16, 64)
QUICK_PASSES = 2
QUICK_DECODE_STEPS = 2

OUTLIER = 1.5  # a point measured this many times slower than the fit of the others is dropped
TOKEN_LO = 1000  # calibration prompts use token ids in [TOKEN_LO, vocab): clear of special tokens


def calibrate(model_path: Path, threads: int | None = None, progress: bool = True, quick: bool = False,
              chunk: int = 512, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              load_format: str = "auto", dtype_seconds: dict[str, float] | None = None) -> CostProfile:
    """Measure prefill and decode of the model at ``model_path`` and fit its cost profile.

    ``threads``: torch threads (default: torch's choice, recorded in the profile). ``chunk``: the
    prefill chunk the prefill service uses (``Settings.prefill_chunk``). ``device``, ``dtype``: the
    resolved ones the workers run. ``dtype_seconds``: the dtype measurement that chose ``dtype``,
    recorded in the profile.
    """
    model_path = Path(model_path)
    runner = ModelRunner(model_path, threads, device=device, dtype=dtype, load_format=load_format)
    used_threads = torch.get_num_threads()
    shape = runner.shape
    news = QUICK_PREFILL_NEW if quick else PREFILL_NEW
    reuseds = QUICK_PREFILL_REUSED if quick else PREFILL_REUSED
    batches = QUICK_DECODE_BATCH if quick else DECODE_BATCH
    contexts = QUICK_DECODE_CONTEXT if quick else DECODE_CONTEXT
    steps = QUICK_DECODE_STEPS if quick else DECODE_STEPS
    passes = QUICK_PASSES if quick else PASSES
    limit = shape.max_context
    prefill_grid = [(n, r) for r in reuseds for n in news if n + r <= limit]
    taken = 1 + passes * len(batches) * steps  # decode steps a row of the batch may take
    contexts = [c for c in contexts if c + taken <= limit] or [max(1, min(16, limit - taken))]
    decode_grid = [(b, c) for c in contexts for b in batches]

    rng = random.Random(0)
    lo = min(TOKEN_LO, shape.vocab_size // 2)
    longest = max([n + r for n, r in prefill_grid] + [max(contexts), 64])
    ids = [rng.randrange(lo, shape.vocab_size) for _ in range(longest)]
    tokens = [rng.randrange(lo, shape.vocab_size) for _ in range(max(batches))]
    pre_times: dict[tuple[int, int], list[float]] = {k: [] for k in prefill_grid}
    dec_times: dict[tuple[int, int], list[float]] = {k: [] for k in decode_grid}
    dec_kv: dict[tuple[int, int], list[int]] = {k: [] for k in decode_grid}
    bar = tqdm(total=1 + passes * (len(prefill_grid) + len(decode_grid)) + len(contexts), desc="calibrate", unit="step",
               disable=not progress, leave=False)
    try:
        # warm-up, then the KV of the longest prefix any point reuses (or any decode row holds)
        bar.set_postfix_str("warm-up")
        _, warm_kv = runner.prefill(ids[:32], chunk=chunk)
        runner.prefill(ids[32:64], warm_kv, chunk=chunk)
        base_len = max([r for _, r in prefill_grid] + [max(contexts)])
        _, base_kv = runner.prefill(ids[:base_len], chunk=chunk)
        bar.update(1)

        # Each pass measures every point once: a stretch of time when other work slows the machine
        # spoils one pass of many points, not every run of one point.
        for npass in range(passes):
            for new, reused in prefill_grid:
                bar.set_postfix_str(f"pass {npass + 1}/{passes} prefill new={new} reused={reused}")
                past = base_kv[:, :, :, :reused].contiguous() if reused else None
                t0 = time.perf_counter()
                runner.prefill(ids[reused : reused + new], past, chunk=chunk)
                pre_times[(new, reused)].append(time.perf_counter() - t0)
                bar.update(1)

        # Decode: per context, one batch of the largest size is built (joining rows is what costs:
        # buffers of gigabytes) and trimmed to each smaller size by letting its last rows leave,
        # as a running decode batch shrinks; between passes the rows join again, into buffers
        # that already have room.
        for context in contexts:
            bar.set_postfix_str(f"decode context={context}: building the batch")
            row = base_kv[:, :, :, :context].contiguous()
            batch = runner.new_batch()
            for npass in range(passes):
                while len(batch) < max(batches):
                    batch.add(f"row{len(batch)}", row)
                if npass == 0:
                    batch.step(tokens[: len(batch)])  # warm-up: first use of the buffers
                    bar.update(1)
                for batch_size in sorted(batches, reverse=True):
                    bar.set_postfix_str(f"pass {npass + 1}/{passes} decode batch={batch_size} context={context}")
                    while len(batch) > batch_size:
                        batch.remove({batch.ids[-1]})  # the last row: nothing moves
                    for _ in range(steps):
                        dec_kv[(batch_size, context)].append(batch.kv_tokens())
                        t0 = time.perf_counter()
                        batch.step(tokens[:batch_size])
                        dec_times[(batch_size, context)].append(time.perf_counter() - t0)
                    bar.update(1)
            del batch, row
    finally:
        bar.close()

    pre = [
        PrefillPoint(new=n, reused=r, seconds=min(t), runs=len(t), median=statistics.median(t),
                     times=[round(x, 6) for x in t])
        for (n, r), t in pre_times.items()
    ]
    dec = [
        DecodePoint(batch=b, context=c, kv_tokens=statistics.fmean(dec_kv[(b, c)]), seconds=min(t), runs=len(t),
                    median=statistics.median(t), times=[round(x, 6) for x in t])
        for (b, c), t in dec_times.items()
    ]
    prefill_coef = _fit_points(pre, [prefill_features(p.new, p.reused) for p in pre])
    decode_coef = _fit_points(dec, [decode_features(p.batch, p.kv_tokens) for p in dec])
    points: list[PrefillPoint | DecodePoint] = [*pre, *dec]
    return CostProfile(
        model=model_identity(model_path, load_format),
        threads=used_threads,
        device=str(runner.device),
        dtype=shape.dtype_name,
        dtype_seconds=dict(dtype_seconds or {}),
        prefill=prefill_coef,
        decode=decode_coef,
        load_tokens_per_second=round(DEFAULT_LOAD_BYTES_PER_SECOND / shape.kv_bytes_per_token(), 1),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        host=socket.gethostname(),
        points=points,
    )


def _fit_points(points: list, features: list[tuple[float, ...]]) -> tuple[float, ...]:
    """Fit on relative error; then, while a used point was measured more than ``OUTLIER`` times
    slower than the fit predicts and enough points remain, drop the worst one and refit."""
    while True:
        used = [i for i, p in enumerate(points) if p.used]
        coef = fit([features[i] for i in used], [points[i].seconds for i in used], relative=True)
        if len(used) <= 2 * len(coef):
            return coef
        slowness = {i: points[i].seconds / max(1e-12, sum(c * f for c, f in zip(coef, features[i]))) for i in used}
        worst = max(slowness, key=slowness.get)
        if slowness[worst] <= OUTLIER:
            return coef
        points[worst].used = False


def fitted_rows(profile: CostProfile) -> list[dict]:
    """Each measured point (fastest and median run) next to the profile's prediction, for a table."""
    rows = []
    for p in profile.points:
        if isinstance(p, PrefillPoint):
            pred = profile.prefill_seconds(p.new + p.reused, p.reused)
            row = {"kind": "prefill", "new/batch": p.new, "reused/context": p.reused}
        else:
            pred = float(sum(c * f for c, f in zip(profile.decode, decode_features(p.batch, p.kv_tokens))))
            row = {"kind": "decode", "new/batch": p.batch, "reused/context": p.context}
        row.update(measured_ms=p.seconds * 1e3, median_ms=p.median * 1e3, fitted_ms=pred * 1e3,
                   rel_err=(pred - p.seconds) / p.seconds if p.seconds > 0 else None,
                   used="yes" if p.used else "no")
        rows.append(row)
    return rows
