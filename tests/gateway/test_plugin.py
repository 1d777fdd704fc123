"""A third-party node package, built as a real wheel and pip-installed into a fresh venv, works like
a built-in: in ``sluice schema``, ``sluice validate``, a running pipeline, ``/metrics``, the console's
pipeline list and the editor's palette.

The package is ``tests/gateway/plugin/sluice-clamp`` (the worked example of docs/writing-a-node.md).
The venv sees this project's environment through a ``site.addsitedir`` line, so only the plugin is
installed into it (offline, seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = Path(__file__).parent / "plugin" / "sluice-clamp"

CONFIG = """
gateway: {id: plug, data_dir: DATA}
pipelines:
  - name: p
    nodes:
      - {id: sim, type: simulate, realtime: false, count: 50, seed: 1,
         sensors: [{key: t, base: 20, amplitude: 10, period: 10, noise: 0}]}
      - {id: c, type: clamp, input: sim, low: 15, high: 25}
      - {id: out, type: log, input: c, level: debug}
console: {host: 127.0.0.1, port: 0, auth: false}
"""

RUN = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])  # the project root, for the test harness
from tests.gateway._harness import get, node, running_gateway
from tests._util import wait_for

async def main():
    async with running_gateway(open(sys.argv[2]).read()) as gw:
        c = node(gw, "p", "c")
        await wait_for(lambda: c.n_in == 50, timeout=30)
        _, pipelines = await get(gw, "/api/pipelines")
        _, metrics = await get(gw, "/metrics")
        _, palette = await get(gw, "/api/editor/palette")
        print(json.dumps({
            "class": f"{type(c).__module__}:{type(c).__name__}",
            "counts": [c.n_in, c.n_out, c.n_clamped],
            "pipelines": pipelines,
            "metrics": [l for l in metrics.splitlines() if l.startswith("sluice_clamp_clamped")],
            "palette": [t["type"] for f in palette["families"] for t in f["types"]],
        }))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def plugin_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("plugin")
    src = tmp / "src"
    shutil.copytree(PLUGIN, src)
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = dist.glob("sluice_clamp-1.0.0-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}, scheme="venv"))
    # the project's own environment (its dependencies and Sluice itself) behind the venv's own
    (site / "_sluice_env.pth").write_text(f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n")
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert list(site.glob("sluice_clamp-1.0.0.dist-info"))
    return python


def _run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_schema_and_validate_know_the_plugin(plugin_venv: Path, tmp_path: Path) -> None:
    res = _run(plugin_venv, "-m", "gateway.cli", "schema", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    schema = json.dumps(json.loads(res.stdout))
    assert '"const": "clamp"' in schema and "Readings above this become this." in schema

    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.replace("DATA", str(tmp_path / "data")))
    res = _run(plugin_venv, "-m", "gateway.cli", "validate", str(cfg), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr

    cfg.write_text(CONFIG.replace("DATA", str(tmp_path / "data")).replace("low: 15", "low: 30"))
    res = _run(plugin_venv, "-m", "gateway.cli", "validate", str(cfg), cwd=tmp_path)
    assert res.returncode == 1
    assert "c.yaml:" in res.stdout + res.stderr and "low (30.0) is above high (25.0)" in res.stdout + res.stderr


def test_the_plugin_runs_in_a_pipeline_and_shows_in_the_console(plugin_venv: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.replace("DATA", str(tmp_path / "data")))
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(RUN))
    res = _run(plugin_venv, str(script), str(ROOT), str(cfg), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["class"] == "sluice_clamp:Clamp"
    n_in, n_out, clamped = out["counts"]
    assert n_in == n_out == 50 and clamped > 0
    (pipeline,) = out["pipelines"]["pipelines"] if isinstance(out["pipelines"], dict) else out["pipelines"]
    assert {"id": "c", "type": "clamp"}.items() <= next(n for n in pipeline["nodes"] if n["id"] == "c").items()
    assert out["metrics"] == [f'sluice_clamp_clamped_total{{node="c",pipeline="p"}} {float(clamped)}']
    assert "clamp" in out["palette"]


def test_without_the_plugin_the_type_is_unknown(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.replace("DATA", str(tmp_path / "data")))
    res = _run(Path(sys.executable), "-m", "gateway.cli", "validate", str(cfg), cwd=tmp_path)
    assert res.returncode == 1
    assert "unknown node type 'clamp'" in res.stdout + res.stderr
