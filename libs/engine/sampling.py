"""Sampling one token from a position's logits: greedy, or temperature/top-k/top-p with a seed
that makes the draw independent of the instance that samples it."""

from __future__ import annotations

import torch

from libs.protocol import SamplingParams


def sample_token(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Sample one token from 1-D float logits. Greedy when temperature is 0.

    With a seed, the draw at each output position uses its own generator seeded from
    (seed, position), so the result does not depend on which instance samples it.
    """
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
