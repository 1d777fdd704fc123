"""A device with a wrong clock: readings too far ahead are dead-lettered; a stalled watermark can be reset.

Through a real Mosquitto and the real gateway (engine, state store): one reading stamped
2100-01-01 used to move the window's watermark so that every later normal reading was late
(dropped, counted), and the saved watermark survived restarts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._util import MosquittoBroker, mqtt_client, wait_for
from tests.gateway._harness import NO_AUTH, get, node, running_gateway

ROOT = Path(__file__).resolve().parents[2]
YEAR_2100 = 4102444800.0


def config(tmp_path: Path, port: int, *, bound: str = "", console: str = "", loose: bool = False) -> str:
    second = """\
  - name: q
    nodes:
      - {id: loose, type: mqtt, connection: plant, topic: "loose/+", key: "topic[1]", max_future: 20m}
      - {id: out, type: log, input: loose}
"""
    return f"""\
gateway: {{id: gw-bound, data_dir: "{tmp_path}/data"}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {port}}}
pipelines:
  - name: p
    nodes:
      - {{id: temp, type: mqtt, connection: plant, topic: "dev/+", key: "topic[1]"{bound}}}
      - {{id: w, type: window, input: temp, kind: tumbling, size: 1s, aggregate: count}}
      - {{id: out, type: log, input: w}}
{second if loose else ""}{console}"""


async def _subscribed(gw: object, pub: object, topic: str, pipeline: str, source: str) -> None:
    src = node(gw, pipeline, source)  # type: ignore[arg-type]
    start = src.n_in

    def arrived() -> bool:
        if src.n_in > start:
            return True
        pub.publish(topic, json.dumps({"value": 0.0}), qos=0)  # type: ignore[attr-defined]
        return False

    await wait_for(arrived, timeout=15, interval=0.1)


async def test_a_reading_from_2100_is_dead_lettered_and_stalls_nothing(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    text = config(tmp_path, mosquitto.port, console=f"console: {{port: 0{NO_AUTH}}}\n")
    with mqtt_client(mosquitto) as pub:
        async with running_gateway(text) as gw:
            await _subscribed(gw, pub, "dev/probe", "p", "temp")
            w = node(gw, "p", "w")
            now = time.time()
            pub.publish("dev/bad", json.dumps({"value": 1.0, "ts": YEAR_2100}))
            pub.publish("dev/s1", json.dumps({"value": 1.0, "ts": now + 3}))
            pub.publish("dev/s1", json.dumps({"value": 1.0, "ts": now + 600}))  # 10 min ahead: over 5m
            for i in range(5):
                pub.publish("dev/s1", json.dumps({"value": 1.0, "ts": now + 4 + i}))
            await wait_for(lambda: node(gw, "p", "temp").n_in >= 9)
            await wait_for(lambda: w.n_in + node(gw, "p", "temp").n_errors >= node(gw, "p", "temp").n_in)
            assert w.n_late == 0 and w.n_dropped == 0, w.counters()
            assert w.watermark < now + 60
            assert node(gw, "p", "temp").n_errors == 2
            _, letters = await get(gw, "/api/deadletters")
            reasons = sorted(d["reason"] for d in letters["recent"] if d["node"] == "temp")
            assert len(reasons) == 2, letters
            bad = next(r for r in reasons if r.startswith("event time 2100-01-01T00:00:00Z is "))
            assert "ahead of ingest time" in bad and "(max_future 300s)" in bad, reasons


async def test_max_future_is_set_per_source(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    with mqtt_client(mosquitto) as pub:
        async with running_gateway(config(tmp_path, mosquitto.port, loose=True)) as gw:
            await _subscribed(gw, pub, "dev/probe", "p", "temp")
            await _subscribed(gw, pub, "loose/probe", "q", "loose")
            ahead = json.dumps({"value": 1.0, "ts": time.time() + 600})  # 10 minutes ahead
            pub.publish("dev/s1", ahead)  # default 5m: refused
            pub.publish("loose/s1", ahead)  # its own 20m: taken
            await wait_for(lambda: node(gw, "p", "temp").n_errors == 1 and node(gw, "q", "loose").n_out >= 2)
            assert node(gw, "q", "loose").n_errors == 0


def _reset(tmp_path: Path, cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "state", "reset-watermark", str(cfg), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def test_reset_watermark_unsticks_a_window_after_a_bad_reading(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    # 4 minutes ahead passes the default bound (5m), and still stalls windows of a second
    text = config(tmp_path, mosquitto.port)
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(text)
    with mqtt_client(mosquitto) as pub:
        async with running_gateway(text) as gw:
            await _subscribed(gw, pub, "dev/probe", "p", "temp")
            w = node(gw, "p", "w")
            pub.publish("dev/bad", json.dumps({"value": 1.0, "ts": time.time() + 240}))
            pub.publish("dev/s1", json.dumps({"value": 1.0, "ts": time.time()}))
            await wait_for(lambda: w.n_late >= 1)  # stalled: a normal reading is late
            refused = _reset(tmp_path, cfg, "--pipeline", "p", "--node", "w", "--future", "60")
            assert refused.returncode == 1 and "a gateway is running" in refused.stderr, refused
        wrong = _reset(tmp_path, cfg, "--pipeline", "p", "--node", "temp")
        assert wrong.returncode == 1 and "only a window node has a watermark" in wrong.stderr, wrong
        done = _reset(tmp_path, cfg, "--pipeline", "p", "--node", "w", "--future", "60")
        assert done.returncode == 0, done
        assert "p/w: watermark reset" in done.stdout and "dropped 1 windows" in done.stdout, done.stdout

        async with running_gateway(text) as gw:  # restored from state.db, as reset
            w = node(gw, "p", "w")
            assert w.watermark == float("-inf") and w.open_windows() == 0
            await _subscribed(gw, pub, "dev/probe", "p", "temp")
            now = time.time()
            for i in range(3):
                pub.publish("dev/s1", json.dumps({"value": 1.0, "ts": now + i}))
            await wait_for(lambda: w.n_in >= 4)
            assert w.n_late == 0
            assert now - 10 < w.watermark < now + 10


@pytest.mark.parametrize("value", ["5m", 300, "1h"])
def test_max_future_is_a_duration(tmp_path: Path, value: object) -> None:
    from gateway.config import parse_config

    text = config(tmp_path, 1883, bound=f", max_future: {value}")
    loaded = parse_config(text, "t.yaml", {})
    assert loaded.nodes["p"][0].max_future in (300.0, 3600.0)  # type: ignore[attr-defined]
