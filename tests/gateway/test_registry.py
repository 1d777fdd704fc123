"""Built-in node types are found through the ``sluice.nodes`` entry points, lazily, by type name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import json
from importlib.metadata import entry_points
from gateway import node
before = set(node._REGISTRY)
node.load_node_types()
print(json.dumps({"index": {ep.name: ep.value for ep in node._node_entry_points().values()},
                  "installed": {ep.name: ep.value for ep in entry_points(group="sluice.nodes")},
                  "before": sorted(before),
                  "registered": {n: f"{c.__module__}:{c.__qualname__}" for n, c in node._REGISTRY.items()}}))
"""

_LAZY = """
import json, sys
from gateway.config import parse_config
parse_config('''
gateway: {id: g}
connections: {b: {type: mqtt}}
pipelines:
  - name: p
    nodes:
      - {id: s, type: mqtt, connection: b, topic: t}
      - {id: f, type: filter, input: s, where: "value > 1.0"}
      - {id: o, type: mqtt_out, input: f, connection: b}
''')
print(json.dumps(sorted(m for m in sys.modules if m.startswith("nodes."))))
"""


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def test_entry_points_name_every_builtin_node_by_its_type() -> None:
    import json

    data = json.loads(_run(_PROBE))
    builtin = {n: m for n, m in data["registered"].items() if m.startswith("nodes.")}
    assert data["before"] == []  # importing gateway.node imports no node module
    # every class a node module registers is an entry point named by its type, and no other
    assert builtin == {n: v for n, v in data["index"].items() if v.startswith("nodes.")}
    # the installed metadata says the same as pyproject.toml
    installed = {n: v for n, v in data["installed"].items() if v.startswith("nodes.")}
    assert installed == builtin, (
        "the installed entry points differ from pyproject.toml: run `make deps` (pip install -e .) again"
    )


def test_a_config_imports_only_the_node_modules_it_uses() -> None:
    import json

    assert json.loads(_run(_LAZY)) == ["nodes._stream", "nodes.operators", "nodes.sinks", "nodes.sources"]


def test_unknown_type_still_lists_every_type() -> None:
    from gateway.config import parse_config
    from gateway.errors import ConfigError

    try:
        parse_config("gateway: {id: g}\npipelines:\n  - name: p\n    nodes:\n      - {id: s, type: modbuss}\n")
    except ConfigError as err:
        assert "did you mean 'modbus'" in str(err.issues[0])
    else:
        raise AssertionError("expected a config error")


def test_the_built_in_table_is_pyprojects_entry_points() -> None:
    import tomllib

    from gateway.node import _BUILT_IN

    with (ROOT / "pyproject.toml").open("rb") as f:
        declared = tomllib.load(f)["project"]["entry-points"]["sluice.nodes"]
    assert _BUILT_IN == declared


_NO_METADATA = """
import json, sys
from gateway.cli import _pydantic_plugins_off
_pydantic_plugins_off()  # as `sluice run` does: pydantic's plug-in loader reads no metadata either
from gateway.node import get_node_type
built_in = get_node_type("window").__name__
before = "importlib.metadata" in sys.modules
unknown = get_node_type("no_such_type")  # a plug-in's name is looked for in the metadata
print(json.dumps({"built_in": built_in, "metadata_before": before, "unknown": unknown,
                  "metadata_after": "importlib.metadata" in sys.modules}))
"""


def test_a_built_in_type_is_found_without_reading_package_metadata() -> None:
    """importlib.metadata, with what it imports, costs a gateway ~1.5 MiB resident."""
    import json

    got = json.loads(_run(_NO_METADATA))
    assert got == {"built_in": "Window", "metadata_before": False, "unknown": None, "metadata_after": True}


_PYDANTIC_PLUGINS = """
import json, os, sys
from gateway.cli import _pydantic_plugins_off
_pydantic_plugins_off()
import pydantic

class M(pydantic.BaseModel):
    x: int

valid = M(x="3").x
metadata = "importlib.metadata" in sys.modules
from pydantic.plugin._loader import PYDANTIC_ENTRY_POINT_GROUP, get_plugins  # another name: the real loader
print(json.dumps({"valid": valid, "metadata": metadata, "env": os.environ.get("PYDANTIC_DISABLE_PLUGINS"),
                  "group": PYDANTIC_ENTRY_POINT_GROUP, "plugins": list(get_plugins()),
                  "real": sys.modules["pydantic.plugin._loader"].__file__ is not None}))
"""


def test_sluice_run_loads_no_pydantic_plugins_unless_the_environment_says_so() -> None:
    import json
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    res = subprocess.run(
        [sys.executable, "-c", _PYDANTIC_PLUGINS], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"valid": 3, "metadata": False, "env": "__all__", "group": "pydantic", "plugins": [], "real": True}
    # set in the environment, the variable decides as in any pydantic program: the real loader
    res = subprocess.run(
        [sys.executable, "-c", _PYDANTIC_PLUGINS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "PYDANTIC_DISABLE_PLUGINS": "some_plugin"},
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["metadata"] is True and got["env"] == "some_plugin" and got["valid"] == 3
