"""Steps of the system clock under a real `sluice run`: readings without a time of their own are never late.

The gateway runs as a subprocess under libfaketime (Debian package `faketime`), which fakes only
the wall clock (``FAKETIME_DONT_FAKE_MONOTONIC=1``) from a timestamp file the test rewrites:
−1 h (an NTP step on a Pi without an RTC), a restart while the clock is still an hour behind,
then +1 h back. Readings come over a real Mosquitto without a ``ts`` field, so they are stamped
with ingest time; a tumbling window counts them. With ingest time read from the system clock,
the −1 h step made every reading late for an hour (dropped), and a forward step closed the open
windows early and jumped an hour ahead.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._util import MosquittoBroker, free_port, mqtt_client, wait_for_sync
from tests.gateway._harness import NO_AUTH

ROOT = Path(__file__).resolve().parents[2]
SIZE = 2.0  # window size, seconds
_LIBS = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
)


@pytest.fixture(scope="session")
def libfaketime() -> str:
    for lib in _LIBS:
        if os.path.exists(lib):
            return lib
    pytest.fail("libfaketime is not installed: run scripts/install_test_peers.sh (apt-get install faketime)")


def _get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return json.loads(resp.read())


def _healthz(port: int) -> Any:
    try:
        return _get(port, "/healthz")
    except OSError:
        return None


class FakedGateway:
    """`sluice run` under libfaketime; ``step(offset)`` rewrites the fake wall clock's offset."""

    def __init__(self, tmp_path: Path, lib: str, config: Path, port: int):
        self.tmp_path = tmp_path
        self.lib = lib
        self.config = config
        self.port = port
        self.clock_file = tmp_path / "faketime"
        self.step("+0")
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def step(self, offset: str) -> None:
        tmp = self.clock_file.with_suffix(".tmp")
        tmp.write_text(offset + "\n")
        os.replace(tmp, self.clock_file)

    @property
    def log(self) -> str:
        return "".join(
            (self.tmp_path / f"run{i}.log").read_text(errors="replace")
            for i in range(self.runs)
            if (self.tmp_path / f"run{i}.log").exists()
        )

    def start(self) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "LD_PRELOAD": self.lib,
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_TIMESTAMP_FILE": str(self.clock_file),
            "FAKETIME_CACHE_DURATION": "1",
        }
        with (self.tmp_path / f"run{self.runs}.log").open("wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run", str(self.config)],
                cwd=self.tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=f,
                env=env,
            )
        self.runs += 1
        wait_for_sync(
            lambda: ((h := _healthz(self.port)) is not None and h.get("state") == "running") or self.proc.poll(),
            timeout=30,
        )
        assert self.proc.poll() is None, self.log

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=30) == 0, self.log

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def node(self, node_id: str) -> dict[str, Any]:
        pipes = _get(self.port, "/api/pipelines")["pipelines"]
        return next(n for n in pipes[0]["nodes"] if n["id"] == node_id)

    def window(self) -> dict[str, Any]:
        return self.node("w")


@pytest.fixture
def faked(tmp_path: Path, libfaketime: str, mosquitto: MosquittoBroker) -> Iterator[FakedGateway]:
    port = free_port()
    config = tmp_path / "clock.yaml"
    config.write_text(
        f"""\
gateway: {{id: gw-clock, data_dir: "{tmp_path}/data"}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {mosquitto.port}}}
pipelines:
  - name: p
    nodes:
      - {{id: temp, type: mqtt, connection: plant, topic: "clock/+", key: "topic[1]"}}
      - {{id: real, type: filter, input: temp, where: 'key != "probe"'}}
      - {{id: w, type: window, input: real, kind: tumbling, size: {SIZE}s, aggregate: count,
          idle_timeout: 1s}}
      - {{id: out, type: mqtt_out, input: w, connection: plant, topic: "clock-out/{{key}}"}}
console: {{port: {port}{NO_AUTH}}}
"""
    )
    gw = FakedGateway(tmp_path, libfaketime, config, port)
    yield gw
    gw.kill()


def _uptime(gw: FakedGateway) -> float:
    """The gateway's uptime as its own (faked) wall clock sees it: it jumps when the step took effect."""
    h = _healthz(gw.port)
    return float(h["uptime"]) if h else 0.0


def test_wall_clock_steps_neither_drop_readings_nor_close_windows_early(
    faked: FakedGateway, mosquitto: MosquittoBroker
) -> None:
    sent = 0
    with mqtt_client(mosquitto, subscribe="clock-out/#") as client:

        def publish(n: int) -> None:
            nonlocal sent
            for _ in range(n):
                client.publish("clock/s1", json.dumps({"value": 1.0}), qos=1)
                sent += 1
                time.sleep(0.05)  # the input's pace (not a synchronisation): a phase spans a few windows

        base = 0  # readings taken by the earlier runs (counters start again at a restart)

        def taken() -> int:
            return base + int(faked.window()["counters"]["in"])

        def subscribed() -> bool:
            """Publish a probe reading until the source has one: its subscription is in place."""
            if faked.node("temp")["counters"]["out"] > 0:
                return True
            client.publish("clock/probe", json.dumps({"value": 1.0}), qos=1)
            return False

        faked.start()
        wait_for_sync(subscribed, timeout=15, interval=0.2)
        publish(30)
        faked.step("-1h")  # NTP steps the clock an hour back
        wait_for_sync(lambda: _uptime(faked) < -3000, timeout=15)
        publish(30)
        wait_for_sync(lambda: taken() == sent, timeout=15)
        # a restart while the system clock is still an hour behind the saved watermark
        assert faked.window()["counters"]["late"] == 0, faked.window()["counters"]
        faked.stop()
        base = sent
        faked.start()
        wait_for_sync(subscribed, timeout=15, interval=0.2)
        publish(30)
        faked.step("+0")  # and an hour forward again
        wait_for_sync(lambda: _uptime(faked) > 3000, timeout=15)
        publish(30)
        wait_for_sync(lambda: taken() == sent, timeout=15)
        counters = faked.window()["counters"]
        assert counters["late"] == 0, (counters, faked.log[-3000:])
        assert counters["dropped"] == 0, counters

        # idle_timeout closes the last window; every reading is in exactly one window result
        def results() -> list[dict[str, Any]]:
            return [json.loads(m.payload) for m in client.received("clock-out/s1")]

        wait_for_sync(lambda: sum(r["value"] for r in results()) >= sent, timeout=20)
        got = results()
        assert sum(r["value"] for r in got) == sent
        # no window closed early: every window result holds at most a window's worth of readings
        # taken at 20 a second, and the windows follow each other without an hour's jump
        starts = sorted(r["ts"] - SIZE for r in got)
        assert all(b - a < 120 for a, b in itertools.pairwise(starts)), starts
        assert all(r["value"] <= SIZE * 20 + 1 for r in got), got
        assert {r["result_id"] for r in got} == {f"p/w/s1/{s!r}/{s + SIZE!r}" for s in starts}

    log = faked.log
    assert "the system clock stepped -3600" in log, log[-3000:]
    assert "the system clock stepped +3600" in log, log[-3000:]
    assert "the system clock is 3" in log  # the restart found it an hour behind the floor, and said so
    assert "Traceback" not in log
