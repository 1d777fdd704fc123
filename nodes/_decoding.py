"""What every source that decodes device bytes shares: malformed input counted by kind and
dead-lettered, and the up/down record of its device link."""

from __future__ import annotations

from typing import Any

from firmware_bridges import RawReading
from gateway.api import Event, Source

__all__ = ["DecodingSource", "DeviceHealth", "to_events"]


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


class DeviceHealth:
    """A device link's state for ``health()``: up/down with the reason, since when, how often lost."""

    def __init__(self, what: str):
        self.what = what
        self.state = "starting"
        self.reason: str | None = None
        self.since = 0.0
        self.losses = 0
        self.next_retry: float | None = None

    def up(self, now: float) -> None:
        self.state, self.reason, self.since, self.next_retry = "up", None, now, None

    def down(self, now: float, reason: str, retry_in: float) -> None:
        if self.state != "down":
            self.since = now
            if self.state == "up":
                self.losses += 1
        self.state, self.reason, self.next_retry = "down", reason, retry_in

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"state": self.state, "device": self.what, "since": self.since, "losses": self.losses}
        if self.reason:
            d["reason"] = self.reason
        if self.next_retry is not None:
            d["retry_in"] = round(self.next_retry, 3)
        return d
