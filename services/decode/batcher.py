"""Sequence bookkeeping for continuous batching. Plain logic: no NATS, no model.

A free row goes to the waiting sequence whose TBT it matters most to: one whose every gap counts
in its TBT (nine gaps or fewer, ``libs.metrics.largest_gap_counts``) before one whose wait for a
row falls outside its 90th percentile, and first come, first served within each. Beyond its
``max_running`` rows the batch has ``urgent_rows`` that only urgent sequences take, so a short
request arriving just after a row went to a long one does not wait out that one's whole stay.
The engine takes up every task sent to it as soon as its KV is in hand (a task left on the bus
cannot be chosen), so a short request arriving behind long ones is here to take the next row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from libs.metrics import largest_gap_counts
from libs.protocol import SamplingParams
from libs.worker import finish_reason


@dataclass
class Sequence:
    attempt_id: str
    params: SamplingParams
    prompt_len: int
    output: list[int]  # every output token so far, including the one from prefill
    kv: Any = None  # the KV to join with (wire layout); dropped once joined
    handle: Any = None  # the task message to ack when finished (its group's last one, for a fork)
    finish: str | None = None
    output_id: str = ""  # where the client listens (the request id, or the original one of a resumed request)
    seq_base: int = 0  # token events the client had before this attempt
    joined_at: float = 0.0  # when it was admitted here (monotonic)
    kv_wait: float = 0.0  # seconds from its task being taken up here to its KV in hand
    row_at: float = 0.0  # when it got a row of the running batch (0: still waiting)
    initial_outputs: int = 0  # output tokens it came with (made by prefill, or before a resume)
    # kept only for a request with penalties (libs/engine/sampling.py): its prompt, and the output
    # tokens streamed before a resume (the tail of this attempt's prompt)
    prompt: list[int] = field(default_factory=list)
    earlier_outputs: list[int] = field(default_factory=list)
    index: int = 0  # the request's choice it makes (n > 1)
    group: "Group | None" = None  # the forks of one decode task (n > 1), which share its message and KV
    kv_key: str = ""  # the received KV buffer it holds a share of, until it joins or leaves
    constraint: Any = None  # a structured output's place in its grammar (libs/engine/grammar.py)
    chain: Any = None  # its blocks' way back to the pool (services/decode/writeback.py); None: not written
    urgent: bool = field(init=False)  # its wait for a row is a gap its TBT counts (ten tokens or fewer)

    def __post_init__(self) -> None:
        self.urgent = largest_gap_counts(self.params.max_tokens)

    def penalty_history(self) -> tuple[list[int], list[int]]:
        """(prompt, output so far) as the penalties see them; empty without penalties."""
        if not self.params.penalized:
            return [], []
        return self.prompt, self.earlier_outputs + self.output

    @property
    def next_seq(self) -> int:
        """Sequence number of the next token event (one event per token)."""
        return self.seq_base + len(self.output)


@dataclass
class Group:
    """The sequences one decode task forked into (a request with n > 1): they share the task's
    message, acked once the last of them is finished, and the KV received once, which each
    copies into its own row."""

    attempt_id: str
    ids: dict[int, str]  # choice index -> its sequence id
    live: set[str] = field(default_factory=set)  # the sequences not finished

    def __post_init__(self) -> None:
        self.live = set(self.ids.values())

    def sequences(self, abort_id: str) -> list[str] | None:
        """The live sequences an abort of ``abort_id`` ends: all of them for the task's attempt id,
        one fork's for ``<attempt>#<choice>`` (a client that has all of that choice); None if
        neither names this group."""
        if abort_id == self.attempt_id:
            return sorted(self.live)
        base, _, index = abort_id.rpartition("#")
        if base == self.attempt_id and index.isdigit() and self.ids.get(int(index)) in self.live:
            return [self.ids[int(index)]]
        return None

    def leave(self, seq_id: str) -> bool:
        """``seq_id`` is finished; whether it was the group's last."""
        self.live.discard(seq_id)
        return not self.live


def fork_ids(attempt_id: str, indices: list[int]) -> list[str]:
    """The sequence id of each fork of a decode task: the attempt's own for the first (the one the
    conductor admitted and follows), ``<attempt>#<choice>`` for the others."""
    return [attempt_id if k == 0 else f"{attempt_id}#{i}" for k, i in enumerate(indices)]


@dataclass
class StepPlan:
    joins: list[Sequence] = field(default_factory=list)
    leaves: set[str] = field(default_factory=set)
    rows: list[Sequence] = field(default_factory=list)  # batch order after joins/leaves


class Batcher:
    """Decides, between steps, who joins and who leaves the running batch."""

    def __init__(self, max_running: int, eos_ids: tuple[int, ...], urgent_rows: int = 0):
        self.max_running = max_running
        self.urgent_rows = urgent_rows
        self.eos_ids = eos_ids
        self.waiting: list[Sequence] = []
        self.running: dict[str, Sequence] = {}  # in batch row order
        self._leaving: set[str] = set()

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def submit(self, seq: Sequence) -> None:
        """Queue it for a row: after the waiting sequences of its own kind, ahead of those that
        are not urgent when it is (the queue is kept in the order rows go out)."""
        if seq.urgent:
            at = next((i for i, s in enumerate(self.waiting) if not s.urgent), len(self.waiting))
            self.waiting.insert(at, seq)
        else:
            self.waiting.append(seq)

    def abort(self, attempt_id: str) -> Sequence | None:
        for i, s in enumerate(self.waiting):
            if s.attempt_id == attempt_id:
                s.finish = "abort"
                return self.waiting.pop(i)
        seq = self.running.get(attempt_id)
        if seq is not None and seq.finish is None:
            seq.finish = "abort"
            self._leaving.add(attempt_id)
        return seq

    def plan(self) -> StepPlan:
        """Joins and leaves to apply before the next step, and the resulting row order."""
        leaves = self._leaving
        self._leaving = set()
        for rid in leaves:
            self.running.pop(rid, None)
        # the queue is in the order rows go out (urgent ones first, which may take the urgent rows
        # too), so those that join are its head
        n = 0
        for s in self.waiting:
            if len(self.running) >= self.max_running + (self.urgent_rows if s.urgent else 0):
                break
            self.running[s.attempt_id] = s
            n += 1
        joins, self.waiting = self.waiting[:n], self.waiting[n:]
        return StepPlan(joins=joins, leaves=leaves, rows=list(self.running.values()))

    def record(self, rows: list[Sequence], tokens: list[int]) -> list[Sequence]:
        """Append each row's new token; returns the sequences that finished with it."""
        finished = []
        for seq, tok in zip(rows, tokens):
            if seq.finish is not None:  # aborted while the step ran
                continue
            seq.output.append(tok)
            reason = finish_reason(tok, len(seq.output), seq.params, self.eos_ids)
            if reason is not None:
                seq.finish = reason
                self._leaving.add(seq.attempt_id)
                finished.append(seq)
        return finished
