"""Incremental detokenisation and stop strings. Plain logic over a tokenizer."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window of recent tokens rather than the whole output each time, and holds
    back text that ends in an incomplete UTF-8 sequence until the next token completes it.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix = self._read
            self._read = len(self.ids)
            return delta
        return ""


class StopStrings:
    """Finds the first stop string in the output and holds back a tail that may start one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self._sent = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add ``delta``; returns the text now safe to send. Sets ``stopped`` on a match."""
        if self.stopped:
            return ""
        start = max(0, len(self.text) - self._hold)
        self.text += delta
        if self.stops:
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self.flush()
        safe = len(self.text) - self._partial_match()
        if safe <= self._sent:
            return ""
        out = self.text[self._sent : safe]
        self._sent = safe
        return out

    def _partial_match(self) -> int:
        """Length of the longest tail of the text that is the start of some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        out = self.text[self._sent :]
        self._sent = len(self.text)
        return out


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet read back: the character standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """A token as logprobs name it: the string of the token alone (special tokens included, a piece
    of a character as the replacement character) and its bytes, for a byte-level BPE tokenizer the
    exact bytes the token stands for (so the pieces of a character join up, as OpenAI's ``bytes``
    are meant to), else the string's UTF-8. Cached per token id (at most the vocabulary)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None) if backend is not None else None
        self._bytes = _byte_decoder() if type(decoder).__name__ == "ByteLevel" else None
        self._added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        text = self.tok.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        raw = None
        if self._bytes is not None and token_id not in self._added:
            piece = self.tok.convert_ids_to_tokens(token_id)
            if piece and all(c in self._bytes for c in piece):
                raw = [self._bytes[c] for c in piece]
        hit = self._cache[token_id] = (text, raw if raw is not None else list(text.encode("utf-8")))
        return hit
