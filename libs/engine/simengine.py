"""A simulated engine: the model's shapes and KV bytes, with compute replaced by sleeping.

``SimRunner`` and ``SimDecodeBatch`` are drop-ins for ``ModelRunner`` and ``DecodeBatch`` as the
prefill and decode services use them. They load no weights and multiply no matrices: a call
produces tensors of the real shapes and dtype (KV of the real size, so the bus and the pool carry
real bytes), then sleeps until it has taken the time a ``CostProfile`` calibrated on the real
model predicts, scattered as the real engine's times were around it when it was calibrated
(``libs.engine.costnoise``; seeded, so a run can be repeated). Many instances then fit on a small machine for scheduling experiments.

Output is deterministic and the same on every path: the token after position ``p`` holding token
``t`` is ``next_word(t, p)``, a word token picked by a hash of ``(t, p)`` from a fixed list of
ordinary English words of the model's tokenizer (never EOS or a special token). A prefill emits
``next_word(last prompt token, prompt_len - 1)``; a decode step feeding token ``t`` at position
``p`` emits ``next_word(t, p)``. So a request's text depends only on its prompt's last token and
length, and is identical cold, with a cached prefix, after the prefill-to-decode hand-off, in any
batch, and when a request is resumed elsewhere. Sim requests never stop on EOS: they run to
``max_tokens`` (or a stop string/token that happens to match).

KV filler: positions computed by a sim prefill are zeros except one marker per position (layer 0,
K, head 0, dim 0 holds the token id as a float), so a block's bytes depend on its tokens.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from libs.engine.costnoise import CostNoise
from libs.engine.costs import CostProfile
from libs.engine.arena import KVArena
from libs.engine.loading import read_shape
from libs.engine.logprobs import PromptScores
from libs.engine.prefill_kv import PrefillKV

# Common English words; those the tokenizer encodes (with a leading space) as one ordinary token
# make up the sim's vocabulary.
WORDS = (
    "the of and to in is that it was for on are as with his they at be this from have or by one had "
    "not but what all were when we there can an your which their said if do will each about how up out "
    "them then she many some so these would other into has more her two like him see time could no make "
    "than first been its who now people my made over did down only way find use may water long little "
    "very after words called just where most know get through back much before go good new write our "
    "used me man too any day same right look think also around another came come work three word must "
    "because does part even place well such here take why things help put years different away again "
    "off went old number great tell men say small every found still between name should home big give "
    "air line set own under read last never us left end along while might next sound below saw something "
    "thought both few those always looked show large often together asked house world going want school "
    "important until form food keep children feet land side without boy once animals life enough took "
    "sometimes four head above kind began almost live page got earth need far hand high year mother light "
    "parts country father let night following picture being study second eyes soon times story boys since "
    "white days ever paper hard near sentence better best across during today others however sure means "
    "knew try told young miles sun ways thing whole hear example heard several change answer room sea "
    "against top turned learn point city play toward five using himself usually money seen car morning "
    "river garden music table window door book friend green blue red tree stone cloud rain"
).split()

LOGIT_HIGH = 10.0
LOGIT_LOW = -1e4  # far enough below that sampling at any sane temperature picks the high one
SCORE_ROWS = 64  # positions whose logits a prompt-logprobs prefill makes at once


def _mix(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread 64-bit hash of an int."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def word_token_ids(path: Path) -> list[int]:
    """Ids of ordinary one-token English words (with a leading space) in the model's tokenizer
    (its tokenizer.json, read by the tokenizers library: no transformers in a simulated process)."""
    import json

    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    tok = Tokenizer.from_file(str(file))
    special = {t["id"] for t in json.loads(file.read_text()).get("added_tokens", []) if t.get("special")}
    special.update(read_shape(path).eos_token_ids)
    ids: list[int] = []
    for w in WORDS:
        enc = tok.encode(" " + w, add_special_tokens=False).ids
        if len(enc) == 1 and enc[0] not in special and enc[0] not in ids and tok.decode(enc).strip():
            ids.append(enc[0])
    if not ids:
        raise ValueError(f"the tokenizer of {path} encodes none of the sim's words as one token")
    return ids


def _sleep_until(deadline: float) -> None:
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        time.sleep(left)


class SimRunner:
    """Stands in for ``ModelRunner``: same ``shape``, ``path``, ``prefill`` and ``new_batch``."""

    def __init__(self, path: Path, profile: CostProfile, dtype: torch.dtype = torch.float32, *,
                 noise: CostNoise | None = None, instance: str = ""):
        torch.set_num_threads(1)  # the sim only fills tensors: leave the cores to the other instances
        self.path = Path(path)
        self.profile = profile
        # each call's time: the profile's prediction times a seeded draw of the real engine's
        # measured scatter around it (none without ``noise``)
        self.noise = noise
        self.instance = instance
        self.steps = 0  # decode steps taken by this instance's batches (the key of their draws)
        self.modelled_seconds = 0.0  # compute time the last call modelled
        self.device = torch.device("cpu")
        self.shape = read_shape(self.path, dtype)
        self.arena: KVArena | None = None  # as ``ModelRunner.arena``
        self.words = word_token_ids(self.path)
        self.eos = set(self.shape.eos_token_ids)
        self.words = [w for w in self.words if w not in self.eos and w < self.shape.vocab_size]

    def next_word(self, token: int, position: int) -> int:
        """The token the sim emits after ``token`` at ``position``."""
        return self.words[_mix((int(token) << 24) ^ int(position)) % len(self.words)]

    def logits_for(self, tokens: list[int]) -> torch.Tensor:
        """Float32 logits [len(tokens), vocab] whose row argmax is ``tokens[row]``."""
        out = torch.full((len(tokens), self.shape.vocab_size), LOGIT_LOW, dtype=torch.float32)
        if tokens:
            out[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)] = LOGIT_HIGH
        return out

    def hold(self, start: float, seconds: float) -> None:
        """Make the call that began at ``start`` (``time.perf_counter()``) last ``seconds``, the
        compute time it models (kept in ``modelled_seconds``)."""
        self.modelled_seconds = seconds
        _sleep_until(start + seconds)

    def kv_buffer(self, new_tokens: int, past=None, pending: int = 0) -> PrefillKV:
        return PrefillKV.with_past(self.shape, new_tokens, past, pending, arena=self.arena)

    def prefill(self, token_ids: list[int], past_kv=None, chunk: int = 512, *, buffer: PrefillKV | None = None,
                scores: PromptScores | None = None):
        """As ``ModelRunner.prefill``: (logits [vocab] float32, KV [L, 2, H, past + new, D])."""
        for out in self.prefill_steps(token_ids, past_kv, chunk, buffer=buffer, scores=scores):
            pass
        return out

    @torch.inference_mode()
    def prefill_steps(self, token_ids: list[int], past_kv=None, chunk: int = 512, *,
                      buffer: PrefillKV | None = None, scores: PromptScores | None = None):
        """As ``ModelRunner.prefill_steps``: a chunk per ``next``, each taking the profile's time of
        that chunk after everything before it (``modelled_seconds`` adds them up). ``scores`` gets
        every position's logits, the same pattern as the emitted token's: position ``p`` holding
        token ``t`` puts ``LOGIT_HIGH`` on ``next_word(t, p)``."""
        if not token_ids:
            raise ValueError("prefill needs at least one new token")
        # a caller that passes no buffer keeps the KV: it is not taken from the arena
        buf = buffer if buffer is not None else PrefillKV.with_past(self.shape, len(token_ids), past_kv)
        kv, past, total = buf.kv, buf.past_len, buf.total
        kv[:, :, :, past:].zero_()  # the new positions only: a loader may still be filling the past
        kv[0, 0, 0, past:, 0] = torch.tensor(token_ids, dtype=torch.float32).to(kv.dtype)
        logits = self.logits_for([self.next_word(token_ids[-1], total - 1)])[0]
        # The layers run one after another over the modelled time, as a real forward's do, and
        # layer i starts only once its past is in: time spent waiting for a load is added, not
        # hidden, so the compute time reported (the call's time less those waits) is the model's.
        # A layer is complete (sendable) once the last chunk has passed it.
        layers = self.shape.num_layers
        modelled = 0.0
        for off in range(0, len(token_ids), chunk):
            if off:
                yield None
            piece = token_ids[off : off + chunk]
            if scores is not None:
                for at in range(0, len(piece), SCORE_ROWS):  # a few MB of logits at a time
                    rows = piece[at : at + SCORE_ROWS]
                    first = past + off + at
                    scores.add(self.logits_for([self.next_word(t, first + i) for i, t in enumerate(rows)]), first)
            seconds = self.profile.prefill_seconds(past + off + len(piece), past + off)
            if self.noise is not None:
                seconds *= self.noise.prefill_factor(piece, past + off)
            modelled += seconds
            last = off + chunk >= len(token_ids)
            end = time.perf_counter()
            for i in range(layers):
                waited = buf.waited
                buf.wait_layer(i)
                if buf.waited > waited:
                    end = max(end, time.perf_counter())
                end += seconds / layers
                _sleep_until(end)
                if last:
                    buf.layer_computed(i)
        self.modelled_seconds = modelled
        yield logits, kv

    def new_batch(self) -> "SimDecodeBatch":
        return SimDecodeBatch(self)


class SimDecodeBatch:
    """Stands in for ``DecodeBatch``: the same row bookkeeping (rows in ``ids`` order, joins
    appended, a leave moves the last row into the freed one), lengths only, no KV kept."""

    def __init__(self, runner: SimRunner):
        self.runner = runner
        self.ids: list[str] = []
        self.lengths: list[int] = []  # KV positions held per row

    def __len__(self) -> int:
        return len(self.ids)

    def kv_tokens(self) -> int:
        return sum(self.lengths)

    def add(self, seq_id: str, kv: torch.Tensor) -> None:
        """Join a sequence whose KV (wire layout) covers ``kv.shape[3]`` positions; the tensor is
        not kept."""
        self.ids.append(seq_id)
        self.lengths.append(int(kv.shape[3]))

    def block_kv(self, seq_id: str, start: int, end: int) -> torch.Tensor:
        """As ``DecodeBatch.block_kv``: KV of the model's shape and dtype (zeros: none is kept)."""
        r = self.ids.index(seq_id)
        if not 0 <= start <= end <= self.lengths[r]:
            raise ValueError(f"positions [{start}, {end}) are not all held (row of {self.lengths[r]})")
        shape = self.runner.shape
        return torch.zeros(shape.kv_dims(end - start), dtype=shape.dtype)

    def remove(self, seq_ids: set[str]) -> None:
        """Leave, exactly as ``DecodeBatch.remove`` reorders rows: each freed row is filled by
        moving the last row into it."""
        for sid in [s for s in self.ids if s in seq_ids]:
            r = self.ids.index(sid)
            last = len(self.ids) - 1
            if r != last:
                self.ids[r], self.lengths[r] = self.ids[last], self.lengths[last]
            self.ids.pop()
            self.lengths.pop()

    def step(self, last_tokens: list[int]) -> torch.Tensor:
        """Feed each row's newest token; returns float32 logits [B, vocab] and takes the
        profile's step time."""
        start = time.perf_counter()
        b = len(self.ids)
        if len(last_tokens) != b:
            raise ValueError(f"step got {len(last_tokens)} tokens for {b} rows")
        runner = self.runner
        duration = runner.profile.step_seconds(b, self.kv_tokens())
        if runner.noise is not None:
            duration *= runner.noise.step_factor(runner.instance, runner.steps)
        runner.steps += 1
        nxt = [self.runner.next_word(t, n) for t, n in zip(last_tokens, self.lengths)]
        logits = self.runner.logits_for(nxt)
        self.lengths = [n + 1 for n in self.lengths]
        self.runner.hold(start, duration)
        return logits
