"""The event model: one reading flowing through a pipeline, and the micro-batch that carries it."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["Event"]


class Event(msgspec.Struct):
    """One reading.

    ``value`` is a float or a mapping of field name to value; numbers are floats so that
    expressions never trip over int/double mixing. ``ts`` is event time (epoch seconds) from
    the payload when present, else ingest time. ``meta`` holds transport details (topic,
    ingest time, priority …) and may be ``None`` to keep the hot path allocation-free. It may be
    shared — by the readings of one MQTT topic, by a map's output and its input — so a node
    that changes it makes a new mapping (``{**event.meta, "late": True}``), never writes into it.

    A ``msgspec.Struct``, built in C (a pipeline makes one or more per reading; a slotted
    dataclass's generated ``__init__`` cost more), that behaves as the dataclass it replaced:
    the same positional and keyword arguments and defaults, no type checks when built, equality
    by type and fields, mutable, unhashable, the same repr.
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
