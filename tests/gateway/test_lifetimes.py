"""What the runtime keeps, frees and drops across start, reload and stop: heap, taps, saved state."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

from gateway.config import parse_config
from gateway.runtime import YOUNG_GENERATION_THRESHOLD
from tests._util import wait_for
from tests.gateway._harness import running_gateway


def config(tmp_path: Path, pipelines: list[str]) -> str:
    text = f'gateway: {{id: gw-h, data_dir: "{tmp_path}/data"}}\nconsole: {{enabled: false}}\npipelines:\n'
    for name in pipelines:
        text += f"""\
  - name: {name}
    nodes:
      - {{id: sim, type: simulate, interval: 50ms, seed: 3, sensors: [{{key: t, base: 20.0}}]}}
      - {{id: shown, type: log, input: sim}}
"""
    return text


async def test_heap_is_frozen_while_running_and_released_at_stop(tmp_path: Path) -> None:
    before = gc.get_threshold()
    async with running_gateway(config(tmp_path, ["a"])):
        frozen = gc.get_freeze_count()
        # the modules, config models and pipelines built at start are left to reference counting
        assert frozen > 10_000, frozen
        # young collections are spaced out while it runs
        assert gc.get_threshold() == (YOUNG_GENERATION_THRESHOLD, *before[1:])
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


async def test_collector_thresholds_come_back_when_the_last_gateway_stops(tmp_path: Path) -> None:
    before = gc.get_threshold()
    async with running_gateway(config(tmp_path / "a", ["a"])):
        async with running_gateway(config(tmp_path / "b", ["b"])):
            assert gc.get_threshold()[0] == YOUNG_GENERATION_THRESHOLD
        assert gc.get_threshold()[0] == YOUNG_GENERATION_THRESHOLD  # the other one still runs
    assert gc.get_threshold() == before


async def test_a_pipeline_dropped_by_reload_is_collected(tmp_path: Path) -> None:
    async with running_gateway(config(tmp_path, ["a", "b"])) as gw:
        old = weakref.ref(gw.pipelines["b"])
        # a cycle, as a pipeline's parts may form: only the cyclic collector can free it
        gw.pipelines["b"].cycle = gw.pipelines["b"]  # type: ignore[attr-defined]
        summary = await gw.reload(parse_config(config(tmp_path, ["a"]), "t.yaml", {}))
        assert summary["removed"] == ["b"]
        assert gc.get_freeze_count() == 0  # not frozen again until the next start
        gc.collect()
        assert old() is None, "the removed pipeline stayed frozen: reload must release the heap first"


def test_the_crypto_library_loads_only_with_the_first_session_cookie(tmp_path: Path) -> None:
    """cryptography costs ~7 MiB of RSS: a console nobody logs in to must not load it."""
    script = f"""
import asyncio, sys, urllib.request
from gateway.config import parse_config
from gateway.runtime import YOUNG_GENERATION_THRESHOLD
from gateway.runtime import Gateway

async def main():
    text = '''gateway: {{id: gw-m, data_dir: "{tmp_path}/data"}}
console: {{host: 127.0.0.1, port: 0, auth: AUTH}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, interval: 50ms, sensors: [{{key: t}}]}}
      - {{id: out, type: log, input: sim}}
'''
    gw = Gateway(parse_config(text.replace("AUTH", sys.argv[1]), "t.yaml", {{}}))
    task = asyncio.create_task(gw.run(install_signals=False))
    while gw.state != "running":
        await asyncio.sleep(0.02)
    url = f"http://127.0.0.1:{{gw.console.port}}/"
    for path in ("healthz", "api/pipelines", "login"):
        try:
            await asyncio.to_thread(urllib.request.urlopen, url + path)
        except Exception:
            pass  # 401/404 are fine: what counts is what got imported
    print("cryptography" in sys.modules)
    gw.stop()
    await task

asyncio.run(main())
"""
    import subprocess
    import sys

    for auth, loaded in (("false", "False"), ("true", "False")):
        out = subprocess.run([sys.executable, "-c", script, auth], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split()[-1] == loaded, (auth, out.stdout, out.stderr[-2000:])


async def test_a_pipeline_removed_by_reload_leaves_no_saved_state(tmp_path: Path, caplog: Any) -> None:
    windowed = """\
  - name: w
    nodes:
      - {id: sim, type: simulate, interval: 10ms, seed: 1, sensors: [{key: t, base: 20.0}]}
      - {id: win, type: window, input: sim, kind: tumbling, size: 60s, aggregate: mean}
      - {id: out, type: log, input: win}
"""
    text = config(tmp_path, ["a"]) + windowed
    async with running_gateway(text) as gw:
        await wait_for(lambda: "win" in gw.store.node_ids("w"), timeout=10)  # a checkpoint committed
        kept = gw.store.node_ids("a")
        summary = await gw.reload(parse_config(config(tmp_path, ["a"]), "t.yaml", {}))
        assert summary["removed"] == ["w"]
        await gw.store.flush()
        assert gw.store.node_ids("w") == set() and gw.store.pipeline_names() <= {"a"}
        assert gw.store.node_ids("a") == kept
    # a config without a pipeline whose state is on disk (say, the wrong file) keeps it, and says so
    async with running_gateway(text) as gw:
        await wait_for(lambda: "win" in gw.store.node_ids("w"), timeout=10)
    with caplog.at_level("WARNING", logger="gateway.runtime"):
        async with running_gateway(config(tmp_path, ["a"])) as gw:
            assert "win" in gw.store.node_ids("w")
    assert any("pipelines not in this config: w" in r.getMessage() for r in caplog.records), caplog.text


async def test_removed_is_called_for_the_nodes_a_reload_takes_out_once_they_are_closed(tmp_path: Path) -> None:
    from typing import ClassVar, Literal

    from gateway import node as node_mod
    from gateway.events import Event
    from gateway.node import NodeOptions, Sink, register

    class KeepOptions(NodeOptions):
        type: Literal["t_keep"]
        tag: int = 0

    class Keep(Sink):
        Options = KeepOptions
        gone: ClassVar[list[tuple[str, str, bool]]] = []
        closed = False

        async def write(self, batch: list[Event]) -> None:
            pass

        async def close(self) -> None:
            self.closed = True

        async def removed(self) -> None:
            Keep.gone.append((self.ctx.pipeline, self.id, self.closed))

    def pipe(name: str, sinks: list[str], extra: str = "") -> str:
        text = f"  - name: {name}{extra}\n    nodes:\n"
        text += "      - {id: sim, type: simulate, interval: 1s, sensors: [{key: t}]}\n"
        return text + "".join(f"      - {{id: {s}, type: t_keep, input: sim}}\n" for s in sinks)

    head = f'gateway: {{id: gw-h, data_dir: "{tmp_path}/data"}}\nconsole: {{enabled: false}}\npipelines:\n'
    register(Keep)
    try:
        start = head + pipe("p1", ["k1", "k2"]) + pipe("p2", ["k3"]) + pipe("p3", ["k4"]) + pipe("p4", ["k5"])
        async with running_gateway(start) as gw:
            # p1 loses k2 and k1 changes; p2 stays; p3 is disabled; p4 is removed
            after = head + pipe("p1", ["k1"]).replace("t_keep,", "t_keep, tag: 1,") + pipe("p2", ["k3"])
            after += pipe("p3", ["k4"], "\n    enabled: false")
            summary = await gw.reload(parse_config(after, "t.yaml", {}))
            assert summary == {"changed": ["p1"], "added": [], "removed": ["p3", "p4"], "unchanged": ["p2"]}
            assert sorted(Keep.gone) == [("p1", "k2", True), ("p3", "k4", True), ("p4", "k5", True)]
            # a reload that restarts a pipeline without taking a node out retires nothing
            Keep.gone.clear()
            await gw.reload(parse_config(after.replace("tag: 1", "tag: 2"), "t.yaml", {}))
            assert Keep.gone == []
        assert Keep.gone == []  # stopping the gateway is not a removal
    finally:
        node_mod._REGISTRY.pop("t_keep", None)
