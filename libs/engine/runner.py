"""The model runner: a loaded model and the calls that run it (a prompt, a new decode batch)."""

from __future__ import annotations

from pathlib import Path

import torch

from libs.engine.arena import KVArena
from libs.engine.decode_batch import DecodeBatch
from libs.engine.device import DTYPES
from libs.engine.loading import load_model, read_shape
from libs.engine.logprobs import PromptScores
from libs.engine.offload import LayerOffload
from libs.engine.prefill_kv import PrefillKV
from libs.engine.prefill_layer import PrefillLayer


class ModelRunner:
    """Owns a loaded model; every method is blocking and meant to run in a worker thread."""

    def __init__(self, path: Path, threads: int | None = None, cpus: str = "", *,
                 device: torch.device | str = "cpu", dtype: torch.dtype | str = torch.float32,
                 load_format: str = "auto"):
        """``cpus``: pin the calling (model) thread and the OpenMP threads it starts to these cores
        (a CPU list such as ``"0-1"``); ``threads`` then defaults to their count. ``device`` and
        ``dtype`` are resolved ones (``libs.engine.device.resolve`` turns ``auto`` into them)."""
        from libs.cpus import pin_current_thread

        threads = threads or len(pin_current_thread(cpus))
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()  # as seen from the model thread, which runs the model
        self.path = path
        self.device = torch.device(device)
        self.shape = read_shape(path, DTYPES[dtype] if isinstance(dtype, str) else dtype)
        self.model = load_model(path, self.shape.dtype, self.device, load_format)
        self.arena: KVArena | None = None
        # on a GPU, computed layers leave for pinned host memory on their own stream
        self.offload = LayerOffload(self.device) if self.device.type == "cuda" else None

    def kv_buffer(self, new_tokens: int, past=None, pending: int = 0) -> "PrefillKV":
        """A request's KV, preallocated for ``past`` (a KV tensor or a sequence of blocks, wire
        layout, copied in), ``pending`` past positions a loader will fill, and ``new_tokens``; from
        ``arena`` when one is set (the service then ``release``s it)."""
        return PrefillKV.with_past(self.shape, new_tokens, past, pending, arena=self.arena, offload=self.offload)

    def prefill(self, token_ids: list[int], past_kv=None, chunk: int = 512, *, buffer: "PrefillKV | None" = None,
                scores: "PromptScores | None" = None):
        """Run the prompt (after the past's positions) and return (last logits, full KV).

        The past is ``past_kv`` (a KV tensor or a sequence of blocks in the wire layout covering
        the first positions of the prompt) or ``buffer`` (a ``PrefillKV`` whose past may still be
        arriving: each layer waits for its own). ``token_ids`` are the remaining tokens. Long
        suffixes run in chunks of ``chunk`` tokens. The returned KV is the buffer the layers wrote
        into: nothing is concatenated or copied at the end. ``scores`` (a prompt whose logprobs are
        asked for) takes the logits of every position computed, chunk by chunk.
        """
        for out in self.prefill_steps(token_ids, past_kv, chunk, buffer=buffer, scores=scores):
            pass
        return out

    @torch.inference_mode()
    def prefill_steps(self, token_ids: list[int], past_kv=None, chunk: int = 512, *,
                      buffer: "PrefillKV | None" = None, scores: "PromptScores | None" = None):
        """``prefill`` one chunk at a time: a generator that runs a chunk per ``next``, yields None
        after each chunk but the last, then (last logits, full KV). A colocated worker runs each
        chunk as its own job on the model thread, so its decode steps go between them."""
        from transformers import DynamicCache

        if not token_ids:
            raise ValueError("prefill needs at least one new token")
        # a caller that passes no buffer keeps the KV: it is not taken from the arena
        buf = buffer if buffer is not None else PrefillKV.with_past(self.shape, len(token_ids), past_kv,
                                                                    offload=self.offload)
        if buf.total != buf.past_len + len(token_ids):
            raise ValueError(f"buffer holds {buf.total} positions, not {buf.past_len} + {len(token_ids)}")
        cache = DynamicCache()
        cache.layers = [PrefillLayer(buf, i) for i in range(self.shape.num_layers)]
        start = buf.past_len
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        try:
            for off in range(0, len(token_ids), chunk):
                if off:
                    yield None
                piece = ids[:, off : off + chunk]
                pos = torch.arange(start + off, start + off + piece.shape[1], device=self.device).unsqueeze(0)
                out = self.model(
                    input_ids=piece,
                    position_ids=pos,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=0 if scores is not None else 1,  # 0: every position's
                )
                if scores is not None:
                    scores.add(out.logits[0], start + off)
                logits = out.logits[0, -1]
            buf.wait_offloaded()  # on a GPU: every layer is in host memory when this returns
        finally:
            buf.drop_device()
        yield logits.float().cpu(), buf.kv

    def new_batch(self) -> "DecodeBatch":
        """An empty running batch for a decode instance."""
        return DecodeBatch(self)
