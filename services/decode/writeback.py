"""Which blocks of a decoding sequence go back to the pool, under which keys. Plain logic, no I/O.

A chat's next turn is its prompt, the answer and a new question: its prompt's leading blocks are
this sequence's prompt and output, token for token, as far as the chat template renders the answer
as the tokens decode produced (it does for the answers SmolLM2's template renders: ``<|im_end|>``
ends both; an answer cut mid-character by ``max_tokens`` differs from its last few tokens on, and
only the blocks before those match). Decode writes each full block of a sequence to the pool as
soon as its KV is computed, keyed by the same hash chain the gateway computes for a prompt
(``libs/kv/keys.py``), so the next turn, or the resumption of this request after its decode
instance is lost, loads those blocks instead of recomputing them.

The prompt's full blocks are the prefill's to write; decode starts at the block holding the
prompt's tail (if partial) and the first output tokens. The KV of the last output token is never
computed (nothing is generated after it), so neither is a block that ends with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from libs.kv.keys import block_hashes


@dataclass
class Chain:
    """One sequence's blocks: the next to write and the key of the one before it."""

    prompt: list[int]  # the attempt's prompt (a resumed request's includes its earlier output)
    block_size: int
    namespace: bytes
    next_block: int  # index of the first block not yet handed out
    parent: bytes | None  # key of block ``next_block - 1`` (None: the chain starts at the namespace)
    stopped: bool = False  # a block was lost (budget, a failed put): the later ones could not be reused

    @classmethod
    def start(cls, prompt: list[int], block_size: int, namespace: bytes) -> "Chain":
        full = len(prompt) // block_size
        keys = block_hashes(prompt[: full * block_size], block_size, namespace)
        return cls(prompt, block_size, namespace, full, keys[-1] if keys else None)

    def due(self, kv_len: int) -> int:
        """How many blocks are complete at ``kv_len`` positions of KV and not handed out yet."""
        return 0 if self.stopped else max(0, kv_len // self.block_size - self.next_block)

    def take(self, count: int, output: list[int]) -> list[tuple[int, bytes, bytes | None]]:
        """Hand out the next ``count`` blocks: (block index, key, parent key) each. ``output``:
        the sequence's output tokens so far (they follow the prompt)."""
        bs = self.block_size
        start = self.next_block * bs
        tokens = (self.prompt[start:] + output[max(0, start - len(self.prompt)):])[: count * bs]
        keys = block_hashes(tokens, bs, self.namespace, parent=self.parent)
        out = []
        for i, key in enumerate(keys):
            out.append((self.next_block + i, key, self.parent if i == 0 else keys[i - 1]))
        if keys:
            self.next_block += len(keys)
            self.parent = keys[-1]
        return out
