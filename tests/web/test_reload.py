"""Save and hot reload from the console: unchanged pipelines keep running, changed ones restart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.runtime import Gateway
from tests._util import wait_for
from tests.gateway._harness import gateway_from_file

from .conftest import Browserish, base_url

TEXT = """\
gateway: {{id: reload-test, data_dir: "{data}"}}
pipelines:
  - name: plant
    nodes:
      - {{id: sensors, type: simulate, interval: 20ms, seed: 1, sensors: [{{key: t, base: 80}}]}}
      - {{id: hot, type: threshold, input: sensors, above: 95, clear_below: 90}}
      - {{id: out, type: log, input: hot}}
  - name: other
    nodes:
      - {{id: sim, type: simulate, interval: 20ms, seed: 2, sensors: [{{key: h, base: 50}}]}}
      - {{id: shown, type: log, input: sim, level: debug}}
console: {{host: 127.0.0.1, port: 0, auth: false}}
"""


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Path, Browserish]]:
    path = tmp_path / "gateway.yaml"
    path.write_text(TEXT.format(data=tmp_path / "data"))
    async with gateway_from_file(path) as gw:
        c = Browserish(base_url(gw))
        try:
            yield gw, path, c
        finally:
            await c.close()


async def test_changed_pipeline_restarts_unchanged_keeps_running(running: tuple[Gateway, Path, Browserish]) -> None:
    gw, path, c = running
    other, plant = gw.pipelines["other"], gw.pipelines["plant"]
    await wait_for(lambda: other.nodes[0].n_out > 0 and plant.nodes[0].n_out > 0, timeout=10)
    original = path.read_text()
    edited = original.replace("above: 95", "above: 96")
    status, r = await c.post("/api/config/save", edited)
    assert status == 200, r
    assert r["reloaded"] is True and r["saved"] is True and r["note"] is None
    assert r["changed"] == ["plant"] and r["unchanged"] == ["other"] and not r["added"] and not r["removed"]
    assert gw.pipelines["other"] is other and other.state == "running"  # not touched
    new_plant = gw.pipelines["plant"]
    assert new_plant is not plant and plant.state == "stopped"
    assert new_plant.nodes[new_plant.index["hot"]].options.above == 96
    await wait_for(lambda: new_plant.state == "running" and new_plant.nodes[0].n_out > 0, timeout=10)
    n = other.nodes[0].n_out
    await wait_for(lambda: other.nodes[0].n_out > n, timeout=10)
    assert path.read_text() == edited
    assert (path.parent / "gateway.yaml.bak").read_text() == original
    assert gw.loaded.text == edited
    status, cfg = await c.get("/api/config")
    assert cfg["text"] == edited
    status, pipes = await c.get("/api/pipelines")
    assert {p["name"]: p["state"] for p in pipes["pipelines"]} == {"plant": "running", "other": "running"}


async def test_add_and_remove_pipelines(running: tuple[Gateway, Path, Browserish]) -> None:
    gw, path, c = running
    text = path.read_text()
    edited = (
        text.replace("  - name: other", "  - name: third")
        .replace("{id: sim,", "{id: sim3,")
        .replace("input: sim,", "input: sim3,")
    )
    status, r = await c.post("/api/config/save", edited)
    assert status == 200, r
    assert r["added"] == ["third"] and r["removed"] == ["other"] and r["unchanged"] == ["plant"]
    assert set(gw.pipelines) == {"plant", "third"}
    await wait_for(lambda: gw.pipelines["third"].nodes[0].n_out > 0, timeout=10)
    assert gw.health()["status"] == "ok"


async def test_sections_other_than_pipelines_need_a_restart(running: tuple[Gateway, Path, Browserish]) -> None:
    gw, path, c = running
    text = path.read_text()
    before = dict(gw.pipelines)
    status, r = await c.post("/api/config/save", text.replace("id: reload-test", "id: renamed"))
    assert status == 409 and r["reloaded"] is False and "gateway" in r["error"] and "restart" in r["error"]
    assert gw.pipelines == before and path.read_text() == text
    status, r = await c.post("/api/config/save", text.replace("above: 95", "above: nope"))
    assert status == 200 and r["valid"] is False and r["errors"][0]["line"] == 6
    assert gw.pipelines == before and path.read_text() == text
    status, r = await c.post("/api/config/save", text)
    assert status == 200 and r["unchanged"] == ["other", "plant"] and not r["changed"]
    assert gw.pipelines == before


def fail_restore_above_97(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the restore of a plant pipeline whose threshold is 97 fail, as an unreadable store would."""
    from gateway.engine import Pipeline

    restore = Pipeline.restore

    async def restore_fails_for_the_new_definition(self: Pipeline) -> None:
        if self.nodes[self.index["hot"]].options.above == 97:  # type: ignore[attr-defined]
            raise RuntimeError("state store unreadable")
        await restore(self)

    monkeypatch.setattr(Pipeline, "restore", restore_fails_for_the_new_definition)


async def test_a_pipeline_that_cannot_start_is_rolled_back(
    running: tuple[Gateway, Path, Browserish], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.engine import Pipeline

    gw, path, c = running
    text = path.read_text()
    old_plant = gw.pipelines["plant"]
    fail_restore_above_97(monkeypatch)
    status, r = await c.post("/api/config/save", text.replace("above: 95", "above: 97"))
    assert status == 409 and r["reloaded"] is False
    assert "did not start: state store unreadable; the previous ones run again" in r["error"]
    back = gw.pipelines["plant"]
    assert back is not old_plant and back.nodes[back.index["hot"]].options.above == 95  # type: ignore[attr-defined]
    await wait_for(lambda: back.state == "running" and back.nodes[0].n_out > 0, timeout=10)
    assert path.read_text() == text and gw.loaded.text == text  # nothing saved

    async def restore_always_fails(self: Pipeline) -> None:
        raise RuntimeError("disk gone")

    monkeypatch.setattr(Pipeline, "restore", restore_always_fails)
    status, r = await c.post("/api/config/save", text.replace("above: 95", "above: 98"))
    assert status == 409 and "nor the previous ones" in r["error"] and "restart the gateway" in r["error"]
    assert "plant" not in gw.pipelines and gw.pipelines["other"].state == "running"


async def test_live_taps_follow_the_reloaded_pipeline(running: tuple[Gateway, Path, Browserish]) -> None:
    from .test_ws import receive

    gw, path, c = running
    ws = await c.http.ws_connect(c.base.replace("http", "ws") + "/ws")
    try:
        await ws.send_json({"op": "subscribe", "topic": "events", "pipeline": "plant", "node": "sensors"})
        await ws.send_json({"op": "subscribe", "topic": "events", "pipeline": "other", "node": "shown"})
        await receive(ws, "events", pred=lambda m: m["node"] == "sensors")
        text = path.read_text()
        edited = text.replace("above: 95", "above: 96").replace(
            "{id: shown, type: log, input: sim, level: debug}", "{id: shown2, type: log, input: sim, level: debug}"
        )
        status, r = await c.post("/api/config/save", edited)
        assert status == 200 and r["changed"] == ["other", "plant"], r
        gone = await receive(ws, "error")
        assert "'shown' of pipeline 'other' is gone" in gone["message"]
        new_plant = gw.pipelines["plant"]
        assert "_process" in new_plant.__dict__  # the source tap moved to the new pipeline
        m = await receive(ws, "events", pred=lambda m: m["node"] == "sensors")
        assert m["events"][0]["key"] == "t"
    finally:
        await ws.close()


async def test_a_watched_pipeline_is_freed_and_taps_follow_a_rollback(
    running: tuple[Gateway, Path, Browserish], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The taps move inside the reload: a pipeline replaced while a browser watches it is freed,
    and after a failed reload the view follows the one put back."""
    import gc
    import weakref

    from .test_ws import receive

    gw, path, c = running
    text = path.read_text()
    ws = await c.http.ws_connect(c.base.replace("http", "ws") + "/ws")
    try:
        await ws.send_json({"op": "subscribe", "topic": "events", "pipeline": "plant", "node": "sensors"})
        await receive(ws, "events", pred=lambda m: m["node"] == "sensors")
        old = weakref.ref(gw.pipelines["plant"])
        status, r = await c.post("/api/config/save", text.replace("above: 95", "above: 96"))
        assert status == 200 and r["changed"] == ["plant"], r
        gc.collect()
        assert old() is None, "the replaced pipeline is still referenced (or frozen with a reference)"

        fail_restore_above_97(monkeypatch)
        status, r = await c.post("/api/config/save", text.replace("above: 95", "above: 97"))
        assert status == 409, r
        back = gw.pipelines["plant"]
        assert "_process" in back.__dict__  # the tap is on the pipeline that runs again
        # events from after the rollback reach the browser
        n = back.nodes[back.index["sensors"]].n_out
        await wait_for(lambda: back.nodes[back.index["sensors"]].n_out > n + 5, timeout=10)
        await receive(ws, "events", pred=lambda m: m["node"] == "sensors")
    finally:
        await ws.close()


async def test_saving_the_text_the_file_holds_rewrites_neither_it_nor_its_backup(
    running: tuple[Gateway, Path, Browserish],
) -> None:
    _, path, c = running
    text = path.read_text()
    bak = path.parent / "gateway.yaml.bak"
    bak.write_text("the backup of an earlier save\n")
    before = (path.stat().st_ino, path.stat().st_mtime_ns, bak.stat().st_mtime_ns)
    status, r = await c.post("/api/config/save", text)
    assert status == 200 and r["saved"] is True and "not rewritten" in r["note"], r
    assert (path.stat().st_ino, path.stat().st_mtime_ns, bak.stat().st_mtime_ns) == before
    assert bak.read_text() == "the backup of an earlier save\n"
    status, r = await c.post("/api/config/save", text.replace("above: 95", "above: 96"))
    assert status == 200 and r["saved"] is True and r["note"] is None
    assert bak.read_text() == text  # a real change still keeps the previous text
