"""Event-time progress of a source that reads several partitions (Kafka) or streams (Redis), one
watermark per part combined as Flink's Kafka source does: see :class:`PartitionWatermarks`."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["PartitionWatermarks"]


class PartitionWatermarks:
    """A consumer's event-time progress, per partition, combined as Flink's Kafka source does.

    Each assigned partition has the newest event time read from it; the source's progress is the
    minimum over the partitions that are not idle (a partition assigned but not yet read holds it
    back), so a partition read ahead of another cannot close windows the other still has readings
    for. A partition without records for ``idle_timeout`` (monotonic seconds, not counting time
    paused) is idle and stops holding it back (Flink's ``withIdleness``) — unless the source finds
    records waiting for it (the Kafka source's ``_busy_while_behind``); when every partition is
    idle the progress is the newest time of any. Rebalances drop revoked partitions and add
    assigned ones. The progress never goes back. Plain logic: every method takes ``now``. The
    Redis source with several streams uses it with a stream for a partition.
    """

    def __init__(self, idle_timeout: float | None):
        self.idle_timeout = idle_timeout
        self.value = -math.inf
        self._newest: dict[Any, float] = {}  # partition -> newest event time read from it
        self._last: dict[Any, float] = {}  # partition -> when it last had a record (or was assigned)
        self._paused_at: float | None = None

    def assign(self, partitions: set[Any], now: float) -> None:
        """The full assignment after a rebalance: new partitions start unread, gone ones are dropped."""
        for tp in set(self._last) - partitions:
            self.revoke({tp})
        now = self._paused_at if self._paused_at is not None else now
        for tp in partitions:
            self._last.setdefault(tp, now)

    def revoke(self, partitions: set[Any]) -> None:
        for tp in partitions:
            self._last.pop(tp, None)
            self._newest.pop(tp, None)

    def seen(self, tp: Any, newest: float, now: float) -> None:
        """Records read from ``tp``, the newest event time among them ``newest`` (-inf: none usable)."""
        self._last[tp] = now
        if newest > self._newest.get(tp, -math.inf):
            self._newest[tp] = newest

    def pause(self, now: float) -> None:
        if self._paused_at is None:
            self._paused_at = now

    def resume(self, now: float) -> None:
        """Time spent paused does not make a partition idle: it had no chance to be read."""
        if self._paused_at is not None:
            gap = now - self._paused_at
            self._paused_at = None
            for tp in self._last:
                self._last[tp] += gap

    def idle(self, now: float) -> list[Any]:
        if self.idle_timeout is None:
            return []
        now = self._paused_at if self._paused_at is not None else now
        return [tp for tp, t in self._last.items() if now - t >= self.idle_timeout]

    def advance(self, now: float) -> float | None:
        """The progress if it moved on since the last call, else None."""
        idle = set(self.idle(now))
        active = [self._newest.get(tp, -math.inf) for tp in self._last if tp not in idle]
        if active:
            progress = min(active)
        else:
            progress = max(self._newest.values(), default=-math.inf)
        if progress > self.value:
            self.value = progress
            return progress
        return None
