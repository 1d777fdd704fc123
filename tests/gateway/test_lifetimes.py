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
