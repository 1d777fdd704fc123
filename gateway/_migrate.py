"""Versioned schemas for Sluice's SQLite files: ordered steps, each committed with its version number.

Every database (``state.db``, ``outbox.db``, ``alerts.db``, ``deadletter.db``) keeps its schema
version in ``PRAGMA user_version``. Its store declares a :class:`Schema`: a list of steps, step *i*
taking the file from version *i - 1* to *i*. At open, :func:`migrate` applies the missing steps, each
in one ``BEGIN IMMEDIATE`` transaction that also sets ``user_version``: a crash or a failing step
leaves the file at the last version that committed, never between two.

A file from a newer Sluice (a version number past the last step) is refused before anything writes
to it: :func:`refuse_newer` reads the number through a read-only connection, so not even a WAL
checkpoint touches the file. Running an older Sluice on it would write rows in a shape the newer
one no longer expects, so the gateway stops with :class:`SchemaTooNew` instead.

Version 0 is every file written before a store had versions: its first steps must accept any
shape such a file has (``CREATE … IF NOT EXISTS``, a column added only when missing). Later steps
can assume the version before them. Never edit a step that has shipped; append one.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import SluiceError

__all__ = [
    "MigrationError",
    "Schema",
    "SchemaError",
    "SchemaTooNew",
    "Step",
    "known_schemas",
    "migrate",
    "read_version",
    "refuse_newer",
    "refuse_newer_files",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Step:
    """One schema change: SQL (one or more statements) or a function given the connection.

    The function runs inside the step's transaction and must not commit.
    """

    name: str
    apply: str | Callable[[sqlite3.Connection], None]


@dataclass(frozen=True, slots=True)
class Schema:
    """What a store's file looks like: ``store`` names it in messages, ``steps`` build it in order.

    ``log_table``, when given, is a table (made by one of the steps) that gets a row
    ``(version, applied)`` for every step applied from then on.
    """

    store: str
    steps: tuple[Step, ...]
    log_table: str | None = None

    @property
    def version(self) -> int:
        return len(self.steps)


class SchemaError(SluiceError):
    """A database whose schema this Sluice cannot use as it is; ``path`` says which file."""

    def __init__(self, path: Path, message: str):
        self.path = path
        super().__init__(message)


class SchemaTooNew(SchemaError):
    """The file was written by a newer Sluice (``found`` > ``known``); it was not changed."""

    def __init__(self, path: Path, store: str, found: int, known: int):
        self.found = found
        self.known = known
        super().__init__(
            path,
            f"{path}: the {store} schema version {found} is newer than this Sluice knows ({known}, "
            f"Sluice {__version__}): the file was written by a newer Sluice and was not changed. Run that "
            "version again, or restore a backup made before the upgrade (docs/install.md, Downgrade)",
        )


class MigrationError(SchemaError):
    """Step ``step`` (``name``) failed; the file was left at version ``step - 1``, as it was before the step."""

    def __init__(self, path: Path, store: str, step: int, name: str, cause: BaseException):
        self.step = step
        self.name = name
        self.cause = cause
        super().__init__(
            path,
            f"{path}: upgrading the {store} schema failed at step {step} ({name}): {cause}; the step was "
            f"rolled back and the file left at version {step - 1}",
        )


def read_version(path: Path) -> int | None:
    """The file's ``user_version`` read without writing anything; None when there is no database yet."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def refuse_newer(path: Path, schema: Schema) -> None:
    """Raise :class:`SchemaTooNew` if ``path`` holds a schema past ``schema``; call before opening it to write."""
    try:
        found = read_version(path)
    except sqlite3.DatabaseError:
        return  # not a database (damaged): the store's own open says so, or sets it aside
    if found is not None and found > schema.version:
        raise SchemaTooNew(path, schema.store, found, schema.version)


def known_schemas() -> dict[str, Schema]:
    """Each database file of a data directory and the schema this Sluice gives it."""
    from .alerts import SCHEMA as alerts
    from .deadletter import SCHEMA as dead_letters
    from .outbox import SCHEMA as outbox
    from .store import SCHEMA as state

    return {"state.db": state, "outbox.db": outbox, "alerts.db": alerts, "deadletter.db": dead_letters}


def refuse_newer_files(data_dir: Path) -> None:
    """Refuse a data directory holding any file from a newer Sluice, before any of its files is upgraded."""
    for name, schema in known_schemas().items():
        refuse_newer(data_dir / name, schema)


def _statements(sql: str) -> Iterable[str]:
    """Split a script into statements (``executescript`` would commit the step's transaction)."""
    pending = ""
    for part in sql.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\n;"):
                yield pending
            pending = ""
    if pending.strip(" \t\n;"):
        yield pending


def _version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection, path: Path, schema: Schema) -> int:
    """Bring the open database ``db`` (the file ``path``) to ``schema.version``; return the version it had.

    Each step commits on its own together with its version number. Raises :class:`SchemaTooNew`
    (nothing written) or :class:`MigrationError` (the failed step rolled back).
    """
    before = _version(db)
    if before == schema.version:
        return before
    if before > schema.version:
        raise SchemaTooNew(path, schema.store, before, schema.version)
    # a file this start created is not news for the log: its upgrades are said at debug level
    fresh = before == 0 and db.execute("SELECT 1 FROM sqlite_master WHERE type='table' LIMIT 1").fetchone() is None
    saved = db.isolation_level
    db.isolation_level = None  # the steps' transactions are ours, not the sqlite3 module's
    try:
        while True:
            db.execute("BEGIN IMMEDIATE")
            found = _version(db)  # under the write lock: what another connection did meanwhile counts
            if found >= schema.version:
                db.execute("ROLLBACK")
                if found > schema.version:
                    raise SchemaTooNew(path, schema.store, found, schema.version)
                return before
            step = schema.steps[found]
            try:
                if isinstance(step.apply, str):
                    for statement in _statements(step.apply):
                        db.execute(statement)
                else:
                    step.apply(db)
                if schema.log_table is not None:
                    db.execute(
                        f"INSERT INTO {schema.log_table} (version, applied) VALUES (?, ?)", (found + 1, time.time())
                    )
                db.execute(f"PRAGMA user_version={found + 1}")
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(exc, Exception):  # translated at this edge: which file, which step
                    raise MigrationError(path, schema.store, found + 1, step.name, exc) from exc
                raise
            log.log(
                logging.DEBUG if fresh else logging.INFO,
                "%s: %s schema upgraded to version %d (%s)",
                path,
                schema.store,
                found + 1,
                step.name,
            )
    finally:
        db.isolation_level = saved
