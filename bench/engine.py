"""``yuebing bench engine``: the engine against the physical limits of the machine it runs on.

One run, on the chosen device and dtype (``--device``, ``--dtype``, ``--load-format``, ``--model`` or
``--dummy``), measures:

1. **Memory bandwidth**: the best of several copies ``dst.copy_(src)`` of a large float32 tensor
   (``--copy-mib``, default 1 GiB) on the device, counting the bytes read and the bytes written
   (2 x the tensor); on CUDA each timing ends with a synchronize.
2. **Matmul FLOP/s** in the dtype on the device: the best of several ``n x n @ n x n`` products
   (2 n^3 FLOPs each) laid out as the model's linear layers compute them, at ``n``
   (``--matmul-size``, default 2048 on a CPU, 8192 on a GPU) and ``n / 2``, the faster size kept.
3. **Decode step time** of ``DecodeBatch.step`` at batch 1 and 16 (``--batches``), every row holding
   ``--context`` positions (the best of ``--steps`` steps after warm-up), next to the bandwidth limit
   of a step: the bytes a step must read, divided by the bandwidth of 1. A step reads every weight
   once (the unique parameters: tied embeddings counted once; the lm_head matrix *is* read in full
   every step, since logits are computed for each row's new position; of an untied input embedding
   only B rows are read, which is not counted) and the K and V of every row over the columns the
   step attends (``max(lengths) + 1`` per row, all layers). The fraction of the limit attained is
   ``limit / measured``; the target is a step at batch 1 of at least 0.6 of it.
4. **Prefill tokens/s** of a ``--prompt``-token prompt (best of ``--prefill-runs``), and the model
   FLOP/s it achieves against the matmul FLOP/s of 2, the model FLOPs being
   ``PREFILL_FLOPS_FORMULA`` (``prefill_flops``).
5. **Decode join cost**: the time of ``DecodeBatch.add`` of one sequence of ``--context`` positions
   into a batch already running 1 and 32 rows (``--join-rows``) of ``--join-context`` positions each,
   when the buffers need not grow (the batch was sized for one more row beforehand: ``grown`` during
   the joins must stay 0); the best and median of ``--joins`` joins, the joined row removed between
   tries. A join that copied the other rows would cost more with 32 rows than with 1.

It prints a table and, last, one JSON line of every figure (also written to ``--out``).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import det_tokens, emit, entry, resolve_models_dir, say

TARGET_FRACTION = 0.6
TARGET = f"decode step at batch 1 >= {TARGET_FRACTION} of the bandwidth limit"
PREFILL_FLOPS_FORMULA = ("2*N*T + 4*L*H*Dh*(T*P + T*(T+1)/2) + 2*V*d*ceil(T/chunk); N: parameters outside the "
                         "embedding and lm_head, T: new tokens, P: past tokens, L: layers, H*Dh: attention width "
                         "(query heads x head dim), V*d: the lm_head, applied to one position per chunk")
DECODE_WARMUP = 3  # steps before the timed ones (the first ones grow the buffers)
CPU_MATMUL = 2048
GPU_MATMUL = 8192
MIN_TIMING_SECONDS = 0.05  # a bandwidth or matmul timing repeats its call until it lasts this long


# ================================================================ the machine
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    """The GPU's name on CUDA, else the CPU model from /proc/cpuinfo."""
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device.index or 0)
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def time_call(fn, device, runs: int, min_seconds: float = MIN_TIMING_SECONDS) -> tuple[float, float]:
    """(best, median) seconds of one call of ``fn`` over ``runs`` timings, after a warm-up call; a
    timing repeats the call until it lasts about ``min_seconds`` (short GPU calls), and ends with a
    synchronize on CUDA."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = time.perf_counter() - t0
    inner = max(1, min(1000, math.ceil(min_seconds / max(one, 1e-9))))
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / inner)
    return min(times), statistics.median(times)


def measure_bandwidth(device, nbytes: int, runs: int = 5) -> dict:
    """The device's memory bandwidth from a copy of ``nbytes`` (read + write counted)."""
    import torch

    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best, med = time_call(lambda: dst.copy_(src), device, runs)
    moved = 2 * n * 4
    return {"copy_bytes": n * 4, "copy_best_ms": round(best * 1e3, 3),
            "bandwidth_gb_s": round(moved / best / 1e9, 2), "bandwidth_median_gb_s": round(moved / med / 1e9, 2)}


def measure_matmul(device, dtype, n: int, runs: int = 5) -> dict:
    """FLOP/s of square matmuls in ``dtype`` on ``device``, laid out as ``nn.Linear`` computes them
    (``x @ W.T``), at ``n`` and ``n / 2``: the best of the two (a library's fastest size varies
    with the machine), each size's also given."""
    import torch
    import torch.nn.functional as F

    out: dict = {"matmul_n": n}
    best_rate = best_median = 0.0
    for size in (n, max(64, n // 2)):
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn((size, size), generator=g).to(device=device, dtype=dtype)
        b = torch.randn((size, size), generator=g).to(device=device, dtype=dtype)
        best, med = time_call(lambda: F.linear(a, b), device, runs)
        flops = 2.0 * size ** 3
        out[f"matmul_{size}_gflop_s"] = round(flops / best / 1e9, 1)
        if flops / best > best_rate:
            best_rate, best_median = flops / best, flops / med
            out["matmul_best_n"] = size
            out["matmul_best_ms"] = round(best * 1e3, 3)
    out["matmul_gflop_s"] = round(best_rate / 1e9, 1)
    out["matmul_median_gflop_s"] = round(best_median / 1e9, 1)
    return out


# ================================================================ the model's bytes and FLOPs
@dataclass(frozen=True)
class Weights:
    """What a model's parameters weigh, and what of them a decode step reads."""

    params: int  # unique parameters (a tied embedding once)
    param_bytes: int
    embedding_params: int
    lm_head_params: int
    lm_head_bytes: int
    tied: bool  # the lm_head is the input embedding
    step_bytes: int  # read by every decode step: all but an untied input embedding

    @property
    def non_embedding_params(self) -> int:
        """Parameters outside the input embedding and the lm_head (the per-token matmuls, norms)."""
        return self.params - self.embedding_params - (0 if self.tied else self.lm_head_params)


def weights_of(model) -> Weights:
    """``model``'s unique parameters (``named_parameters`` lists a tied weight once)."""
    emb = model.get_input_embeddings().weight
    head_mod = model.get_output_embeddings()
    head = head_mod.weight if head_mod is not None else emb
    tied = head is emb or head.data_ptr() == emb.data_ptr()
    params = param_bytes = 0
    for _, p in model.named_parameters():
        params += p.numel()
        param_bytes += p.numel() * p.element_size()
    emb_bytes = emb.numel() * emb.element_size()
    return Weights(params=params, param_bytes=param_bytes, embedding_params=emb.numel(), lm_head_params=head.numel(),
                   lm_head_bytes=head.numel() * head.element_size(), tied=tied,
                   step_bytes=param_bytes if tied else param_bytes - emb_bytes)


def decode_step_bytes(weight_bytes: int, kv_bytes_per_token: int, rows: int, width: int) -> int:
    """Bytes one decode step must read: the weights once and ``width`` KV positions of every row."""
    return weight_bytes + rows * width * kv_bytes_per_token


def prefill_flops(non_embedding_params: int, layers: int, heads: int, head_dim: int, vocab: int, hidden: int,
                  tokens: int, past: int = 0, chunk: int = 512) -> float:
    """The model FLOPs of a prefill of ``tokens`` new tokens after ``past`` (``PREFILL_FLOPS_FORMULA``):
    the matmuls of every token through the layers, causal attention (QK^T and AV, each query over
    the positions up to its own), and the lm_head on the last position of each chunk."""
    linear = 2.0 * non_embedding_params * tokens
    attention = 4.0 * layers * heads * head_dim * (tokens * past + tokens * (tokens + 1) / 2)
    head = 2.0 * vocab * hidden * math.ceil(tokens / max(1, chunk))
    return linear + attention + head


def fraction(limit: float | None, measured: float | None) -> float | None:
    """The fraction of a limit attained: limit time / measured time."""
    return round(limit / measured, 3) if limit is not None and measured else None


def target(figures: dict) -> dict:
    """The target, evaluated: the fraction at batch 1 against ``TARGET_FRACTION``."""
    value = figures.get("decode_b1_fraction")
    met = None if value is None else bool(value >= TARGET_FRACTION)
    return {"target": TARGET, "target_figure": value, "target_met": met,
            "target_verdict": "not measured" if met is None else ("met" if met else "not met")}


def parse_list(spec, name: str) -> list[int]:
    values = [int(x) for x in str(spec).replace(" ", "").split(",") if x]
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{name} must be a comma-separated list of positive integers, not {spec!r}")
    return values


# ================================================================ the engine
def measure_decode(runner, kv, rows: int, steps: int, token: int) -> dict:
    """``steps`` decode steps (after warm-up) of a batch of ``rows`` copies of ``kv``: each step's
    seconds and the columns it attended."""
    batch = runner.new_batch()
    for r in range(rows):
        batch.add(f"row{r}", kv)
    tokens = [token] * rows
    for _ in range(DECODE_WARMUP):
        batch.step(tokens)
    timed = []
    for _ in range(steps):
        width = max(batch.lengths) + 1
        t0 = time.perf_counter()
        batch.step(tokens)  # returns logits on the CPU: the step is finished
        timed.append((time.perf_counter() - t0, width))
    return {"steps": timed, "grown": batch.grown}


def measure_join(runner, long_kv, join_kv, rows: int, joins: int) -> dict:
    """Joins of ``join_kv`` into a batch running ``rows`` rows of ``long_kv``, sized beforehand so
    that no join grows the buffers."""
    batch = runner.new_batch()
    for r in range(rows):
        batch.add(f"run{r}", long_kv)
    batch.add("size", join_kv)  # one row more than the running ones: the joins below fit
    batch.remove({"size"})
    sync(runner.device)
    grown_before = batch.grown
    times = []
    for i in range(joins + 1):  # the first is a warm-up
        sid = f"join{i}"
        t0 = time.perf_counter()
        batch.add(sid, join_kv)
        sync(runner.device)
        dt = time.perf_counter() - t0
        batch.remove({sid})
        if i:
            times.append(dt)
    return {"best": min(times), "median": statistics.median(times), "grown": batch.grown,
            "grown_during_joins": batch.grown - grown_before, "capacity": list(batch.capacity)}


def _model_dir(args) -> tuple[Path, str, str]:
    """(model directory, its name in the figures, load format)."""
    from libs.engine.modelpath import DEFAULT_MODEL, resolve_model

    models_dir = resolve_models_dir(args)
    dummy = getattr(args, "dummy", None)
    load_format = getattr(args, "load_format", None)
    if dummy:
        from bench.models import dummy_model

        if getattr(args, "model", None):
            raise ValueError("--dummy builds its own model directory: leave out --model")
        if load_format not in (None, "dummy"):
            raise ValueError(f"--dummy runs random weights: --load-format {load_format} does not apply")
        path = dummy_model(dummy, models_dir)
        return path, path.name, "dummy"
    spec = getattr(args, "model", None) or DEFAULT_MODEL
    path = resolve_model(spec, models_dir)
    return path, (DEFAULT_MODEL if spec == DEFAULT_MODEL else path.name), load_format or "auto"


def loadavg() -> str | None:
    """The 1, 5 and 15 minute load averages (how busy the host was: others' work skews timings)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def measure_machine(device, dtype, copy_bytes: int, matmul_n: int, runs: int) -> tuple[dict, dict]:
    say(f"copy bandwidth ({copy_bytes >> 20} MiB) and matmul {matmul_n}^2 in {str(dtype).removeprefix('torch.')}...")
    return measure_bandwidth(device, copy_bytes, runs), measure_matmul(device, dtype, matmul_n, runs)


def run(args) -> dict:
    """Every measurement of the module docstring; returns the figures (also the table's rows, under
    ``_rows``). The machine is measured before and after the engine, the better of each kept: a
    peak figure, the least disturbed by whatever else the host was doing."""
    import torch

    from libs.engine.device import dtype_name
    from libs.engine.dtypechoice import placement_for
    from libs.engine.modelpath import default_data_dir
    from libs.engine.runner import ModelRunner

    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(threads)
    path, name, load_format = _model_dir(args)
    placement = placement_for(path, getattr(args, "device", None) or "auto", getattr(args, "dtype", None) or "auto",
                              default_data_dir(), threads, load_format, measure_now=False)
    device, dtype = placement.device, placement.dtype
    batches = parse_list(getattr(args, "batches", "1,16"), "--batches")
    join_rows = parse_list(getattr(args, "join_rows", "1,32"), "--join-rows")
    context, prompt = int(args.context), int(args.prompt)
    join_context, steps, joins = int(args.join_context), int(args.steps), int(args.joins)
    say(f"bench engine: {name} on {device} ({device_name(device)}), {placement.describe()}")
    figures: dict = {"device": str(device), "device_name": device_name(device), "dtype": dtype_name(dtype),
                     "model": name, "model_dir": str(path), "load_format": load_format, "loadavg_start": loadavg()}

    # 1, 2: the machine (again at the end)
    copy_bytes = int(args.copy_mib) << 20
    matmul_n = int(args.matmul_size) or (GPU_MATMUL if device.type == "cuda" else CPU_MATMUL)
    machine = [measure_machine(device, dtype, copy_bytes, matmul_n, int(args.runs))]

    # the model
    say(f"loading {path} ({load_format})...")
    t0 = time.perf_counter()
    runner = ModelRunner(path, threads, device=device, dtype=dtype, load_format=load_format)
    figures["load_s"] = round(time.perf_counter() - t0, 2)
    figures["threads"] = runner.threads
    shape, cfg = runner.shape, runner.model.config
    need = max(context + DECODE_WARMUP + steps + 1, prompt, join_context + 1, context + 1)
    if need > shape.max_context:
        raise ValueError(f"the sizes asked for need {need} positions; the model holds {shape.max_context}")
    w = weights_of(runner.model)
    kv_tok = shape.kv_bytes_per_token()
    figures.update({"params": w.params, "non_embedding_params": w.non_embedding_params, "param_bytes": w.param_bytes,
                    "tied_embeddings": w.tied, "lm_head_bytes": w.lm_head_bytes, "lm_head_read_per_step": True,
                    "step_weight_bytes": w.step_bytes, "kv_bytes_per_token": kv_tok})
    ids = det_tokens(7, max(prompt, join_context, context), shape.vocab_size)
    kv_cache: dict[int, object] = {}

    def kv_of(n: int):
        if n not in kv_cache:
            kv_cache[n] = runner.prefill(ids[:n])[1]
        return kv_cache[n]

    # 4: prefill (first, so its warm-up serves the decode too)
    say(f"prefill of {prompt} tokens x{args.prefill_runs}...")
    runner.prefill(ids[:min(prompt, 64)])  # warm-up
    prefill_times = []
    for _ in range(max(1, int(args.prefill_runs))):
        t0 = time.perf_counter()
        _, kv_cache[prompt] = runner.prefill(ids[:prompt])
        prefill_times.append(time.perf_counter() - t0)
    # 3: decode steps
    decoded = {}
    for b in batches:
        say(f"decode steps at batch {b}, context {context}...")
        decoded[b] = measure_decode(runner, kv_of(context), b, steps, ids[0])
    # 5: joins
    join_kv = kv_of(context)
    joined = {}
    for r in join_rows:
        say(f"joins into a batch of {r} rows of {join_context} positions...")
        joined[r] = measure_join(runner, kv_of(join_context), join_kv, r, joins)
    machine.append(measure_machine(device, dtype, copy_bytes, matmul_n, int(args.runs)))
    figures["loadavg_end"] = loadavg()

    # the figures, against the better of the two measures of the machine
    bw = max((m[0] for m in machine), key=lambda f: f["bandwidth_gb_s"])
    mm = max((m[1] for m in machine), key=lambda f: f["matmul_gflop_s"])
    figures.update(bw)
    figures.update(mm)
    figures["bandwidth_start_end_gb_s"] = [m[0]["bandwidth_gb_s"] for m in machine]
    figures["matmul_start_end_gflop_s"] = [m[1]["matmul_gflop_s"] for m in machine]
    bandwidth = bw["bandwidth_gb_s"] * 1e9
    flops_s = mm["matmul_gflop_s"] * 1e9
    rows: list[dict] = [
        {"measure": f"copy {bw['copy_bytes'] >> 20} MiB (read+write)", "measured": bw["bandwidth_gb_s"], "unit": "GB/s",
         "note": f"median {bw['bandwidth_median_gb_s']}; start, end: {figures['bandwidth_start_end_gb_s']}"},
        {"measure": f"matmul {mm['matmul_best_n']}^2 {dtype_name(dtype)}", "measured": mm["matmul_gflop_s"],
         "unit": "GFLOP/s", "note": f"median {mm['matmul_median_gflop_s']}; " + ", ".join(
             f"{k.split('_')[1]}^2: {v}" for k, v in mm.items() if k.endswith("_gflop_s") and k[7].isdigit())
         + f"; start, end: {figures['matmul_start_end_gflop_s']}"},
    ]

    chunk = 512  # ModelRunner.prefill's default, which the services use
    best = min(prefill_times)
    pf = prefill_flops(w.non_embedding_params, shape.num_layers, cfg.num_attention_heads, shape.head_dim,
                       shape.vocab_size, cfg.hidden_size, prompt, 0, chunk)
    figures.update({"prefill_tokens": prompt, "prefill_chunk": chunk, "prefill_best_ms": round(best * 1e3, 2),
                    "prefill_median_ms": round(statistics.median(prefill_times) * 1e3, 2),
                    "prefill_tok_s": round(prompt / best, 1), "prefill_flops": pf,
                    "prefill_gflop_s": round(pf / best / 1e9, 1), "prefill_flops_formula": PREFILL_FLOPS_FORMULA,
                    "prefill_fraction_of_matmul": fraction(pf / flops_s, best)})
    rows.append({"measure": f"prefill {prompt} tokens", "measured": round(prompt / best, 1), "unit": "tok/s",
                 "limit": round(flops_s / pf * prompt, 1), "attained": figures["prefill_fraction_of_matmul"],
                 "note": f"{figures['prefill_gflop_s']} model GFLOP/s; median {figures['prefill_median_ms']} ms"})

    for b, got in decoded.items():
        seconds = [t for t, _ in got["steps"]]
        best_s, width = min(got["steps"])
        need_bytes = decode_step_bytes(w.step_bytes, kv_tok, b, width)
        limit = need_bytes / bandwidth
        key = f"decode_b{b}"
        figures.update({f"{key}_context": context, f"{key}_best_ms": round(best_s * 1e3, 3),
                        f"{key}_median_ms": round(statistics.median(seconds) * 1e3, 3),
                        f"{key}_tok_s": round(b / best_s, 1), f"{key}_bytes": need_bytes,
                        f"{key}_limit_ms": round(limit * 1e3, 3), f"{key}_fraction": fraction(limit, best_s)})
        rows.append({"measure": f"decode step b={b} ctx {context}", "measured": round(best_s * 1e3, 3), "unit": "ms",
                     "limit": round(limit * 1e3, 3), "attained": figures[f"{key}_fraction"],
                     "note": f"{need_bytes / 1e6:.1f} MB read; median {figures[f'{key}_median_ms']} ms"})

    join_bytes = join_kv.numel() * join_kv.element_size()
    figures.update({"join_context": context, "join_running_context": join_context, "join_bytes": join_bytes})
    for r, got in joined.items():
        key = f"join_r{r}"
        figures.update({f"{key}_best_ms": round(got["best"] * 1e3, 3), f"{key}_median_ms": round(got["median"] * 1e3, 3),
                        f"{key}_grown": got["grown"], f"{key}_grown_during_joins": got["grown_during_joins"],
                        f"{key}_capacity": got["capacity"]})
        on_cpu = device.type == "cpu"  # on a GPU a join's bytes cross from host memory: not the copy's bound
        rows.append({"measure": f"join ctx {context} into {r} rows", "measured": figures[f"{key}_best_ms"], "unit": "ms",
                     "limit": round(2 * join_bytes / bandwidth * 1e3, 3) if on_cpu else None,
                     "attained": fraction(2 * join_bytes / bandwidth, got["best"]) if on_cpu else None,
                     "note": f"median {figures[f'{key}_median_ms']} ms; grown {got['grown_during_joins']} "
                             f"during joins ({got['grown']} in all)"})
    if len(join_rows) > 1:
        figures["join_cost_ratio_most_to_fewest_rows"] = fraction(figures[f"join_r{max(join_rows)}_best_ms"],
                                                                  figures[f"join_r{min(join_rows)}_best_ms"])
    figures.update(target(figures))
    figures["_rows"] = rows
    return figures


COLS = ["measure", "measured", "unit", "limit", "attained", "note"]


def _engine(args) -> int:
    from libs.engine.device import EngineConfigError

    try:
        figures = run(args)
    except (EngineConfigError, ValueError, FileNotFoundError) as e:
        say(f"bench engine: {e}")
        return 2
    rows = figures.pop("_rows")
    title = (f"bench engine: {figures['model']} on {figures['device_name']} ({figures['device']}), "
             f"{figures['dtype']}, {figures['threads']} threads. limit: bytes / copy bandwidth (decode), "
             f"2 x bytes / bandwidth (CPU join), model FLOPs / matmul FLOP/s (prefill); attained = limit / "
             f"measured time.\ntarget: {TARGET}: {figures['target_verdict']} ({figures['target_figure']})")
    emit(title, rows, COLS, figures, getattr(args, "out", None))
    return 0


def main(args) -> int:
    """``yuebing bench engine``."""
    return entry(_engine, args)


def add_arguments(p) -> None:
    """The flags of ``bench engine`` beyond the engine's own (``yuebing.args.add_engine``)."""
    p.add_argument("--model", default=None,
                   help="smollm2-135m-instruct (default), a .gguf file, or a local Hugging Face model directory")
    p.add_argument("--dummy", default=None, choices=("1b", "tiny"),
                   help="run on a config-only Llama of this size with random weights (created once under "
                   "DATA_DIR/models/dummy-llama-SIZE, the default model's tokenizer)")
    p.add_argument("--models-dir", default=None, help="converted and dummy models (default DATA_DIR/models)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the bandwidth copy (default 1024 MiB)")
    p.add_argument("--matmul-size", type=int, default=0,
                   help=f"n of the n x n matmuls (default {CPU_MATMUL} on a CPU, {GPU_MATMUL} on a GPU)")
    p.add_argument("--runs", type=int, default=5, help="timings of the copy and the matmul (best taken)")
    p.add_argument("--context", type=int, default=512, help="positions per decode row, and of a joining sequence")
    p.add_argument("--batches", default="1,16", help="decode batch sizes (default 1,16)")
    p.add_argument("--steps", type=int, default=10, help="timed decode steps per batch size (best taken)")
    p.add_argument("--prompt", type=int, default=1024, help="prefill prompt tokens (default 1024)")
    p.add_argument("--prefill-runs", type=int, default=3)
    p.add_argument("--join-rows", default="1,32", help="running rows a sequence joins (default 1,32)")
    p.add_argument("--join-context", type=int, default=1024, help="positions of each running row in the join test")
    p.add_argument("--joins", type=int, default=8, help="joins timed per batch (best and median)")
    p.add_argument("--out", default=None, help="also write the JSON figures here")
