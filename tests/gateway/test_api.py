"""The node API as a contract: what nodes may import, and what the runtime may not know about them."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from gateway import api
from gateway.envelope import Envelope, encode_fields, event_fields
from gateway.events import Event
from gateway.node import node_types

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def test_nodes_import_only_the_api_from_the_runtime() -> None:
    bad = []
    for path in sorted((ROOT / "nodes").glob("*.py")):
        for line, module, names in _imports(path):
            top = module.split(".")[0]
            if top == "gateway" and module != "gateway.api":
                bad.append(f"{path.name}:{line}: {module}")
            # what node modules share lives in nodes._<helper> modules; another node module's
            # private names are not for use
            private = [n for n in names if n.startswith("_")]
            if top == "nodes" and not module.split(".")[-1].startswith("_") and private:
                bad.append(f"{path.name}:{line}: {module} {private}")
    assert bad == []


def _type_name_comparisons(path: Path, names: set[str]) -> list[str]:
    """``x.type == "alert"``, ``type_name != "llm"``, ``getattr(x, "type") == "llm"`` and the like,
    for the node type ``names`` (an LLM provider's ``type == "local"`` is not a node type)."""

    def names_a_type(e: ast.expr) -> bool:
        if isinstance(e, ast.Attribute):
            return e.attr in ("type", "type_name")
        if isinstance(e, ast.Name):
            return e.id in ("type_name", "node_type")
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id == "getattr" and len(e.args) >= 2:
            a = e.args[1]
            return isinstance(a, ast.Constant) and a.value in ("type", "type_name")
        return False

    def is_str(e: ast.expr) -> bool:
        if isinstance(e, ast.Constant) and isinstance(e.value, str):
            return e.value in names
        return isinstance(e, ast.Tuple | ast.List | ast.Set) and any(is_str(x) for x in e.elts)

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(names_a_type(s) for s in sides) and any(is_str(s) for s in sides):
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_the_runtime_never_compares_a_node_type_name() -> None:
    names = set(node_types())
    assert {"alert", "llm", "mqtt"} <= names
    found = [hit for path in sorted((ROOT / "gateway").rglob("*.py")) for hit in _type_name_comparisons(path, names)]
    assert found == []


def test_the_type_name_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        'a = o.type == "alert"\nb = getattr(n, "type_name", None) != "llm"\nc = n.type_name in ("llm",)\n'
        'd = msg.type == WSMsgType.TEXT\ne = p.type == "local"\n'
    )
    assert len(_type_name_comparisons(probe, {"alert", "llm"})) == 3


def test_api_exports_resolve() -> None:
    assert api.api_version.split(".")[0] == "1"
    for name in api.__all__:
        assert getattr(api, name) is not None, name


def test_one_envelope_for_every_sink() -> None:
    ev = Event("s1", 12.5, {"t": 1.0, "when": Path("/x")}, "src")
    env = Envelope("gw-é")
    direct = json.loads(env.event("p", ev))
    assert list(direct) == ["gateway_id", "seq", "replayed", "pipeline", "source", "key", "ts", "value"]
    assert direct == {
        "gateway_id": "gw-é",
        "seq": None,
        "replayed": False,
        "pipeline": "p",
        "source": "src",
        "key": "s1",
        "ts": 12.5,
        "value": {"t": 1.0, "when": "/x"},
    }
    body = encode_fields(event_fields("p", ev))
    queued = json.loads(env.wrap(body, 42, replayed=True))
    assert queued == {**direct, "seq": 42, "replayed": True}
    assert json.loads(env.wrap(b"{}", 7)) == {"gateway_id": "gw-é", "seq": 7, "replayed": False}


async def test_every_transport_is_a_link() -> None:
    """The outbox sends through the Link protocol only; each built-in transport satisfies it."""
    from gateway.config import MqttConnection
    from gateway.mqtt import MqttLink
    from gateway.webhook import WebhookLink
    from nodes._outlink import OutboxLink

    links = [
        MqttLink("b", MqttConnection(type="mqtt"), "probe"),
        WebhookLink("w", "http://127.0.0.1:9/"),
        OutboxLink("o", "gw"),
    ]
    assert [type(x).__name__ for x in links if not isinstance(x, api.Link)] == []
    assert not isinstance(object(), api.Link)


def test_config_models_come_from_the_schema_not_the_runtime() -> None:
    """Loading a config imports no runtime module; gateway.schema imports none either."""
    import subprocess
    import sys

    probe = (
        "import sys, gateway.config, gateway.schema; "
        "print(sorted(m for m in ('gateway.llm', 'gateway.outbox', 'gateway.store', 'gateway.runtime', "
        "'gateway.engine', 'gateway.mqtt') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    schema_imports = {m for _, m, _ in _imports(ROOT / "gateway" / "schema.py")}
    tree = ast.parse((ROOT / "gateway" / "schema.py").read_text())
    relative = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
    assert relative <= {"node", "redact"}
    assert not {m for m in schema_imports if m.startswith("gateway.")}


def test_the_runtimes_services_are_what_the_api_promises(tmp_path: Path) -> None:
    from gateway.runtime import Links

    assert isinstance(Links("gw", {}, tmp_path, 0.0), api.Services)


def _secret_literals(path: Path) -> list[str]:
    """``{"secret": True}`` written out in a module (the marker belongs to ``secret_field``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
            if "secret" in keys:
                out.append(f"{path.name}:{node.lineno}")
    return out


def test_built_in_nodes_mark_secrets_with_the_api_helper(tmp_path: Path) -> None:
    assert [hit for path in sorted((ROOT / "nodes").glob("*.py")) for hit in _secret_literals(path)] == []
    # the check sees what it looks for
    probe = tmp_path / "probe.py"
    probe.write_text('from pydantic import Field\nx = Field(json_schema_extra={"secret": True})\n')
    assert _secret_literals(probe) == ["probe.py:2"]


def test_secret_field_marks_the_schema_and_hides_the_value() -> None:
    from typing import Literal

    from gateway.redact import redact_options, secrets_of

    class Options(api.NodeOptions):
        type: Literal["t_secretive"]
        token: str = api.secret_field(min_length=8, description="A token.")
        headers: dict[str, str] = api.secret_field(default_factory=dict, json_schema_extra={"format": "headers"})
        password: str | None = api.secret_field(None)
        plain: str = "shown"

    props = Options.model_json_schema()["properties"]
    assert props["token"]["secret"] is True and props["token"]["minLength"] == 8
    assert props["headers"]["secret"] is True and props["headers"]["format"] == "headers"
    assert props["password"]["secret"] is True and "secret" not in props["plain"]
    o = Options(id="n", type="t_secretive", token="tok-12345678", headers={"X-Site": "site-9876"}, password="pw-5555")
    shown = redact_options(o)
    assert shown["token"] == shown["password"] == "***" and shown["headers"] == {"X-Site": "***"}
    assert shown["plain"] == "shown"
    assert {"tok-12345678", "pw-5555"} <= set(secrets_of(o))
    assert Options(id="n", type="t_secretive", token="tok-12345678").password is None
