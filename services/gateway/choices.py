"""The choices of one request as the gateway receives them. Plain logic, no I/O.

A request with ``n`` choices is one attempt at first: one prefill computes the prompt once and
samples ``n`` first tokens, one decode instance forks its KV into ``n`` rows. Each choice's token
events are numbered on their own (``TokenEvent.index``, ``seq``) and put in order here. When the
attempt fails (a worker hands a choice back, or its decode instance is lost), each unfinished choice
is resumed alone, as a request of one choice whose prompt is the prompt and that choice's output so
far, with the choice's own seed: a choice then has an attempt of its own, resumed alone again if
that one fails too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from msgspec.structs import replace

from libs.protocol import SamplingParams, TokenEvent


@dataclass
class Choice:
    index: int
    attempt: str  # the attempt serving it now
    got: list[int] = field(default_factory=list)  # its output tokens received
    expected: int = 0  # the seq of its next event
    base: int = 0  # the seq its attempt started from
    early: dict[int, TokenEvent] = field(default_factory=dict)
    done: bool = False  # nothing more of it is wanted
    ended: bool = False  # its worker has finished it (or been told to)
    tries: int = 1  # attempts at it so far


class Choices:
    def __init__(self, output_id: str, n: int):
        self.output_id = output_id
        self.n = n
        self.all = [Choice(i, output_id) for i in range(n)]
        self.decode: dict[str, str] = {}  # attempt with a choice its worker has not ended -> its decode instance

    def placed(self, attempt: str, decode_id: str) -> None:
        self.decode[attempt] = decode_id

    @property
    def done(self) -> bool:
        return all(c.done for c in self.all)

    def accept(self, ev: TokenEvent) -> tuple[list[TokenEvent], str | None]:
        """The events of ``ev``'s choice now in order (``ev`` and those it lets through), and the
        attempt that failed when one of them hands the choice back (``retry``: nothing after it is
        taken). Duplicates, events of finished choices and stale hand-backs are dropped."""
        if not 0 <= ev.index < self.n:
            return [], None
        c = self.all[ev.index]
        if c.done or ev.seq < c.expected:
            return [], None
        if ev.retry and ev.seq == c.base and c.tries > 1:
            # the attempt before handing the choice back (its others' failure resumed it already):
            # an attempt's own hand-backs come after its first token
            return [], None
        c.early[ev.seq] = ev
        out: list[TokenEvent] = []
        while c.expected in c.early:
            e = c.early.pop(c.expected)
            if e.retry:
                return out, c.attempt
            c.expected += 1
            c.got.extend(e.token_ids)
            out.append(e)
            if e.finish_reason is not None:
                c.done = c.ended = True
                c.early.clear()
                self._settle(c.attempt)
                break
        return out, None

    def _settle(self, attempt: str) -> None:
        if not any(o.attempt == attempt and not o.ended for o in self.all):
            self.decode.pop(attempt, None)

    def finish(self, index: int) -> str | None:
        """The client has all of choice ``index`` (a stop string ended it before its worker did):
        the id to abort it by on the workers (its attempt's, or ``<attempt>#<index>`` while the
        attempt serves other choices), None when its worker has ended it already."""
        c = self.all[index]
        c.done = True
        if c.ended:
            return None
        c.ended = True
        shared = any(o.attempt == c.attempt and not o.ended for o in self.all)
        self._settle(c.attempt)
        return f"{c.attempt}#{index}" if shared else c.attempt

    def failed(self, attempt: str) -> list[Choice]:
        """``attempt`` failed: the choices to resume (those it served that are not done)."""
        self.decode.pop(attempt, None)
        return [c for c in self.all if c.attempt == attempt and not c.done]

    def moved(self, c: Choice, attempt: str, decode_id: str) -> None:
        """``c`` goes on as ``attempt``, placed on ``decode_id``."""
        c.attempt, c.base, c.tries = attempt, c.expected, c.tries + 1
        c.early.clear()
        self.decode[attempt] = decode_id


def resume_id(output_id: str, c: Choice, n: int) -> str:
    """The id of the next attempt at ``c`` (``<request>.a<k>``; ``<request>.c<i>.a<k>`` for n > 1)."""
    return f"{output_id}.a{c.tries + 1}" if n == 1 else f"{output_id}.c{c.index}.a{c.tries + 1}"


def resume_sampling(params: SamplingParams, c: Choice) -> SamplingParams:
    """The sampling of ``c`` resumed alone: its own (its seed), the tokens it has left, and the
    prompt's logprobs only while the choice has had no event (they come with its first)."""
    p = params.choice(c.index)
    return replace(p, max_tokens=params.max_tokens - len(c.got),
                   prompt_logprobs=p.prompt_logprobs if c.expected == 0 else None)
