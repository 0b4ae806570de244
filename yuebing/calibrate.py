"""``yuebing calibrate``: measure the model on this machine and write its cost profile.

Prints a table of every measured point next to the fitted time (relative error; points the fit
dropped as measured while the machine was busy are marked) and a final JSON line with the
coefficients and the mean absolute relative error of the points used. The profile goes to ``--out`` or, by default, to
``DATA_DIR/calibration/<model identity>-t<threads>.json``, where the simulated engine finds it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from yuebing.args import add_engine


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("calibrate", help="time the real model on this machine and fit the cost profile "
                       "of the simulated engine")
    p.add_argument("--model", default=None,
                   help="smollm2-135m-instruct (default), a .gguf file, or a local Hugging Face model directory")
    p.add_argument("--data-dir", default=None, help="where the profile goes (default ~/.cache/yuebing)")
    p.add_argument("--models-dir", default=None, help="converted models (default DATA_DIR/models)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_engine(p)
    p.add_argument("--out", default=None,
                   help="profile path (default DATA_DIR/calibration/<model identity>-t<threads>.json)")
    p.add_argument("--quick", action="store_true", help="a few small points only (seconds; for tests)")
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    import os

    # Measure as the workers run (`yuebing up` starts them so): idle OpenMP threads sleep instead of
    # spinning. Read when torch loads its OpenMP runtime, so before the imports below.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from yuebing.tables import format_table
    from libs.engine.calibrate import calibrate, fitted_rows
    from libs.config import from_env
    from libs.engine.costs import profile_path
    from libs.log import configure
    from libs.engine.modelpath import resolve_model
    from libs.engine.loading import model_identity
    from libs.engine.dtypechoice import choice_path, load as load_choice, placement_for
    import torch

    configure("calibrate")
    settings = from_env(model=args.model, data_dir=args.data_dir, models_dir=args.models_dir, threads=args.threads,
                        device=args.device, dtype=args.dtype, load_format=args.load_format)
    path = resolve_model(settings.model, settings.resolved_models_dir())
    t0 = time.perf_counter()
    threads = settings.threads or torch.get_num_threads()
    placement = placement_for(path, settings.device, settings.dtype, settings.resolved_data_dir(), threads,
                              settings.load_format, announce=lambda text: print(text + "...", flush=True))
    print(f"engine: {placement.describe()}", flush=True)
    choice = None
    if settings.dtype == "auto" and placement.device.type == "cpu":
        choice = load_choice(choice_path(settings.resolved_data_dir(), model_identity(path, settings.load_format),
                                         threads))
    profile = calibrate(path, threads=threads, progress=True, quick=args.quick, device=placement.device,
                        dtype=placement.dtype, load_format=settings.load_format,
                        dtype_seconds={t.dtype: t.request_seconds for t in choice.timings} if choice else None)
    elapsed = time.perf_counter() - t0
    out = Path(args.out) if args.out else profile_path(settings.resolved_data_dir(), profile.model, profile.threads,
                                                       profile.dtype, profile.device)
    profile.save(out)

    rows = fitted_rows(profile)
    print(f"model {path} (identity {profile.model}), {profile.device} {profile.dtype}, {profile.threads} threads, "
          f"{elapsed:.1f} s")
    print(format_table(rows, ["kind", "new/batch", "reused/context", "measured_ms", "median_ms", "fitted_ms",
                              "rel_err", "used"]))
    print(f"profile written to {out}")

    def mean_abs(kind: str) -> float | None:
        errs = [abs(r["rel_err"]) for r in rows if r["kind"] == kind and r["rel_err"] is not None and r["used"] == "yes"]
        return round(statistics.fmean(errs), 4) if errs else None

    print(json.dumps({
        "model": profile.model,
        "threads": profile.threads,
        "device": profile.device,
        "dtype": profile.dtype,
        "dtype_seconds": profile.dtype_seconds,
        "prefill": list(profile.prefill),
        "decode": list(profile.decode),
        "load_tokens_per_second": profile.load_tokens_per_second,
        "prefill_mean_abs_rel_err": mean_abs("prefill"),
        "decode_mean_abs_rel_err": mean_abs("decode"),
        "points_dropped": sum(1 for r in rows if r["used"] == "no"),
        "calibration_seconds": round(elapsed, 1),
        "path": str(out),
    }))
    sys.stdout.flush()
    return 0
