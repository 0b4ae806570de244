"""Structured output: a request's grammar constrains every token sampled for it.

The grammar is llguidance's (a JSON schema, a regular expression, a set of choices or a Lark
grammar, as the gateway builds it from the request: ``services/gateway/structured.py``). The
instance that samples a token asks the request's matcher which tokens may come next, samples among
those, then feeds the token to the matcher. Once the grammar is complete only an end-of-sequence
token may follow, so a constrained request ends with ``finish_reason: stop`` (or ``length`` when
``max_tokens`` cuts it short).

The matcher's vocabulary is the model's tokenizer (its ``tokenizer.json``, read by the tokenizers
library, so a simulated engine's process needs no transformers); every process builds the same one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

import llguidance
import numpy as np
import torch


class GrammarError(ValueError):
    """A grammar llguidance cannot compile for this tokenizer; the message says why."""


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, eos_ids: tuple[int, ...]) -> llguidance.LLTokenizer:
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.exists():
        raise GrammarError(f"structured output needs the model's tokenizer.json; {path} has none")
    tok = Tokenizer.from_file(str(file))
    tok.no_padding()
    tok.no_truncation()
    return llguidance.LLTokenizer(tok.to_str(), eos_token=list(eos_ids))


def tokenizer_for(model_path: Path | str, eos_ids: Iterable[int]) -> llguidance.LLTokenizer:
    """The matchers' vocabulary for a model (built once per process: about a quarter of a second
    for a 49k-token vocabulary)."""
    return _tokenizer(str(model_path), tuple(eos_ids))


def check(grammar: str, tokenizer: llguidance.LLTokenizer) -> None:
    """Raise ``GrammarError`` if ``grammar`` does not compile for ``tokenizer``."""
    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if error:
        raise GrammarError(error.strip())


class Constraint:
    """One sequence's place in its grammar: which tokens may come next, and the tokens so far."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, consumed: Iterable[int] = ()):
        self._m = llguidance.LLMatcher(tokenizer, grammar)
        self._vocab = tokenizer.vocab_size
        if self._m.is_error():
            raise GrammarError(self._m.get_error())
        for token in consumed:  # the output before this attempt (a resumed request's, a fork's first)
            self.advance(token)

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """A bool tensor [vocab_size]: the tokens the grammar lets come next. Ids past the
        tokenizer's vocabulary (a model's padding rows) are never allowed."""
        bits = np.unpackbits(np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        n = min(vocab_size, self._vocab, bits.shape[0])
        mask[:n] = torch.from_numpy(bits[:n].astype(np.bool_))
        return mask

    def advance(self, token: int) -> None:
        """Feed the sampled token; raises ``GrammarError`` for one the grammar does not allow."""
        if not self._m.consume_token(int(token)):
            raise GrammarError(f"token {token} does not continue the grammar: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing more may follow (only end of sequence)."""
        return self._m.is_stopped()

