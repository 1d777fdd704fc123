"""The bounded, prioritised, coalescing queue in front of the model, shedding by policy."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

SHED_REASONS = ("queue_full", "deadline", "coalesced", "breaker_open")


# --- admission queue -----------------------------------------------------------------------

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class _Entry(Generic[T]):
    item: T
    key: str | None
    priority: int
    enqueued: float
    seq: int
    live: bool = True


class AdmissionQueue(Generic[T]):
    """A bounded queue that sheds by policy instead of making its producer wait.

    - **priority**: higher first; within a priority, oldest first;
    - **coalesce**: a new item with the key of a queued one replaces it (the old one is shed);
    - **max_depth**: when full, a new item evicts the oldest lowest-priority item if that one
      ranks below it, else the new item itself is shed;
    - **deadline**: an item that waited longer is shed instead of being handed out.

    Shed items go to ``on_shed(item, reason)``; counts by reason are in ``shed``.
    """

    def __init__(
        self,
        max_depth: int,
        deadline: float | None,
        on_shed: Callable[[T, str], None],
        clock: Callable[[], float] = time.monotonic,
        coalesce: bool = True,
    ):
        self.max_depth = max_depth
        self.deadline = deadline
        self.on_shed = on_shed
        self.clock = clock
        self.coalesce = coalesce
        self.shed: dict[str, int] = dict.fromkeys(SHED_REASONS, 0)
        self.admitted = 0
        self.high_water = 0
        self._heap: list[tuple[int, int, _Entry[T]]] = []
        self._by_key: dict[str, _Entry[T]] = {}
        self._depth = 0
        self._seq = itertools.count()
        self._waiters: list[asyncio.Future[None]] = []
        self.wait_s: list[float] = []  # recent queue waits of handed-out items, bounded

    def __len__(self) -> int:
        return self._depth

    def _shed(self, e: _Entry[T], reason: str) -> None:
        e.live = False
        self._depth -= 1
        if e.key is not None and self._by_key.get(e.key) is e:
            del self._by_key[e.key]
        self.shed[reason] += 1
        self.on_shed(e.item, reason)

    def count_shed(self, item: T, reason: str) -> None:
        """Shed an item that never entered the queue (e.g. every breaker open)."""
        self.shed[reason] += 1
        self.on_shed(item, reason)

    def put(self, item: T, key: str | None = None, priority: int = 0) -> bool:
        """Offer an item; returns False if it was shed at once."""
        now = self.clock()
        if self.coalesce and key is not None:
            old = self._by_key.get(key)
            if old is not None and old.live:
                self._shed(old, "coalesced")
        if self._depth >= self.max_depth:
            victim = self._lowest()
            if victim is None or victim.priority >= priority:
                self.shed["queue_full"] += 1
                self.on_shed(item, "queue_full")
                return False
            self._shed(victim, "queue_full")
        e = _Entry(item, key, priority, now, next(self._seq))
        heapq.heappush(self._heap, (-priority, e.seq, e))
        if key is not None:
            self._by_key[key] = e
        self._depth += 1
        self.admitted += 1
        self.high_water = max(self.high_water, self._depth)
        while self._waiters:
            w = self._waiters.pop(0)
            if not w.done():
                w.set_result(None)
                break
        return True

    def _lowest(self) -> _Entry[T] | None:
        live = [e for _, _, e in self._heap if e.live]
        if not live:
            return None
        return min(live, key=lambda e: (e.priority, e.seq))

    def expire(self) -> int:
        """Shed every item past its deadline now (called periodically, so they go out on time)."""
        if self.deadline is None:
            return 0
        limit = self.clock() - self.deadline
        n = 0
        for _, _, e in self._heap:
            if e.live and e.enqueued < limit:
                self._shed(e, "deadline")
                n += 1
        if n:
            self._heap = [t for t in self._heap if t[2].live]
            heapq.heapify(self._heap)
        return n

    def get_nowait(self) -> tuple[T, float] | None:
        """The next item and how long it waited, or None; expired items are shed on the way."""
        while self._heap:
            _, _, e = heapq.heappop(self._heap)
            if not e.live:
                continue
            waited = self.clock() - e.enqueued
            if self.deadline is not None and waited > self.deadline:
                self._shed(e, "deadline")
                continue
            e.live = False
            self._depth -= 1
            if e.key is not None and self._by_key.get(e.key) is e:
                del self._by_key[e.key]
            self.wait_s.append(waited)
            if len(self.wait_s) > 1000:
                del self.wait_s[:500]
            return e.item, waited
        return None

    async def get(self) -> tuple[T, float]:
        while True:
            got = self.get_nowait()
            if got is not None:
                return got
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)

    def drain(self) -> Iterable[T]:
        """Take every queued item out (at shutdown), oldest first within priority."""
        while True:
            got = self.get_nowait() if self.deadline is None else self._pop_any()
            if got is None:
                return
            yield got[0]

    def _pop_any(self) -> tuple[T, float] | None:
        while self._heap:
            _, _, e = heapq.heappop(self._heap)
            if e.live:
                e.live = False
                self._depth -= 1
                if e.key is not None and self._by_key.get(e.key) is e:
                    del self._by_key[e.key]
                return e.item, 0.0
        return None

    def stats(self) -> dict[str, Any]:
        return {
            "depth": self._depth,
            "max_depth": self.max_depth,
            "high_water": self.high_water,
            "admitted": self.admitted,
            "shed": dict(self.shed),
        }
