"""The event model: one reading flowing through a pipeline, and the micro-batch that carries it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Event"]


@dataclass(slots=True)
class Event:
    """One reading.

    ``value`` is a float or a mapping of field name to value; numbers are floats so that
    expressions never trip over int/double mixing. ``ts`` is event time (epoch seconds) from
    the payload when present, else ingest time. ``meta`` holds transport details (topic,
    ingest time, priority …) and may be ``None`` to keep the hot path allocation-free.
    """

    key: str
    ts: float
    value: Any
    source: str = ""
    meta: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "ts": self.ts,
            "value": self.value,
            "source": self.source,
            "meta": self.meta or {},
        }
