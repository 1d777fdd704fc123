"""`sluice run` as a real process: start, serve the console, stop on SIGTERM with nothing lost."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._util import free_port, wait_for_sync
from tests.gateway._harness import NO_AUTH

ROOT = Path(__file__).resolve().parents[2]
# `python -c STUCK_RUN run CONFIG`: the CLI with the test-only `t_stuck` sink registered (only in that process)
STUCK_RUN = "import sys, tests.gateway._stuck_node; from gateway.cli import main; sys.exit(main(sys.argv[1:]))"


def fetch(port: int, path: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
        # the console's first request loads its web stack: seconds on a busy machine, so no tight bound
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except (ConnectionError, urllib.error.URLError):
        return 0, None


class Run:
    def __init__(self, proc: subprocess.Popen[bytes], stderr: Path):
        self.proc = proc
        self.stderr_path = stderr

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@pytest.fixture
def sluice_run(tmp_path: Path) -> Iterator[Any]:
    runs: list[Run] = []

    def start(config: str, *args: str, stuck_sink: bool = False) -> Run:
        cfg = tmp_path / f"run{len(runs)}.yaml"
        cfg.write_text(config)
        err = tmp_path / f"run{len(runs)}.stderr"
        cli = ["-c", STUCK_RUN] if stuck_sink else ["-m", "gateway.cli"]
        with err.open("wb") as f:
            proc = subprocess.Popen(
                [sys.executable, *cli, "run", str(cfg), *args],
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=f,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        run = Run(proc, err)
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
        run.proc.wait()


def flood_config(tmp_path: Path, port: int) -> str:
    # drift 360000/h at 10 ms steps makes each reading its round number: 0.0, 1.0, 2.0 ...
    sensor = "base: 0.0, amplitude: 0.0, noise: 0.0, drift: 360000.0"
    return f"""\
gateway: {{id: gw-cli, data_dir: "{tmp_path}/data", queue_size: 10, sink_queue_size: 10}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, interval: 10ms, realtime: false,
          sensors: [{{key: a, {sensor}}}, {{key: b, {sensor}}}]}}
      - {{id: shift, type: map, input: sim, value: "value + 0.0"}}
      - {{id: out, type: log, input: shift, prefix: EV}}
console: {{port: {port}{NO_AUTH}}}
"""


def test_sigterm_stops_cleanly_and_loses_nothing(tmp_path: Path, sluice_run: Any) -> None:
    port = free_port()
    run = sluice_run(flood_config(tmp_path, port))
    wait_for_sync(lambda: fetch(port, "/healthz")[0] == 200 or run.proc.poll() is not None, timeout=20)
    assert run.proc.poll() is None, run.stderr
    # wait until the source has pushed more than the queues hold: it is being held back
    wait_for_sync(
        lambda: fetch(port, "/api/pipelines")[1]["pipelines"][0]["nodes"][0]["counters"]["out"] > 3000, timeout=20
    )
    _, api = fetch(port, "/api/pipelines")
    queue = api["pipelines"][0]["nodes"][0]["queue"]
    assert queue["capacity"] <= queue["high_water"] <= queue["capacity"] + 2  # full: the source is held back
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=15) == 0, run.stderr
    err = run.stderr
    assert "Traceback" not in err
    assert "SIGTERM received: stopping" in err
    m = re.search(r"pipeline p stopped: sim in=(\d+) out=(\d+) errors=0, out in=(\d+) out=(\d+) errors=0", err)
    assert m, err[-2000:]
    accepted, sink_in, sink_out = int(m.group(2)), int(m.group(3)), int(m.group(4))
    assert accepted == sink_in == sink_out > 3000
    # the log sink's own lines: every accepted reading exactly once, in order, per sensor
    lines = re.findall(r"EV: ([ab]) (\S+)$", err, re.M)
    assert len(lines) == accepted
    for key in "ab":
        values = [float(v) for k, v in lines if k == key]
        assert values == [float(i) for i in range(len(values))]
    assert "gateway gw-cli stopped" in err


def test_sigint_with_finite_source(tmp_path: Path, sluice_run: Any) -> None:
    port = free_port()
    config = f"""\
gateway: {{id: gw-cli, data_dir: "{tmp_path}/data"}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, interval: 1ms, count: 50, seed: 1, sensors: [{{key: a}}, {{key: b}}]}}
      - {{id: out, type: log, input: sim, prefix: EV}}
console: {{port: {port}{NO_AUTH}}}
"""
    run = sluice_run(config, "--log-format", "json")
    wait_for_sync(
        lambda: (
            (fetch(port, "/api/pipelines")[1] or {"pipelines": [{"nodes": [{"state": ""}]}]})["pipelines"][0]["nodes"][
                0
            ]["state"]
            == "finished"
            or run.proc.poll() is not None
        ),
        timeout=20,
    )
    # a finished source is not a problem: the gateway keeps serving until told to stop
    status, health = fetch(port, "/healthz")
    assert status == 200 and health["status"] == "ok"
    run.proc.send_signal(signal.SIGINT)
    assert run.proc.wait(timeout=15) == 0, run.stderr
    records = [json.loads(line) for line in run.stderr.splitlines()]
    events = [r for r in records if r["msg"].startswith("EV: ")]
    assert len(events) == 100
    assert {r["logger"] for r in events} == {"sluice.p.out"}
    assert any(r["msg"].startswith("SIGINT received") for r in records)


def test_invalid_config_exits_1_without_traceback(tmp_path: Path, sluice_run: Any) -> None:
    run = sluice_run("gateway: {id: gw, bogus: 1}\npipelines:\n  - name: p\n    nodes: [{id: x, type: nope}]\n")
    assert run.proc.wait(timeout=30) == 1
    err = run.stderr
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines[0].endswith(
        "run0.yaml:1: gateway.bogus: unknown field 'bogus'; known fields: data_dir, id, "
        "log_format, log_level, queue_size, shutdown_timeout, sink_queue_size"
    ) or ("run0.yaml:1: gateway.bogus: unknown field 'bogus'; known fields: data_dir, id, " in lines[0])
    assert "run0.yaml:4: pipelines.0.nodes.0.type: unknown node type 'nope'" in lines[1]
    assert lines[-1] == "2 problems found"


def test_busy_console_port_exits_1_without_traceback(tmp_path: Path, sluice_run: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = sluice_run(f'gateway: {{id: gw, data_dir: "{tmp_path}/data"}}\nconsole: {{port: {port}{NO_AUTH}}}\n')
        assert run.proc.wait(timeout=30) == 1
    err = run.stderr
    assert "Traceback" not in err
    assert f"console cannot listen on 127.0.0.1:{port}" in err
    assert "(set console.port, or console.enabled: false)" in err


@pytest.mark.timeout(600)  # the demo loads its LLM at start in a niced thread: a minute and more on a busy machine
def test_demo_runs_without_a_config(tmp_path: Path, mosquitto: Any) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MQTT_PORT": str(mosquitto.port),
        "SLUICE_CONSOLE_PORT": str(port),
        "SLUICE_DATA_DIR": str(tmp_path / "data"),
        "SLUICE_GATEWAY_ID": "demo-test",
    }
    # /healthz shows its details to a session or API token only: give the demo's console one
    token = "slt_demo-test-monitoring-token"
    accounts = tmp_path / "data" / "console" / "users.json"
    accounts.parent.mkdir(parents=True)
    digest = hashlib.sha256(token.encode()).hexdigest()
    monitor = {"id": "t1", "name": "test", "role": "viewer", "digest": digest, "created": 0.0}
    accounts.write_text(json.dumps({"users": [], "tokens": [monitor]}))
    err = tmp_path / "demo.stderr"
    from tests._util import mqtt_client

    with mqtt_client(mosquitto, subscribe="sluice/demo-test/status") as sub, err.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=f,
        )
        try:
            # the gateway says when it runs (after the model has loaded); that is bound to come
            wait_for_sync(
                lambda: "gateway demo-test running" in err.read_text() or proc.poll() is not None, timeout=480
            )
            assert proc.poll() is None, err.read_text()
            wait_for_sync(lambda: fetch(port, "/healthz")[0] == 200, timeout=60)
            wait_for_sync(lambda: sub.received("sluice/demo-test/status"), timeout=60)

            # "online" goes out from the connect callback, a moment before the link counts as connected.
            # The demo's serial and Modbus devices need their simulators (make run starts them):
            # without them those sources are down, and only they may be reported.
            def broker_ok() -> bool:
                problems = fetch(port, "/healthz", token)[1]["problems"]
                return not [p for p in problems if "connection" in p]

            wait_for_sync(broker_ok, timeout=60)
            status, health = fetch(port, "/healthz", token)
            assert status == 200 and health["status"] in ("ok", "degraded"), health
            assert all(p.startswith("source plant_room/") for p in health["problems"]), health
            assert health["gateway_id"] == "demo-test" and health["pipelines"]["boiler"] == "running"
            assert json.loads(sub.received("sluice/demo-test/status")[0].payload)["state"] == "online"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        wait_for_sync(
            lambda: json.loads(sub.received("sluice/demo-test/status")[-1].payload)["state"] == "offline", timeout=60
        )
    text = err.read_text()
    assert "no config given: running the demo" in text
    assert f"console at http://127.0.0.1:{port}/" in text
    assert "Traceback" not in text


STUCK = """\
gateway: {{id: gw-cli, data_dir: "{data}", shutdown_timeout: {timeout}}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, interval: 1ms, count: 20, sensors: [{{key: a}}]}}
      - {{id: out, type: t_stuck, input: sim}}
console: {{enabled: false}}
"""


def test_second_signal_exits_at_once(tmp_path: Path, sluice_run: Any) -> None:
    # the sink never finishes, so the first SIGTERM's drain would wait a minute
    run = sluice_run(STUCK.format(data=tmp_path / "data", timeout="60s"), stuck_sink=True)
    wait_for_sync(lambda: "source p/sim finished" in run.stderr or run.proc.poll() is not None, timeout=20)
    run.proc.send_signal(signal.SIGTERM)
    wait_for_sync(lambda: "SIGTERM received: stopping (draining queues, at most 60s)" in run.stderr)
    assert run.proc.poll() is None  # still draining
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=10) == 1
    assert "second signal: exiting now without draining" in run.stderr
    assert "Traceback" not in run.stderr


def test_drain_gives_up_after_shutdown_timeout(tmp_path: Path, sluice_run: Any) -> None:
    run = sluice_run(STUCK.format(data=tmp_path / "data", timeout="500ms"), stuck_sink=True)
    wait_for_sync(lambda: "source p/sim finished" in run.stderr or run.proc.poll() is not None, timeout=20)
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=15) == 0
    err = run.stderr
    assert "Traceback" not in err
    # all 20 readings are stuck: one batch in the sink's hands, the rest in its queue
    assert "stop took longer than 0.5s; abandoning 20 queued events" in err, err[-1500:]


def test_unusable_data_dir_names_the_path(tmp_path: Path, sluice_run: Any) -> None:
    (tmp_path / "a_file").write_text("")
    run = sluice_run(f'gateway: {{id: gw, data_dir: "{tmp_path}/a_file/data"}}\nconsole: {{enabled: false}}\n')
    assert run.proc.wait(timeout=30) == 1
    assert "Traceback" not in run.stderr
    assert f"cannot run: {tmp_path}/a_file/data: Not a directory" in run.stderr
