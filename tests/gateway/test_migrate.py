"""The schema-migration helper on real SQLite files: steps in order, each committed with its version,
a failing step rolled back alone, a newer file refused without a byte of it changing."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path

import pytest

from gateway._migrate import MigrationError, Schema, SchemaTooNew, Step, migrate, read_version, refuse_newer


def _add_b(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE t ADD COLUMN b TEXT DEFAULT 'x;y'")


SCHEMA = Schema(
    "test",
    (
        Step("t and its log", "CREATE TABLE t (a); CREATE TABLE log (version INTEGER, applied REAL);"),
        Step("column b", _add_b),
        Step("a row with a ';' in it", "INSERT INTO t (a, b) VALUES ('1;2', 'it''s; fine')"),
    ),
    log_table="log",
)


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    return db


def test_steps_apply_in_order_each_with_its_version(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    db = connect(path)
    try:
        assert migrate(db, path, Schema("test", SCHEMA.steps[:1], "log")) == 0
        assert read_version(path) == 1
        assert migrate(db, path, SCHEMA) == 1
        assert migrate(db, path, SCHEMA) == 3  # current: nothing to do
        assert db.execute("SELECT a, b FROM t").fetchall() == [("1;2", "it's; fine")]
        assert [r[0] for r in db.execute("SELECT version FROM log")] == [1, 2, 3]
    finally:
        db.close()
    assert read_version(path) == SCHEMA.version == 3


def test_a_new_file_is_created_quietly_an_old_one_upgraded_aloud(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A first start creates every file: that is debug detail, not news; upgrading a file that
    holds tables is said at info level, one line per step."""
    path = tmp_path / "x.db"
    db = connect(path)
    try:
        with caplog.at_level(logging.DEBUG, logger="gateway._migrate"):
            migrate(db, path, Schema("test", SCHEMA.steps[:1], "log"))
            created = [(r.levelno, r.getMessage()) for r in caplog.records]
            caplog.clear()
            migrate(db, path, SCHEMA)
            upgraded = [(r.levelno, r.getMessage()) for r in caplog.records]
    finally:
        db.close()
    assert [lvl for lvl, _ in created] == [logging.DEBUG]
    assert [lvl for lvl, _ in upgraded] == [logging.INFO, logging.INFO]
    assert "upgraded to version 2 (column b)" in upgraded[0][1]


def test_a_failing_step_rolls_back_alone_and_says_which(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    bad = Schema(
        "test",
        (*SCHEMA.steps[:2], Step("half done", "CREATE TABLE half (x); INSERT INTO missing VALUES (1)")),
        "log",
    )
    db = connect(path)
    try:
        with pytest.raises(MigrationError) as err:
            migrate(db, path, bad)
        assert err.value.step == 3 and err.value.name == "half done" and err.value.path == path
        assert str(err.value).startswith(f"{path}: upgrading the test schema failed at step 3 (half done): ")
        assert "no such table: missing" in str(err.value) and "left at version 2" in str(err.value)
        assert not db.in_transaction
        # steps 1 and 2 stay committed; nothing of step 3 is there
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert db.execute("SELECT name FROM sqlite_master WHERE name='half'").fetchone() is None
        assert [r[0] for r in db.execute("SELECT version FROM log")] == [1, 2]
        assert migrate(db, path, SCHEMA) == 2  # the fixed step goes on from there
    finally:
        db.close()


def test_an_interrupt_inside_a_step_is_rolled_back_and_not_translated(tmp_path: Path) -> None:
    def interrupted(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half (x)")
        raise KeyboardInterrupt

    path = tmp_path / "x.db"
    db = connect(path)
    try:
        with pytest.raises(KeyboardInterrupt):
            migrate(db, path, Schema("test", (*SCHEMA.steps[:1], Step("interrupted", interrupted))))
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert db.execute("SELECT name FROM sqlite_master WHERE name='half'").fetchone() is None
    finally:
        db.close()


def test_a_connection_in_the_sqlite3_modules_own_transaction_mode_gets_it_back(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    db = sqlite3.connect(path)  # isolation_level "" (implicit transactions), as the dead letters use
    try:
        migrate(db, path, SCHEMA)
        assert db.isolation_level == ""
    finally:
        db.close()


def test_a_newer_file_is_refused_without_a_byte_changing_even_with_an_unfinished_wal(tmp_path: Path) -> None:
    """The image a power cut leaves: the last commits only in the -wal file. A read-write connection
    would checkpoint them into the file when it closes; the version check must not."""
    live = tmp_path / "live.db"
    db = connect(live)
    migrate(db, live, SCHEMA)
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("INSERT INTO t (a) VALUES ('only in the wal')")
    db.execute(f"PRAGMA user_version={SCHEMA.version + 1}")
    crash = tmp_path / "crash"
    crash.mkdir()
    shutil.copy(live, crash / "x.db")
    shutil.copy(f"{live}-wal", crash / "x.db-wal")
    db.close()
    path = crash / "x.db"
    before = path.read_bytes(), (crash / "x.db-wal").read_bytes()
    with pytest.raises(SchemaTooNew) as err:
        refuse_newer(path, SCHEMA)
    assert (err.value.found, err.value.known, err.value.path) == (SCHEMA.version + 1, SCHEMA.version, path)
    assert f"{path}: the test schema version 4 is newer than this Sluice knows (3, Sluice " in str(err.value)
    assert (path.read_bytes(), (crash / "x.db-wal").read_bytes()) == before
    # the helper itself refuses too, should a store call it without the check first
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        with pytest.raises(SchemaTooNew):
            migrate(db, path, SCHEMA)
    finally:
        db.close()
    assert path.read_bytes() == before[0]


def test_no_file_or_a_damaged_one_is_left_to_its_store(tmp_path: Path) -> None:
    assert read_version(tmp_path / "none.db") is None
    refuse_newer(tmp_path / "none.db", SCHEMA)
    assert not (tmp_path / "none.db").exists()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    refuse_newer(junk, SCHEMA)  # the store's open says what is wrong with it, or sets it aside
    with pytest.raises(sqlite3.DatabaseError):
        read_version(junk)
