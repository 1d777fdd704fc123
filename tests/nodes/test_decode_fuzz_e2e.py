"""The decode fuzz's hostile payloads end to end: a gateway run as ``sluice run`` in its own process,
fed through real peers — HTTP push with an aiohttp client to the console port, MQTT through a
real Mosquitto, serial JSON lines and CSV through pty pairs.

Each pipeline reaches every store (window state, history, alerts, outbox). After each payload a
probe reading with a fresh key goes the same way; it must come out of the outbox on the broker,
so the process is alive and every store still writes. At the end no store had to drop a record
(the sources refused what no store can hold), and nothing was logged as a traceback.
Few examples (the wide fuzz is test_decode_fuzz.py); derandomized in CI like every property test.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings

from firmware_bridges.simulators import PtyDevice
from tests._util import MosquittoBroker, MqttTestClient, find_mosquitto, free_port, mqtt_client, wait_for_sync
from tests.nodes.test_decode_fuzz import PAYLOADS

TOKEN = "fuzz-ingest-token-0123456789"
E2E = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
_probe = itertools.count()


def _stores(name: str, source: str) -> str:
    return f"""\
  - name: {name}
    nodes:
      - {source}
      - {{id: win, type: window, input: src, kind: count, count: 2, aggregate: mean}}
      - {{id: hot, type: threshold, input: src, above: 0, clear_below: -1}}
      - {{id: book, type: alert, input: hot, connection: plant}}
      - {{id: hist, type: history, input: src}}
      - {{id: out, type: mqtt_out, input: [src, win], connection: plant, topic: "out/{name}/{{key}}"}}
"""


@dataclass
class LiveGateway:
    proc: subprocess.Popen[bytes]
    base: str
    log: Path
    sub: MqttTestClient
    pub: MqttTestClient
    serial_json: PtyDevice
    serial_csv: PtyDevice

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the gateway exited ({self.proc.returncode}):\n{self.log.read_text()[-4000:]}")

    def probe_through(self, pipeline: str, send: Callable[[str], None]) -> None:
        """Send a probe with a fresh key the same way; wait until the outbox published it."""
        key = f"probe{next(_probe)}"
        send(key)

        def arrived() -> bool:
            self.alive()
            return any(m.topic.startswith(f"out/{pipeline}/{key}") for m in self.sub.messages)

        wait_for_sync(arrived, timeout=30, message=f"probe {key} out of pipeline {pipeline}")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            return r.read().decode()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    binary = find_mosquitto()
    if binary is None:
        pytest.fail("mosquitto is not installed: run scripts/ensure_mosquitto.sh", pytrace=False)
    root = tmp_path_factory.mktemp("fuzz-e2e")
    broker = MosquittoBroker(binary, root / "mosquitto", free_port()).start()
    port = free_port()
    cfg = root / "gateway.yaml"
    with PtyDevice() as sj, PtyDevice() as sc:
        cfg.write_text(
            f"""\
gateway: {{id: fuzz, data_dir: "{root / "data"}", state: {{checkpoint_interval: 0.2s}}}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {broker.port}, reconnect_max: 1s}}
pipelines:
"""
            + _stores("http", f'{{id: src, type: http, token: "{TOKEN}", codec: {{type: json, max_line: 1048576}}}}')
            + _stores("mqtt", '{id: src, type: mqtt, connection: plant, topic: "in/#", key: "topic[1]"}')
            + _stores(
                "sjson", f'{{id: src, type: serial, port: "{sj.path}", codec: {{type: json, max_line: 1048576}}}}'
            )
            + _stores(
                "scsv",
                f'{{id: src, type: serial, port: "{sc.path}", '
                "codec: {type: csv, columns: [k, value], device_field: k}}",
            )
            + f"console: {{host: 127.0.0.1, port: {port}, auth: false}}\n"
        )
        log = root / "gateway.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run", str(cfg), "--log-level", "warning"],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=root,
                env={**os.environ, "PYTHONWARNINGS": ""},
            )
        try:
            with mqtt_client(broker, subscribe=["out/#"]) as sub, mqtt_client(broker) as pub:
                gw = LiveGateway(proc, f"http://127.0.0.1:{port}", log, sub, pub, sj, sc)

                def up() -> bool:
                    gw.alive()
                    try:
                        with urllib.request.urlopen(gw.base + "/healthz", timeout=30) as r:
                            return r.status == 200
                    except OSError:
                        return False

                wait_for_sync(up, timeout=120, message="the gateway's console answers /healthz")
                for name in SENDERS:  # every pipeline runs before the first payload
                    gw.probe_through(name, lambda key, name=name: SENDERS[name](gw, PROBE[name](key)))  # type: ignore[misc]
                yield gw
                gw.alive()
                text = gw.metrics()
                for line in text.splitlines():
                    if line.startswith('sluice_store_rejected_records_total{store="outbox"}'):
                        continue  # a key no MQTT topic may hold is refused by design, and dead-lettered:
                        # sluice_dead_letters_unwritten below says none of those was lost
                    if line.startswith(("sluice_store_rejected_records", "sluice_dead_letters_unwritten")):
                        assert line.endswith(" 0.0"), line
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            broker.stop()
        text = log.read_text()
        assert "Traceback" not in text, text[-4000:]


def _post(gw: LiveGateway, body: bytes) -> None:
    async def go() -> int:
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{gw.base}/ingest/src", data=body, headers={"Authorization": f"Bearer {TOKEN}"}) as resp,
        ):
            await resp.read()
            return resp.status

    assert asyncio.run(go()) in (202, 400, 413)


def _publish(gw: LiveGateway, payload: bytes, key: str = "fuzz") -> None:
    gw.pub.publish(f"in/{key}", payload, qos=1)


def _serial(dev: PtyDevice, data: bytes) -> None:
    asyncio.run(dev.send(data if data.endswith(b"\n") else data + b"\n"))


SENDERS: dict[str, Callable[[LiveGateway, Any], None]] = {
    "http": lambda gw, body: _post(gw, body),
    "mqtt": lambda gw, msg: _publish(gw, *msg) if isinstance(msg, tuple) else _publish(gw, msg),
    "sjson": lambda gw, data: _serial(gw.serial_json, data),
    "scsv": lambda gw, data: _serial(gw.serial_csv, data),
}
PROBE: dict[str, Callable[[str], Any]] = {
    "http": lambda key: f'{{"{key}": 1}}'.encode(),
    "mqtt": lambda key: (b'{"value": 1}', key),
    "sjson": lambda key: f'{{"{key}": 1}}\n'.encode(),
    "scsv": lambda key: f"{key},1\n".encode(),
}


@pytest.mark.parametrize("pipeline", list(SENDERS))
def test_hostile_payloads_end_to_end(live: LiveGateway, pipeline: str) -> None:
    send = SENDERS[pipeline]

    @E2E
    @given(payload=PAYLOADS)
    def run(payload: bytes) -> None:
        send(live, payload)
        live.probe_through(pipeline, lambda key: send(live, PROBE[pipeline](key)))

    run()
