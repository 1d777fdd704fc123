"""Dead letters in a real SQLite file: bounded table, counts that are never lost, readable excerpts."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from gateway.deadletter import DeadLetters
from gateway.events import Event
from tests._util import wait_for


async def test_rows_are_written_in_the_background_and_bounded(tmp_path: Path) -> None:
    dl = DeadLetters(tmp_path / "dl" / "deadletter.db", keep=10)
    task = asyncio.create_task(dl.run())
    try:
        for i in range(25):
            dl.record("p", "n", f"bad {i}", Event("k", float(i), float(i), "s"))
        rows = await wait_for(lambda: dl.read(100) if len(dl.read(100)) == 10 else None, timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await dl.close()
    assert [r["reason"] for r in rows] == [f"bad {i}" for i in range(24, 14, -1)]  # newest first
    assert dl.counts == {("p", "n"): 25} and dl.total == 25 and dl.lost == 0
    assert rows[0]["key"] == "k" and '"value": 24.0' in rows[0]["payload"]
    db = sqlite3.connect(tmp_path / "dl" / "deadletter.db")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


async def test_overflow_counts_what_it_cannot_write(tmp_path: Path) -> None:
    dl = DeadLetters(tmp_path / "deadletter.db", buffer=5)
    for i in range(8):
        dl.record("p", "n", "bad", raw=f"payload {i}".encode())
    assert dl.total == 8 and dl.lost == 3
    assert len(dl.recent) == 8
    await dl.close()  # flushes what the buffer held
    assert [r["payload"] for r in dl.read()] == [f"payload {i}" for i in range(4, -1, -1)]


async def test_payload_excerpts(tmp_path: Path) -> None:
    dl = DeadLetters(tmp_path / "deadletter.db")
    dl.record("p", "n", "long", raw=b"x" * 10_000)
    dl.record("p", "n", "binary", raw=b"\xff\x00ok")
    dl.record("p", "n", "no input")
    await dl.close()
    rows = {r["reason"]: r for r in dl.read()}
    assert rows["long"]["payload"] == "x" * 512 + "…"
    assert rows["binary"]["payload"] == "\\xff\x00ok"
    assert rows["no input"]["payload"] == "" and rows["no input"]["key"] is None


async def test_unwritable_database_is_counted_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "deadletter.db").mkdir()  # a directory where the file should be
    dl = DeadLetters(tmp_path / "deadletter.db")
    dl.record("p", "n", "bad", raw=b"1")
    await dl.flush()
    assert dl.lost == 1 and dl.total == 1
    await dl.close()


def test_reading_while_the_writer_is_still_creating_the_table(tmp_path: Path) -> None:
    path = tmp_path / "deadletter.db"
    sqlite3.connect(path).close()  # the file exists, the table not yet
    assert DeadLetters(path).read() == []
