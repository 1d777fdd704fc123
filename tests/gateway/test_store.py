"""The state store: round trips, group commit, migrations, corruption, quota (real SQLite files)."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from gateway._migrate import SchemaTooNew
from gateway.store import SCHEMA_VERSION, StateStore, StoreError
from tests._util import wait_for


async def test_round_trip_coalesce_and_delete(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db", commit_interval=3600)
    await store.start()
    try:
        await store.put_state("p", "w", "a", b"1")
        await store.put_state("p", "w", "a", b"2")  # coalesces with the one before
        await store.put_state("p", "w", "b", b"x")
        await store.put_state("p", "other", "a", b"o")
        await store.flush()
        assert store.load_state("p", "w") == {"a": b"2", "b": b"x"}
        assert store.commits == 1 and store.rows_written == 3
        store.write([("p", "w", "b", None), ("p", "w", "c", b"y")])
        await store.flush()
        assert store.load_state("p", "w") == {"a": b"2", "c": b"y"}
        assert store.load_state("p", "other") == {"a": b"o"}
        assert store.load_state("q", "w") == {}
    finally:
        await store.close()
    # survives a reopen; the file is WAL with synchronous=NORMAL on the writer
    store = StateStore(tmp_path / "state.db")
    await store.start()
    try:
        assert store.load_state("p", "w") == {"a": b"2", "c": b"y"}
        db = store.reader()
        try:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                db.execute("DELETE FROM state")
        finally:
            db.close()
    finally:
        await store.close()


async def test_group_commit_by_size_without_flush(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db", commit_interval=3600, commit_size=10)
    await store.start()
    try:
        for i in range(9):
            store.write([("p", "n", f"k{i}", b"v")])
        # nine rows wait for the (hour-long) interval; the tenth reaches commit_size
        assert store.commits == 0
        store.write([("p", "n", "k9", b"v")])
        await wait_for(lambda: store.commits == 1, timeout=5)
        assert len(store.load_state("p", "n")) == 10
    finally:
        await store.close()


async def test_group_commit_by_interval(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db", commit_interval=0.05, commit_size=10_000)
    await store.start()
    try:
        store.write([("p", "n", "k", b"v")])
        await wait_for(lambda: store.commits == 1, timeout=5)
        assert store.load_state("p", "n") == {"k": b"v"}
        assert store.health()["commit_p50"] is not None
    finally:
        await store.close()


async def test_close_commits_what_is_queued(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db", commit_interval=3600)
    await store.start()
    store.write([("p", "n", "k", b"v")])
    await store.close()
    assert StateStore(tmp_path / "state.db").load_state("p", "n") == {"k": b"v"}


async def test_schema_is_versioned(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore(path)
    await store.start()
    await store.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert [r[0] for r in db.execute("SELECT version FROM schema_version")] == list(range(1, SCHEMA_VERSION + 1))
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        db.commit()
    finally:
        db.close()
    with pytest.raises(SchemaTooNew, match="newer than this Sluice knows"):
        await StateStore(path).start()


def _corrupt_copies(d: Path) -> list[Path]:
    return list(d.glob("state.db.corrupt-*"))


@pytest.mark.parametrize("damage", ["garbage", "torn-page"])
async def test_corrupt_file_is_moved_aside_and_store_starts_fresh(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.db"
    if damage == "garbage":
        path.write_bytes(b"this is not a database, it is an SD card having a bad day" * 100)
    else:
        store = StateStore(path)
        await store.start()
        store.write([("p", "n", f"k{i}", bytes(300)) for i in range(500)])
        await store.close()
        raw = bytearray(path.read_bytes())
        assert len(raw) > 8 * 4096
        raw[4096 * 3 : 4096 * 6] = b"\xa5" * (4096 * 3)  # scribble over b-tree pages
        path.write_bytes(bytes(raw))
    caplog.set_level(logging.ERROR, logger="gateway.store")
    store = StateStore(path)
    await store.start()
    try:
        assert store.corrupt_recoveries == 1
        assert any("STATE STORE CORRUPT" in r.getMessage() for r in caplog.records)
        moved = _corrupt_copies(tmp_path)
        assert moved, "the corrupt file is kept for a post-mortem"
        assert store.load_state("p", "n") == {}
        await store.put_state("p", "n", "k", b"fresh")
        await store.flush()
        assert store.load_state("p", "n") == {"k": b"fresh"}
        db = store.reader()
        try:
            assert db.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        finally:
            db.close()
    finally:
        await store.close()


async def test_quota_full_keeps_rows_and_recovers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.store")
    store = StateStore(tmp_path / "state.db", commit_interval=0.01, quota_bytes=64 * 1024)
    await store.start()
    try:
        await store.put_state("p", "n", "small", b"ok")
        await store.flush()
        store.write([("p", "n", "big", bytes(256 * 1024))])
        with pytest.raises(StoreError, match="disk or quota full"):
            await store.flush()
        assert store.health()["state"] == "full"
        assert store.write_errors >= 1
        # the loop is not blocked and earlier state is intact
        assert store.load_state("p", "n") == {"small": b"ok"}
        # space "returns": the pending row shrinks (a newer snapshot coalesces over it)
        store.write([("p", "n", "big", bytes(1024))])
        await wait_for(lambda: store.health()["state"] == "ok", timeout=30)
        await store.flush()
        assert store.load_state("p", "n") == {"small": b"ok", "big": bytes(1024)}
        assert any("writing again" in r.getMessage() for r in caplog.records)
    finally:
        await store.close()


async def test_write_before_open_is_a_clear_error(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    with pytest.raises(StoreError, match="not open"):
        store.write([("p", "n", "k", b"v")])
