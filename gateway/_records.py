"""One bad record costs that record, never the writer: what every SQLite store writer shares.

Sources refuse text that is not Unicode (see ``firmware_bridges._json``), but a store writer does
not trust that: a record can still be one no file can hold (a lone surrogate from an operator's
expression, an integer beyond SQLite's 64 bits, a NaN where a column says NOT NULL, a value
nested too deeply to serialise). Writers tell such a *record* error from a *store* error (disk
full, I/O, locked), which is retried: a record error drops that one record — dead-lettered or
counted and logged at a limited rate — and the writer goes on with the rest.

The dead-letter store is the exception to dropping: it exists to show bad input, so its text is
escaped (:func:`storable`) rather than refused.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

__all__ = ["RECORD_ERRORS", "execute_each", "in_list", "storable"]

RECORD_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # UnicodeEncodeError: a lone surrogate; a circular structure
    TypeError,  # a value of a type nobody can serialise
    OverflowError,  # an int beyond SQLite's INTEGER
    RecursionError,  # nested too deeply to serialise
    sqlite3.IntegrityError,  # NOT NULL (SQLite stores NaN as NULL), CHECK, UNIQUE
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,  # "Error binding parameter": a type SQLite cannot hold
    sqlite3.DataError,  # a string or blob over SQLite's limit
)
"""Errors that say *this record* cannot be written, as opposed to the store failing."""


def storable(text: Any) -> str:
    """``text`` as a string any UTF-8 file can hold: lone surrogates become ``\\udxxx`` escapes."""
    if type(text) is not str:
        try:
            text = str(text)
        except Exception:  # any object: a deep structure's repr, a broken __str__
            return f"<unprintable {type(text).__name__}>"
    if text.isascii():  # O(1) for a str
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def execute_each(
    db: sqlite3.Connection, statement: str, rows: Iterable[tuple[Any, ...]]
) -> list[tuple[tuple[Any, ...], BaseException]]:
    """Run ``statement`` once per row in the caller's transaction; return the rows that failed as records.

    For after ``executemany`` raised one of :data:`RECORD_ERRORS` and the transaction was rolled
    back: the good rows are written, the bad ones are handed back with their error. A failing
    statement changes nothing (SQLite undoes that statement only), and a store error (disk full,
    I/O) still raises.
    """
    bad: list[tuple[tuple[Any, ...], BaseException]] = []
    for row in rows:
        try:
            db.execute(statement, row)
        except RECORD_ERRORS as exc:
            bad.append((row, exc))
    return bad


# The lengths an ``IN (?, …)`` list is padded to (500: under SQLite's bound-parameter limit).
IN_LIST_SIZES = (1, 4, 16, 64, 250, 500)


def in_list(values: list[Any]) -> tuple[str, list[Any]]:
    """``?,?,…`` for up to 500 ``values`` and the parameters, padded with the last value to one of
    :data:`IN_LIST_SIZES` (a value twice in an ``IN`` list matches its row once).

    Each length is its own statement, which the connection compiles and keeps in its statement
    cache (128 statements): a statement per count filled that cache with one-off statements of
    up to 50 KiB each, several MiB per connection that deletes acknowledged outbox rows.
    """
    n = next(size for size in IN_LIST_SIZES if size >= len(values))
    return ",".join("?" * n), values + values[-1:] * (n - len(values))
