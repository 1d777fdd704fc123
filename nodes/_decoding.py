"""What every source that decodes device bytes shares: malformed input counted by kind and dead-lettered."""

from __future__ import annotations

from firmware_bridges import RawReading
from gateway.events import Event
from gateway.node import Source

__all__ = ["DecodingSource", "to_events"]


def to_events(readings: list[RawReading], now: float, source: str) -> list[Event]:
    """Decoded ``(key, value, ts)`` readings as events; ``now`` stands in where the device sent no time."""
    return [Event(key, now if ts is None else ts, value, source) for key, value, ts in readings]


class DecodingSource(Source):
    """A source whose rejected input is counted as ``malformed`` and ``malformed_<kind>``."""

    def __init__(self, options: object, ctx: object):
        super().__init__(options, ctx)  # type: ignore[arg-type]
        self.n_malformed = 0
        self.by_kind: dict[str, int] = {}

    def counters(self) -> dict[str, int]:
        c = super().counters()
        c["malformed"] = self.n_malformed
        for kind, n in self.by_kind.items():
            c[f"malformed_{kind}"] = n
        return c

    def _reject(self, where: str, kind: str, reason: str, raw: bytes) -> None:
        """Count one rejected piece of input and dead-letter it as ``<where>: <reason>``."""
        self.n_malformed += 1
        self.n_errors += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        self.ctx.dead_letters.record(self.ctx.pipeline, self.id, f"{where}: {reason}", None, raw)
