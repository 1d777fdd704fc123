"""Every node type's ``kind`` is its family (source, operator or sink): the API, its OpenAPI enum,
the graph's CSS classes and the config's graph checks all read that one attribute."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gateway.node import load_node_types, node_types
from tests.gateway._harness import NO_AUTH, get, running_gateway

FAMILIES = {"source", "operator", "sink"}
STYLE = Path(__file__).resolve().parents[2] / "gateway" / "web" / "static" / "style.css"


def test_every_registered_node_type_has_a_family_kind() -> None:
    load_node_types()
    wrong = {name: cls.kind for name, cls in node_types().items() if cls.kind not in FAMILIES}
    assert not wrong, wrong


def _kind_enums(doc: Any) -> list[set[str]]:
    """Every ``kind`` property's enum in an OpenAPI document."""
    found: list[set[str]] = []
    if isinstance(doc, dict):
        kind = doc.get("properties", {}).get("kind") if isinstance(doc.get("properties"), dict) else None
        if isinstance(kind, dict) and "enum" in kind:
            found.append(set(kind["enum"]))
        for v in doc.values():
            found += _kind_enums(v)
    elif isinstance(doc, list):
        for v in doc:
            found += _kind_enums(v)
    return found


async def test_api_pipelines_openapi_and_graph_agree_on_kinds(tmp_path: Path) -> None:
    text = f"""
gateway: {{id: kinds, data_dir: "{tmp_path}"}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, interval: 1s, sensors: [{{key: t, base: 20}}]}}
      - {{id: z, type: zscore, input: sim}}
      - {{id: e, type: ewma, input: sim}}
      - {{id: out, type: log, input: [z, e]}}
console: {{host: 127.0.0.1, port: 0{NO_AUTH}}}
"""
    async with running_gateway(text) as gw:
        status, body = await get(gw, "/api/pipelines")
        assert status == 200
        status, doc = await get(gw, "/api/openapi.json")
        assert status == 200
    kinds = {n["id"]: n["kind"] for p in body["pipelines"] for n in p["nodes"]}
    assert kinds == {"sim": "source", "z": "operator", "e": "operator", "out": "sink"}
    assert _kind_enums(doc) == [FAMILIES]
    # the graph's node classes (`node ${kind}`) are styled per family; operators are the plain default
    css = STYLE.read_text(encoding="utf-8")
    assert set(re.findall(r"\.node\.(\w+) rect", css)) <= FAMILIES
