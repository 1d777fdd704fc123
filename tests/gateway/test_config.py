"""`sluice validate` and `sluice schema` through the real CLI: every problem as FILE:LINE: path: message."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Variables the configs below substitute; the test decides whether they are set.
_TEST_VARS = ("SLUICE_T_BROKER", "SLUICE_T_OFFSET", "SLUICE_T_DESC")


def sluice(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in _TEST_VARS}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60
    )


def validate(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "sluice.yaml").write_text(text, encoding="utf-8")
    full_env = {"PYTHONPATH": str(ROOT), **(env or {})}
    return sluice("validate", "sluice.yaml", cwd=tmp_path, env=full_env)


def registered_types() -> list[str]:
    """Built-ins plus whatever plugins registered, as a fresh process sees them (tests register their own)."""
    out = subprocess.run(
        [sys.executable, "-c", "from gateway.node import node_types; print(*sorted(node_types()))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return out.split()


def assert_problems(res: subprocess.CompletedProcess[str], *lines: str) -> None:
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr
    n = len(lines)
    expected = [*lines, f"{n} problem{'s' if n != 1 else ''} found"]
    assert res.stderr.splitlines() == expected
    assert res.stdout == ""


GOOD = """\
gateway: {id: gw1, data_dir: ./data}
connections:
  plant: {type: mqtt, host: localhost, port: 1883}
pipelines:
  - name: boiler
    nodes:
      - {id: temp, type: mqtt, connection: plant, topic: "sensors/+/temp", key: "topic[1]"}
      - {id: hot, type: threshold, input: temp, above: 90, clear_below: 85}
      - {id: out, type: mqtt_out, input: hot, connection: plant}
"""


def test_valid_file_exits_0(tmp_path: Path) -> None:
    res = validate(tmp_path, GOOD)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "sluice.yaml: valid (1 pipelines, 3 nodes)\n"
    assert res.stderr == ""


def test_demo_config_is_valid() -> None:
    res = sluice("validate", "config/demo.yaml", cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert re.match(r"config/demo.yaml: valid \(\d+ pipelines, \d+ nodes\)\n$", res.stdout), res.stdout


def test_unknown_keys_suggest_the_right_name(tmp_path: Path) -> None:
    res = validate(
        tmp_path,
        """\
gateway:
  id: gw1
  queue_sise: 100
pipeline: []
pipelines:
  - name: p
    nodes:
      - {id: src, type: simulate, sensors: [{key: a, bse: 3.0}]}
      - {id: hot, type: threshold, input: src, abov: 3.0, above: 4.0}
""",
    )
    assert_problems(
        res,
        "sluice.yaml:3: gateway.queue_sise: unknown field 'queue_sise'; did you mean 'queue_size'?",
        "sluice.yaml:4: pipeline: unknown field 'pipeline'; did you mean 'pipelines'?",
        "sluice.yaml:8: pipelines.0.nodes.0.sensors.0.bse: unknown field 'bse'; did you mean 'base'?",
        "sluice.yaml:9: pipelines.0.nodes.1.abov: unknown field 'abov'; did you mean 'above'?",
    )


def test_wrong_types(tmp_path: Path) -> None:
    res = validate(
        tmp_path,
        """\
gateway: {id: gw1}
connections:
  plant:
    type: mqtt
    port: "abc"
pipelines:
  - name: p
    nodes:
      - {id: src, type: simulate, sensors: [{key: a}], interval: soon}
      - {id: hot, type: threshold, input: src, above: hot}
""",
    )
    assert_problems(
        res,
        "sluice.yaml:5: connections.plant.port: input should be a valid integer, unable to parse string as an integer",
        "sluice.yaml:9: pipelines.0.nodes.0.interval: value error, 'soon' is not a duration; "
        "use a number of seconds or e.g. 500ms, 10s, 5m, 1h",
        "sluice.yaml:10: pipelines.0.nodes.1.above: input should be a valid number, unable to parse string as a number",
    )


def test_missing_required_fields(tmp_path: Path) -> None:
    # A node that is invalid itself is not reported a second time as an "unknown input" downstream.
    res = validate(
        tmp_path,
        """\
gateway:
  data_dir: ./data
connections:
  plant: {type: mqtt}
pipelines:
  - name: p
    nodes:
      - {id: src, type: mqtt, topic: a/b}
      - {type: log, input: src}
      - {id: f, type: filter, input: src}
      - {id: hot, type: threshold, input: f}
""",
    )
    assert_problems(
        res,
        "sluice.yaml:1: gateway.id: required field is missing",
        "sluice.yaml:8: pipelines.0.nodes.0.connection: required field is missing",
        "sluice.yaml:9: pipelines.0.nodes.1.id: required field is missing",
        "sluice.yaml:10: pipelines.0.nodes.2.where: required field is missing",
        "sluice.yaml:11: pipelines.0.nodes.3: value error, give `above` and/or `below`",
    )


def test_unknown_node_type(tmp_path: Path) -> None:
    res = validate(
        tmp_path,
        """\
gateway: {id: gw1}
pipelines:
  - name: p
    nodes:
      - {id: src, type: simulate, sensors: [{key: a}]}
      - {id: hot, type: threshhold, input: src, above: 3.0}
      - {id: odd, type: no_such_thing, input: src}
""",
    )
    known = ", ".join(registered_types())
    assert_problems(
        res,
        "sluice.yaml:6: pipelines.0.nodes.1.type: unknown node type 'threshhold'; did you mean 'threshold'?",
        f"sluice.yaml:7: pipelines.0.nodes.2.type: unknown node type 'no_such_thing'; known types: {known}",
    )
    assert {"filter", "log", "map", "mqtt", "mqtt_out", "simulate", "threshold"} <= set(known.split(", "))


def test_graph_errors(tmp_path: Path) -> None:
    res = validate(
        tmp_path,
        """\
gateway: {id: gw1}
pipelines:
  - name: p
    nodes:
      - {id: src, type: simulate, sensors: [{key: a}]}
      - {id: shown, type: log, input: sorce}
      - {id: after_sink, type: filter, input: shown, where: "true"}
      - {id: src, type: log, input: src}
      - {id: a, type: filter, input: [src, b], where: "true"}
      - {id: b, type: filter, input: a, where: "true"}
      - {id: me, type: filter, input: me, where: "true"}
      - {id: gen, type: simulate, input: src, sensors: [{key: b}]}
""",
    )
    assert_problems(
        res,
        "sluice.yaml:6: pipelines.0.nodes.1.input: unknown input 'sorce'; did you mean 'src'?",
        "sluice.yaml:7: pipelines.0.nodes.2.input: 'shown' is a sink (log) and has no output to take",
        "sluice.yaml:8: pipelines.0.nodes.3.id: duplicate node id 'src' (first at pipelines.0.nodes.0)",
        "sluice.yaml:10: pipelines.0.nodes.5.input: cycle: a -> b -> a",
        "sluice.yaml:11: pipelines.0.nodes.6.input: node 'me' cannot take its own output as input",
        "sluice.yaml:12: pipelines.0.nodes.7.input: 'simulate' is a source and takes no input",
    )


def test_duplicate_pipeline_names(tmp_path: Path) -> None:
    res = validate(
        tmp_path,
        """\
gateway: {id: gw1}
pipelines:
  - name: p
    nodes: [{id: src, type: simulate, sensors: [{key: a}]}]
  - name: p
    nodes: [{id: src, type: simulate, sensors: [{key: a}]}]
""",
    )
    assert_problems(res, "sluice.yaml:5: pipelines.1.name: duplicate pipeline name 'p'")


def test_bad_expressions_and_int_double_hint(tmp_path: Path) -> None:
    res = validate(
        tmp_path,
        """\
gateway: {id: gw1}
pipelines:
  - name: p
    nodes:
      - {id: src, type: simulate, sensors: [{key: a}]}
      - {id: f, type: filter, input: src, where: "value >"}
      - {id: g, type: filter, input: src, where: "value > 1.0 && nope"}
      - {id: m, type: map, input: src, value: "value * 2"}
""",
    )
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 4 and lines[-1] == "3 problems found"
    # CEL's own parser message is long and version-specific: check where it is and what it names.
    assert lines[0].startswith("sluice.yaml:6: pipelines.0.nodes.1.where: ")
    assert "Syntax error" in lines[0] and lines[0].endswith("(in expression 'value >')")
    assert lines[1] == (
        "sluice.yaml:7: pipelines.0.nodes.2.where: unknown name 'nope'; available: "
        "value, key, ts, source, meta (in expression 'value > 1.0 && nope')"
    )
    assert lines[2].startswith("sluice.yaml:8: pipelines.0.nodes.3.value: ")
    assert "float * int" in lines[2]
    assert lines[2].endswith("(in expression 'value * 2'; numbers are doubles: write 2.0, not 2)")


def test_environment_variables(tmp_path: Path) -> None:
    text = """\
gateway: {id: gw1}
connections:
  plant: {type: mqtt, host: "${SLUICE_T_BROKER}"}
pipelines:
  - name: p
    description: "${SLUICE_T_DESC:-the default} and $$literal"
    nodes:
      - {id: src, type: simulate, sensors: [{key: a}]}
      - {id: m, type: map, input: src, value: "value + ${SLUICE_T_OFFSET:-1.5}"}
"""
    res = validate(tmp_path, text)
    assert_problems(
        res,
        "sluice.yaml:3: connections.plant.host: environment variable SLUICE_T_BROKER is not set "
        "(use ${SLUICE_T_BROKER:-default} for a default)",
    )
    assert validate(tmp_path, text, {"SLUICE_T_BROKER": "broker.local"}).returncode == 0
    # the substituted text is what gets validated: a default that breaks the expression is reported
    res = validate(tmp_path, text, {"SLUICE_T_BROKER": "b", "SLUICE_T_OFFSET": "2"})
    assert res.returncode == 1
    assert res.stderr.startswith("sluice.yaml:9: pipelines.0.nodes.1.value: ")
    # the error names the variable, never its value
    assert "(in expression 'value + ${SLUICE_T_OFFSET}'" in res.stderr

    from gateway.config import parse_config

    loaded = parse_config(text, env={"SLUICE_T_BROKER": "broker.local"})
    assert loaded.config.connections["plant"].host == "broker.local"
    assert loaded.config.pipelines[0].description == "the default and $literal"
    assert loaded.nodes["p"][1].value == "value + 1.5"  # type: ignore[attr-defined]


def test_yaml_syntax_error(tmp_path: Path) -> None:
    res = validate(
        tmp_path,
        """\
gateway:
  id: gw1
pipelines:
  - name: p
    nodes:
      - {id: a, type: log
      - {id: b}
""",
    )
    assert_problems(res, "sluice.yaml:7: <root>: YAML syntax: expected ',' or '}', but got '{'")


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    res = validate(
        tmp_path,
        """\
gateway:
  id: gw1
  data_dir: ./a
  data_dir: ./b
""",
    )
    assert_problems(res, "sluice.yaml:4: gateway.data_dir: duplicate key")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "sluice.yaml:1: <root>: config is empty; it needs at least a 'gateway' section"),
        ("- a\n- b\n", "sluice.yaml:1: <root>: config must be a mapping of sections"),
    ],
)
def test_empty_or_not_a_mapping(tmp_path: Path, text: str, message: str) -> None:
    assert_problems(validate(tmp_path, text), message)


def test_missing_file(tmp_path: Path) -> None:
    res = sluice("validate", "nope.yaml", cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert_problems(res, "nope.yaml:1: <root>: cannot read config: No such file or directory")


def test_schema_lists_every_node_type(tmp_path: Path) -> None:
    res = sluice("schema", cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    schema = json.loads(res.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert {"gateway", "connections", "pipelines", "console"} <= set(schema["properties"])
    node_types = set()
    for definition in schema["$defs"].values():
        type_prop = definition.get("properties", {}).get("type", {})
        if "const" in type_prop:
            node_types.add(type_prop["const"])
    assert {"mqtt", "threshold", "simulate", "filter", "map", "mqtt_out", "log"} <= node_types
    assert set(registered_types()) <= node_types
    # an editor completes option names from it
    threshold = next(
        d for d in schema["$defs"].values() if d.get("properties", {}).get("type", {}).get("const") == "threshold"
    )
    assert {"above", "below", "clear_below", "severity"} <= set(threshold["properties"])
    assert threshold.get("additionalProperties") is False


def test_expressions_over_payload_fields_validate(tmp_path: Path) -> None:
    # A field the sample payload lacks depends on the data: valid at validation, judged per event.
    res = validate(
        tmp_path,
        """\
gateway: {id: gw1}
connections: {plant: {type: mqtt}}
pipelines:
  - name: p
    nodes:
      - {id: a, type: mqtt, connection: plant, topic: "c/+", key: 'payload.sensor + "@" + topic[1]'}
      - {id: b, type: mqtt, connection: plant, topic: "c/+", key: 'topic[7]'}
      - {id: f, type: filter, input: a, where: 'value.temp > 3.0 && meta.topic == "x"'}
""",
    )
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr


def test_yaml_anchors_and_merge_keys(tmp_path: Path) -> None:
    text = """\
gateway: {id: gw1}
pipelines:
  - name: p
    nodes:
      - id: src
        type: simulate
        sensors:
          - &base {key: a, base: 20.0, noise: 0.1}
          - {<<: *base, key: b, base: 30.0}
          - {<<: [*base, {period: 20s, base: 1.0}], key: c}
          - {<<: *base, key: d, key: e}
          - {<<: *base, key: f, bse: 1.0}
          - {<<: 3, key: g}
"""
    res = validate(tmp_path, text)
    assert_problems(
        res,
        "sluice.yaml:11: pipelines.0.nodes.0.sensors.3.key: duplicate key",
        "sluice.yaml:12: pipelines.0.nodes.0.sensors.4.bse: unknown field 'bse'; did you mean 'base'?",
        "sluice.yaml:13: pipelines.0.nodes.0.sensors.5: YAML merge: expected a mapping or list of mappings "
        "for merging, but found scalar",
    )
    from gateway.config import parse_config

    good = "\n".join(text.splitlines()[:10]) + "\n"
    sensors = parse_config(good, env={}).nodes["p"][0].sensors  # type: ignore[attr-defined]
    assert [(s.key, s.base, s.noise, s.period) for s in sensors] == [
        ("a", 20.0, 0.1, 300.0),
        ("b", 30.0, 0.1, 300.0),  # own keys override merged ones
        ("c", 20.0, 0.1, 20.0),  # of several merged mappings, the first wins
    ]


def test_expressions_over_object_readings(tmp_path: Path) -> None:
    # readings may be objects (value_field: null): field access is valid, an int mixed in is still caught
    res = validate(
        tmp_path,
        """\
gateway: {id: gw1}
pipelines:
  - name: p
    nodes:
      - {id: src, type: simulate, sensors: [{key: a}]}
      - {id: f, type: filter, input: src, where: "value.temp > 30.0"}
      - {id: m, type: map, input: f, fields: {f: "value.temp * 1.8 + 32.0", deep: "value.a.b"}}
      - {id: bad, type: map, input: src, value: "value.temp * 2"}
""",
    )
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 2 and lines[1] == "1 problem found"
    assert lines[0].startswith("sluice.yaml:8: pipelines.0.nodes.3.value: Unsupported operation: float * int.")
    assert lines[0].endswith("(in expression 'value.temp * 2'; numbers are doubles: write 2.0, not 2)")
