"""Logging setup and a rate limiter so a flood of bad input costs one log line per interval."""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["RateLimitedLog", "setup_logging"]


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # gmqtt logs every connection hiccup with a traceback; our link says it once, plainly.
    logging.getLogger("gmqtt").setLevel(logging.CRITICAL)


class RateLimitedLog:
    """Logs the first message per key, then at most one per ``interval`` with a suppressed count."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0):
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        if n:
            msg += " (%d similar suppressed in the last %.0fs)"
            args = (*args, n, self.interval)
        self.logger.log(level, msg, *args)

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, key, msg, *args)
