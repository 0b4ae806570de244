"""What each prefill instance has to do before a new prompt starts, in predicted seconds. Plain logic, no I/O.

A prompt holds its instance from the moment it starts until its KV has been handed to decode and
its blocks kept, not only until its first token. The first token's report is what the compute cost
model learns from; past it the instance still sends the prompt's KV to a decode instance, which on
a loaded bus takes a good part of the compute time (close to half of it on the simulated 8P+8D
cluster at 3x load), and the next prompt waits for it. Left out, every queue looks shorter than it
is and TTFT predictions fall further behind the more loaded the cluster is, exactly where admission
relies on them.

So a task counts its predicted compute while it waits, and its predicted hand-off tail until the
instance says it is done with it. The tail is fitted on those done reports as a fixed part plus a
part per position of KV handed off.

An instance serves its tasks one at a time in the order they were placed, so the task at the head
started when the one before it was done (or when it was placed on an idle instance); from then on
it counts only what is left of its predicted compute. Counted whole until its first token, a long
prompt near its end kept its instance looking busy for seconds after it was all but free, and new
prompts, its prefix's next turns among them, went to instances with less to reuse.

Between an instance being free and a prompt's first token there is more than the compute: taking
the task off its queue, looking up and loading its prefix, the report's trip back. Each costs tens
of milliseconds, so little for one prompt, but a prompt behind a dozen others waits for a dozen of
them: on the simulated 8P+8D cluster at 4x load such queues ran a second (15 %) longer than their
predicted compute, and the TTFT predictions admission relies on fell behind as the queues grew. So
every task also counts the lag between its start and its first token beyond its predicted compute,
learnt as the mean of that difference over recent tasks (``StartLagModel``).

A task's compute is priced by the cost model as it was when the task was placed. When a refit moves
the model's prices (its first fit above all: until then the prices are a built-in guess, which for
a small model may be twenty times too high), the tasks still waiting are priced again (``reprice``):
left at the old prices, a queue built before the fit kept predicting TTFTs of tens of seconds for
prompts that took milliseconds, and admission, by then trusting the fitted model, rejected them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from libs.engine.costs import Refits, fit


class HandOffModel:
    """tail(tokens) = fixed + per_token * tokens: seconds from a prompt's first token to its
    instance being free, fitted on a window of done reports (0 until any arrive)."""

    MIN_SAMPLES = 8

    def __init__(self, window: int = 256):
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self.coef = (0.0, 0.0)
        self.fits = 0
        self._refits = Refits()

    def seconds(self, tokens: int) -> float:
        fixed, per_token = self.coef
        return fixed + per_token * max(0, tokens)

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds < 0:
            return
        self._samples.append((tokens, seconds))
        if len(self._samples) >= self.MIN_SAMPLES:
            if self._refits.due(len(self._samples)):
                self._fit()
        else:  # a first estimate: the mean, all of it fixed
            self.coef = (sum(s for _, s in self._samples) / len(self._samples), 0.0)

    def _fit(self) -> None:
        sizes = [t for t, _ in self._samples]
        times = [s for _, s in self._samples]
        if max(sizes) >= 2 * min(sizes):
            fixed, per_token = fit([(1.0, float(t)) for t in sizes], times)
            self.coef = (float(fixed), float(per_token))
        else:  # prompts too alike in length to show a slope
            self.coef = (sorted(times)[len(times) // 2], 0.0)
        self.fits += 1


class StartLagModel:
    """Seconds a prompt's first token comes after its start beyond its predicted compute: the mean
    over the last tasks whose start is known (0 until ``MIN_SAMPLES``). It may be below 0 when the
    compute model runs high; a task never counts less than nothing.

    The window is short (64 tasks: a few seconds of a loaded cluster) because the lag moves with
    the load: when the cores get busy, every prompt computes slower than the compute model, fitted
    on hundreds of earlier prompts, says, and a queue of a dozen adds up a dozen such errors."""

    MIN_SAMPLES = 8

    def __init__(self, window: int = 64):
        self._samples: deque[float] = deque(maxlen=window)
        self.seconds = 0.0

    def observe(self, elapsed: float, predicted: float) -> None:
        """A task started ``elapsed`` seconds before its first token, predicted to compute for ``predicted``."""
        if elapsed < 0:
            return
        self._samples.append(elapsed - predicted)
        if len(self._samples) >= self.MIN_SAMPLES:
            self.seconds = sum(self._samples) / len(self._samples)


@dataclass
class _Task:
    compute: float  # predicted seconds of the prompt's own compute (its pool load included)
    tokens: int  # positions of KV it will hand off
    started_at: float | None = None  # when the instance took it up (None: still waiting, or unknown)
    first_token_at: float | None = None
    reused: int = 0  # prompt positions it reuses rather than computes
    load: float = 0.0  # predicted seconds of the reused prefix's load, under which the compute runs


class PrefillQueues:
    """Per prefill instance, the tasks placed there and not yet done, and what they will take.

    ``placed`` when the conductor sends a task; ``first_token`` when the instance reports the prompt
    computed (its compute is behind it, its hand-off not yet); ``done`` when the instance is free of
    it (handed off, finished at the first token, or failed). A task whose done report never comes
    (lost, or an instance that sends none) is forgotten ``lost_after`` seconds past its first token.
    """

    def __init__(self, handoff: HandOffModel | None = None, lost_after: float = 60.0,
                 lag: StartLagModel | None = None):
        self.handoff = handoff or HandOffModel()
        self.lag = lag or StartLagModel()
        self.lost_after = lost_after
        self._tasks: dict[str, dict[str, _Task]] = {}

    def placed(self, instance_id: str, attempt_id: str, compute_seconds: float, tokens: int,
               now: float | None = None, reused: int = 0, load_seconds: float = 0.0) -> None:
        """A task of a ``tokens``-long prompt reusing ``reused`` positions (loaded in ``load_seconds``)
        sent to the instance at ``now`` (None: its start is not tracked, its whole compute counts
        until its first token)."""
        tasks = self._tasks.setdefault(instance_id, {})
        idle = not tasks
        tasks[attempt_id] = _Task(max(0.0, compute_seconds), tokens, started_at=now if idle else None,
                                  reused=reused, load=max(0.0, load_seconds))

    def reprice(self, prefill_seconds: Callable[[int, int], float]) -> int:
        """Price again the compute of every task not yet computed, with ``prefill_seconds(prompt_len,
        reused)`` (the cost model as now fitted); returns how many were priced."""
        priced = 0
        for tasks in self._tasks.values():
            for task in tasks.values():
                if task.first_token_at is None:
                    task.compute = max(0.0, prefill_seconds(task.tokens, task.reused), task.load)
                    priced += 1
        return priced

    def first_token(self, instance_id: str, attempt_id: str, now: float) -> None:
        task = self._tasks.get(instance_id, {}).get(attempt_id)
        if task is not None and task.first_token_at is None:
            task.first_token_at = now
            if task.started_at is not None:
                self.lag.observe(now - task.started_at, task.compute)

    def done(self, instance_id: str, attempt_id: str, tokens: int, tail_seconds: float,
             now: float | None = None) -> None:
        """The instance is free of the task at ``now``; ``tokens`` > 0 when it handed off that many
        positions in ``tail_seconds`` after the first token (a sample of the hand-off model)."""
        tasks = self._tasks.get(instance_id)
        if tasks is not None and tasks.pop(attempt_id, None) is not None and now is not None:
            head = next(iter(tasks.values()), None)  # the instance takes up the next one now
            if head is not None and head.started_at is None and head.first_token_at is None:
                head.started_at = now
        if tokens > 0:
            self.handoff.observe(tokens, tail_seconds)

    def seconds(self, instance_id: str, now: float) -> float:
        """Predicted seconds until the instance computes a prompt placed now: what the tasks before
        it have left, and the lag of its own start."""
        return self.seconds_of((instance_id,), now)[0]

    def seconds_of(self, instance_ids: Iterable[str], now: float) -> list[float]:
        """``seconds`` of each instance (one call for a decision's every instance)."""
        lag = self.lag.seconds
        idle = max(0.0, lag)
        fixed, per_token = self.handoff.coef
        out = []
        for iid in instance_ids:
            total = idle
            for task in self._tasks.get(iid, {}).values():
                tail = fixed + per_token * max(0, task.tokens)  # (HandOffModel.seconds)
                if task.first_token_at is None:
                    busy = max(0.0, task.compute + lag)
                    left = busy if task.started_at is None else max(0.0, busy - (now - task.started_at))
                    total += left + tail
                else:  # computed: what is left of its hand-off
                    total += max(0.0, tail - (now - task.first_token_at))
            out.append(total)
        return out

    def pending(self, instance_id: str) -> int:
        return len(self._tasks.get(instance_id, {}))

    def drop_instance(self, instance_id: str) -> None:
        self._tasks.pop(instance_id, None)

    def prune(self, now: float) -> int:
        """Forget tasks computed more than ``lost_after`` ago whose done report never came."""
        dropped = 0
        for tasks in self._tasks.values():
            for rid in [r for r, t in tasks.items()
                        if t.first_token_at is not None and now - t.first_token_at > self.lost_after]:
                del tasks[rid]
                dropped += 1
        return dropped
