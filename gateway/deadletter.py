"""Dead letters: inputs a node could not handle, kept with the reason in a bounded SQLite table."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections import deque
from pathlib import Path
from typing import Any

from ._log import RateLimitedLog
from ._migrate import Schema, Step, migrate, refuse_newer
from ._records import RECORD_ERRORS, execute_each, storable
from .events import Event
from .redact import redact_text

__all__ = ["SCHEMA", "DeadLetters"]

log = logging.getLogger(__name__)
_EXCERPT = 512

# Step i takes the file from version i-1 to i (gateway._migrate); never edit one that has shipped, append.
SCHEMA = Schema(
    "dead letters",
    (
        Step(
            "dead_letters table",
            "CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL, "
            "pipeline TEXT, node TEXT, reason TEXT, key TEXT, payload TEXT)",
        ),
    ),
)


def _excerpt(raw: Any) -> str:
    if raw is None:
        return ""
    if isinstance(raw, bytes | bytearray | memoryview):
        text = bytes(raw[: _EXCERPT + 1]).decode("utf-8", "backslashreplace")
    else:
        text = storable(raw)
    return storable(text if len(text) <= _EXCERPT else text[:_EXCERPT] + "…")


def _event_text(event: Event) -> str:
    """An event as JSON for the record, or what can be said of it when it is not serialisable."""
    try:
        return json.dumps(event.to_dict(), default=str)
    except (TypeError, ValueError, RecursionError):
        try:
            return repr(event)
        except RecursionError:  # a value nested too deeply even for repr
            return f"<event {storable(event.key)!r} with a {type(event.value).__name__} value nested too deeply>"


class DeadLetters:
    """Records rejected inputs: counted per node, logged at a limited rate, written in batches.

    ``record`` never blocks: rows wait in a bounded buffer that a background task writes to
    ``<data_dir>/deadletter.db`` in a thread. If the buffer overflows (the disk cannot keep up),
    the row is counted in ``lost`` — the count itself is never lost.
    """

    def __init__(self, path: Path | None, keep: int = 10_000, buffer: int = 10_000):
        self.path = path
        self.keep = keep
        self.counts: dict[tuple[str, str], int] = {}
        self.lost = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=200)
        self._pending: deque[tuple[Any, ...]] = deque()
        self._buffer = buffer
        self._rl = RateLimitedLog(log)
        self._db: sqlite3.Connection | None = None
        self._wake = asyncio.Event()

    def record(self, pipeline: str, node: str, reason: str, event: Event | None = None, raw: Any = None) -> None:
        """Count one rejected input and keep it; never raises, whatever the input holds.

        Text goes through :func:`~gateway._records.storable`: a lone surrogate in a reason, key
        or payload is kept as its ``\\udxxx`` escape, so the record itself can always be written.
        """
        k = (pipeline, node)
        self.counts[k] = self.counts.get(k, 0) + 1
        reason = redact_text(reason)  # an error text may quote a URL or a header of the config
        if raw is None and event is not None:
            raw = _event_text(event)
        excerpt = _excerpt(raw)
        reason = storable(reason)
        row = {
            "ts": time.time(),
            "pipeline": storable(pipeline),
            "node": storable(node),
            "reason": reason,
            "key": storable(event.key) if event else None,
            "payload": excerpt,
        }
        self.recent.append(row)
        self._rl.warning(
            f"{pipeline}/{node}/{reason[:40]}",
            "dead letter from %s/%s: %s; input: %.120s",
            row["pipeline"],
            row["node"],
            reason,
            excerpt,
        )
        if len(self._pending) >= self._buffer:
            self.lost += 1
            return
        self._pending.append(tuple(row.values()))
        self._wake.set()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _open(self) -> sqlite3.Connection:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        refuse_newer(self.path, SCHEMA)
        db = sqlite3.connect(self.path, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA cache_size=-128")  # append-only; reads go through their own connection
            migrate(db, self.path, SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    async def open(self) -> None:
        """Open (and upgrade) the file now, so a file this Sluice cannot use stops the start."""
        if self.path is not None and self._db is None:
            self._db = await asyncio.to_thread(self._open)

    def _write(self, rows: list[tuple[Any, ...]]) -> list[tuple[tuple[Any, ...], BaseException]]:
        """Write rows in one transaction; return those no file could hold (the others are written)."""
        if self._db is None:
            self._db = self._open()
        insert = "INSERT INTO dead_letters (ts, pipeline, node, reason, key, payload) VALUES (?,?,?,?,?,?)"
        bad: list[tuple[tuple[Any, ...], BaseException]] = []
        with self._db:
            try:
                self._db.executemany(insert, rows)
            except RECORD_ERRORS:  # record() escapes text, so this is the last resort
                self._db.rollback()
                bad = execute_each(self._db, insert, rows)
            self._db.execute(
                "DELETE FROM dead_letters WHERE id <= (SELECT MAX(id) FROM dead_letters) - ?", (self.keep,)
            )
        return bad

    async def flush(self) -> None:
        if self.path is None:
            self._pending.clear()
            return
        if not self._pending:
            return
        rows = list(self._pending)
        self._pending.clear()
        try:
            bad = await asyncio.to_thread(self._write, rows)
        except sqlite3.Error as exc:
            self.lost += len(rows)
            log.error("cannot write %d dead letters to %s: %s", len(rows), self.path, exc)
        except Exception as exc:  # the writer's boundary: whatever the rows held, the writer goes on
            self.lost += len(rows)
            self._rl.log(logging.ERROR, "flush", "dead letters: %d rows not written: %r", len(rows), exc)
        else:
            if bad:
                self.lost += len(bad)
                self._rl.log(logging.ERROR, "rows", "dead letters: %d rows not written: %r", len(bad), bad[0][1])

    async def run(self) -> None:
        """Write buffered rows every half second until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        await self.flush()
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)

    def read(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest rows from the database (for tests and the console)."""
        if self.path is None or not self.path.exists():
            return []
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            db.row_factory = sqlite3.Row
            try:
                rows = db.execute("SELECT * FROM dead_letters ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):  # the writer created the file, not yet the table
                    return []
                raise
            return [dict(r) for r in rows]
        finally:
            db.close()
