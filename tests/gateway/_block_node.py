"""A sink that blocks the event loop on demand, for the systemd watchdog test (imported before the CLI runs).

When the file named by ``$SLUICE_TEST_BLOCK_ARM`` exists, the next batch blocks the whole loop (a
plain ``time.sleep`` loop, as a buggy node would) until ``$SLUICE_TEST_BLOCK_RELEASE`` exists.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

from gateway.events import Event
from gateway.node import NodeOptions, Sink, register


class BlockOptions(NodeOptions):
    type: Literal["t_block"]


def _hold_the_loop() -> bool:
    """Called on the event loop: blocks it (as a buggy node would) while armed and not released."""
    arm = Path(os.environ["SLUICE_TEST_BLOCK_ARM"])
    if not arm.exists():
        return False
    Path(str(arm) + ".blocked").touch()
    release = Path(os.environ["SLUICE_TEST_BLOCK_RELEASE"])
    deadline = time.monotonic() + 60
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


@register
class Block(Sink):
    Options = BlockOptions
    done = False

    async def write(self, batch: list[Event]) -> None:
        if not self.done:
            self.done = _hold_the_loop()
