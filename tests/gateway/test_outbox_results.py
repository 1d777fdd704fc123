"""The outbox takes a result (a message whose fields hold a ``result_id``) at most once per
connection and topic: in one batch, across batches, across a restart, and in a file an earlier
version wrote. The SQLite file is real; the broker is the fake link of test_outbox.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
import zlib
from pathlib import Path
from typing import Any

from gateway.outbox import _MERGE_EVERY, SCHEMA, SqliteOutboxStore
from tests._util import wait_for
from tests.gateway.test_outbox import FakeLink, started


def result(rid: str, topic: str = "t/out", conn: str = "plant") -> tuple[str, str, dict[str, Any], str]:
    return (conn, topic, {"key": "k", "value": 1.0, "result_id": rid}, "k")


async def test_a_result_is_taken_once_in_a_batch_across_batches_and_after_a_restart(tmp_path: Path) -> None:
    link = FakeLink()
    ob, task = await started(tmp_path, link)
    try:
        await ob.put([result("p/w/k/1"), result("p/w/k/2"), result("p/w/k/1")])
        await ob.put([result("p/w/k/2"), result("p/w/k/3")])
        await ob.put([result("p/w/k/1")])  # a batch of nothing new commits nothing
        # the same id to another topic or connection is another result
        await ob.put([result("p/w/k/1", topic="t/other")])
        assert ob.duplicates == 3 and ob.count == 4 and ob.last_id == 4
    finally:
        await ob.close()
        await asyncio.gather(task, return_exceptions=True)

    ob2, task2 = await started(tmp_path, link)
    try:
        assert await ob2.put([result("p/w/k/3"), result("p/w/k/4")]) == 5
        assert ob2.duplicates == 1 and ob2.count == 5
        link.up()
        await wait_for(lambda: len(link.sent) == 5)
        assert [m["result_id"] for m in link.sent] == ["p/w/k/1", "p/w/k/2", "p/w/k/3", "p/w/k/1", "p/w/k/4"]
        await wait_for(lambda: ob2.count == 0)
        # delivered and deleted, still known
        await ob2.put([result("p/w/k/4")])
        assert ob2.duplicates == 2 and ob2.last_id == 5
    finally:
        await ob2.close()
        task2.cancel()


async def test_results_sharing_a_hash_are_told_apart(tmp_path: Path) -> None:
    a, b = "p/w/k/29685295", "p/w/k/32060020"
    assert zlib.crc32(f"plant\x00t/out\x00{a}".encode()) == zlib.crc32(f"plant\x00t/out\x00{b}".encode())
    ob, task = await started(tmp_path, FakeLink())
    try:
        await ob.put([result(a)])
        await ob.put([result(b), result(a)])
        assert ob.count == 2 and ob.duplicates == 1
    finally:
        await ob.close()
        task.cancel()


def test_a_file_an_earlier_version_wrote_keeps_its_results(tmp_path: Path) -> None:
    """Earlier versions indexed ``results`` on the text of the key; their rows stay known."""
    db = sqlite3.connect(tmp_path / "outbox.db")
    db.executescript(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, connection TEXT NOT NULL,"
        " topic TEXT NOT NULL, okey TEXT NOT NULL, body BLOB NOT NULL, retain INTEGER NOT NULL,"
        " size INTEGER NOT NULL, created REAL NOT NULL);"
        "CREATE TABLE results (seq INTEGER PRIMARY KEY, connection TEXT NOT NULL, topic TEXT NOT NULL,"
        " rid TEXT NOT NULL);"
        "CREATE UNIQUE INDEX results_rid ON results (rid, connection, topic);"
        "INSERT INTO outbox VALUES (7, 'plant', 't/out', 'k', '{\"value\":1}', 0, 60, 0);"
        "INSERT INTO results VALUES (7, 'plant', 't/out', 'p/w/k/old');"
    )
    db.commit()
    db.close()

    async def run() -> None:
        ob, task = await started(tmp_path, FakeLink())
        try:
            assert await ob.put([result("p/w/k/old"), result("p/w/k/new")]) == 8
            assert ob.duplicates == 1 and ob.count == 2
        finally:
            await ob.close()
            task.cancel()

    asyncio.run(run())
    db = sqlite3.connect(tmp_path / "outbox.db")
    try:
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "results_rid" not in indexes and {"results_h", "results_new_h"} <= indexes
        assert db.execute("SELECT COUNT(*) FROM results WHERE h IS NULL").fetchone()[0] == 0
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA.version  # the re-index was step 2
    finally:
        db.close()


async def test_a_result_id_the_file_cannot_hold_is_refused_alone(tmp_path: Path) -> None:
    """A lone surrogate in a result id (it came from a reading's key) is dead-lettered; the rest
    of the batch is committed."""
    refused: list[tuple[str, str, bytes, str]] = []
    ob, task = await started(tmp_path, FakeLink())
    ob.on_refused = lambda *a: refused.append(a)
    try:
        assert await ob.put([result("p/w/k/1"), result("p/w/\ud800/2"), result("p/w/k/3")]) == 1
        assert ob.count == 2 and ob.rejected == 1
        assert len(refused) == 1 and "not stored in the outbox" in refused[0][3]
    finally:
        await ob.close()
        task.cancel()


def _append_results(store: SqliteOutboxStore, n: int, start: int, per_commit: int) -> None:
    """``n`` alert-sized rows with result ids ``r<i>``, ``per_commit`` to a commit, each commit
    deleting the rows of the one before (as PUBACKs would)."""
    body = b'{"key":"sensor-017","value":{"state":"raised","reading":99.5,"rule":"sensor-017 above 90"}}'
    prev: list[int] = []
    for at in range(start, start + n, per_commit):
        ids = range(at, min(at + per_commit, start + n))
        rows = [("plant", "t/out", f"k{i % 100}", body, False, len(body) + 60) for i in ids]
        results = [(j, "plant", "t/out", f"r{i}") for j, i in enumerate(ids)]
        store.known_results([r[1:] for r in results])
        first, *_ = store.append(rows, prev, 1 << 40, None, results)
        prev = list(range(first, first + len(rows)))


def test_result_ids_are_known_on_both_sides_of_a_merge_and_after_a_restart(tmp_path: Path) -> None:
    """New result ids wait in results_new and move into results every _MERGE_EVERY ids; a
    look-up finds both, before and after a restart."""
    store = SqliteOutboxStore(tmp_path / "outbox.db", synchronous="OFF")
    store.open()
    _append_results(store, _MERGE_EVERY + 500, 0, 100)
    store.close()
    store = SqliteOutboxStore(tmp_path / "outbox.db", synchronous="OFF")
    store.open()
    try:
        db = store._db
        assert db is not None
        merged = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        waiting = db.execute("SELECT COUNT(*) FROM results_new").fetchone()[0]
        assert merged and waiting and merged + waiting == _MERGE_EVERY + 500
        asked = [("plant", "t/out", f"r{i}") for i in (0, 1, _MERGE_EVERY - 1, _MERGE_EVERY + 499)]
        other = [("plant", "t/out", f"r{_MERGE_EVERY + 500}"), ("plant", "t/other", "r0"), ("mqtt2", "t/out", "r1")]
        assert store.known_results(asked + other) == set(asked)
    finally:
        store.close()


def test_a_commit_of_result_ids_writes_few_pages_when_many_are_kept(tmp_path: Path) -> None:
    """With 60,000 result ids kept, a commit of 100 alerts writes about what it would without the
    hash index on the ids: each new id went to a random leaf page of that index, and a commit
    wrote ~100 whole pages to the WAL (4 KiB an alert; 0.8 KiB without the index)."""
    store = SqliteOutboxStore(tmp_path / "outbox.db", synchronous="OFF")
    store.open()
    try:
        _append_results(store, 60_000, 0, 1000)
        db = store._db
        assert db is not None
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("PRAGMA wal_autocheckpoint=0")  # so that the WAL holds every page written from here
        start = 60_000 + (-60_000 % _MERGE_EVERY) + 100  # past a merge, 20 commits before the next
        _append_results(store, start - 60_000, 60_000, 1000)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        _append_results(store, 2000, start, 100)
        wal = (tmp_path / "outbox.db-wal").stat().st_size
        assert wal / 2000 < 2048, f"{wal / 2000:.0f} bytes of WAL per alert"
    finally:
        store.close()
