"""sluice backup / restore: a snapshot taken while the gateway writes comes back exactly; bad archives are refused."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from gateway._migrate import known_schemas
from tests._util import MosquittoBroker, free_port, mqtt_client, wait_for_sync

ROOT = Path(__file__).resolve().parents[2]


def config(path: Path, data: Path, port: int, gateway_id: str = "gw-bk") -> Path:
    path.write_text(
        f"""\
gateway: {{id: {gateway_id}, data_dir: "{data}"}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {port}, reconnect_max: 1s}}
console: {{enabled: false}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, interval: 2ms, seed: 7,
          sensors: [{{key: a, base: 50.0, amplitude: 45.0, period: 2s}}, {{key: b, base: 10.0}}]}}
      - {{id: win, type: window, input: sim, kind: tumbling, size: 1h, aggregate: mean}}
      - {{id: hot, type: threshold, input: sim, above: 90, clear_below: 80}}
      - {{id: alerts, type: alert, input: hot}}
      - {{id: out, type: mqtt_out, input: sim, connection: plant, topic: "data/{{key}}"}}
"""
    )
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def count(db: Path, table: str) -> int:
    try:
        return int(rows(db, f"SELECT count(*) FROM {table}")[0][0])
    except sqlite3.Error:
        return 0


def test_backup_under_load_restores_exactly_and_replays(tmp_path: Path, mosquitto_factory: Any) -> None:
    port = free_port()  # the broker is down while the gateway runs: the outbox fills
    data = tmp_path / "data"
    cfg = config(tmp_path / "gw.yaml", data, port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", str(cfg)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    archive = tmp_path / "b.tar.gz"
    try:
        wait_for_sync(lambda: count(data / "outbox.db", "outbox") > 500, timeout=60)
        wait_for_sync(lambda: count(data / "alerts.db", "alerts") > 0, timeout=60)
        wait_for_sync(lambda: count(data / "state.db", "state") > 0, timeout=60)
        made = cli("backup", str(cfg), "-o", str(archive))  # while the gateway writes
        assert made.returncode == 0, made.stderr
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-3000:]
    assert oct(archive.stat().st_mode & 0o777) == "0o600"

    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        tar.extractall(tmp_path / "unpacked", filter="data")
    snap = tmp_path / "unpacked" / "data"
    assert manifest["gateway_id"] == "gw-bk" and "data/outbox.db" in manifest["files"]
    for db in ("outbox.db", "alerts.db", "state.db"):
        assert rows(snap / db, "PRAGMA integrity_check") == [("ok",)]

    # a fresh SD card: the same config text, an empty data dir elsewhere
    data2 = tmp_path / "new-card"
    cfg2 = config(tmp_path / "gw2.yaml", data2, port)
    done = cli("restore", str(archive), str(cfg2))
    assert done.returncode == 0, done.stderr
    for db, sql in (
        ("outbox.db", "SELECT * FROM outbox ORDER BY id"),
        ("alerts.db", "SELECT * FROM alerts ORDER BY id"),
        ("state.db", "SELECT * FROM state ORDER BY 1, 2, 3"),
    ):
        assert rows(data2 / db, sql) == rows(snap / db, sql), db
    expected = {r[0] for r in rows(snap / "outbox.db", "SELECT id FROM outbox")}

    # the restored gateway delivers what was waiting in the backup's outbox
    broker: MosquittoBroker = mosquitto_factory(port=port)
    with mqtt_client(broker, subscribe="data/#") as sub:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", str(cfg2)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_sync(
                lambda: sum(json.loads(m.payload)["replayed"] for m in sub.messages) >= len(expected), timeout=120
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def _small_backup(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    data.mkdir()
    con = sqlite3.connect(data / "state.db")
    con.execute("CREATE TABLE t (x)")
    con.executemany("INSERT INTO t VALUES (?)", [(os.urandom(64),) for _ in range(2000)])
    con.commit()
    con.close()
    cfg = config(tmp_path / "gw.yaml", data, free_port())
    archive = tmp_path / "b.tar.gz"
    assert cli("backup", str(cfg), "-o", str(archive)).returncode == 0
    return cfg, archive


def test_a_database_file_that_is_no_database_is_named_not_a_traceback(tmp_path: Path) -> None:
    """The installer takes a backup before an upgrade and shows what stopped it: a damaged file is
    named in one line (it was a Python traceback), and no archive is left."""
    cfg, archive = _small_backup(tmp_path)
    archive.unlink()
    (tmp_path / "data" / "alerts.db").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    res = cli("backup", str(cfg), "-o", str(archive))
    assert res.returncode == 1
    assert res.stderr.startswith("sluice backup: alerts.db is damaged") and "Traceback" not in res.stderr, res.stderr
    assert not archive.exists() and not list(tmp_path.glob("b.tar.gz*"))


def test_a_truncated_archive_is_refused_and_nothing_written(tmp_path: Path) -> None:
    _, archive = _small_backup(tmp_path)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    target = config(tmp_path / "other.yaml", tmp_path / "fresh", free_port())
    res = cli("restore", str(archive), str(target))
    assert res.returncode == 1
    assert "damaged or truncated" in res.stderr, res.stderr
    assert not (tmp_path / "fresh").exists()


def test_a_tampered_file_fails_its_checksum(tmp_path: Path) -> None:
    _, archive = _small_backup(tmp_path)
    unpacked = tmp_path / "u"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    db = unpacked / "data" / "state.db"
    body = bytearray(db.read_bytes())
    body[-10] ^= 0xFF
    db.write_bytes(bytes(body))
    bad = tmp_path / "bad.tar.gz"
    with gzip.open(bad, "wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name in ("manifest.json", "config.yaml", "data/state.db"):
            tar.add(unpacked / name, arcname=name)
    res = cli("restore", str(bad), str(config(tmp_path / "o.yaml", tmp_path / "fresh", free_port())))
    assert res.returncode == 1 and "data/state.db does not match its checksum" in res.stderr, res.stderr


def test_another_gateways_backup_or_existing_state_needs_force(tmp_path: Path) -> None:
    cfg, archive = _small_backup(tmp_path)
    other = config(tmp_path / "o.yaml", tmp_path / "fresh", free_port(), gateway_id="gw-other")
    res = cli("restore", str(archive), str(other))
    assert res.returncode == 1 and "backup of gateway 'gw-bk'" in res.stderr, res.stderr
    res = cli("restore", str(archive), str(cfg))  # its own data dir still holds state
    assert res.returncode == 1 and "already holds a gateway's state" in res.stderr, res.stderr
    res = cli("restore", str(archive), str(cfg), "--force")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "data.before-restore" / "state.db").exists()


def test_a_backup_from_a_newer_schema_is_refused_and_an_older_one_restored(tmp_path: Path) -> None:
    """An archive is as new as its databases: an older schema is restored (the gateway upgrades it at
    start); a schema newer than this Sluice knows is refused before anything is written."""
    fixtures = ROOT / "tests" / "fixtures" / "release-0.1.0"
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(fixtures, old)
    shutil.copytree(fixtures, new)
    known = known_schemas()["alerts.db"].version
    con = sqlite3.connect(new / "alerts.db")
    con.execute(f"PRAGMA user_version={known + 1}")
    con.commit()
    con.close()
    archives = {}
    for name, data in (("old", old), ("new", new)):
        archives[name] = tmp_path / f"{name}.tar.gz"
        res = cli("backup", str(config(tmp_path / f"{name}.yaml", data, free_port())), "-o", str(archives[name]))
        assert res.returncode == 0, res.stderr
    target = config(tmp_path / "t.yaml", tmp_path / "fresh", free_port())
    res = cli("restore", str(archives["new"]), str(target))
    assert res.returncode == 1, res.stderr
    assert f"alerts.db has schema version {known + 1}, newer than this Sluice" in res.stderr, res.stderr
    assert f"knows ({known})" in res.stderr and "Nothing was restored" in res.stderr, res.stderr
    assert not (tmp_path / "fresh").exists()
    res = cli("restore", str(archives["old"]), str(target))
    assert res.returncode == 0, res.stderr
    assert rows(tmp_path / "fresh" / "alerts.db", "PRAGMA user_version") == [(0,)]
    assert count(tmp_path / "fresh" / "alerts.db", "alerts") == 5
