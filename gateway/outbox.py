"""Store-and-forward delivery: everything bound for the broker is committed to disk first.

A message is a row in ``<data_dir>/outbox.db`` (SQLite, WAL, ``synchronous=FULL``) before
:meth:`Outbox.put` returns; it is published at QoS 1 and deleted only once the broker's PUBACK
arrived. After a reconnect or a restart the rows still there are sent again, oldest first, with
``replayed: true`` when they may have been sent before, so consumers can de-duplicate on
``(gateway_id, seq)``. ``seq`` is the row id: it only grows, across restarts too (the highest id is
also reserved in blocks in ``<data_dir>/seq``, so even a lost database cannot make it go back).

A disk quota bounds the outbox's file and its WAL: past it, the oldest rows are dropped, counted
(persistently) and reported. While a backlog drains, messages that arrived after the reconnect ("live") take turns
with it, one for one, so fresh alerts are not stuck behind hours of backlog — but never ahead of
an older message with the same ordering key, so each key's messages still arrive in order.
An optional rate cap protects a metered uplink.

All SQLite work runs in one thread of its own (:class:`SqliteOutboxStore` behind the
:class:`OutboxStore` protocol, which the gateway's state store can implement later).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import sqlite3
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec

from ._log import RateLimitedLog
from ._migrate import Schema, Step, migrate, refuse_newer
from ._records import in_list, storable
from .envelope import Envelope, encode_fields
from .errors import LinkError, SluiceError
from .schema import OutboxConfig

__all__ = ["SCHEMA", "Outbox", "OutboxConfig", "OutboxStore", "SendOrder", "SqliteOutboxStore"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def _sinks_link(name: str) -> bool:
    """Whether an outbox connection is a link a sink registered itself (``<kind>:<pipeline>/<node>``,
    any kind: webhook, kafka, redis, a third-party sink's) rather than a broker connection, whose
    name is an id and never holds a colon."""
    return ":" in name


_LIVE_CACHE = 20_000  # rows kept in memory per connection for the sender
_READ_BATCH = 500  # rows the sender reads from the file at a time
# Live rows held back behind their key's backlog, at most; past it further live rows wait in the
# file, so live traffic during a long drain does not pile up in memory.
_DEFER_MAX = 5_000
RESULT_IDS_KEPT = 100_000
"""How many result ids the outbox remembers (newest first), to refuse a result it already took.

A restart re-emits only what was computed after the last state checkpoint (about a second), so
this covers a long stall of the state store too."""
_ROW_OVERHEAD = 48  # bytes SQLite spends per row beyond its text: header, rowid, the index entry
# Once a backlog has gone (fewer rows wait than _CAUGHT_UP), free pages beyond _RECLAIM_MIN bytes
# go back to the filesystem, _RECLAIM_STEP pages a step (every 50 ms) so that no step holds the
# writer long, nor grows the WAL past _WAL_LIMIT (each page moved is written to it).
_CAUGHT_UP = 1000
_RECLAIM_MIN = 4 << 20
_RECLAIM_STEP = 256
# The WAL file is cut back to this after a checkpoint, which SQLite runs once it holds 1,000 pages
# (about as much): it takes up to that plus the commit that crossed it. The quota keeps _WAL_RESERVE
# for it, enough for a commit of up to about 1 MiB (a batch of a few thousand alert-sized messages).
_WAL_LIMIT = 4 << 20
_WAL_RESERVE = _WAL_LIMIT + (1 << 20)
MIN_QUOTA = 10_000_000
"""The smallest ``max_bytes``: the WAL's share (5 MiB) and room for the file."""
_RESULT_BYTES = 400  # quota bytes per result id remembered: the ids take at most about a quarter
_RESULT_ROW = 128  # bytes a result id takes in the file, at most about (an alert's: 106 with its index entry)


def results_kept(max_bytes: int) -> int:
    """How many result ids the outbox remembers under a quota of ``max_bytes``."""
    return max(1000, min(RESULT_IDS_KEPT, max_bytes // _RESULT_BYTES))


# The key summary (``outbox_keys``: each ordering key's highest id) is written to the file every
# this many rows, in the commit that reaches it: a start reads the summary and the rows after it.
_KEYS_SAVE_EVERY = 10_000


def _result_hash(connection: str, topic: str, rid: str) -> int:
    """What the ``results`` table is indexed on: a CRC-32 of the result's key, so that each insert
    adds an 8-byte entry to the index rather than the key's text (a lookup compares the text)."""
    return zlib.crc32(f"{connection}\x00{topic}\x00{rid}".encode("utf-8", "surrogatepass"))


_GONE_RANGE = "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE id BETWEEN ? AND ?"
_GONE_IN = "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE id IN "

_INSERT_ROWS = 32
"""Rows per multi-row ``INSERT … VALUES``: one statement (cached) binds 32 rows and runs once,
where ``executemany`` runs a statement per row; about 0.7 µs a row less for the outbox's rows."""


def _insert(db: sqlite3.Connection, head: str, row_marks: str, rows: list[tuple[Any, ...]]) -> None:
    """Insert ``rows`` with ``head`` (``INSERT INTO … VALUES``) and one row's ``(?,…)``: 32 at a
    time in one statement, what is left over with ``executemany``."""
    whole = len(rows) - len(rows) % _INSERT_ROWS
    if whole:
        q = _multi_row(head, row_marks)
        for at in range(0, whole, _INSERT_ROWS):
            db.execute(q, [x for r in rows[at : at + _INSERT_ROWS] for x in r])
    if whole < len(rows):
        db.executemany(head + row_marks, rows[whole:])


@cache
def _multi_row(head: str, row_marks: str) -> str:
    return head + ",".join([row_marks] * _INSERT_ROWS)


def _insert_sharing(db: sqlite3.Connection, head: str, lead: tuple[Any, ...], own: int, values: list[Any]) -> None:
    """Insert rows with ``head`` (``INSERT INTO … VALUES``) whose first columns have the same
    values in every row, ``lead``, bound once per statement (binding a value costs sqlite3 about
    700 CPU instructions), and whose ``own`` other values each follow in ``values``, row after
    row: 32 rows to a statement, what is left in statements of 16, 8, 4, 2 and 1."""
    rows = len(values) // own
    at = 0
    for n in _CHUNKS:
        if rows - at < n:
            continue
        q = _sharing_sql(head, len(lead), own, n)
        while rows - at >= n:
            db.execute(q, [*lead, *values[at * own : (at + n) * own]])
            at += n


_CHUNKS = (_INSERT_ROWS, 16, 8, 4, 2, 1)


@cache
def _sharing_sql(head: str, shared: int, own: int, n: int) -> str:
    """``head`` and ``n`` rows of numbered parameters: ``?1``…``?shared`` in every row (bound
    once), then ``own`` of the row's own."""
    rows = []
    for j in range(n):
        marks = [f"?{c + 1}" for c in range(shared)]
        marks += [f"?{shared + j * own + c + 1}" for c in range(own)]
        rows.append("(" + ",".join(marks) + ")")
    return head + ",".join(rows)


@cache
def _known_sql(n: int) -> str:
    """The result ids of ``n`` hashes (numbered parameters), in ``results`` and in ``results_new``."""
    marks = ",".join(f"?{i + 1}" for i in range(n))
    return (
        f"SELECT connection, topic, rid FROM results WHERE h IN ({marks})"
        f" UNION ALL SELECT connection, topic, rid FROM results_new WHERE h IN ({marks})"
    )


def _runs(ids: list[int], shortest: int = 8) -> tuple[list[tuple[int, int]], list[int]]:
    """``ids`` as ranges of at least ``shortest`` consecutive ids, ``(first, last)``, and the
    ids in no such range."""
    ranges: list[tuple[int, int]] = []
    single: list[int] = []
    ordered = sorted(set(ids))
    start = 0
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:
            if i - start >= shortest:
                ranges.append((ordered[start], ordered[i - 1]))
            else:
                single += ordered[start:i]
            start = i
    return ranges, single


# --- the storage seam ------------------------------------------------------------------------


class Row(msgspec.Struct, gc=False):
    """A message as the sender handles it (a ``msgspec.Struct``: built in C, one per alert under
    alert load, where a slotted dataclass's generated ``__init__`` was a Python call)."""

    id: int
    connection: str
    topic: str
    okey: str
    body: bytes
    retain: bool
    size: int


@dataclass(slots=True)
class StoreInfo:
    max_id: int
    count: int
    bytes: int
    dropped: int


class OutboxStore(Protocol):
    """Where outbox rows live. Every method is called from the outbox's one worker thread."""

    def open(self) -> StoreInfo: ...

    def append(
        self,
        rows: list[tuple[str, str, str, bytes, bool, int]],
        delete: list[int],
        max_bytes: int,
        max_rows: int | None,
        results: list[tuple[int, str, str, str]] | None = None,
    ) -> tuple[int, int, int, int]:
        """Delete acknowledged ids, insert rows, enforce the quota, in one durable commit.

        ``results`` are ``(index in rows, connection, topic, result id)``: remembered in the same
        commit, so :meth:`known_results` answers for exactly the rows that were committed.
        Returns (first new id, rows dropped by the quota, bytes they freed, highest id dropped).
        """
        ...

    def known_results(self, keys: list[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
        """Which ``(connection, topic, result id)`` were committed before (now or by an earlier run)."""
        ...

    def delete(self, ids: list[int]) -> None: ...

    def reclaim(self) -> bool:
        """Once a backlog has gone, give one step's worth of the file's free space back to the
        filesystem. Whether another step may be worth it (False until the next backlog)."""
        ...

    def load(self, connection: str, after: int, upto: int | None, limit: int) -> list[Row]: ...

    def backlog_keys(self, connection: str) -> tuple[int, dict[str, int]]:
        """The highest id committed so far, and for each ordering key of ``connection`` an id at or
        past its last row up to there (never before it): read from a summary kept as rows are
        appended, not from the rows, so a reconnect costs the same at any backlog size."""
        ...

    def connections(self) -> set[str]:
        """Every connection that may have rows (from the summary: a few more, never fewer)."""
        ...

    def stats(self) -> tuple[int, int]:
        """(rows, bytes) as stored."""
        ...

    def waiting_keys(self, connections: set[str]) -> dict[str, int]:
        """For each of ``connections`` that has any: how many of its ordering keys still have their
        newest row in the file. Read from the key summary, one look-up by id per key: the work
        grows with the keys, not with the backlog."""
        ...

    def close(self) -> None: ...


def _tables(db: sqlite3.Connection) -> None:
    """Version 1: the outbox of release 0.1 and the result ids, from a file of any earlier shape."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, connection TEXT NOT NULL,"
        " topic TEXT NOT NULL, okey TEXT NOT NULL, body BLOB NOT NULL, retain INTEGER NOT NULL,"
        " size INTEGER NOT NULL, created REAL NOT NULL)"
    )
    db.execute("CREATE TABLE IF NOT EXISTS outbox_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    # result ids of committed messages (window results), kept after the message is delivered:
    # a restart that computes a result again must not queue it again
    db.execute(
        "CREATE TABLE IF NOT EXISTS results (seq INTEGER PRIMARY KEY, connection TEXT NOT NULL,"
        " topic TEXT NOT NULL, rid TEXT NOT NULL, h INTEGER)"
    )


def _index_results(db: sqlite3.Connection) -> None:
    """Version 2: ``results`` indexed on the hash of each key (:func:`_result_hash`).

    Earlier versions indexed the key's text (``results_rid``), which cost more than the rest of a
    commit under alert load; a file such a version wrote gets its rows hashed and that index dropped."""
    if "h" not in {row[1] for row in db.execute("PRAGMA table_info(results)")}:
        db.execute("ALTER TABLE results ADD COLUMN h INTEGER")
    db.execute("CREATE INDEX IF NOT EXISTS results_h ON results (h)")
    old = db.execute("SELECT 1 FROM sqlite_master WHERE type='index' AND name='results_rid'").fetchone()
    if old is None:
        return
    db.create_function("sluice_result_hash", 3, _result_hash, deterministic=True)
    db.execute("UPDATE results SET h = sluice_result_hash(connection, topic, rid) WHERE h IS NULL")
    db.execute("DROP INDEX results_rid")


def _summary(db: sqlite3.Connection) -> None:
    """Version 3: what a start and a reconnect need, kept so that neither reads the whole backlog.

    ``outbox_keys`` holds each (connection, ordering key)'s highest id up to ``keys_upto`` (in
    ``outbox_meta``; rows after it are read at start), ``count`` and ``bytes`` the rows waiting and
    their size, written in every commit that changes them. An older file is summarised once here."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS outbox_keys (connection TEXT NOT NULL, okey TEXT NOT NULL,"
        " last INTEGER NOT NULL, PRIMARY KEY (connection, okey)) WITHOUT ROWID"
    )
    db.execute(
        "INSERT OR REPLACE INTO outbox_keys (connection, okey, last)"
        " SELECT connection, okey, MAX(id) FROM outbox GROUP BY connection, okey"
    )
    count, size, upto = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(id), 0) FROM outbox"
    ).fetchone()
    db.executemany(
        "INSERT OR REPLACE INTO outbox_meta (name, value) VALUES (?, ?)",
        [("count", count), ("bytes", size), ("keys_upto", upto)],
    )


def _new_results(db: sqlite3.Connection) -> None:
    """Version 4: new result ids go to ``results_new`` first and into ``results`` in merges.

    ``results_h`` is an index on a hash: each id inserted lands on a random one of its leaf pages,
    and with 100,000 ids kept a commit of 100 alerts wrote ~100 whole pages to the WAL (5.4 KiB
    per alert, against 0.8 KiB without the index). ``results_new`` stays small (its index a few
    pages, written again by every commit); every _MERGE_EVERY ids its rows move into ``results``
    sorted by hash, so each leaf page of ``results_h`` is written about once per merge. A
    look-up reads both. Nothing to convert in an older file (the new table starts empty)."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS results_new (seq INTEGER PRIMARY KEY, connection TEXT NOT NULL,"
        " topic TEXT NOT NULL, rid TEXT NOT NULL, h INTEGER NOT NULL)"
    )
    db.execute("CREATE INDEX IF NOT EXISTS results_new_h ON results_new (h)")


# Step i takes the file from version i-1 to i (gateway._migrate); never edit one that has shipped, append.
SCHEMA = Schema(
    "outbox",
    (
        Step("outbox and results tables", _tables),
        Step("results indexed by hash", _index_results),
        Step("key summary and counts", _summary),
        Step("new result ids apart until merged", _new_results),
    ),
)
_INSERT_OUTBOX_SAME = "INSERT INTO outbox (connection, topic, retain, created, okey, body, size) VALUES "
_INSERT_OUTBOX = "INSERT INTO outbox (created, connection, topic, retain, okey, body, size) VALUES "
_CONN_TOPIC_RETAIN = itemgetter(0, 1, 4)
_INSERT_RESULTS = "INSERT INTO results_new (connection, topic, seq, rid, h) VALUES "
_CONN_TOPIC = itemgetter(1, 2)
_MERGE_EVERY = 4096  # outbox ids between two merges of results_new into results
_SAVE_COUNTS = (
    "INSERT INTO outbox_meta (name, value) VALUES ('count', ?), ('bytes', ?) "
    "ON CONFLICT(name) DO UPDATE SET value = excluded.value"
)


class SqliteOutboxStore:
    """The outbox's own SQLite file (WAL, synchronous=FULL, one connection, one thread)."""

    def __init__(self, path: Path, seq_path: Path | None = None, seq_block: int = 10_000, synchronous: str = "FULL"):
        self.synchronous = synchronous  # FULL: a commit survives a power cut; NORMAL (low_wear): a crash
        self.path = path
        self.seq_path = seq_path
        self.seq_block = seq_block
        self._db: sqlite3.Connection | None = None
        self._reserved = 0
        self._count = 0
        self._bytes = 0
        self._reclaim_armed = True  # free pages may be worth giving back (cleared when there are none)
        self._page = 4096
        self.disk_bytes = 0  # what the quota counts, as of the last commit (see _disk)
        self._hashes: dict[tuple[str, str, str], int] = {}  # of the last known_results' keys
        # (connection, ordering key) -> the highest id appended with it (see backlog_keys); saved
        # to outbox_keys every _KEYS_SAVE_EVERY rows, up to _keys_upto
        self._keys: dict[tuple[str, str], int] = {}
        self._keys_upto = 0
        self._keys_prune_at = 1024

    def open(self) -> StoreInfo:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        refuse_newer(self.path, SCHEMA)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # Before anything else: a new file is created able to give pages back (an older file is
        # converted by its first reclaim).
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
        self._page = int(db.execute("PRAGMA page_size").fetchone()[0])
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        # Rows go in at the tail and leave from the head: a small page cache holds both ends (the
        # default 2 MiB only keeps pages of rows already deleted).
        db.execute("PRAGMA cache_size=-256")
        try:
            migrate(db, self.path, SCHEMA)
        except BaseException:
            db.close()
            raise
        self._db = db
        used = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
        self.disk_bytes = used * self._page + _WAL_RESERVE
        fresh = db.execute("SELECT 1 FROM sqlite_sequence WHERE name='outbox'").fetchone() is None
        max_id = self._max_id()
        floor = self._read_seq_file()
        if fresh and floor > max_id:
            # A new database while the seq file says numbers were used (the database was lost,
            # or an earlier version numbered messages): continue above them, never below.
            db.execute("BEGIN")
            db.execute("DELETE FROM sqlite_sequence WHERE name='outbox'")
            db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (floor,))
            db.execute("COMMIT")
            max_id = floor
        self._reserved = floor
        # No read of the whole backlog: the counts and the key summary are kept in the file; only
        # the rows appended since the summary was last saved (fewer than _KEYS_SAVE_EVERY and one
        # commit) are read.
        meta = dict(db.execute("SELECT name, value FROM outbox_meta").fetchall())
        if "count" in meta and "bytes" in meta:
            self._count, self._bytes = int(meta["count"]), int(meta["bytes"])
        else:  # pragma: no cover - written by schema step 3 and every commit since
            self._count, self._bytes = self.stats()
        self._keys_upto = int(meta.get("keys_upto", 0))
        keys = self._keys = {(c, k): n for c, k, n in db.execute("SELECT connection, okey, last FROM outbox_keys")}
        for c, k, last in db.execute(
            "SELECT connection, okey, MAX(id) FROM outbox WHERE id > ? GROUP BY connection, okey", (self._keys_upto,)
        ):
            keys[(c, k)] = max(last, keys.get((c, k), 0))
        self._prune_keys()
        return StoreInfo(max_id, self._count, self._bytes, int(meta.get("dropped", 0)))

    def _prune_keys(self) -> int:
        """Forget (in memory) the keys whose every row is gone: their last id is below the oldest row.
        Returns that oldest id (past the highest if none is left)."""
        assert self._db is not None
        lo = self._db.execute("SELECT MIN(id) FROM outbox").fetchone()[0]
        lo = lo if lo is not None else self._max_id() + 1
        self._keys = {k: last for k, last in self._keys.items() if last >= lo}
        self._keys_prune_at = max(1024, 2 * len(self._keys))
        return lo

    def _save_keys(self, upto: int) -> None:
        """In the caller's transaction: write the keys appended since the last save, and forget the
        keys every row of which is gone (a summary that only grew would be a scan of its own)."""
        db = self._db
        assert db is not None
        since = self._keys_upto
        changed = [(c, k, last) for (c, k), last in self._keys.items() if last > since]
        _insert(db, "INSERT OR REPLACE INTO outbox_keys (connection, okey, last) VALUES ", "(?,?,?)", changed)
        if len(self._keys) > self._keys_prune_at:
            db.execute("DELETE FROM outbox_keys WHERE last < ?", (self._prune_keys(),))
        db.execute("INSERT OR REPLACE INTO outbox_meta (name, value) VALUES ('keys_upto', ?)", (upto,))
        self._keys_upto = upto

    def _max_id(self) -> int:
        assert self._db is not None
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
        return int(row[0]) if row else 0

    def _read_seq_file(self) -> int:
        if self.seq_path is None:
            return 0
        try:
            return int(self.seq_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError:
            # torn or edited: start past anything plausible rather than go back
            return int(os.path.getmtime(self.seq_path) * 1000)

    def _reserve(self, upto: int) -> None:
        if self.seq_path is None or upto <= self._reserved:
            return
        end = upto + self.seq_block
        tmp = self.seq_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(str(end))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.seq_path)
        self._reserved = end

    def append(
        self,
        rows: list[tuple[str, str, str, bytes, bool, int]],
        delete: list[int],
        max_bytes: int,
        max_rows: int | None,
        results: list[tuple[int, str, str, str]] | None = None,
    ) -> tuple[int, int, int, int]:
        db = self._db
        assert db is not None
        first = self._max_id() + 1
        # The seq block is reserved on disk before any number of it is committed.
        self._reserve(first + len(rows))
        now = time.time()
        keys_upto = self._keys_upto
        add = sum(r[5] for r in rows)
        db.execute("BEGIN IMMEDIATE")
        try:
            self._delete(delete)
            # Near the quota, room is made first (for the rows and their result ids, with a margin
            # for the estimate), so that the file does not grow past the quota within the commit.
            room = add + add // 8 + _RESULT_ROW * len(results or ())
            if (first + len(rows)) // _MERGE_EVERY != first // _MERGE_EVERY:
                # this commit merges results_new into results: both copies are in the file until it ends
                room += _RESULT_ROW * _MERGE_EVERY
            early = self._trim(max_bytes - room, None) if self.disk_bytes + room > max_bytes else (0, 0, 0)
            # bytearray and int: sqlite3 binds them as they are, where bytes and bool each first go
            # through its adapter look-up (about 2,000 CPU instructions a value)
            if len(set(map(_CONN_TOPIC_RETAIN, rows))) == 1:  # an alert batch: bound once, not per row
                c, t, _, _, keep, _ = rows[0]
                own = [x for _, _, k, b, _, n in rows for x in (k, bytearray(b), n)]
                _insert_sharing(db, _INSERT_OUTBOX_SAME, (c, t, 1 if keep else 0, now), 3, own)
            else:
                own = [x for c, t, k, b, keep, n in rows for x in (c, t, 1 if keep else 0, k, bytearray(b), n)]
                _insert_sharing(db, _INSERT_OUTBOX, (now,), 6, own)
            self._count += len(rows)
            self._bytes += add
            keys = self._keys
            for i, r in enumerate(rows):
                keys[(r[0], r[2])] = first + i
            if first + len(rows) - 1 - self._keys_upto >= _KEYS_SAVE_EVERY:
                self._save_keys(first + len(rows) - 1)
            if results:
                hashed = self._hashes  # a hash of 0 is made again: still the same hash
                _, c, t, _ = results[0]
                if len(set(map(_CONN_TOPIC, results))) == 1:
                    own = [
                        x
                        for i, _, _, rid in results
                        for x in (first + i, rid, hashed.get((c, t, rid)) or _result_hash(c, t, rid))
                    ]
                    _insert_sharing(db, _INSERT_RESULTS, (c, t), 3, own)
                else:
                    own = [
                        x
                        for i, c, t, rid in results
                        for x in (c, t, first + i, rid, hashed.get((c, t, rid)) or _result_hash(c, t, rid))
                    ]
                    _insert_sharing(db, _INSERT_RESULTS, (), 5, own)
                self._hashes = {}
                if (first + len(rows)) // 1000 != first // 1000:  # now and then, not on every commit
                    db.execute("DELETE FROM results_new WHERE seq <= ?", (first + len(rows) - results_kept(max_bytes),))
            if (first + len(rows)) // _MERGE_EVERY != first // _MERGE_EVERY:
                self._merge_results(first + len(rows) - results_kept(max_bytes))
            dropped, freed, hi = self._trim(max_bytes, max_rows)
            dropped, freed, hi = dropped + early[0], freed + early[1], max(hi, early[2])
            if dropped:
                db.execute(
                    "INSERT INTO outbox_meta (name, value) VALUES ('dropped', ?) "
                    "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                    (dropped,),
                )
            db.execute(_SAVE_COUNTS, (self._count, self._bytes))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._count, self._bytes = self.stats()
            self._keys_upto = keys_upto  # the summary's save (if any) was rolled back too
            raise
        if self._count > _CAUGHT_UP:
            self._reclaim_armed = True
        return first, dropped, freed, hi

    def known_results(self, keys: list[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
        db = self._db
        assert db is not None
        wanted = set(keys)
        # kept for the append that follows a look-up (the outbox asks, then appends the rest)
        self._hashes = hashed = {k: _result_hash(*k) for k in wanted}
        hashes = list(set(hashed.values()))
        found: set[tuple[str, str, str]] = set()
        for at in range(0, len(hashes), 500):  # one statement per 500 keys, not one per key
            _, params = in_list(hashes[at : at + 500])  # padded to one of a few lengths
            # merged, and not merged yet: one statement, the hashes bound once for both tables;
            # a hash can be shared, so the text is compared
            found.update(k for k in db.execute(_known_sql(len(params)), params) if k in wanted)
        return found

    def _merge_results(self, oldest: int) -> None:
        """Forget the result ids up to ``oldest`` and move those of ``results_new`` into
        ``results``, in the current transaction, sorted by hash: the deletes and the inserts go
        through the leaf pages of ``results_h`` once, in one commit (each deleted id sits on a
        random one of them too, so deleting them more often would write them all more often)."""
        db = self._db
        assert db is not None
        db.execute("DELETE FROM results WHERE seq <= ?", (oldest,))
        db.execute(
            "INSERT INTO results (seq, connection, topic, rid, h)"
            " SELECT seq, connection, topic, rid, h FROM results_new ORDER BY h"
        )
        db.execute("DELETE FROM results_new")

    def _disk(self, max_bytes: int) -> int:
        """What the quota counts, in the current transaction: the file's pages in use (messages, the
        key summary, the result ids, indexes; not its free pages, which the next rows reuse before
        the file grows) plus the WAL's share, _WAL_RESERVE. Two reads of the file's header."""
        db = self._db
        assert db is not None
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        if pages * self._page + _WAL_RESERVE > max_bytes:  # else the free pages need not be counted
            pages -= db.execute("PRAGMA freelist_count").fetchone()[0]
        self.disk_bytes = pages * self._page + _WAL_RESERVE
        return self.disk_bytes

    def _trim(self, max_bytes: int, max_rows: int | None) -> tuple[int, int, int]:
        """Drop the oldest rows while the quota is exceeded (rows or :meth:`_disk`): (rows, their
        bytes, the highest id dropped)."""
        db = self._db
        assert db is not None
        dropped = freed = hi = 0
        while True:
            over_rows = self._count - max_rows if max_rows is not None else 0
            over_bytes = self._disk(max_bytes) - max_bytes
            if over_rows <= 0 and over_bytes <= 0:
                return dropped, freed, hi
            # rows free about their size in pages; what a partly filled page keeps, the next round takes
            want = max(over_bytes, self._page) if over_bytes > 0 else 0
            n = size = 0
            for rid, rsize in db.execute("SELECT id, size FROM outbox WHERE id > ? ORDER BY id", (hi,)):
                if n >= over_rows and size >= want:
                    break
                n += 1
                size += rsize
                hi = rid
            if not n:  # nothing left to drop: the rest of the file alone is over the quota
                return dropped, freed, hi
            db.execute("DELETE FROM outbox WHERE id <= ?", (hi,))
            self._count -= n
            self._bytes -= size
            dropped += n
            freed += size

    def _delete(self, ids: list[int]) -> None:
        db = self._db
        assert db is not None
        # Acknowledgements come mostly in order: a run of consecutive ids is one range, the
        # ids left over go 500 to a statement (under alert load, not one statement per alert).
        # What leaves is counted by SQLite (one row back per statement), not handed back row by
        # row: a row per deleted message cost more than the delete itself.
        ranges, single = _runs(ids)
        for lo, hi in ranges:
            self._forget(db.execute(_GONE_RANGE, (lo, hi)).fetchone())
            db.execute("DELETE FROM outbox WHERE id BETWEEN ? AND ?", (lo, hi))
        for at in range(0, len(single), 500):
            marks, params = in_list(single[at : at + 500])
            self._forget(db.execute(f"{_GONE_IN}({marks})", params).fetchone())
            db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", params)

    def _forget(self, gone: tuple[int, int]) -> None:
        """Count out ``(rows, bytes)`` about to be deleted."""
        self._count -= gone[0]
        self._bytes -= gone[1]

    def delete(self, ids: list[int]) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            self._delete(ids)
            db.execute(_SAVE_COUNTS, (self._count, self._bytes))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._count, self._bytes = self.stats()
            raise

    def reclaim(self) -> bool:
        db = self._db
        assert db is not None
        if not self._reclaim_armed or self._count > _CAUGHT_UP:
            return self._reclaim_armed
        try:
            page = db.execute("PRAGMA page_size").fetchone()[0]
            if db.execute("PRAGMA freelist_count").fetchone()[0] * page < _RECLAIM_MIN:
                self._reclaim_armed = False  # until the next backlog
                return False
            if db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0:
                # a file created before the outbox gave space back: VACUUM copies what is left
                # (a few rows and the result ids) into a file that can (auto_vacuum was set at open)
                log.info("outbox %s: giving the space of a drained backlog back (once: VACUUM)", self.path)
                db.execute("VACUUM")
            else:
                db.executescript(f"PRAGMA incremental_vacuum({_RECLAIM_STEP})")  # execute() frees one page
        except sqlite3.Error as exc:  # the space stays in the file (and is reused); nothing else is at stake
            log.warning("outbox %s: cannot give free space back to the filesystem: %s", self.path, exc)
            self._reclaim_armed = False
        return self._reclaim_armed

    def load(self, connection: str, after: int, upto: int | None, limit: int) -> list[Row]:
        db = self._db
        assert db is not None
        q = (
            "SELECT id, connection, topic, okey, body, retain, size FROM outbox "
            "WHERE connection=? AND id>?" + (" AND id<=?" if upto is not None else "") + " ORDER BY id LIMIT ?"
        )
        args: tuple[Any, ...] = (connection, after, upto, limit) if upto is not None else (connection, after, limit)
        return [Row(r[0], r[1], r[2], r[3], bytes(r[4]), bool(r[5]), r[6]) for r in db.execute(q, args)]

    def backlog_keys(self, connection: str) -> tuple[int, dict[str, int]]:
        # Appends run in this thread too: the summary holds exactly the rows up to mark.
        return self._max_id(), {k: last for (c, k), last in self._keys.items() if c == connection}

    def connections(self) -> set[str]:
        return {c for c, _ in self._keys}

    def stats(self) -> tuple[int, int]:
        db = self._db
        assert db is not None
        count, size = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone()
        return int(count), int(size)

    def waiting_keys(self, connections: set[str]) -> dict[str, int]:
        # A row older than its key's newest can still be in the file with the newest gone (several
        # in flight, the newest acknowledged, the line lost): such a key is not counted here.
        db = self._db
        assert db is not None
        lasts = [(last, c) for (c, _), last in self._keys.items() if c in connections]
        found: dict[str, int] = {}
        for at in range(0, len(lasts), 500):
            chunk = lasts[at : at + 500]
            marks = ",".join("?" * len(chunk))
            present = {r[0] for r in db.execute(f"SELECT id FROM outbox WHERE id IN ({marks})", [i for i, _ in chunk])}
            for last, c in chunk:
                if last in present:
                    found[c] = found.get(c, 0) + 1
        return found

    def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()


# --- the outbox ------------------------------------------------------------------------------


def _unseen(
    rows: list[Any], results: list[tuple[int, str, str, str]], known: set[tuple[str, str, str]]
) -> tuple[list[Any], list[tuple[int, str, str, str]], int]:
    """``rows`` without the results in ``known`` or taken earlier in the same batch, the remaining
    results re-indexed, and how many were left out."""
    seen_now: set[tuple[str, str, str]] = set()
    skip = set()
    for i, c, t, rid in results:
        key = (c, t, rid)
        if key in known or key in seen_now:
            skip.add(i)
        seen_now.add(key)
    if not skip:
        return rows, results, 0
    kept = [r for i, r in enumerate(rows) if i not in skip]
    new_index = {old: new for new, old in enumerate(i for i in range(len(rows)) if i not in skip)}
    return kept, [(new_index[i], c, t, rid) for i, c, t, rid in results if i not in skip], len(skip)


class SendOrder:
    """Which row goes next in one connected period: a plain, synchronous scheduler.

    The backlog (rows committed before the connection came up) and live rows (committed since)
    take turns one for one, so fresh messages are not stuck behind hours of backlog; but a live
    row never goes ahead of an older row with the same ordering key: it is deferred until that
    key's last backlog row went out (``backlog_last``: ordering key -> id of its last backlog
    row). The sender fills :attr:`backlog` and :attr:`live` from the store and asks :meth:`next`.
    """

    __slots__ = (
        "_held",
        "_turn_live",
        "backlog",
        "backlog_done",
        "backlog_last",
        "deferred",
        "live",
        "n_deferred",
        "pos",
        "ready",
    )

    def __init__(self, backlog_last: dict[str, int]):
        # An id at or past each key's last backlog row (the store's summary may name a later one,
        # or a key whose rows are gone): a key waits only while the backlog sent is before it.
        self.backlog_last = backlog_last
        self.backlog: deque[Row] = deque()
        self.live: deque[Row] = deque()
        self.ready: deque[Row] = deque()  # live rows released once their key's backlog went out
        self.deferred: dict[str, deque[Row]] = {}
        self.n_deferred = 0  # rows in deferred
        self.backlog_done = not backlog_last
        self.pos = 0  # id of the last backlog row handed out (the backlog goes in id order)
        self._held: list[tuple[int, str]] = []  # (backlog_last, key) of each key in deferred, a heap
        self._turn_live = False

    def finish_backlog(self) -> None:
        """The store has no more backlog rows: whatever was deferred may go."""
        self.backlog_done = True
        for q in self.deferred.values():
            self.ready.extend(q)
        self.deferred.clear()
        self.n_deferred = 0
        self.backlog_last.clear()
        self._held.clear()

    def next(self) -> Row | None:
        """The row to send next, or ``None`` when none is at hand now."""
        live, deferred, backlog_last = self.live, self.deferred, self.backlog_last
        # live rows whose key still has backlog to go wait behind it
        while live:
            key = live[0].okey
            if key not in deferred:
                last = backlog_last.get(key)
                if last is None:
                    break
                if last <= self.pos:  # its backlog went out already
                    del backlog_last[key]
                    break
                heapq.heappush(self._held, (last, key))
                deferred[key] = deque()
            deferred[key].append(live.popleft())
            self.n_deferred += 1
        live_q = self.ready if self.ready else live
        if self.backlog and (not live_q or not self._turn_live):
            row = self.backlog.popleft()
            self.pos = row.id
            held = self._held
            while held and held[0][0] <= row.id:  # every backlog row of these keys went out
                key = heapq.heappop(held)[1]
                backlog_last.pop(key, None)
                waited = deferred.pop(key)
                self.ready.extend(waited)
                self.n_deferred -= len(waited)
        elif live_q:
            row = live_q.popleft()
        else:
            return None
        self._turn_live = not self._turn_live
        return row


class _RateCap:
    """A token bucket: at most ``rate`` messages a second, bursts of up to one second's worth."""

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.clock = clock
        self.tokens = rate or 0.0
        self.last = clock()

    async def take(self) -> None:
        if self.rate is None:
            return
        while True:
            now = self.clock()
            self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / self.rate)


class Outbox:
    """The gateway's outbox: durable ``put``, one sender task per connection, quota and counters.

    ``links`` maps connection names to objects with ``connected``, ``wait_connected()``,
    ``publish_acked(topic, payload, retain) -> Future``, ``in_flight`` and ``send_window``
    (:class:`gateway.mqtt.MqttLink`).
    """

    def __init__(
        self,
        path: Path,
        gateway_id: str,
        links: dict[str, Any],
        config: OutboxConfig | None = None,
        *,
        store: OutboxStore | None = None,
        seq_path: Path | None = None,
        on_refused: Callable[[str, str, bytes, str], None] | None = None,
        synchronous: str = "FULL",
    ):
        self.path = path
        self.gateway_id = gateway_id
        self.links = links
        self._all: dict[str, Any] = dict(links)  # plus links sinks register (webhooks)
        self._extra: dict[str, Any] = {}
        self._refs: dict[str, int] = {}  # running sinks per registered link
        self._link_tasks: dict[str, list[asyncio.Task[None]]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self.config = config or OutboxConfig()
        self.store: OutboxStore = store or SqliteOutboxStore(path, seq_path, synchronous=synchronous)
        self.on_refused = on_refused
        self._exec: ThreadPoolExecutor | None = None
        self._envelope = Envelope(gateway_id)
        # counters (exact; also what /metrics shows)
        self.count = 0
        self.bytes = 0
        self.dropped = 0
        self.published = 0
        self.replayed = 0
        self.refused = 0
        self.duplicates = 0  # results not queued again: the outbox had taken them before a restart
        self.rejected = 0  # messages that could not be stored (see gateway._records)
        self.last_id = 0
        self.startup_max = 0  # rows up to this id may have been sent by an earlier process
        self._trimmed_hi = 0  # every id up to this one is gone (acknowledged or dropped)
        self._attempted: set[int] = set()  # sent, connection lost before the PUBACK
        self._acked: set[int] = set()  # acknowledged, delete not yet committed
        self._to_delete: list[int] = []
        self._sizes: dict[int, int] = {}
        self._new: dict[str, asyncio.Event] = {}
        self._restart: set[str] = set()  # connections whose in-flight messages were lost
        self._backlog_sent: set[str] = set()  # connections whose sender's pass handed out its whole backlog
        self._live: dict[str, deque[Row]] = {}  # rows just committed, so sending need not read them back
        self._live_gap: dict[str, int] = {}  # ...complete only for ids above this (default: startup_max)
        self._topics_ok: set[tuple[str, str]] = set()  # (connection, topic) its link takes, as checked
        self._slot = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._rate = _RateCap(self.config.max_rate)
        self._rl = RateLimitedLog(log)
        self._opened = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._reclaim = True  # the file may have space to give back (see OutboxStore.reclaim)

    # --- lifecycle -----------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._exec is not None, "outbox is not open"
        return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)

    async def open(self) -> None:
        self._exec = ThreadPoolExecutor(1, thread_name_prefix="sluice-outbox")
        try:
            info = await self._run(self.store.open)
        except sqlite3.Error as exc:
            raise SluiceError(f"cannot open the outbox {self.path}: {exc}") from exc
        self.last_id = self.startup_max = info.max_id
        self.count, self.bytes, self.dropped = info.count, info.bytes, info.dropped
        self._opened = True
        if self.count:
            log.info(
                "outbox %s: %d messages (%d bytes) waiting from before the restart; they will be "
                "sent with replayed: true",
                self.path,
                self.count,
                self.bytes,
            )
            # the summary names the connections with rows (maybe a few more), and for each of its
            # keys the newest row: counting a connection's rows would read the whole backlog
            gone = {c for c in await self._run(self.store.connections) if c not in self.links and not _sinks_link(c)}
            owed = await self._run(self.store.waiting_keys, gone) if gone else {}
            for conn, keys in sorted(owed.items()):
                log.warning(
                    "outbox %s: messages for connection %r (ordering keys waiting: %d), which the config no "
                    "longer has; they wait (and count against the quota) until it is back",
                    self.path,
                    conn,
                    keys,
                )

    # how long after start the sinks have to take up the webhooks the outbox still owes messages to
    UNCLAIMED_AFTER = 30.0

    async def run(self) -> None:
        """Send what the outbox holds through every link, until :meth:`close` (or cancelled)."""
        self._task = asyncio.current_task()
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tg.create_task(self._deleter(), name="outbox:delete")
            if self.count:
                tg.create_task(self._warn_unclaimed(), name="outbox:unclaimed")
            for name in self._all:
                self._start_sender(name)

    async def _warn_unclaimed(self) -> None:
        """Webhook links are registered by their sinks once the pipelines run, so messages owed to a
        webhook the config no longer has can only be told apart a while after start."""
        await asyncio.sleep(self.UNCLAIMED_AFTER)
        try:
            unclaimed = {c for c in await self._run(self.store.connections) if _sinks_link(c) and c not in self._extra}
            owed = await self._run(self.store.waiting_keys, unclaimed) if unclaimed else {}
        except sqlite3.Error:
            return  # the sender reports an unreadable outbox
        for conn, keys in sorted(owed.items()):
            if conn not in self._extra:  # not taken up meanwhile
                log.warning(
                    "outbox %s: messages for %s (ordering keys waiting: %d), which no sink in the config has; they "
                    "wait (and count against the quota) until a sink of that kind, pipeline and id is back",
                    self.path,
                    conn,
                    keys,
                )

    def _start_sender(self, name: str) -> None:
        assert self._tg is not None
        tasks = [self._tg.create_task(self._sender(name), name=f"outbox:send:{name}")]
        link = self._extra.get(name)
        if link is not None:
            tasks.append(self._tg.create_task(link.run(), name=f"outbox:link:{name}"))
        self._link_tasks[name] = tasks

    def register_link(self, name: str, link: Any) -> Any:
        """Add a destination besides the broker links (a webhook): the outbox runs it and sends to it.

        ``link`` has the publisher interface plus ``async run()``, ``async close()`` and
        ``configure(other)``. Registering a name again (a pipeline reloaded) keeps the running
        link, takes the new one's settings, and returns the link to use.
        """
        old = self._extra.get(name)
        if old is not None:
            old.configure(link)
            self._refs[name] = self._refs.get(name, 0) + 1
            return old
        if name in self._all:
            raise SluiceError(f"outbox: {name!r} is a broker connection's name")
        self._all[name] = self._extra[name] = link
        self._topics_ok.clear()  # checked by whichever link had the name before
        self._refs[name] = 1
        if self._tg is not None:
            self._start_sender(name)
        return link

    def release_link(self, name: str) -> None:
        """A sink that registered ``name`` stopped (:meth:`retire_idle_links` may then close the link)."""
        if name in self._refs:
            self._refs[name] -= 1

    async def retire_idle_links(self) -> list[str]:
        """Close the registered links that no running sink uses and the outbox holds nothing for.

        Called after a reload: a webhook whose sink was removed or renamed would otherwise keep its
        sender, its HTTP session and its sockets for the life of the process. A link still owed
        messages keeps sending them (at least once); a later reload or the next start retires it.
        """
        idle = [n for n, refs in self._refs.items() if refs <= 0 and n in self._extra]
        if not idle or not self._opened:
            return []
        await self._flush_deletes()  # what was acknowledged is not owed any more
        # Counting a connection's rows would read the whole backlog. A link is owed nothing when
        # the summary names no key of it, or when its sender handed out the whole backlog in its
        # current pass, nothing is in flight or lost, and no key's newest row is left: a key's rows
        # go out in id order, so one left behind would keep its key's newest in the file too.
        maybe = await self._run(self.store.connections)
        owed = set(maybe.intersection(idle))
        if owed:
            keys = await self._run(self.store.waiting_keys, owed)
            owed = {
                n
                for n in owed
                if keys.get(n)
                or n not in self._backlog_sent
                or n in self._restart
                or getattr(self._extra[n], "in_flight", 0)
            }
        retired = []
        for name in idle:
            if name in owed or self._refs.get(name, 0) > 0:  # owed, or a sink took it up meanwhile
                continue
            for t in self._link_tasks.pop(name, []):
                t.cancel()
            link = self._extra.pop(name)
            del self._all[name], self._refs[name]
            for d in (self._new, self._live, self._live_gap):
                d.pop(name, None)
            self._restart.discard(name)
            self._backlog_sent.discard(name)
            await link.close()
            retired.append(name)
        if retired:
            log.info("outbox: closed %s (no sink uses them and nothing waits for them)", ", ".join(retired))
        return retired

    async def close(self, grace: float = 2.0) -> None:
        """Stop sending; wait up to ``grace`` seconds for PUBACKs in flight; commit deletes; close.

        What is still unacknowledged stays on disk and goes out (``replayed: true``) next start.
        """
        if not self._opened:
            return
        self._closing = True
        deadline = time.monotonic() + grace
        while any(getattr(lk, "in_flight", 0) for lk in self._all.values()) and time.monotonic() < deadline:
            self._slot.clear()  # set by every acknowledgement
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot.wait(), max(0.0, deadline - time.monotonic()))
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tg = None
        for link in self._extra.values():
            await link.close()
        await self._flush_deletes()
        self._opened = False
        await self._run(self.store.close)
        assert self._exec is not None
        self._exec.shutdown(wait=True)
        self._exec = None

    # --- writing -------------------------------------------------------------------------

    async def put(
        self, messages: Iterable[tuple[str, str, dict[str, Any] | bytes, str | None]], retain: bool = False
    ) -> int:
        """Commit messages ``(connection, topic, fields, ordering key)`` durably; return the first seq.

        ``fields`` is the message's JSON object (or its encoded bytes) without ``gateway_id``,
        ``seq`` and ``replayed``, which are added when it is sent. The ordering key (default:
        the topic) names which messages must stay in order among themselves.

        A message whose fields hold a ``result_id`` (a window result) is taken at most once per
        connection and topic: a restart that computes the result again, after the outbox had
        committed it, does not queue it a second time (counted in ``duplicates``).
        """
        rows = []
        conns = set()
        results: list[tuple[int, str, str, str]] = []
        topics_ok = self._topics_ok
        links = self._all
        last_conn = last_topic = None  # of the message before, if it was taken: checked already
        for conn, topic, fields, okey in messages:
            same = conn is last_conn and topic is last_topic
            if not same and conn not in links:
                raise SluiceError(f"outbox: unknown connection {conn!r}")
            okey = okey if okey is not None else topic
            rid = fields.get("result_id") if isinstance(fields, dict) else None
            try:
                body = fields if isinstance(fields, bytes) else encode_fields(fields)
                # text the file (and the broker) cannot take is refused here, one message at a
                # time, rather than failing the whole batch in the writer
                okey.isascii() or okey.encode()  # isascii: a flag of the string, no copy
                if isinstance(rid, str):
                    rid.isascii() or rid.encode()
                if not same and (conn, topic) not in topics_ok:  # most messages go to a few topics: checked once
                    topic.encode()
                    check = getattr(links[conn], "topic_problem", None)  # the link's own rules
                    why = check(topic) if check is not None else None
                    if why is not None:
                        raise ValueError(why)
                    if len(topics_ok) >= 1024:
                        topics_ok.clear()
                    topics_ok.add((conn, topic))
            except (ValueError, RecursionError) as exc:  # a lone surrogate, a cycle, nested too deeply
                self._reject(conn, topic, fields, exc)
                continue
            if isinstance(rid, str):
                results.append((len(rows), conn, topic, rid))
            if not body.startswith(b"{"):
                raise ValueError("an outbox message must be a JSON object")
            rows.append((conn, topic, okey, body, retain, len(body) + len(topic) + len(okey) + _ROW_OVERHEAD))
            if not same:
                conns.add(conn)
                last_conn, last_topic = conn, topic
        if not rows:
            return self.last_id + 1
        async with self._write_lock:
            delete = self._to_delete
            self._to_delete = []
            try:
                rows, skipped, done = await self._run(self._commit, rows, delete, results)
            except BaseException:
                self._to_delete = delete + self._to_delete
                raise
            if skipped:
                self._duplicates(skipped)
            if done is None:
                return self.last_id + 1
            first, dropped, freed, hi = done
            self._deleted(delete)
            self.last_id = first + len(rows) - 1
            self.count += len(rows)
            if self.count > _CAUGHT_UP:
                self._reclaim = True
            self.bytes += sum(r[5] for r in rows)
            if dropped:
                self.dropped += dropped
                self.count -= dropped
                self.bytes -= freed
                self._trimmed_hi = max(self._trimmed_hi, hi)
                self._rl.warning(
                    "quota",
                    "outbox over its quota (%d bytes on disk, %s messages): dropped the %d oldest messages, up "
                    "to seq %d (%d dropped in all)",
                    self.config.max_bytes,
                    self.config.max_messages or "any",
                    dropped,
                    hi,
                    self.dropped,
                )
            live = self._live
            q_conn, q = None, None
            for i, (c, t, k, b, keep, n) in enumerate(rows, first):
                if c is not q_conn:
                    q_conn, q = c, live.get(c)
                    if q is None:
                        q = live[c] = deque()
                q.append(Row(i, c, t, k, b, keep, n))  # type: ignore[union-attr]
            for c in conns:
                cached = self._live.get(c)  # none when every row of c was a result taken before
                if cached is not None and (len(cached) > _LIVE_CACHE or not self._all[c].connected):
                    # nobody is sending (offline, or far behind): stop keeping a copy, which the next
                    # connected period would not use (it reads its backlog from disk)
                    cached.clear()
                    self._live_gap[c] = self.last_id
        for c in conns:
            self._event(c).set()
        return first

    def _commit(
        self, rows: list[Any], delete: list[int], results: list[tuple[int, str, str, str]]
    ) -> tuple[list[Any], int, tuple[int, int, int, int] | None]:
        """In the outbox's thread: leave out the results committed before, then append the rest.

        The look and the append are one hand-off to the thread, under the write lock, so nothing
        can commit between them. Returns the rows appended, how many were left out, and what
        :meth:`OutboxStore.append` returned (``None`` when there was nothing to commit)."""
        skipped = 0
        if results:
            rows, results, skipped = _unseen(rows, results, self.store.known_results([r[1:] for r in results]))
        if not rows and not delete:
            return rows, skipped, None
        return rows, skipped, self.store.append(rows, delete, self.config.max_bytes, self.config.max_messages, results)

    def _duplicates(self, n: int) -> None:
        self.duplicates += n
        self._rl.log(
            logging.INFO,
            "dup",
            "outbox: %d results computed again after a restart were already queued before it; not queued "
            "again (%d so far)",
            n,
            self.duplicates,
        )

    def _reject(self, conn: str, topic: str, fields: Any, exc: BaseException) -> None:
        """A message that cannot be stored: counted, logged at a limited rate, dead-lettered (``on_refused``)."""
        self.rejected += 1
        why = f"not stored in the outbox: {storable(exc)}"
        self._rl.log(logging.ERROR, "rejected", "outbox: message to %s %s (%d in all)", conn, why, self.rejected)
        if self.on_refused is not None:
            raw = fields if isinstance(fields, bytes) else storable(fields).encode()
            self.on_refused(conn, storable(topic), raw, why)

    def _deleted(self, ids: list[int]) -> None:
        self._acked.difference_update(ids)

    async def _flush_deletes(self) -> None:
        async with self._write_lock:
            if not self._to_delete:
                return
            ids, self._to_delete = self._to_delete, []
            try:
                await self._run(self.store.delete, ids)
            except sqlite3.Error as exc:
                # Still in the file: they will be sent again (replayed), never lost.
                log.error("outbox: cannot delete %d acknowledged messages: %s", len(ids), exc)
                self._to_delete = ids + self._to_delete
                return
            self._deleted(ids)

    async def _deleter(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            await self._flush_deletes()
            if self._reclaim and self.count <= _CAUGHT_UP:
                self._reclaim = await self._run(self.store.reclaim)

    def _event(self, conn: str) -> asyncio.Event:
        ev = self._new.get(conn)
        if ev is None:
            ev = self._new[conn] = asyncio.Event()
        return ev

    # --- sending -------------------------------------------------------------------------

    def _payload(self, row: Row, replayed: bool) -> bytes:
        return self._envelope.wrap(row.body, row.id, replayed)

    def _on_ack(self, fut: asyncio.Future[None], row: Row) -> None:
        if fut.cancelled():
            self._slot.set()
            return
        self._settled([row], 0, fut.exception())

    def _settled(self, rows: list[Row], i: int, exc: BaseException | None) -> None:
        """``rows[i]`` was acknowledged (``exc`` is ``None``), refused, or lost before its PUBACK."""
        self._slot.set()
        row = rows[i]
        if exc is None:
            self._finish(row)
            self.published += 1
        elif getattr(exc, "refused", False):  # gateway.mqtt.PublishRefused
            # Sending it again would be refused again: dead-letter it with the broker's reason.
            self.refused += 1
            self._finish(row)
            log.error("outbox: %s refused message seq %d on %s: %s", row.connection, row.id, row.topic, exc)
            if self.on_refused is not None:
                self.on_refused(row.connection, row.topic, self._payload(row, True), str(exc))
        else:
            # Lost before the PUBACK: the sender starts over from the oldest unacknowledged row.
            self._attempted.add(row.id)
            self._restart.add(row.connection)
            self._event(row.connection).set()

    def _acked_rows(self, rows: list[Row], indices: list[int]) -> None:
        """``rows[i]`` for each of ``indices`` was acknowledged (what :meth:`_settled` does for
        one, for all the PUBACKs of one socket read)."""
        self._slot.set()
        attempted, acked, to_delete, trimmed = self._attempted, self._acked, self._to_delete, self._trimmed_hi
        n = size = 0
        for i in indices:
            row = rows[i]
            rid = row.id
            if attempted:
                attempted.discard(rid)
            if rid > trimmed:
                acked.add(rid)
                to_delete.append(rid)
                n += 1
                size += row.size
        self.count -= n
        self.bytes -= size
        self.published += len(indices)

    def _finish(self, row: Row) -> None:
        self._attempted.discard(row.id)
        if row.id > self._trimmed_hi:
            self._acked.add(row.id)
            self._to_delete.append(row.id)
            self.count -= 1
            self.bytes -= row.size

    async def _sender(self, conn: str) -> None:
        link = self._all[conn]
        new = self._event(conn)
        while not self._closing:
            if not link.connected:
                await link.wait_connected()
                continue
            try:
                await self._pass(conn, link, new)
            except LinkError:
                pass  # lost mid-pass: the next pass starts again from the oldest unacknowledged row
            except sqlite3.Error as exc:
                self._rl.error(f"read:{conn}", "outbox: cannot read %s: %s; retrying", self.path, exc)
                await asyncio.sleep(1.0)
            except Exception:  # the sender's boundary: a bug must not stop delivery for good; say it loudly
                log.exception("outbox: sending to %s failed; starting over in 1 s", conn)
                await asyncio.sleep(1.0)

    async def _pass(self, conn: str, link: Any, new: asyncio.Event) -> None:
        """One connected period: replay the backlog, interleaved with live rows, until the link drops."""
        mark, backlog_last = await self._run(self.store.backlog_keys, conn)
        if backlog_last and self.count:
            log.info("outbox: %s connected; sending %d waiting messages", conn, self.count)
        order = SendOrder(backlog_last)
        if order.backlog_done:
            self._backlog_sent.add(conn)
        else:
            self._backlog_sent.discard(conn)
        b_cursor, l_cursor = 0, mark
        batch = _READ_BATCH

        out: list[Row] = []  # chosen, sent together in one write
        # the next backlog batch, read while this one is sent: the reads share the outbox's thread
        # with its commits, and a drain that waited for each read would idle the link meanwhile
        ahead: Future[list[Row]] | None = None

        def usable(r: Row) -> bool:
            return r.id > self._trimmed_hi and r.id not in self._acked

        self._restart.discard(conn)
        while not self._closing:
            if not link.connected or conn in self._restart:
                raise LinkError(conn, "connection lost")
            if not order.backlog_done and not order.backlog:
                await self._send_many(conn, link, out)
                if ahead is None:
                    rows = await self._run(self.store.load, conn, b_cursor, mark, batch)
                else:
                    rows, ahead = await asyncio.wrap_future(ahead), None
                if rows:
                    b_cursor = rows[-1].id
                    order.backlog.extend(r for r in rows if usable(r))
                    assert self._exec is not None
                    # not a task: left behind when the link drops, it is a read nobody waits for
                    ahead = self._exec.submit(self.store.load, conn, b_cursor, mark, batch)
                else:
                    order.finish_backlog()
                    self._backlog_sent.add(conn)
                continue
            if not order.live and not order.ready and self.last_id > l_cursor and order.n_deferred < _DEFER_MAX:
                new.clear()
                snap = self.last_id
                cache = self._live.get(conn)
                limit = min(batch, _DEFER_MAX - order.n_deferred)  # all of it may be held back
                if l_cursor >= self._live_gap.get(conn, self.startup_max):
                    # the memory copy holds every row after l_cursor: no need to read them back
                    while cache and cache[0].id <= l_cursor:
                        cache.popleft()
                    # with no backlog left to take turns with, live rows go out as they come
                    direct = order.backlog_done
                    take = out if direct else order.live
                    while cache and len(take) < limit:
                        r = cache.popleft()
                        if usable(r):
                            take.append(r)
                        l_cursor = r.id
                    if not cache:
                        l_cursor = max(l_cursor, snap)
                    if direct:
                        await self._send_many(conn, link, out)
                    continue
                await self._send_many(conn, link, out)
                rows = await self._run(self.store.load, conn, l_cursor, snap, limit)
                order.live.extend(r for r in rows if usable(r))
                # every row up to snap was committed before this read: none of this connection's is left
                l_cursor = rows[-1].id if len(rows) == limit else snap
                continue
            row = order.next()
            if row is None:
                await self._send_many(conn, link, out)
                if order.backlog_done and not order.deferred:
                    if self.last_id <= l_cursor:
                        await self._wait(new, link)
                continue
            if not usable(row):
                continue
            out.append(row)
            if len(out) >= 64:
                await self._send_many(conn, link, out)

    async def _wait(self, new: asyncio.Event, link: Any) -> None:
        """Until new rows arrive or the connection drops (checked every 0.5 s)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(new.wait(), 0.5)

    async def _send_many(self, conn: str, link: Any, rows: list[Row]) -> None:
        """Send ``rows`` (then empty the list), as many at a time as the window allows."""
        i = 0
        while i < len(rows):
            window = min(self.config.inflight, link.send_window)
            while link.in_flight >= window:
                self._slot.clear()
                if not link.connected or conn in self._restart:
                    raise LinkError(conn, "connection lost")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot.wait(), 0.5)
            chunk = rows[i : i + window - link.in_flight]
            if self._rate.rate is not None:
                chunk = chunk[:1]
                await self._rate.take()
            startup_max, attempted, wrap = self.startup_max, self._attempted, self._envelope.wrap
            flags = [r.id <= startup_max or r.id in attempted for r in chunk]
            messages = [(r.topic, wrap(r.body, r.id, f), r.retain) for r, f in zip(chunk, flags, strict=True)]
            calls = getattr(link, "publish_acked_calls", None)
            if calls is not None:  # callbacks instead of a future per message (MqttLink)
                sent = calls(messages, partial(self._settled, chunk), partial(self._acked_rows, chunk))
            else:
                futs = link.publish_acked_many(messages)
                for r, fut in zip(chunk, futs, strict=False):
                    fut.add_done_callback(lambda f, row=r: self._on_ack(f, row))
                sent = len(futs)
            if not sent:  # no packet id free right now (others use some): wait for an acknowledgement
                self._slot.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot.wait(), 0.5)
                continue
            self.replayed += sum(flags[:sent])
            i += sent
        rows.clear()

    # --- reporting -----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {
            "messages": self.count,
            "bytes": self.bytes,
            "max_bytes": self.config.max_bytes,
            "disk_bytes": getattr(self.store, "disk_bytes", None),
            "max_messages": self.config.max_messages,
            "dropped": self.dropped,
            "published": self.published,
            "replayed": self.replayed,
            "refused": self.refused,
            "duplicates": self.duplicates,
            "last_seq": self.last_id,
        }

    def problems(self) -> list[str]:
        out = []
        if max(self.bytes, getattr(self.store, "disk_bytes", 0)) > 0.9 * self.config.max_bytes or (
            self.config.max_messages and self.count > 0.9 * self.config.max_messages
        ):
            out.append(
                f"outbox nearly full ({self.count} messages, {self.bytes} bytes of messages, "
                f"{getattr(self.store, 'disk_bytes', self.bytes)} on disk); the oldest are "
                f"dropped past the quota ({self.dropped} dropped so far)"
            )
        for name, link in self._extra.items():
            if not link.connected:
                out.append(f"{name}: {link.state} ({link.last_error})")
        return out
