"""The running batch of a decode instance: rows of sequences in one preallocated, right-aligned
KV buffer that a step extends by one column."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicLayer

if TYPE_CHECKING:
    from libs.engine.runner import ModelRunner


class _BufferLayer(DynamicLayer):
    """A cache layer writing new positions into the batch's preallocated buffer: a step copies
    only the new column, never the past (``DynamicLayer`` concatenates the whole past)."""

    def __init__(self, batch: "DecodeBatch", index: int):
        super().__init__()
        self.batch = batch
        self.index = index
        self.is_initialized = True
        b, n = len(batch.ids), batch.width
        self.keys = batch._k[index][:b, :, :n]
        self.values = batch._v[index][:b, :, :n]
        self.dtype, self.device = self.keys.dtype, self.keys.device

    def update(self, key_states, value_states, *args, **kwargs):
        b, n = len(self.batch.ids), self.batch.width
        t = key_states.shape[-2]
        kb, vb = self.batch._k[self.index], self.batch._v[self.index]
        kb[:b, :, n : n + t] = key_states
        vb[:b, :, n : n + t] = value_states
        self.keys, self.values = kb[:b, :, : n + t], vb[:b, :, : n + t]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


class DecodeBatch:
    """The running batch of a decode instance: rows of sequences sharing one padded KV buffer.

    Rows are right-aligned: every sequence's newest position is column ``width - 1``, so one
    decode step writes one new column for all rows. Shorter sequences are left-padded and masked
    out. The buffers ``[rows, kv_heads, capacity, head_dim]`` per layer are preallocated with room
    to grow, so a step copies nothing but the new column. Sequences join (``add``) and leave
    (``remove``) between steps; those rebuild the buffers.
    """

    GROW = 256  # spare columns allocated beyond what is needed

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.ids: list[str] = []
        self.lengths: list[int] = []  # KV positions held per row
        self.width = 0  # columns in use
        self._k: list[torch.Tensor] = []  # per layer [row capacity, H, column capacity, D]
        self._v: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.ids)

    def kv_tokens(self) -> int:
        return sum(self.lengths)

    def _alloc(self, rows: int, cols: int, like: torch.Tensor) -> list[torch.Tensor]:
        _, h, _, d = like.shape
        return [like.new_zeros((rows, h, cols, d)) for _ in range(self.runner.shape.num_layers)]

    def _rebuild(self, rows: list[int], new_width: int, extra_rows: int = 0) -> None:
        """Copy the kept ``rows`` into fresh buffers ``new_width`` wide, right-aligned."""
        old_k, old_v, old_w = self._k, self._v, self.width
        like = old_k[0]
        row_cap = max(4, 2 * (len(rows) + extra_rows))
        col_cap = new_width + self.GROW
        self._k, self._v = self._alloc(row_cap, col_cap, like), self._alloc(row_cap, col_cap, like)
        if rows:
            idx = torch.tensor(rows, dtype=torch.long)
            keep = min(old_w, new_width)
            for i in range(len(old_k)):
                self._k[i][: len(rows), :, new_width - keep : new_width] = old_k[i].index_select(0, idx)[:, :, old_w - keep : old_w]
                self._v[i][: len(rows), :, new_width - keep : new_width] = old_v[i].index_select(0, idx)[:, :, old_w - keep : old_w]
        self.width = new_width

    @torch.inference_mode()
    def add(self, seq_id: str, kv: torch.Tensor) -> None:
        """Join a sequence whose KV (wire layout, one sequence) covers ``kv.shape[3]`` positions."""
        n_layers, _, _, length, _ = kv.shape
        b = len(self.ids)
        if not self._k:
            self._k = self._alloc(4, length + self.GROW, kv[0, 0].unsqueeze(0))
            self._v = self._alloc(4, length + self.GROW, kv[0, 0].unsqueeze(0))
            self.width = length
        elif length > self.width or b >= self._k[0].shape[0]:
            self._rebuild(list(range(b)), max(self.width, length), extra_rows=1)
        w = self.width
        for i in range(n_layers):
            self._k[i][b, :, w - length : w] = kv[i, 0]
            self._v[i][b, :, w - length : w] = kv[i, 1]
            self._k[i][b, :, : w - length] = 0
            self._v[i][b, :, : w - length] = 0
        self.ids.append(seq_id)
        self.lengths.append(length)

    @torch.inference_mode()
    def remove(self, seq_ids: set[str]) -> None:
        """Leave: each freed row is filled by moving the last row into it (one row copied per
        leave); the buffers are rebuilt only when most columns have become padding."""
        for sid in [s for s in self.ids if s in seq_ids]:
            r = self.ids.index(sid)
            last = len(self.ids) - 1
            if r != last:
                for buf in (*self._k, *self._v):
                    buf[r, :, : self.width] = buf[last, :, : self.width]
                self.ids[r], self.lengths[r] = self.ids[last], self.lengths[last]
            self.ids.pop()
            self.lengths.pop()
        if not self.ids:
            self._k, self._v, self.width = [], [], 0
        elif max(self.lengths) * 2 < self.width:
            self._rebuild(list(range(len(self.ids))), max(self.lengths))

    @torch.inference_mode()
    def step(self, last_tokens: list[int]) -> torch.Tensor:
        """Feed each row's newest token; returns float logits [B, vocab]."""
        from transformers import DynamicCache

        b, width = len(self.ids), self.width
        if width + 1 > self._k[0].shape[2]:
            self._rebuild(list(range(b)), width)
        mask = torch.zeros((b, width + 1), dtype=torch.long)
        for r, n in enumerate(self.lengths):
            mask[r, width - n :] = 1
        pos = torch.tensor(self.lengths, dtype=torch.long).unsqueeze(1)
        cache = DynamicCache()
        cache.layers = [_BufferLayer(self, i) for i in range(len(self._k))]
        out = self.runner.model(
            input_ids=torch.tensor(last_tokens, dtype=torch.long).unsqueeze(1),
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        )
        self.width += 1
        self.lengths = [n + 1 for n in self.lengths]
        return out.logits[:, -1].float()
