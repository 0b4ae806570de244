"""Log-probabilities of tokens, for requests that ask for them (OpenAI's ``logprobs``, an echo's
prompt logprobs). Plain functions over logits, no I/O.

The values are the log-softmax of the model's raw float32 logits at the position, before the
request's penalties, temperature, top-k or top-p: vLLM's default (``raw_logprobs``). They describe
the model's distribution, not the sampler's, so a greedy and a sampled request see the same ones,
and they are what a reference run of the model gives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from libs.protocol import PromptLogprobs, TokenLogprobs


def logprobs_at(logits: torch.Tensor, tokens: Sequence[int], k: int) -> list[TokenLogprobs]:
    """Each of ``tokens`` drawn at the one position whose logits ``[vocab]`` are given (the ``n``
    choices a prefill samples from one distribution), with that position's ``k`` most likely."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids: list[int] = []
    vals: list[float] = []
    if k:
        top = torch.topk(lp, min(k, lp.shape[-1]))
        ids, vals = top.indices.tolist(), top.values.tolist()
    chosen = lp[torch.tensor(list(tokens), dtype=torch.long, device=lp.device)].tolist()
    return [TokenLogprobs(c, list(ids), list(vals)) for c in chosen]


def logprobs_rows(logits: torch.Tensor, tokens: Sequence[int], ks: Sequence[int]) -> list[TokenLogprobs]:
    """Row ``b``'s token ``tokens[b]`` under its logits ``logits[b]`` (``[rows, vocab]``), with the
    ``ks[b]`` most likely tokens of that row: a decode step's rows that asked."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    idx = torch.tensor(list(tokens), dtype=torch.long, device=lp.device).unsqueeze(1)
    chosen = lp.gather(1, idx).squeeze(1).tolist()
    kmax = min(max(ks, default=0), lp.shape[-1])
    if kmax:
        top = torch.topk(lp, kmax, dim=-1)
        ids, vals = top.indices.tolist(), top.values.tolist()
    else:
        ids = vals = [[] for _ in chosen]
    return [TokenLogprobs(c, i[:k], v[:k]) for c, i, v, k in zip(chosen, ids, vals, ks)]


class PromptScores:
    """The prompt logprobs of one prefill, filled chunk by chunk as the model computes the logits
    of every prompt position: position ``p``'s logits give token ``p + 1``'s logprob and the ``k``
    most likely tokens there (the last position's are the first output token's, not the prompt's).

    Every position needs its logits, i.e. its whole forward: a prompt whose logprobs are asked
    for reuses no cached prefix (its positions would have no logits), and ``message`` refuses to
    return a result with a position missing."""

    def __init__(self, prompt: Sequence[int], k: int):
        self.prompt = list(prompt)
        self.k = k
        n = max(0, len(self.prompt) - 1)
        self.logprobs = torch.zeros(n, dtype=torch.float32)
        self.top_ids = torch.zeros((n, k), dtype=torch.int32)
        self.top_logprobs = torch.zeros((n, k), dtype=torch.float32)
        self._filled = torch.zeros(n, dtype=torch.bool)

    def add(self, logits: torch.Tensor, first: int) -> None:
        """The logits ``[rows, vocab]`` of positions ``first .. first + rows - 1``."""
        end = min(first + logits.shape[0], len(self.prompt) - 1)
        if end <= first:
            return
        lp = torch.log_softmax(logits[: end - first].float(), dim=-1)
        targets = torch.tensor(self.prompt[first + 1 : end + 1], dtype=torch.long, device=lp.device)
        self.logprobs[first:end] = lp.gather(1, targets.unsqueeze(1)).squeeze(1).cpu()
        if self.k:
            top = torch.topk(lp, min(self.k, lp.shape[-1]), dim=-1)
            self.top_ids[first:end, : top.indices.shape[1]] = top.indices.to(torch.int32).cpu()
            self.top_logprobs[first:end, : top.values.shape[1]] = top.values.cpu()
        self._filled[first:end] = True

    @property
    def complete(self) -> bool:
        return bool(self._filled.all())

    def message(self) -> PromptLogprobs:
        if not self.complete:
            missing = int((~self._filled).sum())
            raise RuntimeError(f"prompt logprobs lack {missing} positions (their logits were not computed)")
        return PromptLogprobs(
            k=self.k,
            logprobs=_le(self.logprobs),
            top_ids=_le(self.top_ids),
            top_logprobs=_le(self.top_logprobs),
        )


def _le(t: torch.Tensor) -> bytes:
    """A CPU tensor's values as little-endian bytes."""
    import sys

    a = t.contiguous().numpy()
    if sys.byteorder != "little":
        a = a.byteswap()
    return a.tobytes()
