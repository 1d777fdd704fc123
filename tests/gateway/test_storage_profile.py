"""gateway.storage: low_wear saves state less often and commits outbox and alerts without waiting for the disk."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.config import LOW_WEAR_CHECKPOINT, parse_config
from tests.gateway._harness import running_gateway


def text(tmp_path: Path, gateway_extra: str = "") -> str:
    return f"""\
gateway: {{id: gw-w, data_dir: "{tmp_path}/data"{gateway_extra}}}
console: {{enabled: false}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, interval: 50ms, sensors: [{{key: t}}]}}
      - {{id: out, type: log, input: sim, level: debug}}
"""


def test_low_wear_saves_state_less_often_unless_told(tmp_path: Path) -> None:
    durable = parse_config(text(tmp_path), "t.yaml", {}).config.gateway
    low = parse_config(text(tmp_path, ", storage: low_wear"), "t.yaml", {}).config.gateway
    told = parse_config(
        text(tmp_path, ", storage: low_wear, state: {checkpoint_interval: 2s}"), "t.yaml", {}
    ).config.gateway
    assert durable.state.checkpoint_interval == 1.0
    assert low.state.checkpoint_interval == LOW_WEAR_CHECKPOINT
    assert told.state.checkpoint_interval == 2.0


async def test_low_wear_commits_without_waiting_for_the_disk(tmp_path: Path) -> None:
    async with running_gateway(text(tmp_path / "a")) as gw:
        full = (gw.outbox.store.synchronous, gw.alerts.book.synchronous)
    async with running_gateway(text(tmp_path / "b", ", storage: low_wear")) as gw:
        normal = (gw.outbox.store.synchronous, gw.alerts.book.synchronous)
        # the connection itself runs at that level (SQLite's own answer: 1 = NORMAL, 2 = FULL)
        db = gw.alerts.book._db
        assert isinstance(db, sqlite3.Connection) and db.execute("PRAGMA synchronous").fetchone()[0] == 1
    assert full == ("FULL", "FULL") and normal == ("NORMAL", "NORMAL")
