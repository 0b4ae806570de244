"""Sampling one token from a position's logits: greedy, or temperature/top-k/top-p with a seed
that makes the draw independent of the instance that samples it; presence, frequency and
repetition penalties first, when the request has them, then its grammar's allowed tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from libs.protocol import SamplingParams


def split_resumed_prompt(prompt_token_ids: list[int], earlier_outputs: int) -> tuple[list[int], list[int]]:
    """(the request's prompt, its output tokens before this attempt) from an attempt's prompt.

    A resumed attempt's prompt is the request's prompt followed by the tokens already streamed
    to the client, one per token event: ``earlier_outputs`` is its ``seq_base``. The penalties
    on the output count those, as they would have on the instance that made them."""
    cut = len(prompt_token_ids) - earlier_outputs
    return prompt_token_ids[:cut], prompt_token_ids[cut:]


def penalize(logits: torch.Tensor, params: SamplingParams, prompt: Sequence[int],
             output: Sequence[int]) -> torch.Tensor:
    """The logits with the request's penalties, as vLLM applies them (and OpenAI defines the last
    two): the repetition penalty divides a positive logit and multiplies a negative one, for every
    token in the prompt or the output so far; then ``frequency_penalty`` times a token's count in
    the output and ``presence_penalty`` once if it occurs there are subtracted. The logits are
    returned unchanged (not copied) when there are no penalties."""
    if not params.penalized:
        return logits
    logits = logits.float().clone()
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = {t for t in prompt if 0 <= t < vocab}
        seen.update(t for t in output if 0 <= t < vocab)
        if seen:
            idx = torch.tensor(sorted(seen), dtype=torch.long, device=logits.device)
            vals = logits[idx]
            logits[idx] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and output:
        ids = torch.tensor([t for t in output if 0 <= t < vocab], dtype=torch.long, device=logits.device)
        counts = torch.bincount(ids, minlength=vocab).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, position: int,
                 prompt: Sequence[int] = (), output: Sequence[int] = (), allowed: torch.Tensor | None = None) -> int:
    """Sample one token from 1-D float logits. Greedy when temperature is 0.

    ``prompt`` and ``output`` (the request's prompt and its output tokens so far) are what the
    penalties look at; only a request with penalties needs them. ``allowed`` (bool, one per
    logit: a structured output's grammar, ``libs/engine/grammar.py``) leaves only those tokens.

    With a seed, the draw at each output position uses its own generator seeded from
    (seed, position), so the result does not depend on which instance samples it.
    """
    logits = penalize(logits, params, prompt, output)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
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
