"""The pipeline editor's API through HTTP against a running gateway started from a real config file:
palette from the registry, the model of the YAML, draft validation by node and field, deploy with
hot reload, the file's revision (409), viewers read-only, and the ``console`` sink over ``/ws``."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import load_config
from gateway.node import node_types
from gateway.runtime import Gateway
from gateway.web._yamledit import apply_model, load_model
from tests._util import free_port, wait_for
from tests.gateway._harness import gateway_from_file

from .conftest import PASSWORD, Browserish, base_url

ROOT = Path(__file__).resolve().parents[2]

TEXT = """\
# The test plant: one pipeline, a comment the editor must keep.
gateway: {{id: editor-test, data_dir: "{data}"}}
pipelines:
  - name: plant
    nodes:
      # the simulated boiler
      - id: sensors
        type: simulate
        interval: 20ms
        seed: 1
        sensors: [{{key: boiler/temp, base: 80}}]
      - {{id: hot, type: threshold, input: sensors, above: 95, clear_below: 90}}  # alarm point
      - id: out
        type: log
        input: hot
  - name: pushed
    nodes:
      - {{id: push, type: http, token: "s3cret-push-token"}}
      - {{id: shown, type: log, input: push}}
      - {{id: poll, type: http_poll, url: "http://127.0.0.1:9/none", interval: 1h,
         headers: {{Authorization: "Bearer s3cret-poll-token"}}}}
      - {{id: polled, type: log, input: poll}}
console: {{host: 127.0.0.1, port: 0}}
"""


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Path, Browserish]]:
    path = tmp_path / "gateway.yaml"
    path.write_text(TEXT.format(data=tmp_path / "data"))
    async with gateway_from_file(path) as gw:
        c = Browserish(base_url(gw))
        try:
            await c.setup_admin(gw)
            yield gw, path, c
        finally:
            await c.close()


def _node(model: dict[str, Any], pipeline: str, nid: str) -> dict[str, Any]:
    p = next(p for p in model["pipelines"] if p["name"] == pipeline)
    return next(n for n in p["nodes"] if n["id"] == nid)


async def test_palette_lists_every_registered_type_by_family(running: tuple[Gateway, Path, Browserish]) -> None:
    _, _, c = running
    status, pal = await c.get("/api/editor/palette")
    assert status == 200
    by_family = {f["name"]: {t["type"]: t for t in f["types"]} for f in pal["families"]}
    assert [f["name"] for f in pal["families"]][:6] == ["sources", "operators", "windows", "detectors", "llm", "sinks"]
    listed = {t for types in by_family.values() for t in types}
    assert listed == set(node_types())
    assert {"simulate", "mqtt", "http"} <= set(by_family["sources"])
    assert {"console", "mqtt_out", "log"} <= set(by_family["sinks"])
    assert "window" in by_family["windows"] and "threshold" in by_family["detectors"] and "llm" in by_family["llm"]
    th = by_family["detectors"]["threshold"]
    assert th["inputs"] == 1 and th["outputs"] == 1 and th["description"]
    # the schema is the node type's options model, as `sluice schema` prints it
    assert th["schema"]["properties"]["above"]
    assert by_family["sources"]["simulate"]["inputs"] == 0 and by_family["sinks"]["console"]["outputs"] == 0
    # descriptions are plain text: no reST markup from the docstrings they come from
    descriptions = [t["description"] for types in by_family.values() for t in types.values()]
    assert by_family["sources"]["http"]["description"].startswith("POST /ingest/")
    assert not [d for d in descriptions if "``" in d or ":class:`" in d]


async def test_model_round_trip_and_validate_by_node_and_field(running: tuple[Gateway, Path, Browserish]) -> None:
    _, path, c = running
    status, model = await c.get("/api/editor/model")
    assert status == 200 and model["editable"] is True
    hot = _node(model, "plant", "hot")
    assert hot == {
        "id": "hot",
        "type": "threshold",
        "input": ["sensors"],
        "options": {"above": 95, "clear_below": 90},
        "readonly": None,
    }
    status, r = await c.post("/api/editor/validate", {"model": model})
    assert status == 200 and r == {"valid": True, "errors": [], "changed": False, "diff": ""}

    draft = copy.deepcopy(model)
    _node(draft, "plant", "hot")["options"]["above"] = "very hot"
    _node(draft, "plant", "out")["input"] = ["hott"]
    status, r = await c.post("/api/editor/validate", {"model": draft})
    assert status == 200 and r["valid"] is False
    errors = {(e["pipeline"], e["node"], e["field"]): e["message"] for e in r["errors"]}
    assert "above" in str(errors) and ("plant", "hot", "above") in errors
    assert "unknown input 'hott'" in errors[("plant", "out", "input")]
    assert "-      - {id: hot, type: threshold, input: sensors, above: 95" in r["diff"]
    # nothing was written or reloaded by validating
    assert path.read_text() == TEXT.format(data=path.parent / "data")


async def test_deploy_changes_one_line_keeps_comments_and_reloads(
    running: tuple[Gateway, Path, Browserish],
) -> None:
    gw, path, c = running
    before = path.read_text()
    old_plant = gw.pipelines["plant"]
    _, model = await c.get("/api/editor/model")
    draft = copy.deepcopy(model)
    _node(draft, "plant", "hot")["options"]["above"] = 96
    status, r = await c.post(
        "/api/editor/deploy",
        {"revision": model["revision"], "model": draft, "positions": {"plant": {"hot": [300, 120]}}},
    )
    assert status == 200, r
    assert r["deployed"] and r["saved"] and r["changed"] == ["plant"] if isinstance(r["changed"], list) else True
    after = path.read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert changed == [
        (
            "      - {id: hot, type: threshold, input: sensors, above: 95, clear_below: 90}  # alarm point",
            "      - {id: hot, type: threshold, input: sensors, above: 96, clear_below: 90}  # alarm point",
        )
    ]
    assert gw.pipelines["plant"] is not old_plant
    assert gw.pipelines["plant"].nodes[gw.pipelines["plant"].index["hot"]].options.above == 96
    layout = json.loads(path.with_suffix(".layout.json").read_text())
    assert layout["pipelines"]["plant"]["hot"] == [300.0, 120.0]
    _, again = await c.get("/api/editor/model")
    assert again["revision"] == r["revision"] and again["positions"]["plant"]["hot"] == [300.0, 120.0]


async def test_new_pipeline_with_console_sink_streams_to_ws(running: tuple[Gateway, Path, Browserish]) -> None:
    gw, path, c = running
    _, model = await c.get("/api/editor/model")
    draft = copy.deepcopy(model)
    draft["pipelines"].append(
        {
            "name": "watch",
            "nodes": [
                {
                    "id": "sim",
                    "type": "simulate",
                    "input": [],
                    "options": {"interval": "20ms", "sensors": [{"key": "x"}]},
                },
                {
                    "id": "avg",
                    "type": "window",
                    "input": ["sim"],
                    "options": {"kind": "tumbling", "size": "100ms", "aggregate": "mean"},
                },
                {"id": "show", "type": "console", "input": ["avg"], "options": {"label": "averages"}},
            ],
        }
    )
    status, r = await c.post("/api/editor/deploy", {"revision": model["revision"], "model": draft})
    assert status == 200 and r["added"] == ["watch"], r
    text = path.read_text()
    assert text.startswith("# The test plant: one pipeline, a comment the editor must keep.\n")
    assert "      # the simulated boiler\n" in text and "  - name: watch\n" in text
    assert load_config(path, env={}).nodes["watch"][2].type == "console"
    show = gw.pipelines["watch"].nodes[gw.pipelines["watch"].index["show"]]
    await wait_for(lambda: show.n_in > 0, timeout=10)
    assert show.n_shown == 0  # nobody watches: the sink does nothing
    session = c.http
    async with session.ws_connect(f"{base_url(gw)}/ws?csrf={c.csrf}", headers={"Origin": base_url(gw)}) as ws:
        await ws.send_json({"op": "subscribe", "topic": "console"})
        got: list[dict[str, Any]] = []
        while not got:
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type == aiohttp.WSMsgType.TEXT
            data = json.loads(msg.data)
            if data["type"] == "console":
                got.extend(data["events"])
        ev = got[0]
        assert (ev["pipeline"], ev["node"], ev["label"]) == ("watch", "show", "averages")
        assert ev["event"]["key"] == "x" and isinstance(ev["event"]["value"], dict | float | int)
    assert show.n_shown > 0


async def test_conflicting_change_is_409_with_the_other_change(running: tuple[Gateway, Path, Browserish]) -> None:
    gw, path, c = running
    _, model = await c.get("/api/editor/model")
    # another admin (or a text editor) changes the file meanwhile
    path.write_text(path.read_text().replace("clear_below: 90", "clear_below: 89"))
    draft = copy.deepcopy(model)
    _node(draft, "plant", "hot")["options"]["above"] = 97
    old = gw.pipelines["plant"]
    status, r = await c.post("/api/editor/deploy", {"revision": model["revision"], "model": draft})
    assert status == 409 and r["error_kind"] == "revision"
    assert "+      - {id: hot, type: threshold, input: sensors, above: 95, clear_below: 89}" in r["diff"]
    assert "clear_below: 89" in path.read_text() and "above: 97" not in path.read_text()
    assert gw.pipelines["plant"] is old


async def test_invalid_draft_is_refused_and_nothing_changes(running: tuple[Gateway, Path, Browserish]) -> None:
    gw, path, c = running
    before = path.read_text()
    _, model = await c.get("/api/editor/model")
    draft = copy.deepcopy(model)
    _node(draft, "plant", "hot")["options"]["clear_below"] = "cold"
    old = gw.pipelines["plant"]
    status, r = await c.post("/api/editor/deploy", {"revision": model["revision"], "model": draft})
    assert status == 422 and r["valid"] is False
    assert {(e["node"], e["field"]) for e in r["errors"]} == {("hot", "clear_below")}
    assert path.read_text() == before and gw.pipelines["plant"] is old
    status, r = await c.post("/api/editor/deploy", {"revision": model["revision"], "model": {"pipelines": 3}})
    assert status == 422 and r["errors"][0]["message"].startswith("the draft is")


async def test_viewer_reads_redacted_and_cannot_change(running: tuple[Gateway, Path, Browserish]) -> None:
    gw, _, admin = running
    assert (await admin.post("/api/users", {"name": "viewer1", "password": PASSWORD}))[0] == 201
    v = Browserish(base_url(gw))
    try:
        assert (await v.login("viewer1"))[0] == 200
        status, model = await v.get("/api/editor/model")
        assert status == 200 and model["editable"] is False
        assert _node(model, "pushed", "push")["options"]["token"] == "***"
        assert _node(model, "pushed", "poll")["options"]["headers"] == {"Authorization": "***"}
        assert "s3cret" not in json.dumps(model)
        assert (await v.get("/api/editor/palette"))[0] == 200
        _, full = await admin.get("/api/editor/model")
        for route in ("/api/editor/validate", "/api/editor/deploy"):
            status, _ = await v.post(route, {"revision": full["revision"], "model": full})
            assert status == 403, route
        status, _ = await admin.post("/api/editor/deploy", {"revision": full["revision"], "model": full}, csrf=False)
        assert status == 403  # CSRF as everywhere in the console
    finally:
        await v.close()
    status, text = await admin.get("/api/editor/pipelines/pushed")
    assert status == 200 and text.startswith("- name: pushed\n")


async def test_reload_failure_rolls_back(
    running: tuple[Gateway, Path, Browserish], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A draft that validates but whose pipeline fails at start (an unreadable state store,
    injected at the store seam as test_reload does: no real disk fault can be made here)."""
    from .test_reload import fail_restore_above_97

    gw, path, c = running
    before = path.read_text()
    old = gw.pipelines["plant"]
    _, model = await c.get("/api/editor/model")
    draft = copy.deepcopy(model)
    _node(draft, "plant", "hot")["options"]["above"] = 97
    fail_restore_above_97(monkeypatch)
    status, r = await c.post("/api/editor/deploy", {"revision": model["revision"], "model": draft})
    assert status == 409 and r["error_kind"] == "reload" and "previous ones run again" in r["error"]
    assert path.read_text() == before
    back = gw.pipelines["plant"]
    assert back is not old and back.nodes[back.index["hot"]].options.above == 95  # type: ignore[attr-defined]


# --- round trip of every shipped and tested config ------------------------------------------------


def _configs() -> list[Path]:
    out = sorted((ROOT / "config").glob("*.yaml"))
    return out


@pytest.mark.parametrize("path", _configs(), ids=lambda p: p.name)
def test_shipped_configs_round_trip_byte_identical(path: Path) -> None:
    text = path.read_text()
    known = set(node_types())
    model = load_model(text, known)
    assert model["pipelines"]
    assert apply_model(text, model, known).text == text


def test_test_configs_round_trip_and_one_field_one_line() -> None:
    from .conftest import config_text

    known = set(node_types())
    for text in (config_text(Path("/tmp/x")), TEXT.format(data="/tmp/x")):
        model = load_model(text, known)
        assert apply_model(text, model, known).text == text
        draft = copy.deepcopy(model)
        node = next(n for p in draft["pipelines"] for n in p["nodes"] if n["type"] == "threshold")
        node["options"]["above"] = 99
        out = apply_model(text, draft, known).text
        diff = [(a, b) for a, b in zip(text.splitlines(), out.splitlines(), strict=True) if a != b]
        assert len(diff) == 1 and "99" in diff[0][1]


def test_env_and_anchor_nodes_are_read_only_and_survive() -> None:
    text = """\
gateway: {id: g}
defaults: &d {interval: 1s}
pipelines:
  - name: p
    nodes:
      - {id: s, type: simulate, interval: "${RATE:-1s}", sensors: [{key: a}]}
      - {id: l, type: log, input: s}
"""
    known = set(node_types())
    model = load_model(text, known)
    assert "${VAR}" in (model["pipelines"][0]["nodes"][0]["readonly"] or "")
    draft = copy.deepcopy(model)
    draft["pipelines"][0]["nodes"][1]["options"]["level"] = "warning"
    out = apply_model(text, draft, known).text
    assert '"${RATE:-1s}"' in out and "defaults: &d {interval: 1s}" in out
    assert "      - {id: l, type: log, input: s, level: warning}\n" in out
    draft["pipelines"][0]["nodes"][0]["options"]["interval"] = "2s"
    from gateway.web._yamledit import DraftError

    with pytest.raises(DraftError, match="read-only"):
        apply_model(text, draft, known)


def test_unindented_sequences_keep_their_layout() -> None:
    text = """\
gateway: {id: g}
pipelines:
- name: p
  nodes:
  - id: s
    type: simulate
    sensors: [{key: a}]
  - id: l
    type: log
    input: s
"""
    known = set(node_types())
    model = load_model(text, known)
    assert apply_model(text, model, known).text == text
    draft = copy.deepcopy(model)
    draft["pipelines"][0]["nodes"].append({"id": "c", "type": "console", "input": ["s"], "options": {}})
    draft["pipelines"][0]["nodes"][1]["options"]["level"] = "warning"
    assert apply_model(text, draft, known).text == text.replace(
        "    input: s\n", "    input: s\n    level: warning\n  - id: c\n    type: console\n    input: s\n"
    )


def _configs_in_tests() -> list[tuple[str, str]]:
    """Every config text written as a string constant in the test suite (and config/*.yaml)."""
    import ast
    import string

    import yaml

    class Blank(dict[str, str]):
        def __missing__(self, key: str) -> str:
            return "x"

    found = [(str(p.relative_to(ROOT)), p.read_text()) for p in sorted((ROOT / "config").glob("*.yaml"))]
    for f in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            text = node.value
            if "pipelines:" not in text or "gateway:" not in text:
                continue
            if "{{" in text:  # a str.format template
                try:
                    text = string.Formatter().vformat(text, (), Blank())
                except (ValueError, IndexError):
                    continue
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError:
                continue
            if isinstance(data, dict) and isinstance(data.get("pipelines"), list) and data["pipelines"]:
                found.append((f"{f.relative_to(ROOT)}:{node.lineno}", text))
    return found


def test_every_config_the_tests_use_round_trips_and_one_number_changes_one_line() -> None:
    known = set(node_types())
    configs = _configs_in_tests()
    assert len(configs) >= 20
    one_line = 0
    for where, text in configs:
        model = load_model(text, known)
        assert apply_model(text, model, known).text == text, where
        draft = copy.deepcopy(model)
        target = next(
            (
                (n, k)
                for p in draft["pipelines"]
                for n in p["nodes"]
                if not n["readonly"]
                for k, v in n["options"].items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            ),
            None,
        )
        if target is None:
            continue
        n, k = target
        n["options"][k] += 1
        out = apply_model(text, draft, known).text
        before, after = text.splitlines(), out.splitlines()
        assert len(before) == len(after), where
        assert sum(a != b for a, b in zip(before, after, strict=True)) == 1, where
        one_line += 1
    assert one_line >= 10


async def test_export_then_import_a_pipeline(running: tuple[Gateway, Path, Browserish]) -> None:
    _, _, c = running
    _, model = await c.get("/api/editor/model")
    status, text = await c.get("/api/editor/pipelines/plant")
    assert status == 200 and "# the simulated boiler" in text
    status, r = await c.post("/api/editor/import", {"yaml": text})
    assert status == 200
    assert r["pipeline"] == next(p for p in model["pipelines"] if p["name"] == "plant")
    bomb = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n"
        for i in range(9)
    )
    bomb += "name: p\nnodes: [*j]\n"
    status, r = await c.post("/api/editor/import", {"yaml": bomb})
    assert status == 422 and "too many values" in r["error"]
    status, r = await c.post("/api/editor/import", {"yaml": "just: text"})
    assert status == 422 and "one pipeline" in r["error"]
    status, r = await c.post("/api/editor/import", {"text": "x"})
    assert status == 400


def test_a_changed_text_keeps_its_quotes() -> None:
    text = """\
gateway: {id: g}
pipelines:
  - name: p
    nodes:
      - {id: s, type: simulate, sensors: [{key: a}]}
      - {id: f, type: filter, input: s, where: "value > 1"}
      - id: g
        type: filter
        input: f
        where: 'value < 9'  # upper bound
"""
    known = set(node_types())
    draft = load_model(text, known)
    draft["pipelines"][0]["nodes"][1]["options"]["where"] = "value > 2"
    draft["pipelines"][0]["nodes"][2]["options"]["where"] = "value < 8"
    out = apply_model(text, draft, known).text
    assert out == text.replace('"value > 1"', '"value > 2"').replace("'value < 9'", "'value < 8'")


async def test_llm_chunks_reach_the_console_panel_as_they_stream(tmp_path: Path) -> None:
    """A real (tiny) model streaming through an llm node into a console node: the chunks reach a
    /ws client one by one, then the answer's closing event."""
    from tests._tiny_gguf import write_tiny_llama
    from tests.gateway._harness import running_gateway

    model = write_tiny_llama(tmp_path / "tiny.gguf")
    text = f"""
gateway: {{id: editor-llm, data_dir: "{tmp_path / "data"}"}}
llm:
  providers:
    tiny: {{type: local, model: "{model}", chat_format: gemma, n_ctx: 512, threads: 1}}
pipelines:
  - name: explain
    nodes:
      - {{id: sensors, type: simulate, interval: 500ms, sensors: [{{key: boiler/temp, base: 97}}]}}
      - {{id: ask, type: llm, input: sensors, provider: tiny, output: stream, max_tokens: 16,
         temperature: 0, max_queue: 1, prompt: "why is {{{{ key }}}} at {{{{ value }}}}?"}}
      - {{id: show, type: console, input: ask, label: answers}}
console: {{host: 127.0.0.1, port: 0, auth: false}}
"""
    async with running_gateway(text) as gw, aiohttp.ClientSession() as http:
        base = base_url(gw)
        async with http.ws_connect(f"{base}/ws", headers={"Origin": base}) as ws:
            await ws.send_json({"op": "subscribe", "topic": "console"})
            seen: list[dict[str, Any]] = []  # values in arrival order
            for _ in range(500):
                if sum(1 for v in seen if v.get("llm") == "ok") >= 2:
                    break
                data = json.loads((await asyncio.wait_for(ws.receive(), 60)).data)
                if data["type"] == "console":
                    assert all(e["label"] == "answers" for e in data["events"])
                    seen.extend(e["event"]["value"] for e in data["events"])
            done = [v for v in seen if v.get("llm") == "ok"]
            assert len(done) >= 2
            whole = 0
            for answer in done:
                # every chunk of the answer came before it, in order, and they make up its text
                req = answer["request"]
                before = seen[: seen.index(answer)]
                chunks = [v for v in before if v.get("llm") == "chunk" and v["request"] == req]
                if not chunks or chunks[0]["seq"] != 0:
                    continue  # subscribed in the middle of this one
                assert [c["seq"] for c in chunks] == list(range(len(chunks)))
                assert "".join(c["text"] for c in chunks).strip() == answer["text"]
                whole += 1
            assert whole >= 1


def test_rename_keeps_the_place_and_delete_takes_its_comment() -> None:
    text = """\
gateway: {id: g}
pipelines:
  - name: p
    nodes:
      - {id: s, type: simulate, sensors: [{key: a}]}
      # drop the noise
      - id: f
        type: filter
        input: s
        where: "value > 0"  # positive only
      # where it goes
      - {id: out, type: log, input: f}
"""
    known = set(node_types())
    draft = load_model(text, known)
    nodes = draft["pipelines"][0]["nodes"]
    nodes[1].update(id="positive", was="f")
    nodes[2]["input"] = ["positive"]
    out = apply_model(text, draft, known).text
    assert out == text.replace("      - id: f\n", "      - id: positive\n").replace("input: f}", "input: positive}")
    draft = load_model(text, known)
    nodes = draft["pipelines"][0]["nodes"]
    del nodes[1]
    nodes[1]["input"] = ["s"]
    out = apply_model(text, draft, known).text
    assert (
        out
        == """\
gateway: {id: g}
pipelines:
  - name: p
    nodes:
      - {id: s, type: simulate, sensors: [{key: a}]}
      # where it goes
      - {id: out, type: log, input: s}
"""
    )


async def test_disable_and_enable_a_pipeline(running: tuple[Gateway, Path, Browserish]) -> None:
    """`enabled: false` keeps a pipeline in the file, validated, but stopped; enabling starts it again,
    and the file is back to what it was. The other pipelines keep running throughout."""
    gw, path, c = running
    before = await asyncio.to_thread(path.read_text)
    pushed = gw.pipelines["pushed"]
    _, model = await c.get("/api/editor/model")
    assert [p["enabled"] for p in model["pipelines"]] == [True, True]
    draft = copy.deepcopy(model)
    draft["pipelines"][0]["enabled"] = False
    status, r = await c.post("/api/editor/deploy", {"revision": model["revision"], "model": draft})
    assert status == 200, r
    assert r["removed"] == ["plant"]
    text = await asyncio.to_thread(path.read_text)
    assert text == before.replace("  - name: plant\n", "  - name: plant\n    enabled: false\n")
    assert "plant" not in gw.pipelines and gw.pipelines["pushed"] is pushed
    _, model = await c.get("/api/editor/model")
    assert model["pipelines"][0]["enabled"] is False
    # a disabled pipeline is still validated: a mistake in it is refused
    bad = copy.deepcopy(model)
    _node(bad, "plant", "hot")["options"]["above"] = "hot"
    status, r = await c.post("/api/editor/deploy", {"revision": model["revision"], "model": bad})
    assert status == 422 and r["errors"][0]["node"] == "hot"
    # a gateway started from the file does not run it either
    restarted = Gateway(load_config(path, env={}))
    assert set(restarted.pipelines) == {"pushed"}
    draft = copy.deepcopy(model)
    draft["pipelines"][0]["enabled"] = True
    status, r = await c.post("/api/editor/deploy", {"revision": model["revision"], "model": draft})
    assert status == 200 and r["added"] == ["plant"], r
    assert await asyncio.to_thread(path.read_text) == before
    await wait_for(lambda: gw.pipelines["plant"].state == "running", timeout=10)


BROKERS = """\
gateway: {{id: editor-conns, data_dir: "{data}"}}
connections:
  # the plant broker
  plant: {{type: mqtt, host: 127.0.0.1, port: {port}, password: "s3cret-broker-pw"}}  # local
pipelines:
  - name: p
    nodes:
      - {{id: s, type: simulate, interval: 1h, sensors: [{{key: a}}]}}
      - {{id: out, type: mqtt_out, input: s, connection: plant}}
console: {{host: 127.0.0.1, port: 0}}
"""


async def test_connections_panel_validates_and_saves_for_the_next_restart(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    # ports nothing listens on: the gateway's mqtt_out must not reach a broker on this machine
    port, new_port = free_port(), free_port()
    while new_port == port:
        new_port = free_port()
    path.write_text(BROKERS.format(data=tmp_path / "data", port=port))
    async with gateway_from_file(path) as gw:
        c = Browserish(base_url(gw))
        try:
            await c.setup_admin(gw)
            before = await asyncio.to_thread(path.read_text)
            _, got = await c.get("/api/editor/connections")
            assert got["connections"]["plant"]["password"] == "***" and "s3cret" not in json.dumps(got)
            assert got["schema"]["properties"]["port"]["maximum"] == 65535
            conns = copy.deepcopy(got["connections"])
            # a mistake: refused, on its field, nothing written
            conns["plant"]["port"] = 70000
            status, r = await c.post("/api/editor/connections", {"revision": got["revision"], "connections": conns})
            assert status == 422 and r["errors"][0]["field"] == "connections.plant.port", r
            # removing a connection a node uses: refused by the same validation
            status, r = await c.post("/api/editor/connections", {"revision": got["revision"], "connections": {}})
            assert status == 422 and "plant" in r["errors"][0]["message"], r
            conns["plant"]["port"] = new_port
            status, r = await c.post("/api/editor/connections", {"revision": got["revision"], "connections": conns})
            assert status == 200 and r["saved"] and r["restart_needed"], r
            after = await asyncio.to_thread(path.read_text)
            # one line changed, its comment and the password (sent back as ***) kept
            assert after == before.replace(f"port: {port},", f"port: {new_port},")
            # the running gateway keeps its connections until a restart
            assert gw.loaded.config.connections["plant"].port == port
            # an old revision is refused
            status, r = await c.post("/api/editor/connections", {"revision": got["revision"], "connections": conns})
            assert status == 409
        finally:
            await c.close()
