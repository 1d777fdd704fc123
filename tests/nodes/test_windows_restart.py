"""Window state across restarts through the real engine, runtime and state store (SQLite file)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import Field

from gateway import node as node_mod
from gateway.engine import SourceQueue
from gateway.events import Event
from gateway.node import NodeContext, NodeOptions, Sink, Source, register
from gateway.store import StateStore
from tests._util import wait_for
from tests.gateway._harness import running_gateway


class ReplayOptions(NodeOptions):
    type: Literal["t_replay"]
    events: list[list[Any]] = Field(default_factory=list)  # [key, ts, value]
    stop_at: int | None = None
    gate_at: int | None = None  # wait for `gate` to open before reading on from here
    batch: int = 7


class Replay(Source):
    """Replays `events` from the offset it last checkpointed: a source that can re-read its input."""

    Options = ReplayOptions
    options: ReplayOptions

    def __init__(self, options: ReplayOptions, ctx: NodeContext):
        super().__init__(options, ctx)
        self.offset = 0  # handed over to the pipeline (what a checkpoint saves)
        self.restored_offset: int | None = None
        self.gate = asyncio.Event()

    def snapshot(self) -> Any:
        return self.offset

    def restore(self, state: Any) -> None:
        self.offset = self.restored_offset = int(state)

    async def run(self, output: SourceQueue) -> None:
        evs = self.options.events
        end = len(evs) if self.options.stop_at is None else self.options.stop_at
        i = self.offset
        while i < end:
            if i == self.options.gate_at:
                await self.gate.wait()
            j = min(end, i + self.options.batch)
            if self.options.gate_at is not None and i < self.options.gate_at:
                j = min(j, self.options.gate_at)
            batch = [Event(k, float(t), float(v), self.id) for k, t, v in evs[i:j]]
            self.n_in += len(batch)
            await output.put(batch)
            self.offset = i = j  # no await since put returned: a barrier sees exactly this much


class KeepOptions(NodeOptions):
    type: Literal["t_keep"]


class Keep(Sink):
    Options = KeepOptions

    def __init__(self, options: KeepOptions, ctx: NodeContext):
        super().__init__(options, ctx)
        self.events: list[Event] = []

    async def write(self, batch: list[Event]) -> None:
        self.events.extend(batch)


@pytest.fixture(autouse=True)
def test_nodes() -> Iterator[None]:
    for cls in (Replay, Keep):
        register(cls)
    yield
    for cls in (Replay, Keep):
        node_mod._REGISTRY.pop(cls.type_name, None)


def stream(n: int, seed: int) -> list[list[Any]]:
    rnd = random.Random(seed)
    out = []
    t = 1000.0
    for _ in range(n):
        t += rnd.uniform(0, 2)
        out.append([f"s{rnd.randrange(5)}", round(t - rnd.uniform(0, 8), 3), round(rnd.uniform(-5, 30), 2)])
    return out


def config(data_dir: Path, events: list[list[Any]], window: str, stop_at: int | None) -> str:
    return f"""\
gateway: {{id: gw, data_dir: "{data_dir}"}}
console: {{enabled: false}}
pipelines:
  - name: p
    nodes:
      - {{id: src, type: t_replay, events: {json.dumps(events)}, stop_at: {json.dumps(stop_at)}}}
      - {{id: win, {window}, input: src}}
      - {{id: out, type: t_keep, input: win}}
"""


def node(gw: Any, node_id: str) -> Any:
    p = gw.pipelines["p"]
    return p.nodes[p.index[node_id]]


async def run_once(
    data_dir: Path, events: list[list[Any]], window: str, stop_at: int | None
) -> tuple[list[Event], Any, int | None]:
    async with running_gateway(config(data_dir, events, window, stop_at)) as gw:
        src, win = node(gw, "src"), node(gw, "win")
        end = len(events) if stop_at is None else stop_at
        await wait_for(lambda: src.offset == end and gw.pipelines["p"].queue.depth == 0, timeout=20)
    return node(gw, "out").events, json.loads(json.dumps(win.snapshot())), src.restored_offset


def plain(evs: list[Event]) -> list[tuple[Any, ...]]:
    return [(e.key, e.ts, json.dumps(e.value, sort_keys=True), json.dumps(e.meta, sort_keys=True)) for e in evs]


WINDOWS = {
    "tumbling": "type: window, kind: tumbling, size: 10s, aggregate: [mean, count, p90, last], allowed_lateness: 5s",
    "hopping": "type: window, kind: hopping, size: 20s, hop: 5s, aggregate: [sum, stddev], allowed_lateness: 3s",
    "sliding": "type: window, kind: sliding, size: 15s, aggregate: [max, first], allowed_lateness: 4s",
    "session": "type: window, kind: session, gap: 3s, aggregate: [count, collect], allowed_lateness: 6s",
    "count": "type: window, kind: count, count: 5, every: 2, aggregate: [mean, min]",
}


@pytest.mark.parametrize("kind", list(WINDOWS))
async def test_stop_and_restart_gives_the_same_results_as_one_run(tmp_path: Path, kind: str) -> None:
    events = stream(400, seed=list(WINDOWS).index(kind))
    window = WINDOWS[kind]
    whole, whole_state, _ = await run_once(tmp_path / "one", events, window, None)
    assert len(whole) > 20

    first, _, restored = await run_once(tmp_path / "two", events, window, 170)
    assert restored is None
    rows = StateStore(tmp_path / "two" / "state.db").load_state("p", "win")
    assert any(k.startswith(".k:") for k in rows), "open windows were saved"
    assert StateStore(tmp_path / "two" / "state.db").load_state("p", "src") == {"=": b"170"}
    second, state, restored = await run_once(tmp_path / "two", events, window, None)
    assert restored == 170
    assert plain(first + second) == plain(whole)
    assert state == whole_state  # the windows still open at the end are the same too


async def test_checkpoints_happen_while_running_and_only_changed_keys_are_written(tmp_path: Path) -> None:
    events = [[f"k{i % 50}", 1000.0 + i * 0.01, 1.0] for i in range(500)]
    text = config(tmp_path, events, "type: window, kind: tumbling, size: 1h, aggregate: count", None)
    async with running_gateway(text) as gw:
        src = node(gw, "src")
        await wait_for(lambda: src.offset == 500, timeout=20)
        store = gw.store
        ckpt = gw.pipelines["p"].checkpointer
        await wait_for(lambda: ckpt.checkpoints >= 1 and not ckpt.in_flight, timeout=10)
        await store.flush()
        # committed while running, before any stop: 50 keys + the watermark, and the source offset
        rows = store.load_state("p", "win")
        assert len(rows) == 51 and json.loads(rows[".k:k7"])["w"][0][1][0] == 10
        assert store.load_state("p", "src") == {"=": b"500"}
        written = store.rows_written
        n = ckpt.checkpoints
        await wait_for(lambda: ckpt.checkpoints >= n + 2, timeout=10)
        await store.flush()
        assert store.rows_written == written  # nothing changed, nothing written
        assert gw.health()["state_store"]["state"] == "ok"


async def test_wall_clock_jumps_neither_fire_nor_stall_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An NTP step on a Pi without an RTC: time.time() jumps a day ahead, then back; nothing fires early."""
    events = [["a", 1004.0 + i, 1.0] for i in range(5)]
    window = "type: window, kind: tumbling, size: 10s, aggregate: count, idle_timeout: 2s"
    real = time.time
    jump = {"by": 0.0}
    monkeypatch.setattr(time, "time", lambda: real() + jump["by"])
    async with running_gateway(config(tmp_path, events, window, None)) as gw:
        win, out = node(gw, "win"), node(gw, "out")
        await wait_for(lambda: win.n_in == 5, timeout=10)
        ckpt = gw.pipelines["p"].checkpointer
        jump["by"] = 86_400.0
        n = ckpt.checkpoints
        await wait_for(lambda: ckpt.checkpoints >= n + 2, timeout=10)  # the timer ticked under the jump
        assert out.events == [], "a wall-clock jump must not close a window"
        jump["by"] = -86_400.0
        # the window closes on the monotonic clock: idle for 2 s, then the watermark moves on
        await wait_for(lambda: len(out.events) == 1, timeout=15)
        assert out.events[0].value == 5.0 and out.events[0].meta["window_end"] == 1010.0


async def test_state_disk_full_is_reported_processing_goes_on_and_saving_resumes(tmp_path: Path) -> None:
    # 300 keys with 40 collected readings each: far more state than a 64 KiB quota holds
    events = [[f"k{i % 300:03d}", 1000.0 + i / 2000, float(i)] for i in range(12_000)]
    events += [[f"k{i:03d}", 2000.0 + i / 1000, 0.0] for i in range(300)]  # closes every window
    text = config(
        tmp_path, events, "type: window, kind: tumbling, size: 10s, aggregate: [collect, count], collect_max: 40", None
    )
    text = text.replace("data_dir:", "state: {max_bytes: 64KiB, commit_interval: 0.05}, data_dir:")
    text = text.replace("type: t_replay,", "type: t_replay, gate_at: 12000,")
    async with running_gateway(text) as gw:
        src, out = node(gw, "src"), node(gw, "out")
        await wait_for(lambda: src.offset == 12_000, timeout=20)
        await wait_for(lambda: gw.store.state == "full", timeout=20)
        health = gw.health()
        assert health["status"] == "degraded"
        assert any(p.startswith("state store: full") for p in health["problems"]), health["problems"]
        assert health["state_store"]["write_errors"] >= 1
        # processing goes on while the state cannot be saved
        src.gate.set()
        await wait_for(lambda: src.offset == len(events), timeout=20)
        await wait_for(lambda: len(out.events) == 300, timeout=20)
        assert all(e.value["count"] == 40.0 for e in out.events)
        # the windows closed, the state shrank: saving resumes on its own
        await wait_for(lambda: gw.store.state == "ok", timeout=30)
        await wait_for(lambda: gw.health()["status"] == "ok", timeout=10)
    rows = StateStore(tmp_path / "state.db").load_state("p", "win")
    assert len([k for k in rows if k.startswith(".k:")]) == 300  # the 300 new one-reading windows
    assert StateStore(tmp_path / "state.db").load_state("p", "src") == {"=": str(len(events)).encode()}


async def test_metrics_show_the_state_store_and_late_readings(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from tests.gateway._harness import NO_AUTH, get

    events = [["a", 1000.0, 1.0], ["a", 1020.0, 1.0], ["a", 1001.0, 1.0], ["a", 1002.0, 1.0]]  # two late
    text = config(tmp_path, events, "type: window, kind: tumbling, size: 10s, aggregate: count", None)
    text = text.replace("console: {enabled: false}", f"console: {{host: 127.0.0.1, port: 0{NO_AUTH}}}")
    async with running_gateway(text) as gw:
        await wait_for(lambda: node(gw, "src").offset == 4, timeout=10)
        await wait_for(lambda: gw.store.commits >= 1, timeout=10)
        status, body = await get(gw, "/metrics")
        assert status == 200
        m = {s.name: s for fam in text_string_to_metric_families(body) for s in fam.samples}
        assert m["sluice_state_store_ok"].value == 1
        assert m["sluice_state_store_commits_total"].value >= 1
        assert m["sluice_state_store_corrupt_recoveries_total"].value == 0
        assert m["sluice_state_store_bytes"].value > 0
        assert m["sluice_history_dropped_total"].value == 0
        late = m["sluice_node_late_total"]
        assert late.labels == {"pipeline": "p", "node": "win"} and late.value == 2


async def test_a_corrupt_state_file_does_not_stop_the_gateway(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"\x00garbage from a dying SD card" * 500)
    events = [["a", 1000.0, 1.0], ["a", 1011.0, 1.0]]
    text = config(tmp_path, events, "type: window, kind: tumbling, size: 10s, aggregate: count", None)
    async with running_gateway(text) as gw:
        await wait_for(lambda: len(node(gw, "out").events) == 1, timeout=10)
        assert gw.health()["state_store"]["corrupt_recoveries"] == 1
    assert StateStore(tmp_path / "state.db").load_state("p", "src") == {"=": b"2"}


async def test_state_of_a_removed_node_is_dropped(tmp_path: Path) -> None:
    events = [["a", 1000.0, 1.0]]
    await run_once(tmp_path, events, "type: window, kind: tumbling, size: 10s", None)
    assert StateStore(tmp_path / "state.db").node_ids("p") == {"src", "win"}
    text = config(tmp_path, events, "type: window, kind: tumbling, size: 10s", None).replace("id: win", "id: win2")
    text = text.replace("input: win}", "input: win2}")
    async with running_gateway(text) as gw:
        await gw.store.flush()
    assert StateStore(tmp_path / "state.db").node_ids("p") == {"src", "win2"}


async def test_unreadable_saved_state_costs_that_node_its_state_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(tmp_path / "state.db")
    await store.start()
    store.write([("p", "win", ".#", b"{not json"), ("p", "src", "=", b"1")])
    await store.close()
    events = [["a", 1000.0, 1.0], ["a", 1001.0, 2.0], ["a", 1011.0, 0.0]]
    text = config(tmp_path, events, "type: window, kind: tumbling, size: 10s, aggregate: sum", None)
    async with running_gateway(text) as gw:
        await wait_for(lambda: len(node(gw, "out").events) == 1, timeout=10)
        assert node(gw, "src").restored_offset == 1  # the other node's state came back
        assert node(gw, "out").events[0].value == 2.0  # the window started empty: only the replayed reading
    assert "could not restore node win" in caplog.text
