"""Logging setup and a rate limiter so a flood of bad input costs one log line per interval."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .redact import redact_text

__all__ = ["RECENT", "RateLimitedLog", "RecentLogs", "Redacting", "setup_logging"]


class Redacting(logging.Filter):
    """Passes every record with its message (and traceback) redacted: a log line leaves the process."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except (TypeError, ValueError):  # a bad format string must not break logging
            msg = str(record.msg)
        clean = redact_text(msg)
        if clean != msg or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: for journald/Loki/Fluent Bit to parse without regexes."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class RecentLogs(logging.Handler):
    """The last lines logged, kept in memory for the console."""

    def __init__(self, size: int = 500):
        super().__init__()
        self.lines: deque[dict[str, Any]] = deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except (TypeError, ValueError):  # a bad format string must not break logging
            msg = str(record.msg)
        msg = redact_text(msg)
        self.lines.append({"ts": record.created, "level": record.levelname.lower(), "logger": record.name, "msg": msg})


RECENT = RecentLogs()


class JournalFormatter(logging.Formatter):
    """Text lines for systemd's journal: a ``<N>`` syslog priority prefix and no timestamp.

    journald stamps every line itself and reads the prefix as the line's priority, so
    ``journalctl -u sluice -p warning`` shows warnings and errors only.
    """

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self) -> None:
        super().__init__("%(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prio = self.PRIORITIES.get(record.levelno, 6)
        # every line of a traceback carries the prefix, or journald would log it as info
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def _stderr_is_journal() -> bool:
    """Whether stderr is connected to journald (systemd sets JOURNAL_STREAM to its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return dev.isdigit() and ino.isdigit() and (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Log to stderr as text lines (``HH:MM:SS LEVEL logger: message``) or JSON lines.

    Under systemd, with stderr going to the journal, text lines carry the journal's priority
    prefix instead of a time (see :class:`JournalFormatter`).
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif _stderr_is_journal():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(Redacting())
    root = logging.getLogger()
    root.handlers[:] = [handler, RECENT]
    root.setLevel(level.upper())
    # gmqtt logs every connection hiccup with a traceback; our link says it once, plainly.
    logging.getLogger("gmqtt").setLevel(logging.CRITICAL)


class RateLimitedLog:
    """Logs the first message per key, then at most one per ``interval`` with a suppressed count.

    Keys often carry data (a topic, a reason), so their number is bounded: keys quiet for a whole
    interval are forgotten (what they suppressed is reported in one line), and beyond ``max_keys``
    busy ones, new keys share one overflow key. A gateway running for weeks keeps a bounded table
    and a bounded log rate however varied its bad input is.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        max_keys: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: BaseException | None = None) -> None:
        now = self._clock()
        last = self._last.get(key)
        if last is None and len(self._last) >= self.max_keys:
            self._forget_quiet(now, level)
            if len(self._last) >= self.max_keys:
                key = "\0overflow"
                last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        if n:
            msg += " (%d similar suppressed in the last %.0fs)"
            args = (*args, n, self.interval)
        self.logger.log(level, msg, *args, exc_info=exc_info)

    def _forget_quiet(self, now: float, level: int) -> None:
        quiet = [k for k, t in self._last.items() if now - t >= self.interval]
        n = 0
        for k in quiet:
            del self._last[k]
            n += self._suppressed.pop(k, 0)
        if n:
            self.logger.log(level, "%d more messages like the ones above were suppressed", n)

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, key, msg, *args)
