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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from yuebing.libs.costs import fit


class HandOffModel:
    """tail(tokens) = fixed + per_token * tokens: seconds from a prompt's first token to its
    instance being free, fitted on a window of done reports (0 until any arrive)."""

    MIN_SAMPLES = 8

    def __init__(self, window: int = 256):
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self.coef = (0.0, 0.0)
        self.fits = 0

    def seconds(self, tokens: int) -> float:
        fixed, per_token = self.coef
        return fixed + per_token * max(0, tokens)

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds < 0:
            return
        self._samples.append((tokens, seconds))
        if len(self._samples) >= self.MIN_SAMPLES:
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


@dataclass
class _Task:
    compute: float  # predicted seconds of the prompt's own compute (its pool load included)
    tokens: int  # positions of KV it will hand off
    started_at: float | None = None  # when the instance took it up (None: still waiting, or unknown)
    first_token_at: float | None = None


class PrefillQueues:
    """Per prefill instance, the tasks placed there and not yet done, and what they will take.

    ``placed`` when the conductor sends a task; ``first_token`` when the instance reports the prompt
    computed (its compute is behind it, its hand-off not yet); ``done`` when the instance is free of
    it (handed off, finished at the first token, or failed). A task whose done report never comes
    (lost, or an instance that sends none) is forgotten ``lost_after`` seconds past its first token.
    """

    def __init__(self, handoff: HandOffModel | None = None, lost_after: float = 60.0):
        self.handoff = handoff or HandOffModel()
        self.lost_after = lost_after
        self._tasks: dict[str, dict[str, _Task]] = {}

    def placed(self, instance_id: str, request_id: str, compute_seconds: float, tokens: int,
               now: float | None = None) -> None:
        """A task sent to the instance at ``now`` (None: its start is not tracked, its whole
        compute counts until its first token)."""
        tasks = self._tasks.setdefault(instance_id, {})
        idle = not tasks
        tasks[request_id] = _Task(max(0.0, compute_seconds), tokens, started_at=now if idle else None)

    def first_token(self, instance_id: str, request_id: str, now: float) -> None:
        task = self._tasks.get(instance_id, {}).get(request_id)
        if task is not None:
            task.first_token_at = now

    def done(self, instance_id: str, request_id: str, tokens: int, tail_seconds: float,
             now: float | None = None) -> None:
        """The instance is free of the task at ``now``; ``tokens`` > 0 when it handed off that many
        positions in ``tail_seconds`` after the first token (a sample of the hand-off model)."""
        tasks = self._tasks.get(instance_id)
        if tasks is not None and tasks.pop(request_id, None) is not None and now is not None:
            head = next(iter(tasks.values()), None)  # the instance takes up the next one now
            if head is not None and head.started_at is None and head.first_token_at is None:
                head.started_at = now
        if tokens > 0:
            self.handoff.observe(tokens, tail_seconds)

    def seconds(self, instance_id: str, now: float) -> float:
        """Predicted seconds until the instance starts a prompt placed now."""
        total = 0.0
        for task in self._tasks.get(instance_id, {}).values():
            tail = self.handoff.seconds(task.tokens)
            if task.first_token_at is None:
                left = task.compute if task.started_at is None else max(0.0, task.compute - (now - task.started_at))
                total += left + tail
            else:  # computed: what is left of its hand-off
                total += max(0.0, tail - (now - task.first_token_at))
        return total

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
