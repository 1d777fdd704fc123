"""The ingest clock with injected system and monotonic clocks: steps are noticed, never followed.

The end-to-end test with a real gateway under libfaketime is tests/gateway/test_clock_steps.py.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from gateway.clock import FLOOR_INTERVAL, IngestClock


class Clocks:
    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 100.0

    def tick(self, s: float) -> None:
        self.wall += s
        self.mono += s


def make(c: Clocks, floor: float = -math.inf) -> IngestClock:
    return IngestClock(floor, wall=lambda: c.wall, mono=lambda: c.mono)


@pytest.mark.parametrize("step", [-3600.0, 3600.0, -2.0, 86400.0 * 30])
def test_a_step_either_way_is_logged_and_not_followed(step: float, caplog: pytest.LogCaptureFixture) -> None:
    c = Clocks()
    clock = make(c)
    assert clock() == c.wall
    c.tick(5)
    before = clock()
    c.wall += step
    c.tick(1)
    with caplog.at_level(logging.WARNING, "gateway.clock"):
        assert clock.check() == before + 1  # on its course
    assert clock() == before + 1
    assert clock.steps == 1 and clock.offset == step
    assert f"the system clock stepped {step:+.1f}s" in caplog.text
    c.tick(1)
    clock.check()
    assert clock.steps == 1  # one step, one line


def test_small_differences_are_not_steps() -> None:
    c = Clocks()
    clock = make(c)
    c.wall += 0.5
    clock.check()
    assert clock.steps == 0 and clock.offset == 0.0


def test_the_floor_keeps_a_restart_from_going_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = Clocks()
    first = make(c)
    c.tick(60)
    first.save_floor(tmp_path / "clock")
    handed_out = first()
    c.wall -= 3600  # the system clock steps back; the gateway restarts
    with caplog.at_level(logging.WARNING, "gateway.clock"):
        second = make(c, IngestClock.read_floor(tmp_path / "clock"))
    assert second() == handed_out + FLOOR_INTERVAL  # what was saved plus the margin of a crash
    assert "the system clock is 3610.0s behind the ingest time already handed out" in caplog.text
    first.save_floor(tmp_path / "clock", final=True)  # a clean stop saves it without the margin
    assert IngestClock.read_floor(tmp_path / "clock") == first()


def test_a_floor_behind_the_system_clock_changes_nothing(tmp_path: Path) -> None:
    c = Clocks()
    assert make(c, c.wall - 100)() == c.wall
    (tmp_path / "clock").write_text("garbage")
    assert IngestClock.read_floor(tmp_path / "clock") == -math.inf
    assert IngestClock.read_floor(tmp_path / "missing") == -math.inf
