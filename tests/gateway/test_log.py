"""The rate-limited log: one line per key and interval, and a bounded table however varied the keys."""

from __future__ import annotations

import logging

import pytest

from gateway._log import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_key_and_interval_with_the_suppressed_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("t.rl"), interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, "t.rl"):
        for _ in range(5):
            rl.warning("a", "bad %s", "x")
        rl.warning("b", "other")
        clock.now = 10.0
        rl.warning("a", "bad %s", "y")
    assert [r.getMessage() for r in caplog.records] == [
        "bad x",
        "other",
        "bad y (4 similar suppressed in the last 10s)",
    ]


def test_varied_keys_keep_the_table_and_the_log_bounded(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("t.rl2"), interval=10.0, max_keys=100, clock=clock)
    with caplog.at_level(logging.WARNING, "t.rl2"):
        for i in range(10_000):  # a flood of distinct keys (say, a bad payload on every topic)
            clock.now = i * 0.001
            rl.warning(f"topic/{i}", "bad payload on %s", i)
        assert len(rl._last) <= 101
        first_burst = len(caplog.records)
        assert first_burst <= 100 + 2  # the first 100 keys, then one line for the overflow
        # much later, the quiet keys are forgotten and what they held back is reported once
        clock.now = 1000.0
        for i in range(50):
            rl.warning(f"new/{i}", "bad payload on %s", i)
    assert len(rl._last) <= 101
    msgs = [r.getMessage() for r in caplog.records[first_burst:]]
    assert msgs[0] == "9899 more messages like the ones above were suppressed"
    assert msgs[1:] == [f"bad payload on {i}" for i in range(50)]
