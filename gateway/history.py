"""A bounded, downsampled per-key history of readings in the state store, for charts and ``/api/history``.

Every reading lands in one bucket per tier (by default 1 s, kept 1 h; 1 min, kept 2 days; 1 h,
kept 90 days) holding count, sum, min, max and the last value. Buckets accumulate in memory and
are written as *deltas* (``INSERT … ON CONFLICT DO UPDATE SET n = n + excluded.n …``) through the
store's group commit about once a second, so a restart loses at most the last second and never
reads before writing. Retention follows event time (the newest reading seen), not the wall clock,
so a clock step on a gateway without an RTC cannot wipe the history.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from .store import StateStore

__all__ = ["TIERS", "History"]

log = logging.getLogger(__name__)

TIERS: tuple[tuple[float, float], ...] = ((1.0, 3600.0), (60.0, 2 * 86400.0), (3600.0, 90 * 86400.0))
"""(bucket seconds, retention seconds) per tier, finest first."""

_UPSERT = (
    "INSERT INTO history (tier, key, bucket, n, sum, min, max, last_ts, last) VALUES (?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (tier, key, bucket) DO UPDATE SET n = n + excluded.n, sum = sum + excluded.sum, "
    "min = min(min, excluded.min), max = max(max, excluded.max), "
    "last = CASE WHEN excluded.last_ts >= last_ts THEN excluded.last ELSE last END, "
    "last_ts = max(last_ts, excluded.last_ts)"
)


class History:
    """Per-key tiers of buckets; :meth:`add` is cheap, :meth:`flush` hands deltas to the store."""

    def __init__(
        self,
        store: StateStore,
        tiers: tuple[tuple[float, float], ...] = TIERS,
        flush_interval: float = 1.0,
        max_pending: int = 200_000,
    ):
        self.store = store
        self.tiers = tiers
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self.newest = -math.inf
        self.dropped = 0  # bucket updates lost because the store could not take them
        self._pending: dict[tuple[int, str, float], list[float]] = {}
        self._last_flush = time.monotonic()
        self._last_prune = -math.inf

    def add(self, key: str, ts: float, value: float) -> None:
        pending = self._pending
        if len(pending) >= self.max_pending:
            self.dropped += 1
            return
        if ts > self.newest:
            self.newest = ts
        for i, (width, _) in enumerate(self.tiers):
            b = math.floor(ts / width) * width
            acc = pending.get((i, key, b))
            if acc is None:
                pending[(i, key, b)] = [1.0, value, value, value, ts, value]
            else:
                acc[0] += 1.0
                acc[1] += value
                if value < acc[2]:
                    acc[2] = value
                if value > acc[3]:
                    acc[3] = value
                if ts >= acc[4]:
                    acc[4] = ts
                    acc[5] = value

    def maybe_flush(self, now: float | None = None) -> None:
        """Flush if ``flush_interval`` (monotonic) has passed since the last one."""
        now = time.monotonic() if now is None else now
        if now - self._last_flush >= self.flush_interval:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        self._last_flush = time.monotonic() if now is None else now
        if not self._pending:
            return
        rows = [(i, k, b, int(a[0]), a[1], a[2], a[3], a[4], a[5]) for (i, k, b), a in self._pending.items()]
        self._pending = {}
        if not self.store.execute(_UPSERT, rows):
            self.dropped += len(rows)
            return
        # retention, by event time, at most once a minute of it
        if self.newest - self._last_prune >= 60.0:
            self._last_prune = self.newest
            self.store.execute(
                "DELETE FROM history WHERE tier = ? AND bucket < ?",
                [(i, self.newest - keep) for i, (_, keep) in enumerate(self.tiers)],
            )

    def query(self, key: str, start: float, end: float, max_points: int = 1000) -> dict[str, Any]:
        """Points of ``key`` in [start, end): the finest tier that keeps ``start`` and fits ``max_points``.

        Blocking (a read-only connection): call it from a thread. Only committed data is seen.
        """
        tier = len(self.tiers) - 1
        for i, (width, keep) in enumerate(self.tiers):
            if start >= self.newest - keep and (end - start) / width <= max_points:
                tier = i
                break
        width = self.tiers[tier][0]
        points: list[list[float]] = []
        if self.store.path.exists():
            db = self.store.reader()
            try:
                rows = db.execute(
                    "SELECT bucket, n, sum, min, max, last FROM history WHERE tier = ? AND key = ? "
                    "AND bucket >= ? AND bucket < ? ORDER BY bucket LIMIT ?",
                    (tier, key, math.floor(start / width) * width, end, max_points + 1),
                ).fetchall()
            finally:
                db.close()
            points = [[b, s / n, mn, mx, float(n), last] for b, n, s, mn, mx, last in rows]
        return {
            "key": key,
            "tier": width,
            "from": start,
            "to": end,
            "columns": ["t", "mean", "min", "max", "count", "last"],
            "points": points[:max_points],
        }

    def health(self) -> dict[str, Any]:
        return {"pending": len(self._pending), "dropped": self.dropped, "newest": self.newest}
