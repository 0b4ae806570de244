"""Placement decisions. Plain logic with no I/O, unit-tested directly."""

from __future__ import annotations

from dataclasses import dataclass

from .registry import Instance


@dataclass(frozen=True)
class Placement:
    admitted: bool
    prefill_id: str = ""
    decode_id: str = ""
    status: int = 200
    reason: str = ""
    retry_after: float = 0.0


class LeastLoaded:
    """Prefill: fewest queued prompt tokens; decode: fewest running + queued sequences."""

    name = "least_loaded"

    @staticmethod
    def prefill_load(i: Instance) -> tuple[int, int, str]:
        b = i.beat
        return (b.queued_tokens + i.placed_tokens_since_beat, b.queued + i.placed_since_beat, i.instance_id)

    @staticmethod
    def decode_load(i: Instance) -> tuple[int, int, str]:
        b = i.beat
        return (b.running + b.queued + i.placed_since_beat, b.kv_tokens, i.instance_id)

    def place(self, prompt_len: int, prefills: list[Instance], decodes: list[Instance]) -> Placement:
        if not prefills or not decodes:
            missing = " and ".join(k for k, v in (("prefill", prefills), ("decode", decodes)) if not v)
            return Placement(False, status=503, reason=f"no {missing} instance is alive", retry_after=2.0)
        p = min(prefills, key=self.prefill_load)
        d = min(decodes, key=self.decode_load)
        p.placed_since_beat += 1
        p.placed_tokens_since_beat += prompt_len
        d.placed_since_beat += 1
        return Placement(True, prefill_id=p.instance_id, decode_id=d.instance_id)
