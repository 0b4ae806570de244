"""``yuebing bench serve``: the local cluster against plain ``transformers`` generate, same machine, same run.

What it does (DESIGN.md section 10: every speed claim is a ratio against a baseline measured in one run):

1. Resolve the model once into the shared model cache, start a :class:`LocalCluster` (one prefill, one
   decode) on a fresh temporary data directory, and send one warm-up request.
2. For each concurrency level C, send R requests (``--requests-per-level``, default 2*C) with at most C in
   flight: streaming ``/v1/completions`` with token-id prompts (the chat template applied here, so the
   baseline sees exactly the same ids), greedy, ``ignore_eos`` so each request makes exactly
   ``--max-tokens`` tokens. Per request: TTFT (send -> first token) and inter-token latencies
   (gaps between tokens; token arrivals counted by ``bench.sse``: here one per chunk with text);
   tokens come from the ``usage`` chunk. Per level: TTFT and ITL
   p50/p90 and output tokens/s = completion tokens / wall time of the level.
3. Then (the cluster idle) run ``model.generate`` on the same model directory and the same prompts: batch 1
   (a few prompts one after another) and batch 16 (left padded), greedy, exactly ``--max-tokens`` tokens.
4. With ``--rounds N``, N-1 more rounds of the top level then batch 16, each on fresh prompts; the
   headline ratio is then the median of the rounds' ratios (the machine's speed drifts by several
   per cent between minutes: one pair of runs cannot show a ratio near 1.0 either way).
5. Stop the cluster. Print a table, then one line of JSON with the named figures (also written to ``--out``).

Prompts are unique per request (an index at the start of the user message) so no level is served from
blocks an earlier level left in the cache: this measures serving, not prefix reuse.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (entry, make_data_dir, model_name, ms, percentile, ratio, release_data_dir,
                          resolve_models_dir, stream_body)
from yuebing.tables import format_table

HF_BATCH = 16
HF_B1_PROMPTS = 4
PROMPT_MIN_TOKENS = 30
PROMPT_MAX_TOKENS = 300
PROMPT_SEED = 1234
WARMUP_TOKENS = 4

# Fixed source texts; prompts are built from them deterministically (no randomness between runs).
TEXTS = [
    "The Rhine rises in the Swiss Alps and flows north through Germany and the Netherlands to the North Sea.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the chloroplasts of plants.",
    "A hash table stores keys in buckets chosen by a hash function, so lookups take constant time on average.",
    "In 1969 the Apollo 11 mission landed two astronauts on the Moon while a third stayed in lunar orbit.",
    "Bread rises because yeast ferments sugars in the dough and releases bubbles of carbon dioxide.",
    "The mitochondrion is often called the powerhouse of the cell because it produces most of its ATP.",
    "Interest compounds when the interest earned in one period is added to the principal for the next.",
    "Volcanoes form where molten rock from the mantle reaches the surface through cracks in the crust.",
    "A binary search halves the remaining range at every step, so it needs about log2(n) comparisons.",
    "The violin has four strings tuned in fifths and is usually played with a bow made of horsehair.",
    "Tides are caused mainly by the gravitational pull of the Moon and, to a lesser degree, the Sun.",
    "Rust guarantees memory safety without a garbage collector by checking ownership and borrowing at compile time.",
    "Honeybees communicate the direction and distance of flowers to their hive mates with a waggle dance.",
    "The French Revolution began in 1789 and ended the absolute monarchy of the Bourbon kings.",
    "Glaciers carve U-shaped valleys as they slowly grind their way downhill under their own weight.",
    "A transformer language model predicts the next token from all the previous ones using self-attention.",
    "Coffee plants grow best in the tropics at high altitude, where days are warm and nights are cool.",
    "The speed of light in a vacuum is about 299,792 kilometres per second and is the same for every observer.",
    "Chess openings such as the Sicilian Defence have been studied for centuries by players and computers.",
    "Wind turbines convert the kinetic energy of moving air into electricity with a generator in the nacelle.",
]
QUESTIONS = [
    "Summarise the following notes in a few sentences.",
    "Write a short story that uses the facts below.",
    "Explain the following to a ten-year-old.",
    "Which of these statements is the most surprising, and why?",
    "Turn these notes into a list of quiz questions.",
]


# ---------------------------------------------------------------- prompts
def build_prompts(tokenizer, n: int, seed: int = PROMPT_SEED) -> list[list[int]]:
    """``n`` chat prompts as token ids, lengths spread over ~30..~300 tokens, identical on every run."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        target = rng.randint(PROMPT_MIN_TOKENS, PROMPT_MAX_TOKENS)
        start = rng.randrange(len(TEXTS))
        head = f"[{i}] {QUESTIONS[i % len(QUESTIONS)]}"
        ids = _chat_ids(tokenizer, head)
        k = 0
        body: list[str] = []
        while len(ids) < target and k < 200:
            body.append(TEXTS[(start + k) % len(TEXTS)])
            k += 1
            ids = _chat_ids(tokenizer, head + "\n\n" + " ".join(body))
        prompts.append(list(ids))
    return prompts


def _chat_ids(tokenizer, content: str) -> list[int]:
    messages = [{"role": "user", "content": content}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)
    return tokenizer.encode(content, add_special_tokens=True)


# ---------------------------------------------------------------- figures
def _round(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


@dataclass
class RequestResult:
    ok: bool
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    wall: float
    results: list[RequestResult]

    @property
    def errors(self) -> int:
        return sum(not r.ok for r in self.results)

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results if r.ok)

    def figures(self) -> dict:
        ok = [r for r in self.results if r.ok]
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        itls = [g for r in ok for g in r.itls]
        return {
            "tok_s": _round(self.tokens / self.wall if self.wall > 0 else None),
            "ttft_p50_ms": ms(percentile(ttfts, 50)),
            "ttft_p90_ms": ms(percentile(ttfts, 90)),
            "itl_p50_ms": ms(percentile(itls, 50)),
            "itl_p90_ms": ms(percentile(itls, 90)),
            "errors": self.errors,
        }


# ---------------------------------------------------------------- the cluster side
async def _one_request(session, url: str, body: dict) -> RequestResult:
    """One streaming request (``bench.sse``): TTFT = send -> first token, ITLs = gaps between tokens,
    completion tokens from the usage chunk."""
    from bench.sse import stream_completion

    s = await stream_completion(session, url, body)
    res = RequestResult(ok=False, error=s.error)
    if s.token_times:
        res.ttft = s.token_times[0] - s.sent
        res.itls = [b - a for a, b in zip(s.token_times, s.token_times[1:])]
    if not s.ok:
        return res
    if s.completion_tokens is None:
        res.error = "no usage chunk in the stream"
        return res
    res.completion_tokens = s.completion_tokens
    res.ok = True
    return res


async def run_cluster_levels(base: str, plan: list[tuple[int, list[list[int]]]], max_tokens: int,
                             progress: bool = True, warm_prompt: list[int] | None = None) -> list[LevelResult]:
    """Run each (concurrency, prompts) level of ``plan`` in turn; first a warm-up request when given."""
    import aiohttp
    from tqdm import tqdm

    timeout = aiohttp.ClientTimeout(total=None, sock_read=900)
    connector = aiohttp.TCPConnector(limit=0)
    url = base + "/v1/completions"
    results: list[LevelResult] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        name = await model_name(session, base)
        if warm_prompt is not None:
            warm = await _one_request(session, url, stream_body(name, warm_prompt, min(WARMUP_TOKENS, max_tokens)))
            if not warm.ok:
                raise RuntimeError(f"the warm-up request failed: {warm.error}")
        for c, mine in plan:
            sem = asyncio.Semaphore(c)
            bar = tqdm(total=len(mine), desc=f"cluster c={c}", unit="req", file=sys.stderr, disable=not progress,
                       leave=True, dynamic_ncols=True)

            async def go(p: list[int]) -> RequestResult:
                async with sem:
                    r = await _one_request(session, url, stream_body(name, p, max_tokens))
                bar.update(1)
                return r

            started = time.perf_counter()
            try:
                out = await asyncio.gather(*(go(p) for p in mine))
            finally:
                bar.close()
            wall = time.perf_counter() - started
            results.append(LevelResult(concurrency=c, requests=len(mine), wall=wall, results=list(out)))
    return results


# ---------------------------------------------------------------- the transformers baseline
class _StepTimes:
    """A generate() streamer that records when each generation step's tokens come out."""

    def __init__(self, bar=None):
        self.times: list[float] = []
        self._prompt_seen = False
        self.bar = bar

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        if self.bar is not None:
            self.bar.update(1)

    def end(self) -> None:
        pass


class HFBaseline:
    """Plain ``model.generate`` on the model directory the cluster serves: batch 1 (prompts one
    after another) and one left-padded batch, greedy, exactly ``max_tokens`` tokens each."""

    def __init__(self, model_dir: Path, max_tokens: int, progress: bool = True, device: str = "cpu",
                 dtype: str = "float32", load_format: str = "auto"):
        import torch

        from libs.engine.device import DTYPES
        from libs.engine.loading import load_model, load_tokenizer

        tok = load_tokenizer(model_dir)
        self.device = torch.device(device)
        self.model = load_model(model_dir, DTYPES[dtype], self.device, load_format)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.max_tokens = max_tokens
        self.progress = progress
        self.gen = dict(do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                        pad_token_id=self.pad_id, temperature=None, top_p=None, top_k=None)
        self._torch = torch
        self._warm = False

    def generate(self, batch: list[list[int]], streamer=None, **override):
        torch = self._torch
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):  # left padding
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            out = self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device), streamer=streamer,
                                      **{**self.gen, **override})
        return out[:, width:].cpu()

    def _warm_up(self, prompt: list[int]) -> None:
        if not self._warm:
            self.generate([prompt], None, max_new_tokens=WARMUP_TOKENS, min_new_tokens=WARMUP_TOKENS)
            self._warm = True

    def batch1(self, prompts: list[list[int]]) -> dict:
        from tqdm import tqdm

        self._warm_up(prompts[0])
        bar = tqdm(total=len(prompts) * self.max_tokens, desc="hf batch 1", unit="tok", file=sys.stderr,
                   disable=not self.progress, dynamic_ncols=True)
        total_tokens, total_time, ttfts, itls = 0, 0.0, [], []
        try:
            for p in prompts:
                st = _StepTimes(bar)
                t0 = time.perf_counter()
                out = self.generate([p], st)
                total_time += time.perf_counter() - t0
                total_tokens += int(out.shape[1])
                if st.times:
                    ttfts.append(st.times[0] - t0)
                    itls.extend(b - a for a, b in zip(st.times, st.times[1:]))
        finally:
            bar.close()
        return {
            "hf_b1_tok_s": _round(total_tokens / total_time),
            "hf_b1_ttft_p50_ms": ms(percentile(ttfts, 50)),
            "hf_b1_itl_p50_ms": ms(percentile(itls, 50)),
            "hf_b1_itl_p90_ms": ms(percentile(itls, 90)),
            "hf_b1_ms_per_token": ms(total_time / total_tokens),
        }

    def batched(self, prompts: list[list[int]]) -> dict:
        from tqdm import tqdm

        self._warm_up(prompts[0])
        n = len(prompts)
        bar = tqdm(total=self.max_tokens, desc=f"hf batch {n}", unit="step", file=sys.stderr,
                   disable=not self.progress, dynamic_ncols=True)
        try:
            st = _StepTimes(bar)
            t0 = time.perf_counter()
            out = self.generate(prompts, st)
            elapsed = time.perf_counter() - t0
        finally:
            bar.close()
        steps = [b - a for a, b in zip(st.times, st.times[1:])]
        return {
            f"hf_b{n}_tok_s": _round(out.numel() / elapsed),
            f"hf_b{n}_ttft_ms": ms(st.times[0] - t0) if st.times else None,
            f"hf_b{n}_step_p50_ms": ms(percentile(steps, 50)),
            f"hf_b{n}_step_p90_ms": ms(percentile(steps, 90)),
        }


# ---------------------------------------------------------------- output
SERVE_COLS = ["config", "requests", "tok/s", "TTFT p50", "TTFT p90", "ITL p50", "ITL p90", "errors"]


def serve_table(rows: list[dict], cols: list[str] = SERVE_COLS) -> str:
    return format_table(rows, cols, ".1f")


def _parse_levels(spec) -> list[int]:
    if isinstance(spec, (list, tuple)):
        levels = [int(x) for x in spec]
    else:
        levels = [int(x) for x in str(spec).replace(" ", "").split(",") if x]
    if not levels or any(c < 1 for c in levels):
        raise ValueError(f"--concurrency must be a comma-separated list of positive integers, not {spec!r}")
    return levels


# ---------------------------------------------------------------- entry point
def main(args) -> int:
    """``yuebing bench serve``."""
    return entry(_serve, args)  # quiet logs; SIGTERM unwinds like Ctrl-C


def _serve(args) -> int:
    import torch

    from yuebing.cluster import LocalCluster
    from libs.config import from_env
    from libs.engine.modelpath import DEFAULT_MODEL, resolve_model
    from libs.engine.loading import load_tokenizer
    from libs.natsserver import free_port

    levels = _parse_levels(getattr(args, "concurrency", "1,8,16"))
    per_level = int(getattr(args, "requests_per_level", 0) or 0)
    max_tokens = int(getattr(args, "max_tokens", 128))
    rounds = max(1, int(getattr(args, "rounds", 1) or 1))
    threads = getattr(args, "threads", None)
    progress = bool(getattr(args, "progress", True))
    top = max(levels)

    spec = getattr(args, "model", None) or DEFAULT_MODEL
    models_dir = resolve_models_dir(args)  # the shared model cache: the model is converted at most once
    model_dir = resolve_model(spec, models_dir)
    tokenizer = load_tokenizer(model_dir)
    # Round 1 runs every level, later rounds the top level again; every request has its own prompt.
    sizes = [(c, per_level or 2 * c) for c in levels] + [(top, per_level or 2 * top)] * (rounds - 1)
    prompts = build_prompts(tokenizer, max(1 + sum(n for _, n in sizes), HF_BATCH + 1))
    plans: list[list[tuple[int, list[list[int]]]]] = [[]]
    off = 1
    for i, (c, n) in enumerate(sizes):
        if i >= len(levels):
            plans.append([])
        plans[-1].append((c, prompts[off : off + n]))
        off += n

    def b16_of(plan) -> list[list[int]]:  # the baseline batch: the first 16 prompts of the round's top level
        big = next(mine for c, mine in plan if c == top)
        return [big[i % len(big)] for i in range(HF_BATCH)]

    data_dir, own_dir = make_data_dir(args, "yuebing-bench-")
    settings = from_env(model=str(model_dir), data_dir=str(data_dir), models_dir=str(models_dir), port=free_port(),
                        block_size=getattr(args, "block_size", None), threads=threads or None,
                        device=getattr(args, "device", None), dtype=getattr(args, "dtype", None),
                        load_format=getattr(args, "load_format", None),
                        no_auth=True)  # a private cluster on loopback, for this run only
    cluster = LocalCluster(settings, prefill=1, decode=1)
    print(f"bench serve: model {model_dir}, max_tokens {max_tokens}, concurrency {levels}, rounds {rounds}, "
          f"baseline torch threads {threads or torch.get_num_threads()}; cluster logs in {cluster.log_dir}",
          file=sys.stderr, flush=True)
    clean = False
    level_results: list[LevelResult] = []
    round_figures: list[dict] = []
    hf: dict = {}
    errors = 0
    try:
        try:
            t0 = time.perf_counter()
            print("starting the cluster (nats-server, gateway, conductor, cachestore, prefill, decode)...",
                  file=sys.stderr, flush=True)
            cluster.start(ready_timeout=300)
            print(f"cluster ready in {time.perf_counter() - t0:.1f}s at {cluster.url}; cores: "
                  f"{cluster.describe_cores()}", file=sys.stderr, flush=True)
            if threads:
                torch.set_num_threads(threads)
            baseline = None
            for r, plan in enumerate(plans):
                got = asyncio.run(run_cluster_levels(cluster.url, plan, max_tokens, progress,
                                                     warm_prompt=prompts[0] if r == 0 else None))
                for lr in got:  # shown now, in case a later step fails after minutes of measuring
                    print(f"round {r + 1} cluster c={lr.concurrency}: {json.dumps(lr.figures())}", file=sys.stderr,
                          flush=True)
                if r == 0:
                    level_results = got
                errors += sum(lr.errors for lr in got)
                # The baseline in the same round, on the same prompts, the cluster idle meanwhile.
                print("running plain transformers generate on the same model and prompts...", file=sys.stderr,
                      flush=True)
                if baseline is None:
                    s = cluster.settings  # the device and dtype the cluster resolved
                    baseline = HFBaseline(model_dir, max_tokens, progress, s.device, s.dtype, s.load_format)
                if r == 0:  # batch 1: the first prompts the cluster served
                    hf.update(baseline.batch1(prompts[1 : 1 + HF_B1_PROMPTS]))
                hf_round = baseline.batched(b16_of(plan))
                if r == 0:
                    hf.update(hf_round)
                top_result = next(lr for lr in got if lr.concurrency == top)
                round_figures.append({"round": r + 1, "cluster_tok_s": top_result.figures()["tok_s"],
                                      "hf_tok_s": hf_round[f"hf_b{HF_BATCH}_tok_s"]})
        finally:
            print("stopping the cluster...", file=sys.stderr, flush=True)
            cluster.stop()
        clean = not errors
    finally:
        release_data_dir(own_dir, clean, f"cluster logs in {cluster.log_dir}")  # kept after a failed run

    figures: dict = {"model": model_dir.name if spec != DEFAULT_MODEL else DEFAULT_MODEL, "max_tokens": max_tokens,
                     "device": cluster.settings.device, "dtype": cluster.settings.dtype,
                     "load_format": cluster.settings.load_format}
    rows = []
    for lr in level_results:
        f = lr.figures()
        rows.append({"config": f"cluster c={lr.concurrency}", "requests": lr.requests, "tok/s": f["tok_s"],
                     "TTFT p50": f["ttft_p50_ms"], "TTFT p90": f["ttft_p90_ms"], "ITL p50": f["itl_p50_ms"],
                     "ITL p90": f["itl_p90_ms"], "errors": f["errors"]})
        for k, v in f.items():
            figures[f"cluster_c{lr.concurrency}_{k}"] = v
    rows.append({"config": "hf generate b=1", "requests": HF_B1_PROMPTS, "tok/s": hf["hf_b1_tok_s"],
                 "TTFT p50": hf["hf_b1_ttft_p50_ms"], "ITL p50": hf["hf_b1_itl_p50_ms"],
                 "ITL p90": hf["hf_b1_itl_p90_ms"], "errors": 0})
    rows.append({"config": f"hf generate b={HF_BATCH}", "requests": HF_BATCH, "tok/s": hf[f"hf_b{HF_BATCH}_tok_s"],
                 "TTFT p50": hf[f"hf_b{HF_BATCH}_ttft_ms"], "ITL p50": hf[f"hf_b{HF_BATCH}_step_p50_ms"],
                 "ITL p90": hf[f"hf_b{HF_BATCH}_step_p90_ms"], "errors": 0})
    figures.update(hf)

    for rf in round_figures:
        rf["ratio"] = ratio(rf["cluster_tok_s"], rf["hf_tok_s"])
    per_round = [rf["ratio"] for rf in round_figures if rf["ratio"] is not None]
    # With several rounds the headline ratio is the median of the rounds' ratios (each round's
    # cluster level and baseline batch run back to back on fresh prompts).
    figures[f"ratio_c{top}_vs_hf_b{HF_BATCH}"] = (
        round(statistics.median(per_round), 3) if per_round else None)
    if rounds > 1:
        figures[f"ratio_c{top}_vs_hf_b{HF_BATCH}_rounds"] = per_round
    if 1 in levels:
        figures["ratio_c1_vs_hf_b1"] = ratio(figures["cluster_c1_tok_s"], hf["hf_b1_tok_s"])

    print(f"\nmodel {figures['model']}, {max_tokens} output tokens per request, prompts "
          f"{PROMPT_MIN_TOKENS}-{PROMPT_MAX_TOKENS} tokens; times in ms (hf b={HF_BATCH}: ITL = one batched step)")
    print(serve_table(rows))
    if rounds > 1:
        print(f"\nrounds (cluster c={top} then hf generate b={HF_BATCH}, fresh prompts each round):")
        cols = ["round", f"cluster c={top} tok/s", f"hf b={HF_BATCH} tok/s", "ratio"]
        print(serve_table([dict(zip(cols, (rf["round"], rf["cluster_tok_s"], rf["hf_tok_s"],
                                            None if rf["ratio"] is None else f"{rf['ratio']:.3f}")))
                            for rf in round_figures], cols))
    line = json.dumps(figures)
    print(line, flush=True)
    out = getattr(args, "out", None)
    if out:
        Path(out).write_text(line + "\n")
    return 1 if errors else 0
