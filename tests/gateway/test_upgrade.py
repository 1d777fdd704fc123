"""Databases written by the previous release open in this one: state, outbox, alerts, dead letters, history.

The files in tests/fixtures/release-0.1.0/ were written by Sluice 0.1.0 (the release before the
installer) running the pipeline below for a few seconds, with its broker down: two messages wait
in the outbox, the window holds partials for keys a and b, five alerts were raised and resolved,
one malformed POST was dead-lettered, and the history holds key a and b buckets. Never regenerate
them: they stand for what gateways in the field have on their SD cards.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gateway._migrate import known_schemas, migrate
from gateway.store import SCHEMA_VERSION
from tests._util import MosquittoBroker, free_port, mqtt_client, wait_for
from tests.gateway._harness import node, running_gateway

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "release-0.1.0"


def config(data: Path, port: int) -> str:
    return f"""\
gateway: {{id: gw-old, data_dir: "{data}"}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {port}, reconnect_max: 1s}}
console: {{host: 127.0.0.1, port: 0, auth: false}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: http, token: "0123456789abcdef0123"}}
      - {{id: push, type: http, token: "0123456789abcdef0123"}}
      - {{id: win, type: window, input: sim, kind: tumbling, size: 1h, aggregate: mean}}
      - {{id: hot, type: threshold, input: sim, above: 90, clear_below: 80}}
      - {{id: alerts, type: alert, input: hot}}
      - {{id: hist, type: history, input: sim}}
      - {{id: out, type: mqtt_out, input: win, connection: plant, topic: "data/{{key}}"}}
      - {{id: out2, type: mqtt_out, input: push, connection: plant, topic: "push/{{key}}"}}
"""


def get(gw: Any, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.console.port}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def post_garbage(gw: Any) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{gw.console.port}/ingest/push",
        data=b'{"value": ',
        headers={"Authorization": "Bearer 0123456789abcdef0123", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_the_previous_releases_databases_work(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    missing = [n for n in ("state.db", "outbox.db", "alerts.db", "deadletter.db") if not (FIXTURES / n).is_file()]
    assert not missing, f"release 0.1.0 databases missing from {FIXTURES}: {missing}"
    data = tmp_path / "data"
    shutil.copytree(FIXTURES, data)
    with mqtt_client(mosquitto, subscribe="push/#") as sub:
        async with running_gateway(config(data, mosquitto.port)) as gw:
            # the window's partials came back
            assert node(gw, "p", "win").open_windows() == 2
            # the outbox's two waiting messages go out, marked as replayed
            await wait_for(lambda: len(sub.messages) >= 2, timeout=30)
            bodies = [json.loads(m.payload) for m in sub.messages]
            assert sorted(b["value"] for b in bodies) == [1.5, 2.5]
            assert all(b["replayed"] for b in bodies)
            # alerts, dead letters and history read through the API
            alerts = await asyncio.to_thread(get, gw, "/api/alerts")
            listed = alerts["alerts"] if isinstance(alerts, dict) else alerts
            assert len(listed) == 5 and {a["alert_key"] for a in listed} == {"p/hot/a"}
            # a new dead letter goes into the old table beside the old one
            status = await asyncio.to_thread(post_garbage, gw)
            assert status == 400
            await wait_for(lambda: gw.dead_letters.total >= 1, timeout=10)
            hist = await asyncio.to_thread(get, gw, "/api/history?key=a&from=0&to=4102444800")
            assert hist["points"], hist
    con = sqlite3.connect(data / "state.db")
    try:
        assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        con.close()
    # every file now carries the newest schema version this Sluice knows
    assert versions(data) == {name: schema.version for name, schema in known_schemas().items()}
    con = sqlite3.connect(data / "deadletter.db")
    try:
        reasons = [r[0] for r in con.execute("SELECT reason FROM dead_letters ORDER BY id")]
    finally:
        con.close()
    assert len(reasons) == 2 and all("not JSON" in r for r in reasons), reasons


ROOT = Path(__file__).resolve().parents[2]


def versions(data: Path) -> dict[str, int]:
    out = {}
    for name in known_schemas():
        con = sqlite3.connect(f"file:{data / name}?mode=ro", uri=True)
        try:
            out[name] = con.execute("PRAGMA user_version").fetchone()[0]
        finally:
            con.close()
    return out


def digests(data: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data.iterdir()) if p.is_file()}


def set_version(path: Path, version: int) -> None:
    con = sqlite3.connect(path)
    try:
        con.execute(f"PRAGMA user_version={version}")
        con.commit()
    finally:
        con.close()


def sluice_run(config_text: str, tmp_path: Path, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """``sluice run CONFIG`` in a child process; ``prelude`` runs first in it (a fault injected there)."""
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(config_text)
    code = f"{prelude}\nimport sys\nfrom gateway.cli import main\nsys.exit(main(['run', {str(cfg)!r}]))"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("name", sorted(known_schemas()))
def test_a_file_from_a_newer_sluice_is_refused_and_nothing_is_changed(tmp_path: Path, name: str) -> None:
    """A downgrade after an upgrade: the gateway stops at start, saying which file and both versions,
    and no file of the data directory is touched (the others are not upgraded either)."""
    data = tmp_path / "data"
    shutil.copytree(FIXTURES, data)
    known = known_schemas()[name].version
    set_version(data / name, known + 1)
    before = digests(data)
    out = sluice_run(config(data, free_port()), tmp_path)
    assert out.returncode == 1, out.stderr
    assert f"{data / name}: the" in out.stderr, out.stderr
    assert f"schema version {known + 1} is newer than this Sluice knows ({known}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    after = digests(data)
    assert {n: after[n] for n in before} == before


def test_a_failing_step_is_rolled_back_and_named(tmp_path: Path) -> None:
    """Fault injection at the one seam there is: a step appended to the alerts schema in the child
    process (no real upgrade fails on demand). Its first statement succeeds, its second fails; the
    file must be left exactly as it was, and the error names the file and the step."""
    data = tmp_path / "data"
    shutil.copytree(FIXTURES, data)
    for name, schema in known_schemas().items():  # every file at the current version first
        con = sqlite3.connect(data / name)
        try:
            migrate(con, data / name, schema)
        finally:
            con.close()
    before = (data / "alerts.db").read_bytes()
    prelude = (
        "import gateway.alerts as a\n"
        "from gateway._migrate import Schema, Step\n"
        "a.SCHEMA = Schema(a.SCHEMA.store, (*a.SCHEMA.steps, Step('bad step', "
        "'CREATE TABLE half_done (x); INSERT INTO no_such_table VALUES (1)')))"
    )
    out = sluice_run(config(data, free_port()), tmp_path, prelude)
    assert out.returncode == 1, out.stderr
    step = known_schemas()["alerts.db"].version + 1
    assert f"{data / 'alerts.db'}: upgrading the alerts schema failed at step {step} (bad step)" in out.stderr
    assert "no such table: no_such_table" in out.stderr and f"left at version {step - 1}" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert (data / "alerts.db").read_bytes() == before


def test_sluice_state_refuses_a_state_store_from_a_newer_sluice(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(FIXTURES, data)
    known = known_schemas()["state.db"].version
    set_version(data / "state.db", known + 1)
    before = (data / "state.db").read_bytes()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(config(data, free_port()))
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "state", "reset-watermark", str(cfg), "--pipeline", "p", "--node", "win"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 1, out
    assert f"schema version {known + 1} is newer than this Sluice knows ({known}" in out.stderr, out.stderr
    assert (data / "state.db").read_bytes() == before
