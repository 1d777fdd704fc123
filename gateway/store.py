"""The state store: node state (window partials, keyed state) in one SQLite file, written by one thread.

``<data_dir>/state.db`` is opened in WAL mode with ``synchronous=NORMAL``: a commit survives a
process crash (SIGKILL), and a power cut can lose only the last commits, never corrupt the file.
Everything that must never be lost once acknowledged (alerts, the outbox) belongs in a separate
file with ``synchronous=FULL``; this store holds state that the pipelines can rebuild by
replaying input.

Writes go through one writer thread with *group commit*: rows queue up and are written in one
transaction every ``commit_interval`` seconds, or sooner once ``commit_size`` rows wait, so an SD
card sees a few fsyncs a second whatever the event rate. Rows for the same (pipeline, node, key)
coalesce: only the newest value is written. The event loop never waits on the disk.

At open the file gets ``PRAGMA quick_check``; a corrupt file is moved aside (``state.db.corrupt-…``)
with a loud log and the store starts fresh, so a bad SD card sector costs state, not the gateway.
A disk quota (``PRAGMA max_page_count``) bounds the file; a full disk or quota pauses the writes
(rows stay queued, coalesced, and are retried with backoff) and shows in :meth:`health`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ._log import RateLimitedLog
from ._migrate import Schema, Step, migrate, refuse_newer
from ._records import RECORD_ERRORS, execute_each, storable
from ._retry import backoff
from .errors import SluiceError
from .schema import StateConfig

__all__ = ["SCHEMA", "SCHEMA_VERSION", "Checkpointer", "StateConfig", "StateStore", "StoreError"]

log = logging.getLogger(__name__)

# Step i takes the file from version i-1 to i (gateway._migrate); never edit one that has shipped, append.
SCHEMA = Schema(
    "state store",
    (
        Step(
            "state table",
            """
    CREATE TABLE state (
        pipeline TEXT NOT NULL,
        node TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        updated REAL NOT NULL,
        PRIMARY KEY (pipeline, node, key)
    ) WITHOUT ROWID;
    CREATE TABLE schema_version (version INTEGER NOT NULL, applied REAL NOT NULL);
    """,
        ),
        Step(
            "history table",
            """
    CREATE TABLE history (
        tier INTEGER NOT NULL,
        key TEXT NOT NULL,
        bucket REAL NOT NULL,
        n INTEGER NOT NULL,
        sum REAL NOT NULL,
        min REAL NOT NULL,
        max REAL NOT NULL,
        last_ts REAL NOT NULL,
        last REAL NOT NULL,
        PRIMARY KEY (tier, key, bucket)
    ) WITHOUT ROWID;
    """,
        ),
    ),
    log_table="schema_version",
)
SCHEMA_VERSION = SCHEMA.version


_Row = tuple[str, str, str, "bytes | None"]  # pipeline, node, key, value (None: delete)
_UPSERT_STATE = "INSERT OR REPLACE INTO state (pipeline, node, key, value, updated) VALUES (?,?,?,?,?)"
_DELETE_STATE = "DELETE FROM state WHERE pipeline=? AND node=? AND key=?"


class _Sql:
    __slots__ = ("params", "statement")

    def __init__(self, statement: str, params: list[tuple[Any, ...]]):
        self.statement = statement
        self.params = params


class StoreError(SluiceError):
    """The state store cannot do what was asked (disk full, quota, I/O error); ``path`` says which file."""

    def __init__(self, path: Path, message: str):
        self.path = path
        super().__init__(f"state store {path}: {message}")


def _is_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc)


class StateStore:
    """One SQLite state file with a single writer thread and group commit.

    Use ``await store.start()`` (or :meth:`open` from a thread) before writing, ``await store.close()``
    at the end. :meth:`write` only queues rows and never blocks; :meth:`flush` waits until
    everything queued before it is committed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        commit_interval: float = 0.1,
        commit_size: int = 2000,
        quota_bytes: int | None = None,
        max_queued: int = 100_000,
    ):
        self.path = Path(path)
        self.commit_interval = commit_interval
        self.commit_size = commit_size
        self.quota_bytes = quota_bytes
        self.max_queued = max_queued
        self.state = "closed"  # closed | ok | full | error
        self.last_error: str | None = None
        self.corrupt_recoveries = 0
        self.commits = 0
        self.rows_written = 0
        self.write_errors = 0
        self.rejected_rows = 0  # rows dropped because no file can hold them (see gateway._records)
        self._rl = RateLimitedLog(log)
        self.commit_seconds: deque[float] = deque(maxlen=4096)
        self._cond = threading.Condition()
        self._queue: deque[Any] = deque()
        self._queued_rows = 0
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None

    # --- opening ----------------------------------------------------------------------------

    def open(self) -> None:
        """Check, migrate and open the file, then start the writer thread. Blocking: call from a thread."""
        if self._thread is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        refuse_newer(self.path, SCHEMA)  # before anything, even a WAL checkpoint, writes to it
        self._check_integrity()
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # keep the WAL file itself small on a small card once checkpoints have run
            db.execute("PRAGMA journal_size_limit=4194304")
            migrate(db, self.path, SCHEMA)
            if self.quota_bytes is not None:
                page = db.execute("PRAGMA page_size").fetchone()[0]
                db.execute(f"PRAGMA max_page_count={max(8, self.quota_bytes // page)}")
        except BaseException:
            db.close()
            raise
        self._db = db
        self.state = "ok"
        self._thread = threading.Thread(target=self._writer, name=f"state-store:{self.path.name}", daemon=True)
        self._thread.start()

    async def start(self) -> None:
        await asyncio.to_thread(self.open)

    def _check_integrity(self) -> None:
        if not self.path.exists():
            return
        why = ""
        try:
            db = sqlite3.connect(self.path)
            try:
                rows = db.execute("PRAGMA quick_check").fetchall()
            finally:
                db.close()
            if rows != [("ok",)]:
                why = "; ".join(str(r[0]) for r in rows[:5])
        except sqlite3.DatabaseError as exc:
            why = str(exc)
        if not why:
            return
        stamp = time.strftime("%Y%m%dT%H%M%S")
        moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                os.replace(src, Path(f"{moved}{suffix}"))
        self.corrupt_recoveries += 1
        log.error(
            "STATE STORE CORRUPT: %s failed its integrity check (%s); moved it to %s and starting "
            "with empty state — windows and keyed state start over",
            self.path,
            why,
            moved,
        )

    # --- writing ----------------------------------------------------------------------------

    def execute(self, statement: str, params: list[tuple[Any, ...]]) -> bool:
        """Queue a statement (run with each parameter tuple) for the next group commit.

        Unlike state rows these do not coalesce, so while the store cannot write (disk or quota
        full) they are refused: False, and the caller counts what it lost.
        """
        if self._thread is None:
            raise StoreError(self.path, "not open")
        if self.state not in ("ok", "closed") or self._queued_rows > self.max_queued:
            return False
        with self._cond:
            self._queue.append(_Sql(statement, params))
            self._queued_rows += len(params)
            self._cond.notify()
        return True

    def write(self, rows: Iterable[_Row]) -> None:
        """Queue rows (``value`` None deletes the row); they are committed together, never split."""
        batch = list(rows)
        if not batch:
            return
        if self._thread is None:
            raise StoreError(self.path, "not open")
        with self._cond:
            self._queue.append(batch)
            self._queued_rows += len(batch)
            self._cond.notify()

    async def put_state(self, pipeline: str, node: str, key: str, blob: bytes | None) -> None:
        """Queue one row; waits (without blocking the loop) while too many rows are queued."""
        self.write([(pipeline, node, key, blob)])
        if self._queued_rows > self.max_queued:
            await self.flush()

    def _submit_flush(self, done: Callable[[BaseException | None], None]) -> None:
        with self._cond:
            self._queue.append(done)
            self._cond.notify()

    def on_committed(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call ``callback`` (in the writer thread) once everything queued so far is committed,
        with the error if it could not be."""
        if self._thread is None:
            callback(None)
            return
        self._submit_flush(callback)

    async def flush(self) -> None:
        """Wait until everything queued so far is committed; raise :class:`StoreError` if it cannot be."""
        if self._thread is None:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def resolve(f: asyncio.Future[None], exc: BaseException | None) -> None:
            if f.done():
                return
            if exc is None:
                f.set_result(None)
            else:
                f.set_exception(exc)

        self._submit_flush(lambda exc: loop.call_soon_threadsafe(resolve, fut, exc))
        await fut

    def flush_sync(self, timeout: float | None = None) -> None:
        """:meth:`flush` for threads and scripts outside an event loop."""
        if self._thread is None:
            return
        done = threading.Event()
        box: list[BaseException | None] = [None]

        def resolve(exc: BaseException | None) -> None:
            box[0] = exc
            done.set()

        self._submit_flush(resolve)
        if not done.wait(timeout):
            raise StoreError(self.path, "flush timed out")
        if box[0] is not None:
            raise box[0]

    def _writer(self) -> None:
        pending: dict[tuple[str, str, str], bytes | None] = {}
        sqls: list[_Sql] = []
        waiters: list[Callable[[BaseException | None], None]] = []
        last_commit = 0.0
        attempt = 0
        retry_at = 0.0
        stop = False
        while True:
            with self._cond:
                while True:
                    while self._queue:
                        item = self._queue.popleft()
                        if item is None:
                            stop = True
                        elif callable(item):
                            waiters.append(item)
                        elif type(item) is _Sql:
                            self._queued_rows -= len(item.params)
                            sqls.append(item)
                        else:
                            self._queued_rows -= len(item)
                            for p, n, k, v in item:
                                pending[(p, n, k)] = v
                    now = time.monotonic()
                    work = pending or sqls
                    if stop or (
                        (work or waiters)
                        and now >= retry_at
                        and (waiters or len(pending) >= self.commit_size or now - last_commit >= self.commit_interval)
                    ):
                        break
                    if work or waiters:
                        wake = max(retry_at, last_commit + self.commit_interval)
                        self._cond.wait(max(0.001, wake - now))
                    else:
                        self._cond.wait()
            error: BaseException | None = None
            if pending or sqls:
                try:
                    self._commit(pending, sqls)
                except Exception as exc:  # the writer thread's boundary: it must outlive any batch
                    if isinstance(exc, sqlite3.Error):
                        why = "disk or quota full" if _is_full(exc) else "write failed"
                    else:
                        why = f"write failed ({type(exc).__name__})"
                        self._rl.log(logging.ERROR, "bug", "state store %s: unexpected %r in a commit", self.path, exc)
                    error = StoreError(self.path, f"{why}: {storable(exc)}")
                    self.write_errors += 1
                    self.last_error = str(error)
                    if self.state == "ok":
                        log.error("%s; keeping %d rows queued and retrying", error, len(pending))
                    self.state = "full" if _is_full(exc) else "error"
                    retry_at = time.monotonic() + backoff(attempt, 5.0)
                    attempt += 1
                else:
                    if self.state != "ok":
                        log.warning("state store %s: writing again after %d failed attempts", self.path, attempt)
                    self.state = "ok"
                    attempt = 0
                    retry_at = 0.0
                    pending = {}
                    sqls = []
            last_commit = time.monotonic()
            for w in waiters:
                try:
                    w(error)
                except Exception:  # e.g. its event loop closed: the writer goes on for the others
                    log.warning("state store %s: a flush waiter failed", self.path, exc_info=True)
            waiters = []
            if stop and (not (pending or sqls) or error is not None):
                if pending:
                    log.error("state store %s: closing with %d rows not written: %s", self.path, len(pending), error)
                return

    def _commit(self, pending: dict[tuple[str, str, str], bytes | None], sqls: list[_Sql]) -> None:
        db = self._db
        assert db is not None
        t0 = time.perf_counter()
        now = time.time()
        ups = [(p, n, k, v, now) for (p, n, k), v in pending.items() if v is not None]
        dels = [(p, n, k) for (p, n, k), v in pending.items() if v is None]
        work = [(_UPSERT_STATE, ups), (_DELETE_STATE, dels), *((q.statement, q.params) for q in sqls)]
        bad: list[tuple[tuple[Any, ...], BaseException]] = []
        db.execute("BEGIN")
        try:
            try:
                for statement, params in work:
                    if params:
                        db.executemany(statement, params)
            except RECORD_ERRORS:
                # A row no file can hold (a lone surrogate in a key, NaN in a NOT NULL column, an
                # int beyond 64 bits): write the rest row by row and drop only the bad ones.
                db.execute("ROLLBACK")
                db.execute("BEGIN")
                for statement, params in work:
                    bad += execute_each(db, statement, params)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.commit_seconds.append(time.perf_counter() - t0)
        self.commits += 1
        self.rows_written += len(pending) + sum(len(q.params) for q in sqls) - len(bad)
        if bad:
            self.rejected_rows += len(bad)
            row, exc = bad[0]
            self._rl.log(
                logging.ERROR,
                "rejected",
                "state store %s: dropped %d rows no file can hold (%d in all), e.g. %s: %s",
                self.path,
                len(bad),
                self.rejected_rows,
                storable(row[:3]),
                storable(exc),
            )

    # --- reading ----------------------------------------------------------------------------

    def reader(self) -> sqlite3.Connection:
        """A read-only connection (for the console and tests); the caller closes it."""
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)

    def _committed(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Rows of one query on a short-lived read-only connection; none before the file exists."""
        if not self.path.exists():
            return []
        db = self.reader()
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def load_state(self, pipeline: str, node: str) -> dict[str, bytes]:
        """Committed rows of one node: key -> value. Blocking; cheap enough for start-up."""
        rows = self._committed("SELECT key, value FROM state WHERE pipeline=? AND node=?", (pipeline, node))
        return {k: bytes(v) for k, v in rows}

    def pipeline_names(self) -> set[str]:
        """Pipelines that have committed rows."""
        return {r[0] for r in self._committed("SELECT DISTINCT pipeline FROM state")}

    def drop_pipeline(self, pipeline: str) -> int:
        """Queue the deletion of every committed row of ``pipeline``; returns how many. Blocking
        (it reads the keys); deletions coalesce like any row, so a full store still takes them."""
        keys = self._committed("SELECT node, key FROM state WHERE pipeline=?", (pipeline,))
        self.write([(pipeline, node, key, None) for node, key in keys])
        return len(keys)

    def node_ids(self, pipeline: str) -> set[str]:
        """Nodes of ``pipeline`` that have committed rows."""
        return {r[0] for r in self._committed("SELECT DISTINCT node FROM state WHERE pipeline=?", (pipeline,))}

    # --- closing and reporting --------------------------------------------------------------

    def close_sync(self) -> None:
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._queue.append(None)
            self._cond.notify()
        thread.join()
        self._thread = None
        if self._db is not None:
            db, self._db = self._db, None
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("state store %s: checkpoint at close failed: %s", self.path, exc)
            db.close()
        self.state = "closed"

    async def close(self) -> None:
        """Commit what is queued (one last attempt) and close."""
        await asyncio.to_thread(self.close_sync)

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

    def health(self) -> dict[str, Any]:
        lat = sorted(self.commit_seconds)

        def pct(q: float) -> float | None:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

        return {
            "state": self.state,
            "last_error": self.last_error,
            "commits": self.commits,
            "rows_written": self.rows_written,
            "write_errors": self.write_errors,
            "queued_rows": self._queued_rows,
            "corrupt_recoveries": self.corrupt_recoveries,
            "bytes": self.size_bytes(),
            "quota_bytes": self.quota_bytes,
            "commit_p50": pct(0.5),
            "commit_p99": pct(0.99),
        }


class Checkpointer:
    """Writes a pipeline's node state to the store, only what changed, and restores it at start.

    A node's :meth:`snapshot` that is a mapping with string keys is stored entry by entry (row key
    ``.<entry>``), so a window with a thousand keys rewrites only the keys that changed; entries
    that are the very same object as last time are skipped without serialising them. Any other
    snapshot is one row (``=``). Values are JSON. A checkpoint's rows are queued as one unit, so
    the store commits them in one transaction: after a crash every node comes back from the same
    checkpoint. The engine takes sources' snapshots when its barrier enters the input queue, so a
    source that can re-read (a file, a log) saves the position of what it has *handed over*
    (advanced when ``put`` returns), and the other nodes' state when the chain reaches the barrier.

    A node that also has ``snapshot_changes()`` — the entries changed since its last snapshot and
    the names of those removed — is asked only for those once its rows are known, so a checkpoint
    costs what changed, not how many keys there are. A checkpoint whose work on the loop took
    more than :data:`CHECKPOINT_BUDGET` of its interval spaces the next one out accordingly, so
    checkpoints never take more than that share of the CPU, however many keys change.
    """

    def __init__(self, store: StateStore, pipeline: str, nodes: Iterable[Any], interval: float = 1.0):
        self.store = store
        self.pipeline = pipeline
        self.nodes = list(nodes)
        self.interval = interval
        self.in_flight = False
        self.checkpoints = 0
        self._next = 0.0
        self._last_obj: dict[str, dict[str, Any]] = {}
        self._last_json: dict[str, dict[str, bytes]] = {}
        self._failing: set[str] = set()
        self._cost = 0.0  # seconds of loop time the checkpoint under way has taken so far

    def due(self, now: float) -> bool:
        """True (and the checkpoint counts as started) when one should be taken at monotonic ``now``."""
        if self.in_flight or now < self._next:
            return False
        self.in_flight = True
        self._next = now + self.interval
        return True

    async def restore(self) -> None:
        saved = await asyncio.to_thread(self.store.node_ids, self.pipeline)
        for stale in sorted(saved - {n.id for n in self.nodes}):
            rows = await asyncio.to_thread(self.store.load_state, self.pipeline, stale)
            log.info(
                "pipeline %s: dropping the saved state of node %s (no longer in the pipeline)", self.pipeline, stale
            )
            self.store.write([(self.pipeline, stale, k, None) for k in rows])
        for node in self.nodes:
            rows = await asyncio.to_thread(self.store.load_state, self.pipeline, node.id)
            if not rows:
                continue
            try:
                if "=" in rows:
                    state: Any = json.loads(rows["="])
                else:
                    state = {k[1:]: json.loads(v) for k, v in rows.items() if k.startswith(".")}
                node.restore(state)
            except Exception:  # node boundary: bad stored state costs that node's state, not the gateway
                log.exception(
                    "pipeline %s: could not restore node %s from the state store; it starts empty",
                    self.pipeline,
                    node.id,
                )
                continue
            self._last_json[node.id] = dict(rows)
            log.info("pipeline %s: restored node %s (%d state rows)", self.pipeline, node.id, len(rows))

    def take(self, nodes: Iterable[Any] | None = None) -> dict[str, Any]:
        """The snapshots of ``nodes`` (default: all), at a point where no batch is half-processed."""
        t0 = time.perf_counter()
        snaps: dict[str, Any] = {}
        for node in self.nodes if nodes is None else nodes:
            try:
                known = self._last_json.get(node.id)
                if known is not None and "=" not in known and hasattr(node, "snapshot_changes"):
                    snaps[node.id] = _Changes(*node.snapshot_changes())
                else:
                    snaps[node.id] = node.snapshot()
            except Exception:  # node boundary: keep the node's previous state rows
                if node.id not in self._failing:
                    log.exception("pipeline %s: node %s failed to snapshot its state", self.pipeline, node.id)
                self._failing.add(node.id)
                snaps[node.id] = _KEEP
        self._cost += time.perf_counter() - t0
        return snaps

    def _commit_changes(self, node_id: str, changes: _Changes, rows: list[_Row]) -> None:
        last_obj = self._last_obj.setdefault(node_id, {})
        last_json = self._last_json[node_id]
        try:
            blobs = {"." + k: json.dumps(v, separators=(",", ":")).encode() for k, v in changes.changed.items()}
        except (TypeError, ValueError, RecursionError) as exc:
            if node_id not in self._failing:
                log.error("pipeline %s: node %s state is not plain data (%s); not saved", self.pipeline, node_id, exc)
            self._failing.add(node_id)
            # what is stored is now unknown for this node: its next checkpoint is a full one
            self._last_json.pop(node_id, None)
            self._last_obj.pop(node_id, None)
            return
        self._failing.discard(node_id)
        for k, blob in blobs.items():
            if last_json.get(k) != blob:
                rows.append((self.pipeline, node_id, k, blob))
                last_json[k] = blob
            last_obj[k] = changes.changed[k[1:]]
        for name in changes.removed:
            k = "." + name
            last_obj.pop(k, None)
            if last_json.pop(k, None) is not None:
                rows.append((self.pipeline, node_id, k, None))

    def commit(self, snaps: dict[str, Any]) -> None:
        """Queue the rows that changed since the last checkpoint, as one transaction."""
        t0 = time.perf_counter()
        rows: list[_Row] = []
        for node_id, snap in snaps.items():
            if snap is _KEEP:
                continue
            if isinstance(snap, _Changes):
                self._commit_changes(node_id, snap, rows)
                continue
            last_obj = self._last_obj.setdefault(node_id, {})
            last_json = self._last_json.setdefault(node_id, {})
            if isinstance(snap, dict) and all(type(k) is str for k in snap):
                entries = {"." + k: v for k, v in snap.items()}
            elif snap is None:
                entries = {}
            else:
                entries = {"=": snap}
            new_json: dict[str, bytes] = {}
            new_obj: dict[str, Any] = {}
            try:
                for k, obj in entries.items():
                    if k in last_obj and last_obj[k] is obj and k in last_json:
                        new_json[k] = last_json[k]
                    else:
                        new_json[k] = json.dumps(obj, separators=(",", ":")).encode()
                    new_obj[k] = obj
            except (TypeError, ValueError, RecursionError) as exc:
                if node_id not in self._failing:
                    log.error(
                        "pipeline %s: node %s state is not plain data (%s); not saved", self.pipeline, node_id, exc
                    )
                self._failing.add(node_id)
                continue
            self._failing.discard(node_id)
            for k, blob in new_json.items():
                if last_json.get(k) != blob:
                    rows.append((self.pipeline, node_id, k, blob))
            for k in last_json:
                if k not in new_json:
                    rows.append((self.pipeline, node_id, k, None))
            self._last_json[node_id] = new_json
            self._last_obj[node_id] = new_obj
        self.in_flight = False
        # Bounded: a checkpoint that took more than the budget of its interval on the loop
        # spaces the next one out, so they never take more than that share of the CPU.
        cost, self._cost = self._cost + time.perf_counter() - t0, 0.0
        self._next = max(self._next, time.monotonic() + cost * (1.0 / CHECKPOINT_BUDGET - 1.0))
        try:
            self.store.write(rows)
        except StoreError as exc:
            log.error("pipeline %s: checkpoint not saved: %s", self.pipeline, exc)
            self._last_json.clear()  # unknown what is stored: write everything next time
            self._last_obj.clear()
            return
        self.checkpoints += 1

    async def final(self) -> None:
        """At a clean stop, with every queue drained: save the state to start again from."""
        self.commit(self.take())
        try:
            await self.store.flush()
        except StoreError as exc:
            log.error("pipeline %s: final checkpoint not saved: %s", self.pipeline, exc)


_KEEP: Any = object()

CHECKPOINT_BUDGET = 0.1
"""The largest share of the event loop's time checkpoints may take (see :class:`Checkpointer`)."""


class _Changes:
    """A node's ``snapshot_changes()``: entries changed since its last snapshot, names removed."""

    __slots__ = ("changed", "removed")

    def __init__(self, changed: dict[str, Any], removed: Iterable[str]):
        self.changed = changed
        self.removed = removed


def metric_families(gw: Any) -> Iterator[Any]:
    """Prometheus families for ``/metrics``: the state store's health and the windows' late readings."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    store: StateStore = gw.store
    yield GaugeMetricFamily(
        "sluice_state_store_ok",
        "1 while node state is being saved (0: disk/quota full or failing)",
        value=1 if store.state in ("ok", "closed") else 0,
    )
    yield GaugeMetricFamily("sluice_state_store_bytes", "Size of state.db and its WAL", value=store.size_bytes())
    yield CounterMetricFamily("sluice_state_store_commits", "Group commits of node state", value=store.commits)
    yield CounterMetricFamily(
        "sluice_state_store_write_errors", "Commits that failed (retried)", value=store.write_errors
    )
    yield CounterMetricFamily(
        "sluice_state_store_corrupt_recoveries",
        "Damaged state files moved aside at start",
        value=store.corrupt_recoveries,
    )
    rejected = CounterMetricFamily(
        "sluice_store_rejected_records",
        "Records no file can hold (e.g. a lone surrogate in text), dropped so the writer goes on",
        labels=["store"],
    )
    rejected.add_metric(["state"], store.rejected_rows)
    outbox = getattr(gw, "outbox", None)
    if outbox is not None:
        rejected.add_metric(["outbox"], outbox.rejected)
    alerts = getattr(gw, "alerts", None)
    if alerts is not None:
        rejected.add_metric(["alerts"], alerts.book.rejected)
    yield rejected
    history = getattr(gw, "history", None)
    if history is not None:
        yield CounterMetricFamily(
            "sluice_history_dropped",
            "History bucket updates lost (store full or too many pending)",
            value=history.dropped,
        )
    late = CounterMetricFamily("sluice_node_late", "Readings too late for any window", labels=["pipeline", "node"])
    for p in gw.pipelines.values():
        for n in p.nodes:
            c = n.counters()
            if "late" in c:
                late.add_metric([p.name, n.id], c["late"])
    yield late
