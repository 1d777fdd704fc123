"""The alert lifecycle: open → (updated) → acknowledged → resolved, kept in SQLite.

Detector alert events (``state`` raised/cleared with a stable ``alert_key``) reach an ``alert``
sink, which hands them to the gateway's :class:`AlertBook`. There is at most one unresolved alert
per ``alert_key``: a repeat raise updates it (``count`` + 1) instead of opening another, so a
flapping sensor makes one alert with a count, not a storm. With a ``cooldown``, a cleared
condition resolves the alert only after it stayed clear that long, and a raise within the cooldown
after a resolve reopens the same alert.

Operators acknowledge and resolve alerts on the console (``GET /api/alerts``,
``POST /api/alerts/<id>/ack|resolve``) or over MQTT: JSON on ``sluice/<gateway>/cmd/ack`` or
``…/cmd/resolve``, answered on the request's MQTT 5 response topic, else on
``sluice/<gateway>/cmd/reply``. Each lifecycle step is published through the outbox when the
sink names a connection.

Suppression (maintenance) windows hold notifications back without losing alerts: a sink's
scheduled windows (:class:`SuppressWindow`, wall-clock by nature, in a time zone) and ad-hoc
suppressions (an ``alert_key`` glob until a time, kept in ``alerts.db``, made on the console or on
``…/cmd/suppress``). An alert opened while suppressed is recorded with ``suppressed`` set and
nothing is published about it; once no suppression covers it any more, a still-unresolved one is
published once (action ``opened``, or ``acknowledged`` if an operator acknowledged it meanwhile).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fnmatch
import json
import logging
import re
import sqlite3
import time
import zoneinfo
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ._log import RateLimitedLog
from ._migrate import Schema, Step, migrate, refuse_newer
from ._records import RECORD_ERRORS, in_list, storable
from .errors import SluiceError

__all__ = ["SCHEMA", "AlertBook", "AlertCommand", "AlertError", "AlertService", "SuppressCommand", "SuppressWindow"]

log = logging.getLogger(__name__)
T = TypeVar("T")

STATES = ("open", "acknowledged", "resolved")
SEVERITIES = ("info", "warning", "critical")
_COLUMNS = (
    "id",
    "alert_key",
    "pipeline",
    "node",
    "key",
    "severity",
    "state",
    "condition",
    "rule",
    "reading",
    "count",
    "opened_at",
    "updated_at",
    "cleared_at",
    "acked_at",
    "acked_by",
    "resolved_at",
    "resolved_by",
    "note",
    "connection",
    "topic",
    "suppressed",
)
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_OFFSET = re.compile(r"^(?:UTC|GMT)?\s*([+-])(\d{1,2})(?::?(\d{2}))?$")
_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$|^24:00$")


def parse_tz(name: str) -> dt.tzinfo:
    """An IANA zone (``Europe/Berlin``), ``UTC``/``Z``, or a fixed offset (``+02:00``, ``UTC-5``)."""
    if name in ("UTC", "Z", "GMT"):
        return dt.UTC
    m = _OFFSET.match(name)
    if m:
        sign, hours, minutes = m.group(1), int(m.group(2)), int(m.group(3) or 0)
        if hours > 14 or minutes > 59:
            raise ValueError(f"offset {name!r} is out of range (-14:00..+14:00)")
        delta = dt.timedelta(hours=hours, minutes=minutes)
        return dt.timezone(-delta if sign == "-" else delta)
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}; give an IANA name such as Europe/Berlin, UTC, or an offset such as +02:00"
        ) from None


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


class SuppressWindow(BaseModel):
    """A recurring maintenance window: on ``days``, from ``from`` to ``to`` local time in ``tz``
    (a window that ends before it starts runs past midnight into the next day)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(
        default_factory=lambda: list(DAYS), min_length=1, description="Days the window starts on."
    )
    start: str = Field(alias="from", description='Local start time "HH:MM".')
    end: str = Field(alias="to", description='Local end time "HH:MM" ("24:00": midnight at the end of the day).')
    tz: str = Field("UTC", description="IANA time zone (Europe/Berlin), UTC, or an offset (+02:00).")
    keys: list[str] = Field(default_factory=lambda: ["*"], min_length=1, description="alert_key glob patterns.")
    severities: list[Literal["info", "warning", "critical"]] = Field(
        default_factory=lambda: list(SEVERITIES), min_length=1
    )

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        if not _HHMM.match(v):
            raise ValueError(f'{v!r} is not a time "HH:MM" (00:00..23:59, or 24:00 as an end)')
        return v

    @field_validator("tz")
    @classmethod
    def _tz(cls, v: str) -> str:
        parse_tz(v)
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> SuppressWindow:
        if self.start == "24:00":
            raise ValueError("a window cannot start at 24:00; use 00:00")
        if _minutes(self.start) == _minutes(self.end):
            raise ValueError('`from` and `to` are equal: an empty window (a whole day is "00:00" to "24:00")')
        return self

    def covers(self, now: float, alert_key: str, severity: str) -> bool:
        """Whether the window is open at epoch ``now`` for this alert."""
        if severity not in self.severities or not any(fnmatch.fnmatchcase(alert_key, k) for k in self.keys):
            return False
        local = dt.datetime.fromtimestamp(now, parse_tz(self.tz))
        minute = local.hour * 60 + local.minute
        start, end = _minutes(self.start), _minutes(self.end)
        today = DAYS[local.weekday()]
        if start < end:
            return today in self.days and start <= minute < end
        yesterday = DAYS[(local.weekday() - 1) % 7]
        return (today in self.days and minute >= start) or (yesterday in self.days and minute < end)


def parse_until(v: Any) -> float:
    """Epoch seconds from a number or an ISO 8601 time with its offset."""
    if isinstance(v, bool):
        raise ValueError("until is epoch seconds or an ISO 8601 time with an offset")
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        try:
            t = dt.datetime.fromisoformat(v.upper())
        except ValueError:
            raise ValueError(f"until {v!r} is not an ISO 8601 time") from None
        if t.tzinfo is None:
            raise ValueError(f"until {v!r} needs an offset (Z or +02:00): local time is ambiguous")
        return t.timestamp()
    raise ValueError("until is epoch seconds or an ISO 8601 time with an offset")


class SuppressCommand(BaseModel):
    """An ad-hoc suppression: alerts whose ``alert_key`` matches the glob publish nothing until ``until``."""

    model_config = ConfigDict(extra="forbid")

    alert_key: str = Field(min_length=1, max_length=200, description="alert_key glob, e.g. boiler/hot/*.")
    until: float = Field(description="Epoch seconds or an ISO 8601 time with an offset.")
    note: str | None = Field(None, max_length=2000)
    by: str = Field("mqtt", min_length=1, max_length=100)
    request_id: str | int | None = None

    @field_validator("until", mode="before")
    @classmethod
    def _until(cls, v: Any) -> float:
        return parse_until(v)


class AlertError(SluiceError):
    """An alert operation that cannot be done; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


class AlertCommand(BaseModel):
    """An acknowledge/resolve request from the MQTT command topic."""

    model_config = ConfigDict(extra="forbid")

    id: int | None = Field(None, ge=1, description="The alert's id.")
    alert_key: str | None = Field(None, min_length=1, description="Or its key (the unresolved alert of that key).")
    by: str = Field("mqtt", min_length=1, max_length=100)
    note: str | None = Field(None, max_length=2000)
    request_id: str | int | None = None

    @model_validator(mode="after")
    def _one_target(self) -> AlertCommand:
        if (self.id is None) == (self.alert_key is None):
            raise ValueError("give exactly one of `id` or `alert_key`")
        return self


def _alerts_tables(db: sqlite3.Connection) -> None:
    """Version 1: the alerts and suppressions of release 0.1, from a file of any earlier shape."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY AUTOINCREMENT, alert_key TEXT NOT NULL,"
        " pipeline TEXT, node TEXT, key TEXT, severity TEXT, state TEXT NOT NULL, condition TEXT,"
        " rule TEXT, reading TEXT, count INTEGER NOT NULL, opened_at REAL, updated_at REAL,"
        " cleared_at REAL, acked_at REAL, acked_by TEXT, resolved_at REAL, resolved_by TEXT, note TEXT,"
        " connection TEXT, topic TEXT, suppressed INTEGER NOT NULL DEFAULT 0)"
    )
    cols = {r[1] for r in db.execute("PRAGMA table_info(alerts)")}
    if "suppressed" not in cols:  # an alerts.db from before suppression windows
        db.execute("ALTER TABLE alerts ADD COLUMN suppressed INTEGER NOT NULL DEFAULT 0")
    # the release loop asks for held alerts every second: a partial index keeps that cheap
    db.execute("CREATE INDEX IF NOT EXISTS alerts_held ON alerts (id) WHERE suppressed=1")
    db.execute(
        "CREATE TABLE IF NOT EXISTS suppressions (id INTEGER PRIMARY KEY AUTOINCREMENT, pattern TEXT NOT NULL,"
        " until REAL NOT NULL, note TEXT, created_at REAL NOT NULL, created_by TEXT)"
    )
    db.execute("CREATE INDEX IF NOT EXISTS alerts_key ON alerts (alert_key, id)")
    db.execute("CREATE INDEX IF NOT EXISTS alerts_state ON alerts (state, updated_at)")


# Step i takes the file from version i-1 to i (gateway._migrate); never edit one that has shipped, append.
SCHEMA = Schema(
    "alerts",
    (
        Step("alerts and suppressions tables", _alerts_tables),
        # Who did what to an alert, kept across a re-raise (which clears acked_by/resolved_by on
        # the alert itself): ack and resolve by an operator, reopen by the gateway. (IF NOT EXISTS:
        # files written after it came and before versions came have it already.)
        Step(
            "alert_actions table",
            """
            CREATE TABLE IF NOT EXISTS alert_actions (id INTEGER PRIMARY KEY AUTOINCREMENT,
                alert_id INTEGER NOT NULL, at REAL NOT NULL, action TEXT NOT NULL, by TEXT, note TEXT);
            CREATE INDEX IF NOT EXISTS alert_actions_alert ON alert_actions (alert_id, id);
            """,
        ),
    ),
)


class AlertBook:
    """The alerts of one gateway in ``<data_dir>/alerts.db``; all SQLite work in one thread."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time, synchronous: str = "FULL"):
        self.path = path
        self.synchronous = synchronous
        self.clock = clock
        self._exec: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self.counts = {"opened": 0, "updated": 0, "reopened": 0, "cleared": 0, "acknowledged": 0, "resolved": 0}
        self.rejected = 0  # detector alerts no file can hold (dead-lettered by their sink)
        self._rl = RateLimitedLog(log)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._exec is None:
            raise AlertError(503, "alerts are not open")
        return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)

    async def open(self) -> None:
        self._exec = ThreadPoolExecutor(1, thread_name_prefix="sluice-alerts")
        try:
            await self._run(self._open)
        except BaseException:  # e.g. a file from a newer Sluice: no thread outlives the failed start
            self._exec.shutdown(wait=False)
            self._exec = None
            raise

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        refuse_newer(self.path, SCHEMA)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute("PRAGMA cache_size=-256")  # open alerts are looked up by key; history is on disk
        try:
            migrate(db, self.path, SCHEMA)
        except BaseException:
            db.close()
            raise
        self._db = db

    async def close(self) -> None:
        if self._exec is None:
            return
        await self._run(self._close)
        self._exec.shutdown(wait=True)
        self._exec = None

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- reading -------------------------------------------------------------------------

    @staticmethod
    def _dict(row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        d = dict(row)
        if "suppressed" in d:
            d["suppressed"] = bool(d["suppressed"])
        try:
            d["reading"] = json.loads(d["reading"]) if d["reading"] is not None else None
        except ValueError:
            pass
        return d

    def _get(self, alert_id: int) -> dict[str, Any] | None:
        assert self._db is not None
        return self._dict(self._db.execute("SELECT * FROM alerts WHERE id=?", (alert_id,)).fetchone())

    def _latest(self, alert_key: str) -> dict[str, Any] | None:
        assert self._db is not None
        row = self._db.execute("SELECT * FROM alerts WHERE alert_key=? ORDER BY id DESC LIMIT 1", (alert_key,))
        return self._dict(row.fetchone())

    async def get(self, alert_id: int) -> dict[str, Any] | None:
        return await self._run(self._get, alert_id)

    async def list(
        self,
        *,
        state: str | None = None,
        severity: str | None = None,
        pipeline: str | None = None,
        since: float | None = None,
        until: float | None = None,
        key: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Newest first. ``since``/``until`` bound the last update time (epoch seconds)."""
        where, args = [], []
        for col, v in (("state", state), ("severity", severity), ("pipeline", pipeline), ("alert_key", key)):
            if v is not None:
                where.append(f"{col}=?")
                args.append(v)
        if since is not None:
            where.append("updated_at>=?")
            args.append(since)
        if until is not None:
            where.append("updated_at<=?")
            args.append(until)
        q = "SELECT * FROM alerts" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
        args.append(limit)

        def run() -> list[dict[str, Any]]:
            assert self._db is not None
            return self._with_actions([d for r in self._db.execute(q, args) if (d := self._dict(r)) is not None])

        return await self._run(run)

    def _with_actions(self, alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``alerts``, each with ``actions``: its operator and reopen history, oldest first."""
        assert self._db is not None
        by_id = {a["id"]: a for a in alerts}
        for a in alerts:
            a["actions"] = []
        ids = list(by_id)
        for i in range(0, len(ids), 500):  # below SQLite's bound-parameter limit
            marks, params = in_list(ids[i : i + 500])
            rows = self._db.execute(
                f"SELECT alert_id, at, action, by, note FROM alert_actions WHERE alert_id IN ({marks}) ORDER BY id",
                params,
            )
            for alert_id, at, action, by, note in rows:
                by_id[alert_id]["actions"].append({"at": at, "action": action, "by": by, "note": note})
        return alerts

    def _log_action(self, alert_id: int, at: float, action: str, by: str | None, note: str | None) -> None:
        assert self._db is not None
        self._db.execute(
            "INSERT INTO alert_actions (alert_id, at, action, by, note) VALUES (?,?,?,?,?)",
            (alert_id, at, action, by, note),
        )

    async def summary(self) -> dict[str, int]:
        def run() -> dict[str, int]:
            assert self._db is not None
            return dict(self._db.execute("SELECT state, COUNT(*) FROM alerts GROUP BY state").fetchall())

        return await self._run(run)

    # --- detector events -----------------------------------------------------------------

    async def apply(
        self,
        items: list[dict[str, Any]],
        *,
        cooldown: float = 0.0,
        auto_resolve: bool = True,
        on_rejected: Callable[[int, BaseException], None] | None = None,
    ) -> list[tuple[str, dict[str, Any]]]:
        """Take detector alerts (``pipeline, node, key, ts, value, connection, topic``) in one
        transaction; return the lifecycle steps ``(action, alert)`` they caused.

        An item no file can hold (see :mod:`gateway._records`) changes nothing, is counted in
        ``rejected`` and handed to ``on_rejected(index, error)``; the other items are taken.
        """
        out, rejected = await self._run(self._apply, items, cooldown, auto_resolve)
        if rejected:
            self.rejected += len(rejected)
            i, exc = rejected[0]
            self._rl.log(
                logging.ERROR,
                "rejected",
                "alerts: %d alerts could not be stored (%d in all), e.g. %s: %s",
                len(rejected),
                self.rejected,
                storable(items[i].get("value", {}).get("alert_key")),
                storable(exc),
            )
            for i, exc in rejected:
                if on_rejected is not None:
                    on_rejected(i, exc)
        return out

    def _apply(
        self, items: list[dict[str, Any]], cooldown: float, auto_resolve: bool
    ) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[int, BaseException]]]:
        db = self._db
        assert db is not None
        out: list[tuple[str, dict[str, Any]]] = []
        rejected: list[tuple[int, BaseException]] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for i, it in enumerate(items):
                # each item in a savepoint: one that cannot be written leaves no trace, the rest go on
                db.execute("SAVEPOINT alert_item")
                try:
                    step = self._one(it, cooldown, auto_resolve)
                except RECORD_ERRORS as exc:
                    db.execute("ROLLBACK TO alert_item")
                    rejected.append((i, exc))
                    step = None
                db.execute("RELEASE alert_item")
                if step is not None:
                    out.append(step)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        for action, _ in out:
            self.counts[action] += 1
        return out, rejected

    def _one(self, it: dict[str, Any], cooldown: float, auto_resolve: bool) -> tuple[str, dict[str, Any]] | None:
        db = self._db
        assert db is not None
        v = it["value"]
        now = self.clock()
        akey = v["alert_key"]
        reading = json.dumps(v.get("reading"), default=str)
        latest = self._latest(akey)
        if v["state"] == "raised":
            severity = v.get("severity") if v.get("severity") in SEVERITIES else "warning"
            if latest is not None and latest["state"] != "resolved":
                db.execute(
                    "UPDATE alerts SET count=count+1, condition='active', cleared_at=NULL, reading=?, rule=?,"
                    " severity=?, updated_at=? WHERE id=?",
                    (reading, v.get("rule"), severity, now, latest["id"]),
                )
                return "updated", self._get(latest["id"])  # type: ignore[return-value]
            if (
                latest is not None
                and cooldown
                and latest["resolved_at"] is not None
                and now - latest["resolved_at"] < cooldown
            ):
                db.execute(
                    "UPDATE alerts SET state='open', condition='active', count=count+1, cleared_at=NULL,"
                    " reading=?, rule=?, severity=?, updated_at=?, acked_at=NULL, acked_by=NULL,"
                    " resolved_at=NULL, resolved_by=NULL, suppressed=? WHERE id=?",
                    (reading, v.get("rule"), severity, now, int(bool(it.get("suppress"))), latest["id"]),
                )
                self._log_action(latest["id"], now, "reopened", "gateway", None)
                return "reopened", self._get(latest["id"])  # type: ignore[return-value]
            cur = db.execute(
                "INSERT INTO alerts (alert_key, pipeline, node, key, severity, state, condition, rule,"
                " reading, count, opened_at, updated_at, connection, topic, suppressed)"
                " VALUES (?,?,?,?,?,'open','active',?,?,1,?,?,?,?,?)",
                (
                    akey,
                    it["pipeline"],
                    it["node"],
                    it["key"],
                    severity,
                    v.get("rule"),
                    reading,
                    now,
                    now,
                    it.get("connection"),
                    it.get("topic"),
                    int(bool(it.get("suppress"))),
                ),
            )
            return "opened", self._get(int(cur.lastrowid or 0))  # type: ignore[return-value]
        # cleared
        if latest is None or latest["state"] == "resolved":
            return None
        if auto_resolve and not cooldown:
            db.execute(
                "UPDATE alerts SET state='resolved', condition='cleared', cleared_at=?, reading=?,"
                " resolved_at=?, resolved_by='auto', updated_at=? WHERE id=?",
                (now, reading, now, now, latest["id"]),
            )
            return "resolved", self._get(latest["id"])  # type: ignore[return-value]
        db.execute(
            "UPDATE alerts SET condition='cleared', cleared_at=?, reading=?, updated_at=? WHERE id=?",
            (now, reading, now, latest["id"]),
        )
        return "cleared", self._get(latest["id"])  # type: ignore[return-value]

    async def resolve_cooled(self, cooldown_by_node: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
        """Resolve alerts whose condition stayed cleared for their sink's cooldown."""

        def run() -> list[dict[str, Any]]:
            db = self._db
            assert db is not None
            now = self.clock()
            done = []
            rows = db.execute(
                "SELECT id, pipeline, node, cleared_at FROM alerts WHERE state!='resolved' AND condition='cleared'"
            ).fetchall()
            for r in rows:
                cd = cooldown_by_node.get((r["pipeline"], r["node"]))
                if cd is not None and now - r["cleared_at"] >= cd:
                    db.execute(
                        "UPDATE alerts SET state='resolved', resolved_at=?, resolved_by='auto', updated_at=?"
                        " WHERE id=?",
                        (now, now, r["id"]),
                    )
                    done.append(self._get(r["id"]))
            self.counts["resolved"] += len(done)
            return [d for d in done if d is not None]

        return await self._run(run)

    # --- suppression -----------------------------------------------------------------------

    async def held(self) -> list[dict[str, Any]]:
        """Unresolved alerts whose notifications are being held back."""

        def run() -> list[dict[str, Any]]:
            assert self._db is not None
            rows = self._db.execute("SELECT * FROM alerts WHERE suppressed=1 AND state!='resolved' ORDER BY id")
            return [d for r in rows if (d := self._dict(r)) is not None]

        return await self._run(run)

    async def release(self, alert_id: int) -> dict[str, Any] | None:
        """Clear an alert's ``suppressed`` flag; the alert as it is now, or None if it was resolved meanwhile."""

        def run() -> dict[str, Any] | None:
            assert self._db is not None
            cur = self._db.execute(
                "UPDATE alerts SET suppressed=0 WHERE id=? AND suppressed=1 AND state!='resolved'", (alert_id,)
            )
            return self._get(alert_id) if cur.rowcount else None

        return await self._run(run)

    async def add_suppression(self, pattern: str, until: float, note: str | None, by: str) -> dict[str, Any]:
        """Record an ad-hoc suppression; expired ones are pruned at the same time."""

        def run() -> dict[str, Any]:
            db = self._db
            assert db is not None
            now = self.clock()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM suppressions WHERE until<=?", (now,))
                cur = db.execute(
                    "INSERT INTO suppressions (pattern, until, note, created_at, created_by) VALUES (?,?,?,?,?)",
                    (pattern, until, note, now, by),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            row = db.execute("SELECT * FROM suppressions WHERE id=?", (cur.lastrowid,)).fetchone()
            return dict(row)

        return await self._run(run)

    async def suppressions(self) -> list[dict[str, Any]]:
        """Ad-hoc suppressions still in force, oldest first."""

        def run() -> list[dict[str, Any]]:
            assert self._db is not None
            rows = self._db.execute("SELECT * FROM suppressions WHERE until>? ORDER BY id", (self.clock(),))
            return [dict(r) for r in rows]

        return await self._run(run)

    async def delete_suppression(self, sup_id: int) -> None:
        def run() -> None:
            assert self._db is not None
            if not self._db.execute("DELETE FROM suppressions WHERE id=?", (sup_id,)).rowcount:
                raise AlertError(404, f"no suppression {sup_id}")

        await self._run(run)

    # --- operator actions ----------------------------------------------------------------

    async def ack(
        self,
        alert_id: int | None = None,
        *,
        alert_key: str | None = None,
        by: str = "operator",
        note: str | None = None,
    ) -> dict[str, Any]:
        return await self._run(self._act, "ack", alert_id, alert_key, by, note)

    async def resolve(
        self,
        alert_id: int | None = None,
        *,
        alert_key: str | None = None,
        by: str = "operator",
        note: str | None = None,
    ) -> dict[str, Any]:
        return await self._run(self._act, "resolve", alert_id, alert_key, by, note)

    def _act(self, what: str, alert_id: int | None, alert_key: str | None, by: str, note: str | None) -> dict[str, Any]:
        db = self._db
        assert db is not None
        a = self._get(alert_id) if alert_id is not None else self._latest(alert_key or "")
        if a is None:
            raise AlertError(404, f"no alert {alert_id if alert_id is not None else repr(alert_key)}")
        now = self.clock()
        if a["state"] == "resolved":
            raise AlertError(409, f"alert {a['id']} is already resolved")
        db.execute("BEGIN IMMEDIATE")  # the step and its line in alert_actions, together
        try:
            self._step(what, a, now, by, note)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        got = self._get(a["id"])
        assert got is not None
        return self._with_actions([got])[0]

    def _step(self, what: str, a: dict[str, Any], now: float, by: str, note: str | None) -> None:
        db = self._db
        assert db is not None
        if what == "ack":
            if a["state"] == "acknowledged":
                raise AlertError(409, f"alert {a['id']} is already acknowledged by {a['acked_by']}")
            db.execute(
                "UPDATE alerts SET state='acknowledged', acked_at=?, acked_by=?, note=COALESCE(?, note),"
                " updated_at=? WHERE id=?",
                (now, by, note, now, a["id"]),
            )
            self.counts["acknowledged"] += 1
            self._log_action(a["id"], now, "acknowledged", by, note)
        else:
            db.execute(
                "UPDATE alerts SET state='resolved', resolved_at=?, resolved_by=?, note=COALESCE(?, note),"
                " updated_at=? WHERE id=?",
                (now, by, note, now, a["id"]),
            )
            self.counts["resolved"] += 1
            self._log_action(a["id"], now, "resolved", by, note)


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], data: Any) -> M:
    """``data`` as ``model``, or an AlertError(400) naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise AlertError(400, f"{where + ': ' if where else ''}{msg}") from None


def _public(alert: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in alert.items() if k not in ("connection", "topic")}


class AlertService:
    """The gateway's alerts: the book, lifecycle notifications through the outbox, the MQTT
    command topic, and the cooldown timer. Owned (opened, run, closed) by the Gateway."""

    def __init__(
        self,
        path: Path,
        gateway_id: str,
        outbox: Any,
        links: dict[str, Any],
        command_links: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        synchronous: str = "FULL",
    ):
        self.book = AlertBook(path, clock, synchronous)
        self.gateway_id = gateway_id
        self.outbox = outbox
        self.links = links  # publisher links, for command replies
        self.command_links = command_links or {}
        self.cooldowns: dict[tuple[str, str], float] = {}  # (pipeline, node) -> cooldown, set by alert sinks
        # (pipeline, node) -> that sink's scheduled windows and the wall clock they are read with
        self.windows: dict[tuple[str, str], tuple[Sequence[SuppressWindow], Callable[[], float]]] = {}
        self.adhoc: list[dict[str, Any]] = []  # ad-hoc suppressions in force (a copy of alerts.db's)
        self.notifications_suppressed = 0
        self.released = 0
        self.commands_ok = 0
        self.commands_rejected = 0
        self._opened = False
        self._rl = RateLimitedLog(log)
        # called with (action, public alert) on every lifecycle step: the console's live /ws topic
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []

    @property
    def cmd_prefix(self) -> str:
        return f"sluice/{self.gateway_id}/cmd/"

    async def open(self) -> None:
        await self.book.open()
        self.adhoc = await self.book.suppressions()
        self._opened = True
        for link in self.command_links.values():
            link.subscribe(self.cmd_prefix + "+", 1)

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            await self.book.close()

    async def run(self) -> None:
        """Run the command links and resolve cooled-down alerts, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for name, link in self.command_links.items():
                tg.create_task(link.run(), name=f"alerts:cmd:{name}")
            tg.create_task(self._cooldown_loop(), name="alerts:cooldown")

    async def stop_links(self) -> None:
        for link in self.command_links.values():
            await link.close()

    async def _cooldown_loop(self) -> None:
        # Its boundary catches everything: this task ends only by cancellation, whatever an alert
        # row or the outbox says (an error here would end the gateway's task group).
        while True:
            await asyncio.sleep(1.0)
            if self.cooldowns:
                try:
                    for alert in await self.book.resolve_cooled(self.cooldowns):
                        await self.notify("resolved", alert)
                except Exception as exc:
                    self._rl.log(logging.ERROR, "cooled", "alerts: cannot resolve cooled-down alerts: %r", exc)
            try:
                await self.release_due()
            except Exception as exc:
                self._rl.log(logging.ERROR, "release", "alerts: cannot release suppressed alerts: %r", exc)

    # --- suppression -----------------------------------------------------------------------

    def is_suppressed(self, pipeline: str, node: str, alert_key: str, severity: str) -> bool:
        """Whether a scheduled window of the alert's sink or an ad-hoc suppression covers it now."""
        now = self.book.clock()
        if any(s["until"] > now and fnmatch.fnmatchcase(alert_key, s["pattern"]) for s in self.adhoc):
            return True
        windows, clock = self.windows.get((pipeline, node), ((), self.book.clock))
        if not windows:
            return False
        wall = clock()
        return any(w.covers(wall, alert_key, severity) for w in windows)

    async def release_due(self) -> list[dict[str, Any]]:
        """Publish, once, each held alert no suppression covers any more; return them."""
        out = []
        for alert in await self.book.held():
            if self.is_suppressed(alert["pipeline"], alert["node"], alert["alert_key"], alert["severity"]):
                continue
            now_alert = await self.book.release(alert["id"])
            if now_alert is None:
                continue
            self.released += 1
            log.info("alert %s (%s): suppression over, publishing it", now_alert["id"], now_alert["alert_key"])
            await self.notify("acknowledged" if now_alert["state"] == "acknowledged" else "opened", now_alert)
            out.append(_public(now_alert))
        return out

    async def suppress(self, pattern: str, until: float, *, note: str | None = None, by: str) -> dict[str, Any]:
        now = self.book.clock()
        if until <= now:
            # 409, not 400: the request is well formed, the time it names has passed
            raise AlertError(409, f"until: {until} is not in the future (now {now:.0f})")
        sup = await self.book.add_suppression(pattern, until, note, by)
        self.adhoc = await self.book.suppressions()
        log.info("alerts: %s suppressed %r until %s (%s)", by, pattern, until, note or "no note")
        return sup

    async def suppressions(self) -> list[dict[str, Any]]:
        self.adhoc = await self.book.suppressions()
        return self.adhoc

    async def unsuppress(self, sup_id: int) -> None:
        """End an ad-hoc suppression now; its held alerts are published at the next release."""
        await self.book.delete_suppression(sup_id)
        self.adhoc = await self.book.suppressions()
        log.info("alerts: suppression %s removed", sup_id)

    async def notify(self, action: str, alert: dict[str, Any], *, hold: bool = False) -> None:
        """Publish a lifecycle step through the outbox, to where the alert's sink publishes; a held
        step (``hold``, or an alert flagged ``suppressed``) reaches the console's listeners only."""
        for listener in self.listeners:
            try:
                listener(action, _public(alert))
            except Exception:  # a console bug must not stop the alert going out
                log.exception("alerts: a lifecycle listener failed")
        conn, topic = alert.get("connection"), alert.get("topic")
        if hold or alert.get("suppressed"):
            self.notifications_suppressed += 1
            return
        if not conn or not topic or self.outbox is None:
            return
        await self.outbox.put([(conn, topic, {"action": action, "alert": _public(alert)}, alert["alert_key"])])

    async def list(self, **filters: Any) -> list[dict[str, Any]]:
        """Alerts newest first, filtered as :meth:`AlertBook.list` takes them."""
        return [_public(a) for a in await self.book.list(**filters)]

    async def operator(
        self,
        what: Literal["ack", "resolve"],
        alert_id: int | None = None,
        *,
        alert_key: str | None = None,
        by: str = "operator",
        note: str | None = None,
    ) -> dict[str, Any]:
        fn = self.book.ack if what == "ack" else self.book.resolve
        alert = await fn(alert_id, alert_key=alert_key, by=by, note=note)
        log.info("alert %s (%s) %s by %s", alert["id"], alert["alert_key"], alert["state"], by)
        await self.notify("acknowledged" if what == "ack" else "resolved", alert)
        return _public(alert)

    # --- MQTT commands ---------------------------------------------------------------------

    async def on_command(self, client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        verb = topic[len(self.cmd_prefix) :] if topic.startswith(self.cmd_prefix) else ""
        if verb == "reply":
            return 0
        reply_to = self.cmd_prefix + "reply"
        rt = (props or {}).get("response_topic")
        if rt:
            reply_to = rt[0] if isinstance(rt, list | tuple) else rt
        request_id: Any = None
        try:
            try:
                data = json.loads(payload)
            except ValueError:
                raise AlertError(400, "the command is not JSON") from None
            if isinstance(data, dict):
                request_id = data.get("request_id")
            if verb not in ("ack", "resolve", "suppress"):
                raise AlertError(404, f"unknown command {verb!r}; use ack, resolve or suppress")
            reply: dict[str, Any]
            if verb == "suppress":
                sup = validated(SuppressCommand, data)
                made = await self.suppress(sup.alert_key, sup.until, note=sup.note, by=sup.by)
                reply = {"ok": True, "request_id": request_id, "command": verb, "suppression": made}
            else:
                cmd = validated(AlertCommand, data)
                alert = await self.operator(verb, cmd.id, alert_key=cmd.alert_key, by=cmd.by, note=cmd.note)  # type: ignore[arg-type]
                reply = {"ok": True, "request_id": request_id, "command": verb, "alert": alert}
            self.commands_ok += 1
        except AlertError as exc:
            self.commands_rejected += 1
            log.warning("alerts: command on %s rejected: %s", topic, exc)
            reply = {"ok": False, "request_id": request_id, "command": verb, "error": str(exc), "status": exc.status}
        except Exception as exc:  # the command boundary: answer, log, keep listening
            self.commands_rejected += 1
            log.exception("alerts: command on %s failed", topic)
            reply = {
                "ok": False,
                "request_id": request_id,
                "command": verb,
                "error": f"internal error: {exc}",
                "status": 500,
            }
        self._reply(reply_to, reply)
        return 0

    def _reply(self, topic: str, reply: dict[str, Any]) -> None:
        body = json.dumps({"gateway_id": self.gateway_id, **reply}, separators=(",", ":"), default=str).encode()
        for link in [*self.command_links.values(), *self.links.values()]:
            if link.connected:
                try:
                    link.publish(topic, body, qos=1)
                    return
                except SluiceError:
                    continue
        log.warning("alerts: no connection to answer on %s", topic)

    def health(self) -> dict[str, Any]:
        return {
            **self.book.counts,
            "commands_ok": self.commands_ok,
            "commands_rejected": self.commands_rejected,
            "notifications_suppressed": self.notifications_suppressed,
            "released": self.released,
            "suppressions": len(self.adhoc),
        }
