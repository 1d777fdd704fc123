"""A sink that never finishes a write, for lifecycle tests of `sluice run` (imported before the CLI runs)."""

from __future__ import annotations

import asyncio
from typing import Literal

from gateway.events import Event
from gateway.node import NodeOptions, Sink, register


class StuckOptions(NodeOptions):
    type: Literal["t_stuck"]


@register
class Stuck(Sink):
    """Takes a batch and waits forever, like a sink whose device stopped answering."""

    Options = StuckOptions

    async def write(self, batch: list[Event]) -> None:
        await asyncio.Event().wait()
