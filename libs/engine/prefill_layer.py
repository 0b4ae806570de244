"""A cache layer of transformers' model forward that writes a prompt's new positions straight into
the request's ``PrefillKV`` (kept apart from it: the simulated engine uses the buffer without
importing transformers)."""

from __future__ import annotations

from transformers.cache_utils import DynamicLayer

from libs.engine.prefill_kv import PrefillKV


class PrefillLayer(DynamicLayer):
    """A cache layer of a prompt writing its new positions into the request's ``PrefillKV``: no
    concatenation per chunk, no stacking at the end (``DynamicLayer`` does both)."""

    def __init__(self, buf: PrefillKV, index: int):
        super().__init__()
        self.buf = buf
        self.index = index
        self.is_initialized = True
        self.n = buf.past_len
        self._k = buf.dev[index, 0].unsqueeze(0)  # [1, H, total, D] views of the buffer
        self._v = buf.dev[index, 1].unsqueeze(0)
        self.keys, self.values = self._k[:, :, : self.n], self._v[:, :, : self.n]
        self.dtype, self.device = buf.dev.dtype, buf.dev.device
        self._waited = False

    def update(self, key_states, value_states, *args, **kwargs):
        if not self._waited:
            self.buf.wait_layer(self.index)  # the past this layer attends to must be in place
            self.buf.upload_past(self.index)
            self._waited = True
        n, t = self.n, key_states.shape[-2]
        self._k[:, :, n : n + t] = key_states
        self._v[:, :, n : n + t] = value_states
        self.n = n + t
        if self.n == self.buf.total:
            self.buf.layer_written(self.index)
        self.keys, self.values = self._k[:, :, : self.n], self._v[:, :, : self.n]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.n
