"""Pipeline compilation and scheduling.

A pipeline's synchronous operators are fused into one chain that runs in one task, batch by
batch in topological order (like Flink's operator chaining). Bounded queues exist only at async
boundaries: sources → chain (one queue per pipeline) and chain → each sink. A full queue makes
its producer wait; sources that cannot wait (a socket callback) pause their reading instead, so
overload is felt at the edge of the process and memory stays flat.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from ._log import RateLimitedLog
from ._retry import backoff
from .errors import NodeError
from .events import Event
from .node import NodeContext, NodeOptions, Operator, Sink, Source, _Node, get_node_type

if TYPE_CHECKING:
    from .store import Checkpointer, StateStore

__all__ = ["BatchQueue", "Pipeline", "SourceQueue"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Batch:
    origin: int
    events: list[Event]
    done: Callable[[], None] | None = None
    settle: bool = False  # a source's batch that was emptied (dead-lettered): ``done`` waits its turn
    watermark: float | None = None  # the source's event-time progress once these events are in


_STOP: Any = object()
_event_time = attrgetter("ts")
_SINK_WRITE_MAX = 4096  # events a sink is given in one write, at most, when batches queued up
_TRACEBACK_EVERY = 600.0  # seconds between two tracebacks of the same node's failures


class _TooFarAhead(ValueError):
    def __init__(self, ts: float, now: float, limit: float):
        super().__init__(
            f"event time {_iso(ts)} is {ts - now:.0f}s ahead of ingest time {_iso(now)} (max_future "
            f"{limit:g}s): the device's clock is wrong, or its time field is not epoch seconds"
        )


def _iso(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return repr(ts)


class _SinkMark:
    """A checkpoint barrier in the sink queues: ``passed`` runs once every sink has written what came before."""

    __slots__ = ("left", "on_passed")

    def __init__(self, sinks: int, on_passed: Callable[[], None]):
        self.left = sinks
        self.on_passed = on_passed

    def passed(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.on_passed()


class BatchQueue:
    """A FIFO of batches bounded by the number of *events* it holds.

    ``put`` waits while the queue is at capacity; ``put_nowait`` always accepts (for producers
    that cannot wait and pause their input instead) and ``when_room`` tells them when to resume
    (at half capacity, so they do not flap).
    """

    def __init__(self, capacity: int, name: str = ""):
        self.capacity = capacity
        self.name = name
        self.depth = 0
        self.high_water = 0
        self._items: deque[tuple[Any, int]] = deque()
        self._getter: asyncio.Future[None] | None = None
        self._putters: deque[asyncio.Future[None]] = deque()
        self._room_callbacks: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return self.depth >= self.capacity

    @property
    def waiting_producers(self) -> int:
        return len(self._putters) + len(self._room_callbacks)

    def put_nowait(self, item: Any, size: int) -> None:
        self._items.append((item, size))
        self.depth += size
        if self.depth > self.high_water:
            self.high_water = self.depth
        g = self._getter
        if g is not None and not g.done():
            g.set_result(None)

    async def put(self, item: Any, size: int) -> None:
        await self._wait_room()
        self.put_nowait(item, size)

    async def room(self) -> None:
        """Return once the queue is below capacity (for a producer about to ``put_nowait``)."""
        await self._wait_room()
        # this waiter puts nothing itself: hand the wake-up on, or a putter behind it waits for
        # a ``get`` that may never come
        if self.depth < self.capacity:
            self._wake_putter()

    async def _wait_room(self) -> None:
        while self.depth >= self.capacity:
            fut = asyncio.get_running_loop().create_future()
            self._putters.append(fut)
            try:
                await fut
            except BaseException:
                if fut in self._putters:
                    self._putters.remove(fut)
                raise

    def _wake_putter(self) -> None:
        while self._putters:
            f = self._putters.popleft()
            if not f.done():
                f.set_result(None)
                break

    def when_room(self, callback: Callable[[], None]) -> None:
        self._room_callbacks.append(callback)

    async def get(self) -> Any:
        while not self._items:
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
        return self.get_nowait()

    def peek(self) -> Any:
        """The item :meth:`get` returns next (the queue must not be empty)."""
        return self._items[0][0]

    def get_nowait(self) -> Any:
        """The next item (the queue must not be empty)."""
        item, size = self._items.popleft()
        self.depth -= size
        if self.depth < self.capacity:
            self._wake_putter()
            if self._room_callbacks and self.depth <= self.capacity // 2:
                cbs, self._room_callbacks = self._room_callbacks, []
                for cb in cbs:
                    cb()
        return item

    def stats(self) -> dict[str, int]:
        return {
            "depth": self.depth,
            "capacity": self.capacity,
            "high_water": self.high_water,
            "waiting_producers": self.waiting_producers,
        }


class SourceQueue:
    """A source's handle on its pipeline's input queue.

    It also bounds event time: a reading stamped further ahead of ingest time than the source's
    ``max_future`` option (a device with a bad clock, a reading from the year 2100) would move
    every window's watermark past the readings still to come, so it is dead-lettered with the
    reason instead of handed over.
    """

    __slots__ = ("_max_future", "_node", "_origin", "_q", "_quiet", "_settled")

    def __init__(
        self,
        q: BatchQueue,
        origin: int,
        node: Source,
        quiet: asyncio.Event | None = None,
        settled: asyncio.Event | None = None,
    ):
        self._q = q
        self._origin = origin
        self._node = node
        self._quiet = quiet or asyncio.Event()  # set: the source, stopping, hands over nothing more
        self._settled = settled or asyncio.Event()  # set: the pipeline drained and ran every ``done``
        mf = getattr(node.options, "max_future", None)
        self._max_future: float | None = None if mf is None else float(mf)

    def _plausible(self, events: list[Event]) -> list[Event]:
        """``events`` without those stamped more than ``max_future`` ahead of ingest time (dead-lettered)."""
        limit = self._max_future
        assert limit is not None
        clock = self._node.ctx.clock
        # after a forward step of the system clock, ingest time is behind it: a device whose
        # clock is right must not look ahead, so the bound is taken from the later of the two
        now = clock() + max(0.0, getattr(clock, "offset", 0.0))
        horizon = now + limit
        try:
            if max(map(_event_time, events)) <= horizon:  # the common case, at C speed
                return events
        except TypeError:  # a non-numeric time: for the nodes downstream to refuse with their reason
            pass
        kept = []
        for ev in events:
            ts = ev.ts
            if isinstance(ts, int | float) and ts > horizon:
                self._node.fail(ev, _TooFarAhead(ts, now, limit))
            else:
                kept.append(ev)
        return kept

    async def put(
        self, events: list[Event], done: Callable[[], None] | None = None, *, watermark: float | None = None
    ) -> None:
        """Hand over a batch, waiting while the pipeline is full. ``done`` runs once it is processed;
        ``watermark`` is the source's event-time progress once these events are in."""
        if self._max_future is not None and events:
            events = self._plausible(events)
        if events:
            await self._q.put(_Batch(self._origin, events, done, False, watermark), len(events))
            # counted once accepted: a put cancelled while waiting (shutdown) handed nothing over
            self._node.n_out += len(events)
        elif done is not None or watermark is not None:
            # everything dead-lettered: acknowledged in its turn, like any batch; or progress alone
            await self._q.put(_Batch(self._origin, [], done, done is not None, watermark), 0)

    def put_nowait(
        self, events: list[Event], done: Callable[[], None] | None = None, *, watermark: float | None = None
    ) -> bool:
        """Hand over a batch without waiting; returns False when the producer should pause."""
        if self._max_future is not None and events:
            events = self._plausible(events)
        if events:
            self._node.n_out += len(events)
            self._q.put_nowait(_Batch(self._origin, events, done, False, watermark), len(events))
        elif done is not None or watermark is not None:
            self._q.put_nowait(_Batch(self._origin, [], done, done is not None, watermark), 0)
        return not self._q.full

    @property
    def full(self) -> bool:
        return self._q.full

    def when_room(self, callback: Callable[[], None]) -> None:
        self._q.when_room(callback)

    def pause_while_full(self, reader: Any) -> None:
        """Backpressure for a push source: while the queue is full, ``reader`` (a link with
        ``reading``, ``pause_reading()`` and ``resume_reading()``) stops reading its socket; it
        resumes once the queue has drained to half. The source's ``n_pauses`` and ``paused``
        say so (``sluice_source_pauses`` and ``sluice_source_paused`` on ``/metrics``)."""
        if self._q.full and reader.reading:
            reader.pause_reading()
            node = self._node
            node.n_pauses += 1
            node.paused = True
            self._q.when_room(lambda: self._resume(reader))

    def _resume(self, reader: Any) -> None:
        self._node.paused = False
        reader.resume_reading()

    async def settled(self) -> None:
        """Hand over nothing more; return once the stopping pipeline has drained and run the
        ``done`` of every batch (see :meth:`gateway.api.SourceOutput.settled`)."""
        self._quiet.set()
        await self._settled.wait()


class Pipeline:
    """One running pipeline: its nodes, the fused chain, and the tasks that drive them."""

    def __init__(
        self,
        name: str,
        options: list[NodeOptions],
        make_ctx: Callable[[str], NodeContext],
        queue_size: int = 10_000,
        sink_queue_size: int = 10_000,
        store: StateStore | None = None,
    ):
        self.name = name
        self.state = "created"
        self.started_at: float | None = None
        self.nodes: list[_Node] = []
        index: dict[str, int] = {}
        for opts in _topological(options):
            cls = get_node_type(opts.type)
            assert cls is not None, opts.type  # validated by config
            index[opts.id] = len(self.nodes)
            ctx = make_ctx(opts.id)
            _check_services(cls, opts.id, ctx)
            ctx.emit = partial(self._emit, len(self.nodes))
            ctx.room = self._room
            self.nodes.append(cls(opts, ctx))
        self.index = index
        self.queue = BatchQueue(queue_size, f"{name}:input")
        self.sink_queues: dict[int, BatchQueue] = {
            i: BatchQueue(sink_queue_size, f"{name}:{n.id}") for i, n in enumerate(self.nodes) if isinstance(n, Sink)
        }
        self.inputs: list[list[int]] = [[index[u] for u in n.options.input] for n in self.nodes]
        self.plans: dict[int, list[tuple[int, _Node, list[int]]]] = {}
        for i, n in enumerate(self.nodes):
            if isinstance(n, Source | Operator):
                self.plans[i] = self._plan(i)
        # event-time progress declared by sources: which nodes take it, by source
        self._wm_targets: dict[int, frozenset[int]] = {}
        for i, n in enumerate(self.nodes):
            if isinstance(n, Source) and n.declares_watermark:
                self._wm_targets[i] = targets = self._watermark_targets(i)
                for t in targets:
                    self.nodes[t].on_watermark(n.id, -math.inf)  # type: ignore[union-attr]
        self._timed = [
            i for i, n in enumerate(self.nodes) if isinstance(n, Operator) and type(n).on_timer is not Operator.on_timer
        ]
        self._serving = [
            i for i, n in enumerate(self.nodes) if isinstance(n, Operator) and type(n).run is not Operator.run
        ]
        self._settling: dict[int, deque[list[Any]]] = {}  # per origin: done callbacks waiting for sinks
        self._stopping = asyncio.Event()
        self._rl = RateLimitedLog(log)
        # A node that keeps failing has a bug to find, so its failures are logged with their traceback:
        # a restart (paced by backoff) every time, its traceback the first time and then every few
        # minutes; a failure that can come with every batch or tick at most once a minute.
        self._traceback_at: dict[str, float] = {}
        self._failures = RateLimitedLog(log, 60.0)
        self.source_state: dict[str, str] = {}
        # node state: restored at start, checkpointed about once a second through a barrier
        self.checkpointer: Checkpointer | None = None
        self._restored = False
        if store is not None:
            from .store import Checkpointer

            self.checkpointer = Checkpointer(store, name, self.nodes)
        # With stateful nodes, a source's acknowledgement (a QoS 1 PUBACK) waits until the checkpoint
        # that holds what the batch did to their state is committed: a crash before that makes the
        # input come again instead of leaving a hole in the restored windows.
        self._hold_acks = self.checkpointer is not None and any(
            not isinstance(n, Source) and type(n).snapshot is not _Node.snapshot for n in self.nodes
        )
        self._held: list[tuple[int, Callable[[], None]]] = []
        self._chain_n = 0  # data batches the chain has processed
        # stopping: a source that confirms to its peer (Kafka, Redis) says it is quiet, and waits
        # for ``_settled`` to confirm the batches the final checkpoint releases before it closes
        self._quiet: dict[int, asyncio.Event] = {}
        self._settled = asyncio.Event()

    def _plan(self, origin: int) -> list[tuple[int, _Node, list[int]]]:
        """Nodes reachable from ``origin`` in topological order, each with its upstream slots."""
        reach = {origin}
        plan = []
        for i, n in enumerate(self.nodes):
            if i == origin:
                continue
            ups = [u for u in self.inputs[i] if u in reach]
            if ups:
                reach.add(i)
                plan.append((i, n, ups))
        return plan

    def _watermark_targets(self, origin: int) -> frozenset[int]:
        """The operators that take ``origin``'s declared progress: those with ``on_watermark``
        reached from it through nodes without (a window's output carries its own progress)."""
        through = {origin}
        targets = set()
        for i, n, ups in self.plans[origin]:
            if not isinstance(n, Operator) or not any(u in through for u in ups):
                continue
            if type(n).on_watermark is not Operator.on_watermark:
                targets.add(i)
            else:
                through.add(i)
        return frozenset(targets)

    # --- running ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until :meth:`stop`; then stop sources, drain the chain and the sinks, and return."""
        self.state = "starting"
        self.started_at = time.time()
        await self.restore()
        async with asyncio.TaskGroup() as tg:
            sink_tasks = [
                tg.create_task(self._sink_loop(i, n), name=f"sink:{self.name}:{n.id}")  # type: ignore[arg-type]
                for i, n in enumerate(self.nodes)
                if isinstance(n, Sink)
            ]
            chain = tg.create_task(self._chain_loop(), name=f"chain:{self.name}")
            sources = [
                tg.create_task(self._source_loop(i, n), name=f"source:{self.name}:{n.id}")  # type: ignore[arg-type]
                for i, n in enumerate(self.nodes)
                if isinstance(n, Source)
            ]
            timer = (
                tg.create_task(self._timer_loop(), name=f"timer:{self.name}")
                if (self._timed or self.checkpointer)
                else None
            )
            serving = [
                tg.create_task(
                    self._operator_loop(i, self.nodes[i]),  # type: ignore[arg-type]
                    name=f"operator:{self.name}:{self.nodes[i].id}",
                )
                for i in self._serving
            ]
            try:
                self.state = "running"
                log.info("pipeline %s running: %d nodes", self.name, len(self.nodes))
                await self._stopping.wait()
                self.state = "stopping"
                stopping = [*sources, *([timer] if timer else [])]
                for t in stopping:
                    t.cancel()
                if timer:
                    await asyncio.gather(timer, return_exceptions=True)
                await self._sources_quiet(sources)
                if serving:
                    # operators with background work stop only once everything queued before them went
                    # through the chain; what they emit while stopping is still drained below
                    await self._flushed(self._serving[0])
                    for t in serving:
                        t.cancel()
                    await asyncio.gather(*serving, return_exceptions=True)
                self.queue.put_nowait(_STOP, 0)
                await chain
                for i in self.sink_queues:
                    self.sink_queues[i].put_nowait(_STOP, 0)
                await asyncio.gather(*sink_tasks)
                if self.checkpointer is not None:  # everything drained: the state to start again from
                    await self.checkpointer.final()
                    self._release(math.inf)
                # every batch's ``done`` has run: the sources still open confirm them, then close
                self._settled.set()
                await asyncio.gather(*sources, return_exceptions=True)
            finally:
                # a stop cut short (the pipeline cancelled): a source waiting to confirm closes now
                self._settled.set()
        self.state = "stopped"
        # what came in and what went out, so a stop shows whether the drain was complete
        ends = ", ".join(
            f"{n.id} in={c['in']} out={c['out']} errors={c['errors']}"
            for n in self.nodes
            if not isinstance(n, Operator)
            for c in (n.counters(),)
        )
        log.info("pipeline %s stopped: %s", self.name, ends)

    def stop(self) -> None:
        self._stopping.set()

    async def _sources_quiet(self, sources: list[asyncio.Task[None]]) -> None:
        """Wait until each cancelled source has ended or, to confirm what the drain releases, waits
        in ``SourceOutput.settled`` (it hands over nothing more either way)."""
        for i, task in zip((i for i, n in enumerate(self.nodes) if isinstance(n, Source)), sources, strict=True):
            # a source cancelled before its first turn never made its event: its task ends at once
            quiet = asyncio.ensure_future(self._quiet.setdefault(i, asyncio.Event()).wait())
            try:
                await asyncio.wait((task, quiet), return_when=asyncio.FIRST_COMPLETED)
            finally:
                quiet.cancel()

    async def restore(self) -> None:
        """Take the nodes' state back from the store (once; :meth:`run` does it if nobody did)."""
        if self.checkpointer is not None and not self._restored:
            self._restored = True
            await self.checkpointer.restore()

    async def _source_loop(self, i: int, src: Source) -> None:
        out = SourceQueue(self.queue, i, src, self._quiet.setdefault(i, asyncio.Event()), self._settled)
        attempt = 0
        while True:
            self.source_state[src.id] = "running"
            try:
                await src.run(out)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # node boundary: a failing source is restarted, not fatal
                src.n_errors += 1
                self.source_state[src.id] = f"failed: {exc}"
                if self._stopping.is_set():
                    # not restarted while the pipeline stops (on Python 3.11 a cancellation that
                    # meets a library's timeout can come out as TimeoutError instead)
                    self._failed("source", src, exc, "not restarted: the pipeline stops")
                    return
                delay = backoff(attempt, 30.0)
                attempt += 1
                self._failed("source", src, exc, f"restarting in {delay:.1f}s")
                await asyncio.sleep(delay)
                continue
            self.source_state[src.id] = "finished"
            log.info("source %s/%s finished", self.name, src.id)
            return

    def _failed(self, what: str, node: _Node, exc: Exception, then: str, paced: bool = False) -> None:
        key = f"{what}:{node.id}"
        msg = "%s %s/%s failed (%s: %s); %s"
        args = (what, self.name, node.id, type(exc).__name__, exc, then)
        if paced:
            self._failures.log(logging.ERROR, key, msg, *args, exc_info=exc)
            return
        now = time.monotonic()
        last = self._traceback_at.get(key)
        with_traceback = last is None or now - last >= _TRACEBACK_EVERY
        if with_traceback:
            self._traceback_at[key] = now
        log.error(msg, *args, exc_info=exc if with_traceback else None)

    def _emit(self, i: int, events: list[Event]) -> bool:
        """``ctx.emit``: an operator's asynchronous output enters the chain below that operator.

        Bounded like every queue: into a full queue the events are refused (False), counted as
        dropped and logged now and then; a node awaits ``ctx.room()`` first for what it must not
        lose. While the pipeline stops they are always taken: the sources have stopped, so what
        comes is only what the nodes still hold.
        """
        if not events:
            return True
        node = self.nodes[i]
        if self.queue.full and not self._stopping.is_set():
            node.n_dropped += len(events)
            self._rl.warning(
                f"emit:{node.id}",
                "pipeline %s: %s emitted into a full queue; %d events dropped",
                self.name,
                node.id,
                len(events),
            )
            return False
        node.n_out += len(events)
        self.queue.put_nowait(_Batch(i, list(events)), len(events))
        return True

    async def _room(self) -> None:
        """``ctx.room``: wait until the chain's input queue has room for an operator's output."""
        await self.queue.room()

    async def _flushed(self, origin: int) -> None:
        """Return once every batch queued so far has been through the chain."""
        marker = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Batch(origin, [], lambda: marker.done() or marker.set_result(None)), 0)
        await marker

    async def _operator_loop(self, i: int, op: Operator) -> None:
        attempt = 0
        while True:
            try:
                await op.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # node boundary: an operator's background work is restarted
                op.n_errors += 1
                delay = backoff(attempt, 30.0)
                attempt += 1
                self._failed("operator", op, exc, f"restarting in {delay:.1f}s")
                await asyncio.sleep(delay)

    async def _timer_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for i in self._timed:
                node = self.nodes[i]
                try:
                    events = node.on_timer(node.ctx.monotonic())  # type: ignore[union-attr]
                except Exception as exc:  # node boundary
                    node.fail(None, exc)
                    self._failed("timer of", node, exc, "dead-lettered", paced=True)
                    continue
                if events:
                    try:
                        await self.queue.put(_Batch(i, events), len(events))
                    except asyncio.CancelledError:
                        # stopping while the queue is full: these are already out of the node's
                        # state, so queue them anyway; the chain drains them before it stops
                        self.queue.put_nowait(_Batch(i, events), len(events))
                        node.n_out += len(events)
                        raise
                    node.n_out += len(events)
            if self.checkpointer is not None and self.plans and self.checkpointer.due(now):
                # A barrier (as in Flink): sources' positions as it enters the queue, so exactly what
                # they handed over before it; every other node's state once the chain reaches it.
                sources = self.checkpointer.take([n for n in self.nodes if isinstance(n, Source)])
                self.queue.put_nowait(_Batch(next(iter(self.plans)), [], partial(self._checkpoint, sources)), 0)

    def _checkpoint(self, sources: dict[str, Any]) -> None:
        """Snapshot the other nodes now; commit once the sinks have written what these states produced."""
        ckpt = self.checkpointer
        assert ckpt is not None
        snaps = ckpt.take([n for n in self.nodes if not isinstance(n, Source)])
        snaps.update(sources)
        upto = self._chain_n
        if not self.sink_queues:
            self._commit(snaps, upto)
            return
        mark = _SinkMark(len(self.sink_queues), partial(self._commit, snaps, upto))
        for q in self.sink_queues.values():
            q.put_nowait(mark, 0)

    async def _chain_loop(self) -> None:
        q = self.queue
        sink_queues = self.sink_queues
        while True:
            item = await q.get()
            if item is _STOP:
                return
            outs = self._process(item)
            for si, events in outs:
                await sink_queues[si].put(events, len(events))
            if item.events:
                self._chain_n += 1
            if item.done is not None:
                if item.events or item.settle:
                    self._settle(item, outs)
                else:
                    self._call(item.done)  # a barrier or marker: it has been through the chain now

    def _settle(self, item: _Batch, outs: list[tuple[int, list[Event]]]) -> None:
        """Run a batch's ``done`` (a QoS 1 PUBACK, a source offset) once every sink it reached has
        written or dead-lettered its events, so a crash before that makes the input come again;
        in the order its source handed batches over."""
        fifo = self._settling.get(item.origin)
        if fifo is None:
            fifo = self._settling[item.origin] = deque()
        entry = [item.done, bool(outs), self._chain_n]  # [callback, still waiting for sinks, chain position]
        fifo.append(entry)
        if outs:
            mark = _SinkMark(len(outs), partial(self._written, fifo, entry))
            for si, _ in outs:
                self.sink_queues[si].put_nowait(mark, 0)
        else:
            self._written(fifo, entry)

    def _written(self, fifo: deque[list[Any]], entry: list[Any]) -> None:
        entry[1] = False
        while fifo and not fifo[0][1]:
            done, _, n = fifo.popleft()
            if self._hold_acks:
                self._held.append((n, done))
            else:
                self._call(done)

    def _commit(self, snaps: dict[str, Any], upto: int) -> None:
        """Queue a checkpoint; once it is on disk, acknowledge the batches it covers."""
        ckpt = self.checkpointer
        assert ckpt is not None
        ckpt.commit(snaps)
        if self._hold_acks:
            loop = asyncio.get_running_loop()
            ckpt.store.on_committed(lambda exc: loop.call_soon_threadsafe(self._release, upto, exc))

    def _release(self, upto: float, exc: BaseException | None = None) -> None:
        if exc is not None:
            # The state could not be saved (disk or quota full): acknowledge anyway rather than
            # stall the broker's sessions; the store's health already says what is wrong.
            self._rl.warning(
                f"ack:{self.name}", "pipeline %s: state not saved (%s); acknowledging input anyway", self.name, exc
            )
        keep = []
        for n, done in self._held:
            if n <= upto:
                self._call(done)
            else:
                keep.append((n, done))
        self._held = keep

    def _call(self, done: Callable[[], None]) -> None:
        try:
            done()
        except Exception:  # an ack callback must not stop the chain or a sink
            log.exception("acknowledging a batch failed in pipeline %s", self.name)

    def _process(self, item: _Batch) -> list[tuple[int, list[Event]]]:
        slots: dict[int, list[Event]] = {item.origin: item.events}
        to_sinks: list[tuple[int, list[Event]]] = []
        wm_targets = self._wm_targets.get(item.origin) if item.watermark is not None else None
        for i, node, ups in self.plans[item.origin]:
            if len(ups) == 1:
                ins = slots.get(ups[0])
            else:
                ins = [ev for u in ups for ev in slots.get(u, ())]
            if not ins:
                if wm_targets and i in wm_targets:
                    ins = []
                else:
                    continue
            node.n_in += len(ins)
            if isinstance(node, Operator):
                try:
                    out = node.process_batch(ins) if ins else []
                    if wm_targets and i in wm_targets:
                        # behind the batch's events, as a Flink watermark follows the records it covers
                        closed = node.on_watermark(self.nodes[item.origin].id, item.watermark)  # type: ignore[arg-type]
                        if closed:
                            out = [*out, *closed]
                except Exception as exc:  # an operator that broke outside its per-event guard
                    for ev in ins:
                        node.fail(ev, exc)
                    self._failed("operator", node, exc, f"{len(ins)} events dead-lettered", paced=True)
                    continue
                if not out:
                    continue
                node.n_out += len(out)
                slots[i] = out
            else:
                to_sinks.append((i, ins))
        return to_sinks

    async def _sink_loop(self, i: int, sink: Sink) -> None:
        q = self.sink_queues[i]
        attempt = 0
        while True:
            try:
                await sink.start()
                break
            except Exception as exc:  # node boundary: retry a sink that cannot start
                delay = backoff(attempt, 30.0)
                attempt += 1
                self._rl.warning(
                    f"start:{sink.id}",
                    "sink %s/%s cannot start (%s); retrying in %.1fs",
                    self.name,
                    sink.id,
                    exc,
                    delay,
                )
                if self._stopping.is_set() and attempt > 3:
                    break
                await asyncio.sleep(delay)
        merge = sink.merge_batches
        while True:
            batch = await q.get()
            if batch is _STOP:
                break
            if type(batch) is _SinkMark:
                batch.passed()
                continue
            # For a sink that asks for it, what queued up behind this batch during the last write
            # goes in this one (an outbox sink then commits many batches at once under load); the
            # markers between them are passed after it: each says only that what came before it
            # has been written.
            marks: list[_SinkMark] = []
            if merge and len(q) and q.peek() is not _STOP:
                batch = list(batch)  # a new list: the one queued may be another sink's too
                while len(q) and len(batch) < _SINK_WRITE_MAX and q.peek() is not _STOP:
                    more = q.get_nowait()
                    if type(more) is _SinkMark:
                        marks.append(more)
                    else:
                        batch.extend(more)
            try:
                await sink.write(batch)
            except Exception as exc:  # node boundary: dead-letter what could not be written
                for ev in batch:
                    sink.fail(ev, exc)
            else:
                sink.n_out += len(batch)
            for mark in marks:
                mark.passed()
        try:
            await sink.close()
        except Exception:  # closing must not hide the other sinks' shutdown
            log.exception("sink %s/%s failed to close", self.name, sink.id)

    # --- reporting --------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        out = []
        for i, n in enumerate(self.nodes):
            q = self.queue if isinstance(n, Source) else self.sink_queues.get(i)
            entry: dict[str, Any] = {
                "id": n.id,
                "type": n.type_name,
                "kind": n.kind,
                "inputs": list(n.options.input),
                "counters": n.counters(),
                "queue": q.stats() if q is not None else None,
            }
            if isinstance(n, Source | Sink):
                entry["health"] = n.health()
            if isinstance(n, Source):
                entry["state"] = self.source_state.get(n.id, "created")
            out.append(entry)
        return {"name": self.name, "state": self.state, "started_at": self.started_at, "nodes": out}


def _check_services(cls: type[_Node], node_id: str, ctx: NodeContext) -> None:
    """A node whose required services the runtime does not offer fails here, by name, not later.

    A context without services (``None``: a test or a benchmark building a pipeline by hand) is
    taken as it is.
    """
    services = ctx.services
    if services is None:
        return
    missing = sorted(s for s in cls.required_services() if getattr(services, s, None) is None)
    if missing:
        raise NodeError(node_id, f"node {node_id!r} ({cls.type_name}) needs the {', '.join(missing)} service(s)")


def _topological(options: list[NodeOptions]) -> list[NodeOptions]:
    """Order nodes so every node comes after its inputs (stable for independent nodes)."""
    by_id = {o.id: o for o in options}
    done: set[str] = set()
    out: list[NodeOptions] = []

    def visit(o: NodeOptions, seen: set[str]) -> None:
        if o.id in done:
            return
        if o.id in seen:
            raise ValueError(f"cycle through {o.id!r}")
        seen.add(o.id)
        for up in o.input:
            visit(by_id[up], seen)
        done.add(o.id)
        out.append(o)

    for o in options:
        visit(o, set())
    return out
