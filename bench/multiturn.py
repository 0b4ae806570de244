"""``yuebing bench multiturn``: what decode's write-back of a sequence's blocks buys a conversation's
next turn, and a request resumed after its decode instance is killed, against the same cluster
without it, in the same run.

Two clusters, one after the other, alike but for ``decode_write_back`` (on, then off): 1 prefill,
2 decode and 1 cachestore instances on the real model (default SmolLM2-135M), global cache-aware
placement, the pool on.

* Conversations (``--conversations`` of ``--turns`` turns): chat requests, streamed, one at a time
  (TTFT is the unloaded latency). Turn 1 is a user message of about ``--history-tokens`` tokens;
  each later turn sends the whole conversation so far, the previous answers as the model gave them
  (its streamed text), and a new question of about ``--question-tokens`` tokens. Answers are greedy,
  at most ``--answer-tokens``. Messages are deterministic English words. For turns 2 and later:
  ``cached_tokens`` against the previous turn's prompt and answer tokens (the history), and TTFT.
* Resumption (``--resumes``): a completion whose prompt is ``--history-tokens`` deterministic token
  ids streams ``--resume-tokens`` tokens (greedy, ``ignore_eos``); once ``--kill-after`` have arrived,
  the decode instance serving it (the conductor's log names it) is killed with SIGKILL, and restarted
  once the stream has finished elsewhere. Measured: the resumed attempt's prefill as its instance
  logged it (tokens reused, load and compute seconds), and the client's stall (the last token before
  the kill to the first after, which includes the heartbeats it takes to declare the instance lost).

The Mooncake conversation trace has almost no follow-up turns (12 of its 12,031 requests extend an
earlier one's blocks; a median of 226 new tokens beyond the previous prompt and answer), so the
conversations here are synthetic, with lengths given on the command line.

It prints a table and a final JSON line of named figures (also written to ``--out``).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (det_tokens, emit, entry, make_data_dir, median, ms, ratio, release_data_dir,
                          resolve_models_dir, say)


@dataclass
class Turn:
    write_back: bool
    conversation: int
    turn: int
    ok: bool
    ttft: float | None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    history_tokens: int = 0  # the previous turn's prompt and answer tokens (0 for turn 1)
    error: str | None = None


@dataclass
class Resume:
    write_back: bool
    rep: int
    ok: bool
    killed: str | None = None
    stall: float | None = None  # the last token before the kill to the first one after
    prompt_tokens: int = 0  # the resumed attempt's prompt: the original and the tokens streamed
    reused_tokens: int = 0
    load_s: float | None = None
    compute_s: float | None = None
    error: str | None = None

    @property
    def prefill_s(self) -> float | None:
        return None if self.compute_s is None else (self.load_s or 0.0) + self.compute_s


def words_text(rng: random.Random, tokenizer, tokens: int) -> str:
    """Deterministic English words, about ``tokens`` tokens of them."""
    from libs.engine.simengine import WORDS

    words: list[str] = []
    while True:
        words.extend(rng.choice(WORDS) for _ in range(16))
        text = " ".join(words)
        if len(tokenizer.encode(text, add_special_tokens=False)) >= tokens:
            return text[0].upper() + text[1:] + "."


async def conversations(url: str, model: str, tokenizer, *, write_back: bool, count: int, turns: int,
                        history_tokens: int, question_tokens: int, answer_tokens: int, seed: int) -> list[Turn]:
    import aiohttp

    from bench.sse import stream_completion

    out: list[Turn] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=900)) as session:
        for c in range(count):
            rng = random.Random(seed * 1000 + c)  # the same messages in both clusters
            messages = [{"role": "user", "content": words_text(rng, tokenizer, history_tokens)}]
            history = 0
            for t in range(turns):
                if t:
                    messages.append({"role": "user", "content": words_text(rng, tokenizer, question_tokens)})
                body = {"model": model, "messages": messages, "max_tokens": answer_tokens, "temperature": 0,
                        "stream": True, "stream_options": {"include_usage": True}}
                s = await stream_completion(session, url + "/v1/chat/completions", body)
                turn = Turn(write_back, c, t + 1, s.ok and s.usage is not None,
                            None if not s.token_times else s.token_times[0] - s.sent, history_tokens=history,
                            error=s.error)
                out.append(turn)
                if not turn.ok:
                    break
                turn.prompt_tokens, turn.cached_tokens = s.prompt_tokens or 0, s.cached_tokens or 0
                turn.completion_tokens = s.completion_tokens or 0
                history = turn.prompt_tokens + turn.completion_tokens
                messages.append({"role": "assistant", "content": s.text})
    return out


def _scheduled_on(log_dir: Path, rid: str) -> str | None:
    """The decode instance the conductor placed ``rid`` on (its ``scheduled`` log line)."""
    for line in (Path(log_dir) / "conductor-0.log").read_text(errors="replace").splitlines():
        if rid in line and '"scheduled"' in line:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("request_id") == rid:
                return rec.get("decode")
    return None


async def _stream_and_kill(session, cluster, body: dict, kill_after: int) -> tuple[list[float], str, str | None,
                                                                                float | None, str | None]:
    """Stream ``body``; once ``kill_after`` tokens have come, SIGKILL the decode instance the
    conductor placed the request on. (token arrival times, request id, the instance killed, when,
    an error)."""
    import orjson

    times: list[float] = []
    rid, killed, killed_at = "", None, None
    async with session.post(cluster.url + "/v1/completions", json=body) as r:
        if r.status != 200:
            return times, rid, None, None, f"HTTP {r.status}: {(await r.read())[:200]!r}"
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            ev = orjson.loads(line[5:])
            if ev.get("error"):
                return times, rid, killed, killed_at, str(ev["error"])
            rid = rid or ev.get("id", "")
            if ev.get("choices") and ev["choices"][0].get("text"):
                times.append(time.perf_counter())
            if killed is None and len(times) >= kill_after:
                killed = _scheduled_on(cluster.log_dir, rid)
                if killed is None:
                    return times, rid, None, None, f"the conductor's log does not place {rid}"
                cluster.kill(killed, signal.SIGKILL)
                killed_at = time.perf_counter()
    return times, rid, killed, killed_at, None


async def resumes(cluster, model: str, vocab: int, *, write_back: bool, count: int, history_tokens: int,
                  resume_tokens: int, kill_after: int, seed: int) -> list[Resume]:
    import aiohttp

    from bench.common import prefill_log_records

    out: list[Resume] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=900)) as session:
        for r in range(count):
            prompt = det_tokens(seed + 7000 + r, history_tokens, vocab)
            body = {"model": model, "prompt": prompt, "max_tokens": resume_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            times, rid, killed, killed_at, error = await _stream_and_kill(session, cluster, body, kill_after)
            res = Resume(write_back, r, False, killed=killed, error=error)
            if error is None and killed_at is None:
                res.error = "the stream ended before its decode instance was killed"
            elif error is None and len(times) != resume_tokens:
                res.error = f"{len(times)} tokens streamed of {resume_tokens}"
            elif error is None:
                before = [x for x in times if x <= killed_at]
                after = [x for x in times if x > killed_at]
                if before and after:
                    res.stall = after[0] - before[-1]
                rec = prefill_log_records(cluster.log_dir).get(f"{rid}.a2")
                if rec is None:
                    res.error = f"no resumed attempt {rid}.a2 in the prefill logs"
                else:
                    res.ok = True
                    res.prompt_tokens = rec.get("prompt_tokens", 0)
                    res.reused_tokens = rec.get("local_tokens", 0) + rec.get("pool_tokens", 0)
                    res.load_s, res.compute_s = rec.get("load_s"), rec.get("compute_s")
            out.append(res)
            if killed:  # back to two live decode instances before the next one
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    cluster.supervise(time.monotonic())
                    health = cluster.health() or {}
                    ids = {w.get("id") for w in health.get("workers", []) if w.get("kind") == "decode"}
                    if killed in ids and len(ids) >= 2:
                        break
                    await asyncio.sleep(0.5)
    return out


def main(args) -> int:
    """``yuebing bench multiturn``."""
    return entry(_multiturn, args)


def _multiturn(args) -> int:
    from libs.config import from_env
    from libs.engine.modelpath import DEFAULT_MODEL, resolve_model
    from libs.engine.loading import load_tokenizer, read_shape
    from libs.natsserver import free_port
    from yuebing.cluster import LocalCluster

    spec = getattr(args, "model", None) or DEFAULT_MODEL
    models_dir = resolve_models_dir(args)
    model_dir = resolve_model(spec, models_dir)
    tokenizer = load_tokenizer(model_dir)
    vocab = read_shape(model_dir).vocab_size
    conv = dict(count=args.conversations, turns=args.turns, history_tokens=args.history_tokens,
                question_tokens=args.question_tokens, answer_tokens=args.answer_tokens, seed=args.seed)
    started = time.perf_counter()
    turns: list[Turn] = []
    resumed: list[Resume] = []
    clean = True
    for write_back in (True, False):
        data_dir, own = make_data_dir(args, "yuebing-bench-multiturn-")
        settings = from_env(model=str(model_dir), data_dir=str(data_dir), models_dir=str(models_dir),
                            port=free_port(), block_size=getattr(args, "block_size", None),
                            threads=getattr(args, "threads", None) or None, device=getattr(args, "device", None),
                            dtype=getattr(args, "dtype", None), load_format=getattr(args, "load_format", None),
                            use_pool=True, no_auth=True, decode_write_back=write_back)
        cluster = LocalCluster(settings, prefill=1, decode=2, cachestore=1)
        label = "write-back" if write_back else "no write-back"
        ok = False
        try:
            try:
                t0 = time.perf_counter()
                cluster.start(ready_timeout=300)
                say(f"[{label}] cluster ready in {time.perf_counter() - t0:.1f}s (1 prefill, 2 decode, 1 cachestore;"
                    f" cores: {cluster.describe_cores()})")
                model = settings.served_name()
                got = asyncio.run(conversations(cluster.url, model, tokenizer, write_back=write_back, **conv))
                turns += got
                say(f"[{label}] {len(got)} turns")
                res = asyncio.run(resumes(cluster, model, vocab, write_back=write_back, count=args.resumes,
                                          history_tokens=args.history_tokens, resume_tokens=args.resume_tokens,
                                          kill_after=args.kill_after, seed=args.seed))
                resumed += res
                say(f"[{label}] {sum(r.ok for r in res)} of {len(res)} resumptions measured")
                ok = all(t.ok for t in got) and all(r.ok for r in res)
            finally:
                cluster.stop()
        finally:
            clean = clean and ok
            release_data_dir(own, ok, f"cluster logs in {cluster.log_dir}")

    later = {wb: [t for t in turns if t.write_back == wb and t.turn > 1 and t.ok] for wb in (True, False)}
    res_ok = {wb: [r for r in resumed if r.write_back == wb and r.ok] for wb in (True, False)}
    rows = []
    for wb in (True, False):
        label = "write-back" if wb else "no write-back"
        for turn in range(1, args.turns + 1):
            ts = [t for t in turns if t.write_back == wb and t.turn == turn and t.ok]
            rows.append({"cluster": label, "what": f"turn {turn}", "n": len(ts),
                         "prompt": median([t.prompt_tokens for t in ts]), "cached": median([t.cached_tokens for t in ts]),
                         "of history": median([t.cached_tokens / t.history_tokens for t in ts if t.history_tokens]),
                         "TTFT ms": ms(median([t.ttft for t in ts]))})
        rs = res_ok[wb]
        rows.append({"cluster": label, "what": "resumed prefill", "n": len(rs),
                     "prompt": median([r.prompt_tokens for r in rs]), "cached": median([r.reused_tokens for r in rs]),
                     "TTFT ms": ms(median([r.prefill_s for r in rs])), "stall ms": ms(median([r.stall for r in rs]))})

    def share(ts: list[Turn]) -> float | None:
        hist = sum(t.history_tokens for t in ts)
        return round(sum(min(t.cached_tokens, t.history_tokens) for t in ts) / hist, 3) if hist else None

    ttft_on, ttft_off = median([t.ttft for t in later[True]]), median([t.ttft for t in later[False]])
    res_on, res_off = median([r.prefill_s for r in res_ok[True]]), median([r.prefill_s for r in res_ok[False]])
    stall_on, stall_off = median([r.stall for r in res_ok[True]]), median([r.stall for r in res_ok[False]])
    figures = {
        "model": DEFAULT_MODEL if spec == DEFAULT_MODEL else model_dir.name,
        "conversations": args.conversations, "turns": args.turns, "history_tokens": args.history_tokens,
        "question_tokens": args.question_tokens, "answer_tokens": args.answer_tokens,
        "later_turns_cached_of_history": share(later[True]),
        "later_turns_cached_of_history_without": share(later[False]),
        "later_turns_ttft_ms": ms(ttft_on), "later_turns_ttft_ms_without": ms(ttft_off),
        "later_turns_ttft_vs_without": ratio(ttft_on, ttft_off),
        "resumes": len(res_ok[True]), "resumes_without": len(res_ok[False]),
        "resume_prefill_ms": ms(res_on), "resume_prefill_ms_without": ms(res_off),
        "resume_prefill_vs_without": ratio(res_on, res_off),
        "resume_stall_ms": ms(stall_on), "resume_stall_ms_without": ms(stall_off),
        "resume_stall_vs_without": ratio(stall_on, stall_off),
        "problems": [t.error for t in turns if not t.ok] + [r.error for r in resumed if not r.ok],
        "seconds": round(time.perf_counter() - started, 1),
    }
    cols = ["cluster", "what", "n", "prompt", "cached", "of history", "TTFT ms", "stall ms"]
    emit(f"model {figures['model']}: {args.conversations} conversations of {args.turns} turns ({args.history_tokens}-token "
         f"first message, {args.question_tokens}-token questions, answers of at most {args.answer_tokens}); "
         f"{args.resumes} resumptions of {args.history_tokens}-token prompts killed after {args.kill_after} tokens; "
         "medians (resumed prefill: load + compute as its instance logged it)", rows, cols, figures,
         getattr(args, "out", None))
    return 0 if clean else 1

