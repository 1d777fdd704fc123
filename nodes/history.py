"""The ``history`` sink: keeps a downsampled per-key history of readings for charts and ``/api/history``."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from gateway.api import Event, NodeOptions, Sink, SluiceError, register

__all__ = ["HistorySink"]


class HistoryOptions(NodeOptions):
    type: Literal["history"]
    field: str | None = Field(
        None,
        description="For object readings: the field to keep (under the event key); "
        "default: every number field, as <key>.<field>.",
    )


@register
class HistorySink(Sink):
    """Record readings in the gateway's history (1 s / 1 min / 1 h tiers in ``state.db``).

    A number is kept under the event key; an object reading keeps ``field`` under the event key,
    or else each of its number fields as ``<key>.<field>``. Anything else is dead-lettered.
    """

    Options = HistoryOptions
    options: HistoryOptions

    def __init__(self, options: HistoryOptions, ctx: Any):
        super().__init__(options, ctx)
        self._history: Any = None

    async def start(self) -> None:
        self._history = getattr(self.ctx.services, "history", None)
        if self._history is None:
            raise SluiceError(f"history {self.id}: no history store (it runs inside a gateway)")

    async def write(self, batch: list[Event]) -> None:
        h = self._history
        field = self.options.field
        for ev in batch:
            v = ev.value
            if field is not None:
                v = v.get(field) if type(v) is dict else None
                if not _number(v):
                    self.fail(ev, TypeError(f"history {self.id}: reading has no number field {field!r}"))
                    continue
                h.add(ev.key, ev.ts, float(v))
            elif _number(v):
                h.add(ev.key, ev.ts, float(v))
            elif type(v) is dict and any(_number(x) for x in v.values()):
                for name, x in v.items():
                    if _number(x):
                        h.add(f"{ev.key}.{name}", ev.ts, float(x))
            else:
                self.fail(ev, TypeError(f"history {self.id}: needs a number or an object with numbers, got {v!r:.60}"))
        h.maybe_flush()

    async def close(self) -> None:
        if self._history is not None:
            self._history.flush()


def _number(v: Any) -> bool:
    return type(v) in (float, int) and math.isfinite(v)
