"""An example third-party node type: ``clamp`` keeps numeric readings inside ``[low, high]``.

It uses only :mod:`gateway.api`, and Sluice finds it through the ``sluice.nodes`` entry point in
this package's ``pyproject.toml``; nothing in Sluice names it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gateway.api import Event, Metric, NodeOptions, Operator


class ClampOptions(NodeOptions):
    type: Literal["clamp"]
    low: float = Field(description="Readings below this become this.")
    high: float = Field(description="Readings above this become this.")

    @model_validator(mode="after")
    def _ordered(self) -> ClampOptions:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        return self


class Clamp(Operator):
    """Clamp each numeric reading into ``[low, high]``; other values pass unchanged."""

    Options = ClampOptions
    options: ClampOptions

    def __init__(self, options: ClampOptions, ctx: object) -> None:
        super().__init__(options, ctx)  # type: ignore[arg-type]
        self.n_clamped = 0

    def on_event(self, event: Event) -> Event:
        v = event.value
        if isinstance(v, float):
            c = min(max(v, self.options.low), self.options.high)
            if c != v:
                self.n_clamped += 1
                return Event(event.key, event.ts, c, event.source, event.meta)
        return event

    def metrics(self) -> list[Metric]:
        return [Metric("sluice_clamp_clamped", "Readings moved into the range", "counter", self.n_clamped)]
