"""`sluice doctor` against working and broken setups: real broker, a pty, real SQLite files, a full disk."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway._migrate import known_schemas
from tests._util import MosquittoBroker, free_port

ROOT = Path(__file__).resolve().parents[2]


def doctor(config: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "doctor", str(config), "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert out.stdout, out.stderr
    return out.returncode, json.loads(out.stdout)


def messages(report: dict[str, Any], level: str) -> list[str]:
    return [c["message"] for c in report["checks"] if c["level"] == level]


def write_config(tmp_path: Path, data: Path, broker_port: int, extra_nodes: str = "") -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(
        f"""\
gateway: {{id: gw-doc, data_dir: "{data}"}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {broker_port}}}
console: {{enabled: false}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, interval: 1s, sensors: [{{key: t}}]}}
{extra_nodes}      - {{id: out, type: mqtt_out, input: sim, connection: plant}}
"""
    )
    return path


def test_a_healthy_setup_reports_no_error(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rc, report = doctor(write_config(tmp_path, data, mosquitto.port))
    assert not messages(report, "error"), report
    assert rc in (0, 1)  # the machine's clock may warn (no RTC here), nothing else
    assert any("connected to 127.0.0.1" in m for m in messages(report, "ok")), report
    assert any("is valid" in m for m in messages(report, "ok"))


def test_a_broken_setup_is_explained_check_by_check(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "state.db").write_bytes(b"this is not a database" * 100)
    master, slave = os.openpty()
    tty = os.ttyname(slave)
    os.chmod(tty, 0o600)  # root's alone: the service user may not open it
    nodes = (
        f"      - {{id: ser, type: serial, port: {tty}, codec: {{type: json}}}}\n"
        "      - {id: gone, type: serial, port: /dev/ttyUSB-not-plugged, codec: {type: json}}\n"
    )
    try:
        rc, report = doctor(write_config(tmp_path, data, free_port(), nodes), "--user", "nobody")
    finally:
        os.close(master)
        os.close(slave)
    errors = messages(report, "error")
    assert rc == 2 and report["status"] == "error"
    assert any("connection refused" in m and "MQTT plant" in m for m in errors), errors
    assert any("/dev/ttyUSB-not-plugged is not there" in m for m in errors), errors
    if os.geteuid() == 0:
        assert any(f"user nobody may not open {tty}" in m for m in errors), errors
    assert any("state.db is not a readable database" in m or "state.db is damaged" in m for m in errors), errors


def test_an_invalid_config_is_an_error_with_its_problems(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("gateway: {id: gw}\npipelines:\n  - name: p\n    nodes: [{id: a, type: nosuch}]\n")
    rc, report = doctor(path)
    assert rc == 2
    assert any("bad.yaml:4" in m for m in messages(report, "error")), report


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_reported(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    data = tmp_path / "small"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(data)], check=True)
    try:
        (data / "fill").write_bytes(b"\0" * (2 * 2**20 - 64 * 1024))
        rc, report = doctor(write_config(tmp_path, data, mosquitto.port))
    finally:
        subprocess.run(["umount", str(data)], check=True)
    assert rc == 2
    assert any("is full" in m for m in messages(report, "error")), report


def test_the_text_report_speaks_plainly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "doctor", str(write_config(tmp_path, data, free_port()))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "[FAIL] connection" in out.stdout and "nothing listens on that port" in out.stdout
    last = out.stdout.splitlines()[-1]
    assert last.startswith("sluice doctor: ") and "error(s)" in last, last


def test_each_databases_schema_version_is_reported(tmp_path: Path) -> None:
    """Files of release 0.1.0: the state store is current, alerts and the rest wait for an upgrade at
    the next start, and a file from a newer Sluice is an error; the doctor changes none of them."""
    data = tmp_path / "data"
    shutil.copytree(ROOT / "tests" / "fixtures" / "release-0.1.0", data)
    schemas = known_schemas()
    newer = schemas["deadletter.db"].version + 1
    con = sqlite3.connect(data / "deadletter.db")
    con.execute(f"PRAGMA user_version={newer}")
    con.commit()
    con.close()
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    rc, report = doctor(write_config(tmp_path, data, free_port()))
    assert rc == 2
    schema = {c["message"].split(":")[0]: c for c in report["checks"] if c["area"] == "schema"}
    assert set(schema) == set(schemas), report
    assert schema["state.db"]["level"] == "ok"
    assert schema["state.db"]["message"] == f"state.db: schema version {schemas['state.db'].version}, current"
    assert schema["alerts.db"]["level"] == "warning"
    upgrade = f"upgrades it to {schemas['alerts.db'].version} at the gateway's next start"
    assert upgrade in schema["alerts.db"]["message"]
    assert schema["deadletter.db"]["level"] == "error"
    assert f"schema version {newer} is newer than this Sluice" in schema["deadletter.db"]["message"]
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.name in before} == before


def test_the_llm_check_leaves_no_warning_under_dev_mode(tmp_path: Path) -> None:
    """The local-model check finds out whether llama-cpp-python loads without importing it into
    the doctor's own process: its import leaves two files of /dev/null open, which ``-X dev`` shows
    as ResourceWarnings at exit (and ``-W error`` as errors). A package that fails to load is still
    an error with its reason."""
    from tests._tiny_gguf import write_tiny_llama

    data = tmp_path / "data"
    data.mkdir()
    model = write_tiny_llama(tmp_path / "tiny.gguf")
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"""\
gateway: {{id: gw-doc, data_dir: "{data}"}}
console: {{enabled: false}}
llm:
  providers:
    tiny: {{type: local, model: "{model}", n_ctx: 512, threads: 1}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, interval: 1s, sensors: [{{key: t}}]}}
      - {{id: out, type: log, input: sim}}
"""
    )
    out = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-m", "gateway.cli", "doctor", str(config), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stderr == ""  # no ResourceWarning, nor asyncio's slow-callback note of a blocking check
    report = json.loads(out.stdout)
    assert any(m.startswith("LLM tiny: tiny.gguf") for m in messages(report, "ok")), report
    assert not messages(report, "error"), report

    # llama-cpp-python there but not loading (a broken native library, here a module that raises)
    broken = tmp_path / "broken"
    (broken / "llama_cpp").mkdir(parents=True)
    (broken / "llama_cpp" / "__init__.py").write_text('raise OSError("libllama.so: cannot open shared object file")\n')
    rc, report = doctor(config, env={"PYTHONPATH": str(broken)})
    errors = messages(report, "error")
    assert rc == 2 and any("LLM tiny" in m and "libllama.so" in m for m in errors), report
