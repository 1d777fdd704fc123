"""Detector nodes: turn readings into alert events (``threshold``).

An alert event's value is a mapping: ``state`` (``raised`` or ``cleared``), a stable
``alert_key`` (``<pipeline>/<node>/<event key>``), ``severity``, the triggering ``reading``
and a human-readable ``rule`` text, so an alert is meaningful without any model.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from gateway.events import Event
from gateway.node import NodeOptions, Operator, register

__all__ = ["Threshold"]

Severity = Literal["info", "warning", "critical"]


class ThresholdOptions(NodeOptions):
    type: Literal["threshold"]
    above: float | None = Field(None, description="Raise when the reading goes above this.")
    below: float | None = Field(None, description="Raise when the reading goes below this.")
    clear_below: float | None = Field(None, description="With `above`: clear only below this (hysteresis); "
                                                        "default: `above`.")
    clear_above: float | None = Field(None, description="With `below`: clear only above this; default: `below`.")
    field: str | None = Field(None, description="For object readings: the field to test.")
    severity: Severity = "warning"
    name: str | None = Field(None, description="What is measured, for the rule text; default: the key.")

    @model_validator(mode="after")
    def _consistent(self) -> ThresholdOptions:
        if self.above is None and self.below is None:
            raise ValueError("give `above` and/or `below`")
        if self.clear_below is not None and (self.above is None or self.clear_below > self.above):
            raise ValueError("`clear_below` goes with `above` and must not exceed it")
        if self.clear_above is not None and (self.below is None or self.clear_above < self.below):
            raise ValueError("`clear_above` goes with `below` and must not be under it")
        return self


@register
class Threshold(Operator):
    """Raise an alert when a reading crosses a limit; clear it once back past the clear level.

    Only transitions produce events (one ``raised``, later one ``cleared``); readings in between
    pass nothing downstream, so a sensor hovering at the limit cannot cause an alert storm.
    """

    Options = ThresholdOptions
    options: ThresholdOptions

    def __init__(self, options: ThresholdOptions, ctx: Any):
        super().__init__(options, ctx)
        o = options
        self._hi = o.above
        self._hi_clear = o.clear_below if o.clear_below is not None else o.above
        self._lo = o.below
        self._lo_clear = o.clear_above if o.clear_above is not None else o.below
        self._active: dict[str, str] = {}  # key -> "high" | "low"

    def _reading(self, event: Event) -> float:
        v = event.value
        f = self.options.field
        if f is not None:
            if type(v) is not dict or f not in v:
                raise ValueError(f"reading has no field {f!r}")
            v = v[f]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise TypeError(f"threshold needs a finite number, got {v!r}")
        return float(v)

    def _rule(self, key: str, side: str) -> str:
        name = self.options.name or key
        if side == "high":
            extra = f" (clears below {self._hi_clear:g})" if self._hi_clear != self._hi else ""
            return f"{name} above {self._hi:g}{extra}"
        extra = f" (clears above {self._lo_clear:g})" if self._lo_clear != self._lo else ""
        return f"{name} below {self._lo:g}{extra}"

    def _alert(self, event: Event, state: str, side: str, v: float) -> Event:
        return Event(
            event.key,
            event.ts,
            {
                "state": state,
                "alert_key": f"{self.ctx.pipeline}/{self.id}/{event.key}",
                "severity": self.options.severity,
                "reading": v,
                "rule": self._rule(event.key, side),
            },
            self.id,
            event.meta,
        )

    def on_event(self, event: Event) -> Event | None:
        v = self._reading(event)
        key = event.key
        active = self._active.get(key)
        if active is None:
            if self._hi is not None and v > self._hi:
                self._active[key] = "high"
                return self._alert(event, "raised", "high", v)
            if self._lo is not None and v < self._lo:
                self._active[key] = "low"
                return self._alert(event, "raised", "low", v)
            return None
        if (active == "high" and v < self._hi_clear) or (active == "low" and v > self._lo_clear):  # type: ignore[operator]
            del self._active[key]
            return self._alert(event, "cleared", active, v)
        return None

    def snapshot(self) -> Any:
        return dict(self._active)

    def restore(self, state: Any) -> None:
        self._active = dict(state or {})
