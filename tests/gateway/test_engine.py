"""The engine: fused chains, fan-out/fan-in, counters, dead letters, backpressure and draining."""

from __future__ import annotations

import asyncio
import gc
import logging
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import Field

from gateway import node as node_mod
from gateway.config import parse_config
from gateway.deadletter import DeadLetters
from gateway.engine import BatchQueue, Pipeline, SourceQueue
from gateway.events import Event
from gateway.node import NodeContext, NodeOptions, Operator, Sink, Source, register
from tests._util import wait_for

# --- test-only node types (registered for the duration of each test) -----------------------------


class ListOptions(NodeOptions):
    type: Literal["t_list"]
    key: str = "k"
    values: list[Any] = Field(default_factory=list)
    batch: int = 10


class ListSource(Source):
    """Emits `values` in batches of `batch`, then finishes."""

    Options = ListOptions
    options: ListOptions

    async def run(self, output: SourceQueue) -> None:
        vals = self.options.values
        for i in range(0, len(vals), self.options.batch):
            chunk = vals[i : i + self.options.batch]
            batch = [Event(self.options.key, float(i + j), v, self.id) for j, v in enumerate(chunk)]
            self.n_in += len(batch)
            await output.put(batch)


class BoomOptions(NodeOptions):
    type: Literal["t_boom"]
    on: float = 3.0


class Boom(Operator):
    """Passes events through, raises on the value `on`."""

    Options = BoomOptions
    options: BoomOptions

    def on_event(self, event: Event) -> Event:
        if event.value == self.options.on:
            raise RuntimeError(f"boom on {event.value}")
        return event


class CollectOptions(NodeOptions):
    type: Literal["t_collect"]
    delay: float = 0.0
    fail_on: float | None = None


class Collect(Sink):
    """Keeps every event written; can be slow (`delay` per batch) or fail on a batch with `fail_on`."""

    Options = CollectOptions
    options: CollectOptions

    def __init__(self, options: CollectOptions, ctx: NodeContext):
        super().__init__(options, ctx)
        self.events: list[Event] = []
        self.batches = 0
        self.closed = False

    async def write(self, batch: list[Event]) -> None:
        if self.options.delay:
            await asyncio.sleep(self.options.delay)
        if self.options.fail_on is not None and any(ev.value == self.options.fail_on for ev in batch):
            raise OSError("disk on fire")
        self.batches += 1
        self.events.extend(batch)

    async def close(self) -> None:
        self.closed = True


class CountOptions(NodeOptions):
    type: Literal["t_count"]
    delay: float = 0.0


class Count(Sink):
    """Counts events without keeping them (for memory measurements)."""

    Options = CountOptions
    options: CountOptions

    def __init__(self, options: CountOptions, ctx: NodeContext):
        super().__init__(options, ctx)
        self.count = 0

    async def write(self, batch: list[Event]) -> None:
        await asyncio.sleep(self.options.delay)
        self.count += len(batch)


@pytest.fixture(autouse=True)
def test_nodes() -> Iterator[None]:
    classes = (ListSource, Boom, Collect, Count)
    for cls in classes:
        register(cls)
    yield
    for cls in classes:
        node_mod._REGISTRY.pop(cls.type_name, None)


# --- helpers ---------------------------------------------------------------------------------


def build(
    tmp_path: Path,
    nodes_yaml: str,
    *,
    queue_size: int = 10_000,
    sink_queue_size: int = 10_000,
) -> tuple[Pipeline, DeadLetters]:
    """A pipeline from YAML node lines, validated by the real config loader."""
    text = f"gateway: {{id: gw, data_dir: {tmp_path}}}\npipelines:\n  - name: p\n    nodes:\n{nodes_yaml}"
    loaded = parse_config(text)
    dl = DeadLetters(tmp_path / "deadletter.db")

    def ctx(node_id: str) -> NodeContext:
        return NodeContext("gw", "p", node_id, str(tmp_path), None, dl)

    return Pipeline("p", loaded.nodes["p"], ctx, queue_size=queue_size, sink_queue_size=sink_queue_size), dl


def node(p: Pipeline, node_id: str) -> Any:
    return p.nodes[p.index[node_id]]


def sources_finished(p: Pipeline) -> bool:
    srcs = [n.id for n in p.nodes if isinstance(n, Source)]
    return all(p.source_state.get(s) == "finished" for s in srcs)


async def run_until(p: Pipeline, condition: Any) -> None:
    task = asyncio.create_task(p.run())
    try:
        await wait_for(condition, timeout=10)
    finally:
        p.stop()
        await asyncio.wait_for(task, 10)
    assert p.state == "stopped"


# --- tests -----------------------------------------------------------------------------------


async def test_fan_out_and_fan_in(tmp_path: Path) -> None:
    a_values = ", ".join(str(i) for i in range(100))
    b_values = ", ".join(str(i) for i in range(100, 150))
    p, _ = build(
        tmp_path,
        f"""\
      - {{id: a, type: t_list, key: a, values: [{a_values}], batch: 7}}
      - {{id: b, type: t_list, key: b, values: [{b_values}], batch: 4}}
      - {{id: low, type: filter, input: a, where: "value < 50.0"}}
      - {{id: high, type: filter, input: a, where: "value >= 50.0"}}
      - {{id: shift, type: map, input: [low, high, b], value: "value + 1000.0"}}
      - {{id: low_out, type: t_collect, input: low}}
      - {{id: all_out, type: t_collect, input: shift}}
      - {{id: raw_out, type: t_collect, input: [a, b]}}
""",
    )
    low_out, all_out, raw_out = node(p, "low_out"), node(p, "all_out"), node(p, "raw_out")
    await run_until(p, lambda: sources_finished(p) and len(all_out.events) == 150 and len(raw_out.events) == 150)

    assert [e.value for e in low_out.events] == [float(i) for i in range(50)]
    assert {e.key for e in low_out.events} == {"a"}
    assert sorted(e.value for e in all_out.events) == [1000.0 + i for i in range(150)]
    # each source's events keep their order through the fused chain
    assert [e.value for e in all_out.events if e.key == "b"] == [1100.0 + i for i in range(50)]
    assert sorted(e.value for e in raw_out.events) == [float(i) for i in range(150)]

    c = {n.id: n.counters() for n in p.nodes}
    assert c["a"] == {"in": 100, "out": 100, "errors": 0, "dropped": 0, "pauses": 0}
    assert c["b"] == {"in": 50, "out": 50, "errors": 0, "dropped": 0, "pauses": 0}
    assert c["low"] == {"in": 100, "out": 50, "errors": 0, "dropped": 50}
    assert c["high"] == {"in": 100, "out": 50, "errors": 0, "dropped": 50}
    assert c["shift"] == {"in": 150, "out": 150, "errors": 0, "dropped": 0}
    assert c["low_out"] == {"in": 50, "out": 50, "errors": 0, "dropped": 0}
    assert c["all_out"] == {"in": 150, "out": 150, "errors": 0, "dropped": 0}
    assert c["raw_out"] == {"in": 150, "out": 150, "errors": 0, "dropped": 0}
    assert all(n.closed for n in (low_out, all_out, raw_out))

    described = p.describe()
    assert described["state"] == "stopped"
    by_id = {n["id"]: n for n in described["nodes"]}
    assert by_id["shift"]["inputs"] == ["low", "high", "b"]
    assert by_id["a"]["state"] == "finished"
    assert by_id["all_out"]["queue"]["depth"] == 0


async def test_node_raising_dead_letters_the_event_and_goes_on(tmp_path: Path) -> None:
    p, dl = build(
        tmp_path,
        """\
      - {id: src, type: t_list, values: [1, 2, 3, 4, {temp: 5}, 6], batch: 3}
      - {id: boom, type: t_boom, input: src, on: 3}
      - {id: num, type: map, input: boom, value: "value * 2.0"}
      - {id: out, type: t_collect, input: num, fail_on: 12}
""",
    )
    out = node(p, "out")
    await run_until(p, lambda: sources_finished(p) and out.batches >= 1 and out.n_errors >= 1)
    # batches [1,2,3] and [4,{temp:5},6]: 3 raises in boom, the mapping fails in the map,
    # and the sink fails on the second batch (it holds 12.0) -> that batch is dead-lettered.
    assert [e.value for e in out.events] == [2.0, 4.0]
    assert node(p, "boom").counters() == {"in": 6, "out": 5, "errors": 1, "dropped": 0}
    assert node(p, "num").counters() == {"in": 5, "out": 4, "errors": 1, "dropped": 0}
    assert out.counters() == {"in": 4, "out": 2, "errors": 2, "dropped": 0}
    assert dl.counts == {("p", "boom"): 1, ("p", "num"): 1, ("p", "out"): 2}

    await dl.close()
    rows = {(r["node"], r["payload"]): r for r in dl.read()}
    assert len(rows) == 4
    boom = next(r for (n, _), r in rows.items() if n == "boom")
    assert boom["reason"] == "boom on 3" and boom["pipeline"] == "p" and boom["key"] == "k"
    assert '"value": 3,' in boom["payload"]
    num = next(r for (n, _), r in rows.items() if n == "num")
    assert "map * float" in num["reason"] and num["reason"].endswith("(in expression 'value * 2.0')")
    sink_rows = [r for (n, _), r in rows.items() if n == "out"]
    assert {r["reason"] for r in sink_rows} == {"disk on fire"}


async def test_backpressure_bounds_queues_and_memory(tmp_path: Path) -> None:
    sensors = ", ".join(f"{{key: s{i}, noise: 0.5}}" for i in range(50))
    cap = 1000
    p, _ = build(
        tmp_path,
        f"""\
      - {{id: sim, type: simulate, realtime: false, count: 1200, seed: 1, sensors: [{sensors}]}}
      - {{id: warm, type: filter, input: sim, where: "value > -1000.0"}}
      - {{id: f, type: map, input: warm, value: "value * 1.8 + 32.0"}}
      - {{id: slow, type: t_count, input: f, delay: 0.001}}
""",
        queue_size=cap,
        sink_queue_size=cap,
    )
    slow, sim = node(p, "slow"), node(p, "sim")
    gc.collect()
    tracemalloc.start()
    try:
        task = asyncio.create_task(p.run())
        await wait_for(lambda: slow.count >= 5_000, timeout=30)
        gc.collect()
        baseline, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        depth_samples = []

        def done() -> bool:
            depth_samples.append((p.queue.depth, p.sink_queues[p.index["slow"]].depth))
            return slow.count >= 60_000

        await wait_for(done, timeout=60, interval=0.005)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        p.stop()
        await asyncio.wait_for(task, 20)
    batch = 50
    # the source outran the sink (it was paused), yet no queue held more than capacity + one batch
    assert p.queue.high_water >= cap - batch
    assert p.queue.high_water <= cap + batch
    sink_q = p.sink_queues[p.index["slow"]]
    assert sink_q.high_water >= cap - batch
    assert sink_q.high_water <= cap + batch
    assert max(d for d, _ in depth_samples) <= cap + batch
    growth = peak - baseline  # ~40 KB measured; queued events alone would be several MiB unbounded
    assert growth < 4 * 2**20, f"memory grew by {growth / 2**20:.1f} MiB while 55k events flowed"
    assert slow.count == sim.n_out == 60_000


async def test_stop_drains_every_accepted_event(tmp_path: Path) -> None:
    p, _ = build(
        tmp_path,
        """\
      - {id: sim, type: simulate, realtime: false, seed: 2, sensors: [{key: a}, {key: b}, {key: c}]}
      - {id: m, type: map, input: sim, value: "value + 1.0"}
      - {id: out, type: t_collect, input: m, delay: 0.002}
      - {id: fast, type: t_collect, input: sim}
""",
        queue_size=300,
        sink_queue_size=300,
    )
    out, fast, sim = node(p, "out"), node(p, "fast"), node(p, "sim")
    task = asyncio.create_task(p.run())
    # stop while the source is running and both queues are full
    await wait_for(lambda: p.queue.full and p.sink_queues[p.index["out"]].full and len(out.events) > 300)
    queued = p.queue.depth + p.sink_queues[p.index["out"]].depth
    assert queued >= 300
    p.stop()
    await asyncio.wait_for(task, 20)
    assert p.state == "stopped"
    accepted = sim.n_out
    assert len(out.events) == accepted
    assert len(fast.events) == accepted
    assert node(p, "m").counters()["in"] == accepted
    assert p.queue.depth == 0 and all(q.depth == 0 for q in p.sink_queues.values())
    # nothing duplicated or reordered per key
    for k in "abc":
        ts = [e.ts for e in out.events if e.key == k]
        assert ts == sorted(ts) and len(set(ts)) == len(ts)


async def test_a_stop_before_the_sources_ran_ends_the_pipeline_cleanly(tmp_path: Path) -> None:
    """A pipeline told to stop before its source tasks had their first turn (a reload that drops it
    right after it started): it stops, instead of failing on a source that never said it was quiet."""
    p, _ = build(
        tmp_path,
        """\
      - {id: sim, type: simulate, realtime: false, sensors: [{key: a}]}
      - {id: out, type: t_collect, input: sim}
""",
    )
    p.stop()
    await asyncio.wait_for(p.run(), 20)
    assert p.state == "stopped"
    assert len(node(p, "out").events) == node(p, "sim").n_out


async def test_failing_source_is_restarted(tmp_path: Path) -> None:
    class FlakyOptions(NodeOptions):
        type: Literal["t_flaky"]

    class Flaky(Source):
        Options = FlakyOptions
        runs = 0

        async def run(self, output: SourceQueue) -> None:
            type(self).runs += 1
            await output.put([Event("k", 0.0, float(type(self).runs), self.id)])
            if type(self).runs < 2:
                raise ConnectionError("device went away")

    register(Flaky)
    try:
        p, _ = build(
            tmp_path,
            """\
      - {id: src, type: t_flaky}
      - {id: out, type: t_collect, input: src}
""",
        )
    finally:
        node_mod._REGISTRY.pop("t_flaky", None)
    out = node(p, "out")
    await run_until(p, lambda: sources_finished(p) and len(out.events) == 2)
    assert [e.value for e in out.events] == [1.0, 2.0]
    assert node(p, "src").n_errors == 1


class TickOptions(NodeOptions):
    type: Literal["t_tick"]
    per_tick: int = 50


class Tick(Operator):
    """Passes events through and emits `per_tick` events of its own on every timer tick."""

    Options = TickOptions
    options: TickOptions
    ticks = 0

    def on_event(self, event: Event) -> Event:
        return event

    def on_timer(self, now: float) -> list[Event]:
        self.ticks += 1
        return [Event("tick", float(self.ticks), float(j), self.id) for j in range(self.options.per_tick)]


class GateOptions(NodeOptions):
    type: Literal["t_gate"]


class Gate(Sink):
    """Holds every write until `gate` opens: a sink that is stuck, then recovers."""

    Options = GateOptions

    def __init__(self, options: GateOptions, ctx: NodeContext):
        super().__init__(options, ctx)
        self.gate = asyncio.Event()
        self.events: list[Event] = []

    async def write(self, batch: list[Event]) -> None:
        await self.gate.wait()
        self.events.extend(batch)


async def test_stop_keeps_timer_events_that_were_waiting_for_room(tmp_path: Path) -> None:
    register(Tick)
    register(Gate)
    try:
        ones = ", ".join(["1"] * 1000)
        p, _ = build(
            tmp_path,
            f"""\
      - {{id: src, type: t_list, values: [{ones}], batch: 10}}
      - {{id: tick, type: t_tick, input: src}}
      - {{id: out, type: t_gate, input: tick}}
""",
            queue_size=100,
            sink_queue_size=100,
        )
    finally:
        node_mod._REGISTRY.pop("t_tick", None)
        node_mod._REGISTRY.pop("t_gate", None)
    out, tick, src = node(p, "out"), node(p, "tick"), node(p, "src")
    task = asyncio.create_task(p.run())
    # the sink is stuck: the source fills the queues and waits, then the timer waits too
    await wait_for(lambda: p.queue.waiting_producers >= 2, timeout=10)
    p.stop()
    await wait_for(lambda: p.state == "stopping")
    out.gate.set()
    await asyncio.wait_for(task, 10)
    assert tick.ticks >= 1
    ticked = [e for e in out.events if e.key == "tick"]
    assert len(ticked) == tick.n_out - src.n_out == 50 * tick.ticks
    assert len(out.events) == tick.n_out


class AckOptions(NodeOptions):
    type: Literal["t_ack"]
    batches: list[list[float]] = Field(default_factory=list)


class AckSource(Source):
    """Hands over each batch with a `done` callback, like a QoS 1 MQTT source acknowledging to the broker."""

    Options = AckOptions
    options: AckOptions

    def __init__(self, options: AckOptions, ctx: NodeContext):
        super().__init__(options, ctx)
        self.acked: list[int] = []

    async def run(self, output: SourceQueue) -> None:
        for i, values in enumerate(self.options.batches):
            await output.put([Event("k", 0.0, v, self.id) for v in values], lambda i=i: self.acked.append(i))


async def test_inputs_are_acknowledged_once_every_sink_wrote_them(tmp_path: Path) -> None:
    for cls in (AckSource, Gate):
        register(cls)
    try:
        p, _ = build(
            tmp_path,
            """\
      - {id: src, type: t_ack, batches: [[1, 2], [200], [3], [4]]}
      - {id: small, type: filter, input: src, where: "value < 100.0"}
      - {id: slow, type: t_gate, input: small}
      - {id: fast, type: t_collect, input: src, fail_on: 4}
""",
        )
    finally:
        node_mod._REGISTRY.pop("t_ack", None)
        node_mod._REGISTRY.pop("t_gate", None)
    src, slow, fast = node(p, "src"), node(p, "slow"), node(p, "fast")
    task = asyncio.create_task(p.run())
    try:
        await wait_for(lambda: len(fast.events) == 4 and fast.n_errors == 1)
        # the fast sink wrote everything; the slow one holds batches 0, 2 and 3. Batch 1 reached
        # only the fast sink, but acknowledgements keep the source's order: it waits for batch 0
        assert src.acked == [] and slow.events == []
        slow.gate.set()
        # a failed write is dead-lettered, which also settles it
        await wait_for(lambda: src.acked == [0, 1, 2, 3])
    finally:
        slow.gate.set()
        p.stop()
        await asyncio.wait_for(task, 10)
    assert [e.value for e in slow.events] == [1, 2, 3, 4]


async def test_input_reaching_no_sink_is_acknowledged_at_once(tmp_path: Path) -> None:
    for cls in (AckSource, Gate):
        register(cls)
    try:
        p, _ = build(
            tmp_path,
            """\
      - {id: src, type: t_ack, batches: [[200], [300, 400]]}
      - {id: small, type: filter, input: src, where: "value < 100.0"}
      - {id: slow, type: t_gate, input: small}
""",
        )
    finally:
        node_mod._REGISTRY.pop("t_ack", None)
        node_mod._REGISTRY.pop("t_gate", None)
    src = node(p, "src")
    await run_until(p, lambda: src.acked == [0, 1])


class SteppedAckSource(AckSource):
    """An AckSource that hands over its first batch, then the others once `more` is set."""

    def __init__(self, options: AckOptions, ctx: NodeContext):
        super().__init__(options, ctx)
        self.more = asyncio.Event()

    async def run(self, output: SourceQueue) -> None:
        for i, values in enumerate(self.options.batches):
            if i == 1:
                await self.more.wait()
            await output.put([Event("k", 0.0, v, self.id) for v in values], lambda i=i: self.acked.append(i))


class MergingGate(Gate):
    """A gated sink that asks for the batches queued during a write in the next one."""

    merge_batches = True

    def __init__(self, options: GateOptions, ctx: NodeContext):
        super().__init__(options, ctx)
        self.writes: list[list[float]] = []

    async def write(self, batch: list[Event]) -> None:
        self.writes.append([e.value for e in batch])
        await super().write(batch)


async def test_a_merging_sink_gets_what_queued_during_a_write_in_one_write(tmp_path: Path) -> None:
    register(SteppedAckSource)
    register(MergingGate)
    try:
        p, _ = build(
            tmp_path,
            """\
      - {id: src, type: t_ack, batches: [[1, 2], [3], [4, 5], [6]]}
      - {id: slow, type: t_gate, input: src}
      - {id: plain, type: t_collect, input: src}
""",
        )
    finally:
        node_mod._REGISTRY.pop("t_ack", None)
        node_mod._REGISTRY.pop("t_gate", None)
    src, slow, plain = node(p, "src"), node(p, "slow"), node(p, "plain")
    task = asyncio.create_task(p.run())
    try:
        await wait_for(lambda: slow.writes)
        src.more.set()
        await wait_for(lambda: len(plain.events) == 6)
        await wait_for(lambda: p.sink_queues[p.index["slow"]].depth == 4)  # the three other batches
        assert slow.writes == [[1, 2]] and src.acked == []
        slow.gate.set()
        await wait_for(lambda: src.acked == [0, 1, 2, 3])
        # the first write, then one for the three batches that queued behind it
        assert slow.writes == [[1, 2], [3, 4, 5, 6]]
        assert plain.batches == 4  # a sink that does not ask keeps one write per batch
    finally:
        slow.gate.set()
        p.stop()
        await asyncio.wait_for(task, 10)
    assert [e.value for e in slow.events] == [1, 2, 3, 4, 5, 6]
    assert node(p, "slow").counters()["in"] == 6 and node(p, "slow").counters()["out"] == 6


async def test_a_producer_that_only_waits_for_room_hands_the_wake_up_on() -> None:
    q = BatchQueue(2)
    q.put_nowait("a", 2)
    waiter = asyncio.create_task(q.room())  # first in line, puts nothing itself
    putter = asyncio.create_task(q.put("b", 1))
    await wait_for(lambda: q.waiting_producers == 2, timeout=5)
    assert await q.get() == "a"  # one get makes room for both
    await asyncio.wait_for(waiter, 5)
    await asyncio.wait_for(putter, 5)  # no second get comes: the waiter must have woken it
    assert (q.depth, await q.get()) == (1, "b")


# --- a node that keeps failing says where -----------------------------------------------------


class BrokenOptions(NodeOptions):
    type: Literal["t_broken"]


def _parse_frame() -> None:
    raise KeyError("frame")


class BrokenSource(Source):
    """Fails on every run, in a helper whose name the traceback must show."""

    Options = BrokenOptions

    async def run(self, output: SourceQueue) -> None:
        _parse_frame()


class BrokenWorkOptions(NodeOptions):
    type: Literal["t_broken_work"]


class BrokenWork(Operator):
    """Passes events through; its background task and its timer fail every time."""

    Options = BrokenWorkOptions

    def on_event(self, event: Event) -> Event:
        return event

    async def run(self) -> None:
        _parse_frame()

    def on_timer(self, now: float) -> list[Event]:
        _parse_frame()
        return []


def _failures(caplog: pytest.LogCaptureFixture, prefix: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gateway.engine" and r.getMessage().startswith(prefix)]


def _traceback(record: logging.LogRecord) -> str:
    assert record.exc_info is not None, record.getMessage()
    return logging.Formatter().formatException(record.exc_info)


@pytest.mark.parametrize(("what", "yaml"), [("source p/src", "t_broken"), ("operator p/work", "t_broken_work")])
async def test_a_node_that_keeps_restarting_logs_its_traceback_once_then_a_line_per_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, what: str, yaml: str
) -> None:
    register(BrokenSource)
    register(BrokenWork)
    try:
        nodes = (
            "      - {id: src, type: t_broken}\n"
            if yaml == "t_broken"
            else "      - {id: src, type: t_list, values: [1]}\n      - {id: work, type: t_broken_work, input: src}\n"
        )
        p, _ = build(tmp_path, nodes)
    finally:
        node_mod._REGISTRY.pop("t_broken", None)
        node_mod._REGISTRY.pop("t_broken_work", None)
    caplog.set_level(logging.ERROR, logger="gateway.engine")
    await run_until(p, lambda: len(_failures(caplog, what)) >= 3)
    first, *later = _failures(caplog, what)
    assert first.getMessage().startswith(f"{what} failed (KeyError: 'frame'); restarting in ")
    assert "in _parse_frame" in _traceback(first)
    assert [r.exc_info for r in later] == [None] * len(later)  # the same traceback is not repeated


async def test_a_failing_timer_is_logged_with_its_traceback_and_dead_lettered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    register(BrokenWork)
    try:
        p, dl = build(
            tmp_path,
            "      - {id: src, type: t_list, values: [1]}\n      - {id: work, type: t_broken_work, input: src}\n",
        )
    finally:
        node_mod._REGISTRY.pop("t_broken_work", None)
    caplog.set_level(logging.ERROR, logger="gateway.engine")
    await run_until(p, lambda: _failures(caplog, "timer of p/work"))
    (record,) = _failures(caplog, "timer of p/work")
    assert record.getMessage() == "timer of p/work failed (KeyError: 'frame'); dead-lettered"
    assert "in on_timer" in _traceback(record) and "in _parse_frame" in _traceback(record)
    assert dl.counts[("p", "work")] >= 1


async def test_timers_run_on_each_nodes_injected_monotonic_clock(tmp_path: Path) -> None:
    text = f"""\
gateway: {{id: gw, data_dir: {tmp_path}}}
pipelines:
  - name: p
    nodes:
      - {{id: a, type: t_list, key: k, values: [1]}}
      - {{id: quiet, type: stale, input: a, timeout: 1h}}
      - {{id: out, type: t_collect, input: quiet}}
"""
    loaded = parse_config(text)
    dl = DeadLetters(None)
    now = [100.0]

    def ctx(node_id: str) -> NodeContext:
        return NodeContext("gw", "p", node_id, str(tmp_path), None, dl, monotonic=lambda: now[0])

    p = Pipeline("p", loaded.nodes["p"], ctx)
    out = node(p, "out")
    task = asyncio.create_task(p.run())
    try:
        await wait_for(lambda: node(p, "quiet").n_in == 1, timeout=10)
        now[0] += 3600  # an hour passes on the node's clock, a moment on the wall
        await wait_for(lambda: out.events, timeout=10)
    finally:
        p.stop()
        await asyncio.wait_for(task, 10)
    assert [(e.value["state"], e.value["silent_for"]) for e in out.events] == [("raised", 3600.0)]
