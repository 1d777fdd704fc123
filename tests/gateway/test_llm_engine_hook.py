"""The engine hook the LLM stage needs: an operator's background task emitting via ``ctx.emit``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from gateway import node as node_mod
from gateway.config import parse_config
from gateway.deadletter import DeadLetters
from gateway.engine import Pipeline, SourceQueue
from gateway.events import Event
from gateway.node import NodeContext, NodeOptions, Operator, Sink, Source, register
from tests._util import wait_for


class _SrcOptions(NodeOptions):
    type: Literal["t_hook_src"]
    n: int = 10


class _Src(Source):
    Options = _SrcOptions

    async def run(self, output: SourceQueue) -> None:
        for i in range(self.options.n):  # type: ignore[attr-defined]
            await output.put([Event("k", float(i), float(i), self.id)])


class _DeferOptions(NodeOptions):
    type: Literal["t_hook_defer"]
    hold: int = 0


class _Defer(Operator):
    """Returns nothing from on_event; its run() task emits later. Keeps the last `hold` until stop."""

    Options = _DeferOptions

    def __init__(self, options: Any, ctx: NodeContext):
        super().__init__(options, ctx)
        self.pending: list[Event] = []
        self.wake = asyncio.Event()

    def on_event(self, event: Event) -> None:
        self.pending.append(event)
        self.wake.set()

    async def run(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                await asyncio.sleep(0)  # emitted from another task, later than on_event
                keep = self.options.hold  # type: ignore[attr-defined]
                out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
                self.ctx.emit([Event(e.key, e.ts, e.value * 10, self.id) for e in out])
        except asyncio.CancelledError:
            self.ctx.emit([Event(e.key, e.ts, -1.0, self.id) for e in self.pending])
            raise


class _SinkOptions(NodeOptions):
    type: Literal["t_hook_sink"]


class _Collect(Sink):
    Options = _SinkOptions

    def __init__(self, options: Any, ctx: NodeContext):
        super().__init__(options, ctx)
        self.events: list[Event] = []

    async def write(self, batch: list[Event]) -> None:
        self.events.extend(batch)


@pytest.fixture(autouse=True)
def _nodes() -> Iterator[None]:
    classes = (_Src, _Defer, _Collect)
    for cls in classes:
        register(cls)
    yield
    for cls in classes:
        node_mod._REGISTRY.pop(cls.type_name, None)


def _build(tmp_path: Path, hold: int) -> Pipeline:
    text = f"""gateway: {{id: gw, data_dir: {tmp_path}}}
pipelines:
  - name: p
    nodes:
      - {{id: src, type: t_hook_src, n: 10}}
      - {{id: defer, type: t_hook_defer, input: src, hold: {hold}}}
      - {{id: double, type: map, input: defer, value: "value * 2.0"}}
      - {{id: out, type: t_hook_sink, input: double}}
"""
    loaded = parse_config(text, env={})
    dl = DeadLetters(tmp_path / "dl.db")
    return Pipeline("p", loaded.nodes["p"], lambda nid: NodeContext("gw", "p", nid, str(tmp_path), None, dl))


async def test_background_emit_enters_the_chain_below_the_operator(tmp_path: Path) -> None:
    p = _build(tmp_path, hold=0)
    out = p.nodes[p.index["out"]]
    task = asyncio.create_task(p.run())
    await wait_for(lambda: len(out.events) == 10, timeout=10)
    p.stop()
    await asyncio.wait_for(task, 10)
    # went through `double` (the node after `defer`), not back through `defer`
    assert sorted(e.value for e in out.events) == [i * 20.0 for i in range(10)]
    assert p.nodes[p.index["defer"]].counters()["out"] == 10


async def test_what_an_operator_emits_while_stopping_is_drained(tmp_path: Path) -> None:
    p = _build(tmp_path, hold=3)
    out = p.nodes[p.index["out"]]
    defer = p.nodes[p.index["defer"]]
    task = asyncio.create_task(p.run())
    await wait_for(lambda: len(out.events) == 7 and defer.n_in == 10, timeout=10)
    p.stop()
    await asyncio.wait_for(task, 10)
    assert p.state == "stopped"
    assert sorted(e.value for e in out.events) == [-2.0] * 3 + [i * 20.0 for i in range(7)]


def test_emit_outside_a_pipeline_says_so(tmp_path: Path) -> None:
    ctx = NodeContext("gw", "p", "n", str(tmp_path), None, None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="not running in a pipeline"):
        ctx.emit([])


async def test_a_console_tap_on_an_operator_sees_what_it_emits_later(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from gateway.web.ws import Hub

    p = _build(tmp_path, hold=0)
    hub = Hub.__new__(Hub)  # only the tap machinery is used here
    hub.gw = SimpleNamespace(pipelines={"p": p})  # type: ignore[assignment]
    seen: list[Event] = []
    undo = hub._wrap(("p", "defer"), seen.extend)
    out = p.nodes[p.index["out"]]
    task = asyncio.create_task(p.run())
    await wait_for(lambda: len(out.events) == 10, timeout=10)
    undo()
    p.stop()
    await asyncio.wait_for(task, 10)
    assert sorted(e.value for e in seen) == [i * 10.0 for i in range(10)]
    assert "process_batch" not in vars(p.nodes[p.index["defer"]])
