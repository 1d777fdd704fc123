"""The ingest clock: wall time for readings without a device timestamp, which a clock step cannot move.

Sources stamp a reading that carries no time of its own with *ingest time*. Read straight from the
system clock, an NTP step of −1 h (a Pi without an RTC, after boot) puts every such reading an hour
behind the windows' watermark — late and dropped for the whole hour — and a forward step closes
open windows early. :class:`IngestClock` is the system clock read once, at start, and advanced by
the monotonic clock from then on:

- it never goes back, and it runs at the rate of real time (Linux disciplines ``CLOCK_MONOTONIC``'s
  rate with NTP too, so the two clocks only part when the system clock *steps*);
- a step of the system clock (more than ``step_threshold`` either way) is logged once, with its
  size, and counted; ingest time keeps its course, so windows on ingest time are unaffected
  either way. The difference stays visible (:attr:`IngestClock.offset`, ``/healthz``, ``/metrics``);
- it is re-anchored on the system clock deliberately, at the next start of the gateway, and even
  then never below the ingest time it had already handed out (the floor saved in
  ``<data_dir>/clock``), so a restart after a backward step does not make readings late either.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

__all__ = ["CHECK_INTERVAL", "FLOOR_INTERVAL", "MAX_FUTURE", "IngestClock", "ingest_clock", "max_future_field"]

log = logging.getLogger(__name__)

STEP_THRESHOLD = 1.0
"""Seconds: a larger difference between the system clock and ingest time is a step (NTP steps
only beyond 0.128 s and slews below; both clocks are slewed alike)."""

FLOOR_INTERVAL = 10.0
"""Seconds between two saves of the floor; the floor read at start is the saved value plus this."""

CHECK_INTERVAL = 1.0
"""Seconds between two looks at the system clock for a step (:meth:`IngestClock.check`)."""

MAX_FUTURE = 300.0
"""Seconds: how far ahead of ingest time a reading's own time may be, by default."""


def max_future_field() -> Any:
    """The ``max_future`` option of a source whose readings can carry their own time."""
    return Field(
        MAX_FUTURE,
        description="Readings stamped further ahead of ingest time than this (a device with a wrong clock) "
        "are dead-lettered with the reason instead of moving every window's watermark; null: no bound.",
    )


class IngestClock:
    """``clock()``: epoch seconds from the wall clock at start, advanced by the monotonic clock."""

    __slots__ = ("_anchor", "_mono", "_wall", "offset", "step_threshold", "steps")

    def __init__(
        self,
        floor: float = -math.inf,
        *,
        step_threshold: float = STEP_THRESHOLD,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wall = wall
        self._mono = mono
        self.step_threshold = step_threshold
        self.steps = 0
        w = wall()
        start = max(w, floor)
        if start > w:
            log.warning(
                "the system clock is %.1fs behind the ingest time already handed out; ingest time "
                "goes on from there (readings without a time of their own are not made late)",
                start - w,
            )
        self._anchor = start - mono()
        self.offset = w - start
        """The system clock minus ingest time, as of the last :meth:`check`; 0 until the system clock steps."""

    def __call__(self) -> float:
        # on the hot path (a stamp per reading): the system clock is looked at by check()
        return self._mono() + self._anchor

    def check(self) -> float:
        """Compare with the system clock and log a step; the gateway calls it about once a second."""
        now = self._mono() + self._anchor
        off = self._wall() - now
        if abs(off - self.offset) > self.step_threshold:
            self._stepped(off)
        return now

    def _stepped(self, off: float) -> None:
        self.steps += 1
        log.warning(
            "the system clock stepped %+.1fs (it is now %+.1fs from ingest time); ingest time keeps "
            "its course until the next start, so windows on ingest time neither stall nor close early",
            off - self.offset,
            off,
        )
        self.offset = off

    def health(self) -> dict[str, float | int]:
        self.check()
        return {"offset": round(self.offset, 3), "steps": self.steps}

    # --- the floor across restarts ----------------------------------------------------------

    @staticmethod
    def read_floor(path: Path) -> float:
        """What :meth:`save_floor` saved: the ingest time then plus its margin; -inf when none is readable."""
        try:
            t, margin = path.read_text().split()
            return float(t) + float(margin)
        except (OSError, ValueError):
            return -math.inf

    def save_floor(self, path: Path, *, final: bool = False) -> None:
        """Save the current ingest time to ``path`` (atomically; a lost save only lowers the floor).

        The margin covers what is handed out until the next save (:data:`FLOOR_INTERVAL`); the
        ``final`` save at a stop needs none.
        """
        tmp = path.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(f"{self()!r} {0.0 if final else FLOOR_INTERVAL!r}\n")
            os.replace(tmp, path)


ingest_clock = IngestClock()
"""The process's ingest clock, for nodes built outside a gateway (a gateway has its own, with its floor)."""
