"""The running batch of a decode instance: each sequence in a slot of preallocated KV buffers, with
its own length, so joining or leaving never moves the other rows' KV."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicLayer

if TYPE_CHECKING:
    from libs.engine.runner import ModelRunner


class _SlotLayer(DynamicLayer):
    """A cache layer over the batch's slots: a step writes each row's new position at that row's
    own length (one column per row, nothing else copied) and attends over the columns in use,
    masked per row."""

    def __init__(self, batch: "DecodeBatch", index: int, rows: torch.Tensor, at: torch.Tensor, width: int):
        super().__init__()
        self.batch, self.index = batch, index
        self.rows, self.at, self.width = rows, at, width
        self.is_initialized = True
        b = len(rows)
        self.keys = batch._k[index][:b, :, : width - 1]
        self.values = batch._v[index][:b, :, : width - 1]
        self.dtype, self.device = self.keys.dtype, self.keys.device

    def update(self, key_states, value_states, *args, **kwargs):
        kb, vb = self.batch._k[self.index], self.batch._v[self.index]
        kb[self.rows, :, self.at] = key_states[:, :, 0]
        vb[self.rows, :, self.at] = value_states[:, :, 0]
        b = len(self.rows)
        self.keys, self.values = kb[:b, :, : self.width], vb[:b, :, : self.width]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


class DecodeBatch:
    """The running batch of a decode instance: rows of sequences in per-layer buffers
    ``[row capacity, kv_heads, column capacity, head_dim]`` on the model's device.

    Row ``r`` holds its sequence's positions in columns ``[0, lengths[r])``; a step writes each
    row's new position at its own length and attends over ``max(lengths) + 1`` columns, each row
    masked to its own. A sequence joins (``add``) by copying its own KV into the next free row and
    leaves (``remove``) by moving the last row into its place: neither touches the other rows, so
    their cost does not grow with the batch's context. The buffers grow (doubling, so rarely) when a
    row or column is needed beyond their capacity, and are dropped when the batch empties.
    """

    MIN_ROWS = 4
    MIN_COLUMNS = 256

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.device = runner.device
        self.ids: list[str] = []
        self.lengths: list[int] = []  # KV positions held per row
        self._k: list[torch.Tensor] = []  # per layer [row capacity, H, column capacity, D]
        self._v: list[torch.Tensor] = []
        self.grown = 0  # times the buffers were reallocated (rows or columns beyond capacity)

    def __len__(self) -> int:
        return len(self.ids)

    def kv_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, columns) the buffers hold without growing."""
        return (self._k[0].shape[0], self._k[0].shape[2]) if self._k else (0, 0)

    def _ensure(self, rows: int, columns: int, heads: int, dim: int, dtype: torch.dtype) -> None:
        """Buffers of at least ``rows`` x ``columns``; growing copies the rows in use (their own
        columns only) into buffers twice as large in the dimension that ran out."""
        have_rows, have_cols = self.capacity
        if rows <= have_rows and columns <= have_cols:
            return
        new_rows = max(self.MIN_ROWS, rows if rows <= have_rows else max(rows, 2 * have_rows))
        new_cols = max(self.MIN_COLUMNS, columns if columns <= have_cols else max(columns, 2 * have_cols))
        new_rows, new_cols = max(new_rows, have_rows), max(new_cols, have_cols)
        used = max(self.lengths, default=0)
        n = self.runner.shape.num_layers
        k = [torch.zeros((new_rows, heads, new_cols, dim), dtype=dtype, device=self.device) for _ in range(n)]
        v = [torch.zeros((new_rows, heads, new_cols, dim), dtype=dtype, device=self.device) for _ in range(n)]
        b = len(self.ids)
        if b and self._k:
            for i in range(n):
                k[i][:b, :, :used] = self._k[i][:b, :, :used]
                v[i][:b, :, :used] = self._v[i][:b, :, :used]
        self._k, self._v = k, v
        if have_rows:
            self.grown += 1

    @torch.inference_mode()
    def add(self, seq_id: str, kv: torch.Tensor) -> None:
        """Join a sequence whose KV (wire layout, one sequence) covers ``kv.shape[3]`` positions."""
        n_layers, _, heads, length, dim = kv.shape
        r = len(self.ids)
        self._ensure(r + 1, length + 1, heads, dim, kv.dtype)
        kv = kv.to(self.device, non_blocking=True)
        for i in range(n_layers):
            self._k[i][r, :, :length] = kv[i, 0]
            self._v[i][r, :, :length] = kv[i, 1]
        self.ids.append(seq_id)
        self.lengths.append(length)

    @torch.inference_mode()
    def block_kv(self, seq_id: str, start: int, end: int) -> torch.Tensor:
        """A copy of one row's KV at positions ``[start, end)`` in the wire layout
        ``[layers, 2, kv_heads, end - start, head_dim]``, on the CPU (a pool write's blocks)."""
        r = self.ids.index(seq_id)
        if not 0 <= start <= end <= self.lengths[r]:
            raise ValueError(f"positions [{start}, {end}) are not all held (row of {self.lengths[r]})")
        layers = [torch.stack((k[r, :, start:end], v[r, :, start:end])) for k, v in zip(self._k, self._v)]
        return torch.stack(layers).cpu()

    @torch.inference_mode()
    def remove(self, seq_ids: set[str]) -> None:
        """Leave: each freed row is filled by moving the last row (its own positions) into it."""
        for sid in [s for s in self.ids if s in seq_ids]:
            r = self.ids.index(sid)
            last = len(self.ids) - 1
            if r != last:
                n = self.lengths[last]
                for buf in (*self._k, *self._v):
                    buf[r, :, :n] = buf[last, :, :n]
                self.ids[r], self.lengths[r] = self.ids[last], self.lengths[last]
            self.ids.pop()
            self.lengths.pop()
        if not self.ids:
            self._k, self._v = [], []

    @torch.inference_mode()
    def step(self, last_tokens: list[int]) -> torch.Tensor:
        """Feed each row's newest token; returns float logits [B, vocab] on the CPU."""
        from transformers import DynamicCache

        b = len(self.ids)
        width = max(self.lengths) + 1
        _, heads, _, dim = self._k[0].shape
        self._ensure(b, width, heads, dim, self._k[0].dtype)
        lengths = torch.tensor(self.lengths, dtype=torch.long, device=self.device)
        rows = torch.arange(b, device=self.device)
        mask = (torch.arange(width, device=self.device).unsqueeze(0) <= lengths.unsqueeze(1)).long()
        cache = DynamicCache()
        cache.layers = [_SlotLayer(self, i, rows, lengths, width) for i in range(len(self._k))]
        out = self.runner.model(
            input_ids=torch.tensor(last_tokens, dtype=torch.long, device=self.device).unsqueeze(1),
            attention_mask=mask,
            position_ids=lengths.unsqueeze(1),
            past_key_values=cache,
            use_cache=True,
        )
        self.lengths = [n + 1 for n in self.lengths]
        return out.logits[:, -1].float().cpu()
