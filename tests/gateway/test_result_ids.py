"""Window results after a SIGKILL: one stable result id each, and none queued twice.

A real `sluice run` reads QoS 1 readings (persistent session) from a real Mosquitto into a
tumbling window and publishes its results through the outbox. The state checkpoint is kept far
apart (``checkpoint_interval: 1h``), so when the process is killed the saved state is older than
the window result already handed to the outbox: the broker redelivers the readings, the restarted
gateway computes the same window again — and must not publish it a second time. Before, it went
out again as a new message (new ``seq``, ``replayed: false``) that a consumer could only tell
apart by comparing (key, window start).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._util import MosquittoBroker, free_port, mqtt_client, wait_for_sync
from tests.gateway._harness import NO_AUTH

ROOT = Path(__file__).resolve().parents[2]


def _get(port: int, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


class Runs:
    def __init__(self, tmp_path: Path, config: Path, port: int):
        self.tmp_path = tmp_path
        self.config = config
        self.port = port
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def log(self) -> str:
        return "".join((self.tmp_path / f"run{i}.log").read_text(errors="replace") for i in range(len(self.procs)))

    def start(self) -> subprocess.Popen[bytes]:
        with (self.tmp_path / f"run{len(self.procs)}.log").open("wb") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run", str(self.config)],
                cwd=self.tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=f,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        self.procs.append(proc)
        wait_for_sync(
            lambda: ((h := _get(self.port, "/healthz")) is not None and h["state"] == "running") or proc.poll(),
            timeout=30,
        )
        assert proc.poll() is None, self.log
        return proc

    def window(self) -> dict[str, Any]:
        pipes = _get(self.port, "/api/pipelines")
        assert pipes is not None
        return next(n for n in pipes["pipelines"][0]["nodes"] if n["id"] == "w")


@pytest.fixture
def runs(tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator[Runs]:
    port = free_port()
    config = tmp_path / "ids.yaml"
    config.write_text(
        f"""\
gateway: {{id: gw-ids, data_dir: "{tmp_path}/data", state: {{checkpoint_interval: 1h}}}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {mosquitto.port}}}
pipelines:
  - name: p
    nodes:
      - {{id: temp, type: mqtt, connection: plant, topic: "dev/+", key: "topic[1]", qos: 1}}
      - {{id: w, type: window, input: temp, kind: tumbling, size: 10s, aggregate: [count, sum]}}
      - {{id: out, type: mqtt_out, input: w, connection: plant, topic: "res/{{key}}"}}
console: {{port: {port}{NO_AUTH}}}
"""
    )
    r = Runs(tmp_path, config, port)
    yield r
    for p in r.procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def again_seq(got: list[dict[str, Any]]) -> int:
    return next(r["seq"] for r in got if r["value"]["window_start"] == 1010.0)


def test_a_result_handed_to_the_outbox_before_a_sigkill_is_not_published_again(
    runs: Runs, mosquitto: MosquittoBroker
) -> None:
    with mqtt_client(mosquitto, subscribe="res/#") as sub, mqtt_client(mosquitto) as pub:

        def results() -> list[dict[str, Any]]:
            return [json.loads(m.payload) for m in sub.received("res/s1")]

        first = runs.start()
        # the source subscribes after start: publish until the window has taken one reading
        wait_for_sync(
            lambda: (
                runs.window()["counters"]["in"] > 0
                or pub.publish("dev/s1", json.dumps({"value": 1.0, "ts": 1000.0}), qos=1)
            ),
            timeout=15,
            interval=0.2,
        )
        # the first checkpoint (about a second after start) is the last one in this run: the
        # readings below are held unacknowledged, and the state saved does not know them
        wait_for_sync(lambda: _get(runs.port, "/healthz")["state_store"]["commits"] >= 1, timeout=15)
        for t in range(1, 10):
            pub.publish("dev/s1", json.dumps({"value": 1.0, "ts": 1000.0 + t}), qos=1)
        pub.publish("dev/s1", json.dumps({"value": 5.0, "ts": 1010.0}), qos=1)  # closes [1000, 1010)
        wait_for_sync(lambda: results(), timeout=15)
        (before,) = results()
        assert before["value"]["window_start"] == 1000.0 and before["value"]["count"] >= 10

        first.kill()  # SIGKILL: the state saved is from before these readings, none acknowledged
        first.wait()
        runs.start()
        # the broker redelivers those ten readings (and any probe after the checkpoint); the
        # window computes [1000, 1010) again
        wait_for_sync(lambda: runs.window()["counters"]["in"] >= 10, timeout=20)
        pub.publish("dev/s1", json.dumps({"value": 1.0, "ts": 1020.0}), qos=1)  # closes [1010, 1020)
        wait_for_sync(lambda: any(r["value"]["window_start"] == 1010.0 for r in results()), timeout=15)

        got = results()
        # one message per result: the outbox may send a message again (same seq, replayed: true)
        # when the kill came before it saw the PUBACK, but a result is never queued a second time
        seqs: dict[float, set[int]] = {}
        for r in got:
            seqs.setdefault(r["value"]["window_start"], set()).add(r["seq"])
        assert seqs == {1000.0: {before["seq"]}, 1010.0: {again_seq(got)}}, got
        assert all(r["replayed"] for r in got[1:] if r["value"]["window_start"] == 1000.0), got
        # the stable id of each result, the consumer's de-duplication key
        assert {r["result_id"] for r in got} == {"p/w/s1/1000.0/1010.0", "p/w/s1/1010.0/1020.0"}, got
        again = next(r for r in got if r["value"]["window_start"] == 1010.0)
        assert again["value"] == {"count": 1.0, "sum": 5.0, "window_start": 1010.0, "window_end": 1020.0}
        health = _get(runs.port, "/healthz")
        assert health["outbox"]["duplicates"] == 1, health["outbox"]
