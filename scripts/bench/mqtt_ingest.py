#!/usr/bin/env python3
"""MQTT ingest benchmark: what one reading costs a subscriber, from the broker to an alert.

A fast publisher sends N JSON readings over K keys to a Mosquitto broker of our own. Broker and
publisher share core 0; the subscriber under test (the "subject") has core 1 to itself. Subjects,
run back to back in the same invocation, each against a fresh broker:

  bare     a gmqtt subscriber that only receives and json-decodes (the floor for Python); at
           --qos 1 it acknowledges each message itself (MQTT 5, optimistic_acknowledgement off)
  sluice_quiet  `sluice run` with the flow below, its console never opened: readiness and
           the end of the run are read from MQTT (the alerts), so its RSS is the gateway's own
  sluice   the same, its console in use: readiness and progress polled from /healthz and
           /api/pipelines every 0.1 s (the console's web stack loads at the first request);
           CPU figures and `ratio` come from this row, the memory goals from the one above
  nodered  Node-RED 4.x with `mqtt in` -> `function` (the same flow) -> `mqtt out`
           (installed with npm into .cache/bench/node-red on first use; skipped, with a
           message, when node/npm are absent)

Flows (--flow):
  realistic (default)  mqtt -> filter -> map (°F) -> per-key 10 s tumbling mean (event time)
                       -> threshold with hysteresis -> mqtt_out: every raise and clear is
                       published (about 35,000 alert messages per 200,000 readings). Each key
                       reads every 2.5 s of event time, ending a minute before the run.
  simple               mqtt -> filter -> map -> threshold -> mqtt_out on each reading
                       (about 2,000 alerts per 200,000 readings)

For each: msg/s, CPU µs per message (utime+stime of the subject from /proc/PID/stat over the
run / messages received), peak RSS (VmHWM), idle RSS (VmRSS once subscribed, before the run),
messages lost (sent - received), alerts published and the broker's
$SYS/broker/publish/messages/dropped. The output ends with one JSON line of every figure.

A run ends when the subject reports it received all N, when its count stayed put for 5 s after
the publisher finished (messages lost), or at a deadline of 30 s + N / 1,000 msg/s: a subject
that cannot tell its count meanwhile (the bare subscriber reports only at the end) is waited
for until then. A subject given up says why, in the log and under the table.

  .venv/bin/python scripts/bench/mqtt_ingest.py [--n 200000] [--keys 100] [--qos 0|1]
                                                 [--flow realistic|simple]
                                                 [--quick] [--skip-nodered]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import Mosquitto, compile_sources, find_mosquitto, free_port, pinned, stop_process

ROOT = Path(__file__).resolve().parents[2]
# SLUICE_BENCH_BIN overrides which `sluice` executable is measured.
SLUICE_BIN = Path(os.environ.get("SLUICE_BENCH_BIN") or ROOT / ".venv" / "bin" / "sluice")
NODERED_DIR = ROOT / ".cache" / "bench" / "node-red"
NODERED_VERSION = "4"  # npm range: the newest 4.x

DATA_FILTER = "bench/+/temp"
PROBE_TOPIC = "bench/probe/temp"
ALERT_TOPIC = "bench/alerts"
READY_TOPIC = "bench/ready"
DONE_TOPIC = "bench/done"
# The pipeline under test, in °C in and °F out: valid readings only, to Fahrenheit, alert above
# 194 °F (90 °C) and clear again below 185 °F (85 °C), per key.
VALID_MIN, VALID_MAX = -50.0, 150.0
ABOVE_F, CLEAR_F = 194.0, 185.0

GOAL_VS_NODERED = 2.0
GOAL_RATIO = 0.7
GOAL_SLUICE_RSS_MIB = 45.0
GOAL_SLUICE_IDLE_MIB = 35.0

POLL_INTERVAL = 0.1  # seconds between progress polls of sluice / Node-RED
IDLE_TIMEOUT = 5.0  # a run ends this long after the count stopped growing (messages lost)
# A subject that cannot say its count (the bare subscriber reports only at the end; Node-RED's
# HTTP endpoint may not answer while it is busy) is waited for until this deadline, based on N.
DEADLINE_BASE_S = 30.0
DEADLINE_MIN_RATE = 1000.0  # msg/s: a subject slower than this is given up
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[mqtt_ingest] {msg}", file=sys.stderr, flush=True)


# --- the data ------------------------------------------------------------------------------


def gen_values(n: int, keys: int, seed: int = 20251128) -> list[tuple[int, float]]:
    """Simple flow: (key index, value °C) for each reading: keys round-robin, values mostly
    20-80 °C, about 0.5 % spikes of 90.5-99.5 °C (alerts) and 0.1 % out-of-range glitches
    (filtered out)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.001:
            v = 999.0
        elif r < 0.006:
            v = round(rng.uniform(90.5, 99.5), 2)
        else:
            v = round(rng.uniform(20.0, 80.0), 2)
        out.append((i % keys, v))
    return out


# Realistic flow: each key reads every READING_DT s of event time, so a 10 s window holds 4
# readings of a key; a key's window is hot (every reading 90.5-99.5 °C, its mean above
# ABOVE_F) or normal (20-80 °C, below CLEAR_F), and changes from one window to the next with
# probability FLIP_P: that makes ~35,000 raise/clear messages per 200,000 readings.
WINDOW_S = 10.0
READING_DT = 2.5
FLIP_P = 0.7


def gen_realistic(n: int, keys: int, base: float = 0.0, seed: int = 20251207) -> list[tuple[int, float, float]]:
    """Realistic flow: (key index, event time, value °C) for each reading, keys round-robin,
    times from `base` (a multiple of WINDOW_S) on; 0.1 % glitches of 999 °C."""
    rng = random.Random(seed)
    per_window = int(WINDOW_S / READING_DT)
    hot = [False] * keys
    out = []
    for i in range(n):
        k, slot = i % keys, i // keys
        if slot % per_window == 0 and rng.random() < FLIP_P:
            hot[k] = not hot[k]
        if rng.random() < 0.001:
            v = 999.0
        elif hot[k]:
            v = round(rng.uniform(90.5, 99.5), 2)
        else:
            v = round(rng.uniform(20.0, 80.0), 2)
        out.append((k, base + slot * READING_DT, v))
    return out


def realistic_base(n: int, keys: int, now: float | None = None) -> float:
    """Event time of the first reading: the last one lands about a minute before `now`."""
    span = (n + keys - 1) // keys * READING_DT
    now = time.time() if now is None else now
    return (now - span - 60.0) // WINDOW_S * WINDOW_S


def key_name(k: int) -> str:
    return f"k{k:03d}"


def _hysteresis(means: list[tuple[int, float]]) -> tuple[int, int]:
    """(raised, cleared) of a per-key threshold with hysteresis over (key, °F) in order."""
    hot: dict[int, bool] = {}
    raised = cleared = 0
    for k, f in means:
        if not hot.get(k) and f > ABOVE_F:
            hot[k] = True
            raised += 1
        elif hot.get(k) and f < CLEAR_F:
            hot[k] = False
            cleared += 1
    return raised, cleared


def expected_alerts(values: list[tuple[int, float]]) -> tuple[int, int]:
    """Simple flow: (alerts raised, alerts cleared) that a per-key threshold with hysteresis
    must emit."""
    return _hysteresis([(k, v * 1.8 + 32.0) for k, v in values if VALID_MIN < v < VALID_MAX])


def window_means(readings: list[tuple[int, float, float]], per_key_close: bool = False) -> list[tuple[int, float]]:
    """Realistic flow: the (key, mean °F) of every tumbling window that closes, in the order
    they close. A window [start, start + 10 s) closes once a valid reading at or past its end
    arrives: from any key (a watermark, as Sluice's `window` node does) or, with
    `per_key_close`, from the same key (the Node-RED function). Windows still open at the end
    emit nothing."""
    out: list[tuple[int, float]] = []
    open_: dict[int, list[float]] = {}  # key -> [start, sum °F, count]
    wm = float("-inf")
    due = float("inf")  # the earliest end of an open window
    for k, ts, v in readings:
        if not VALID_MIN < v < VALID_MAX:
            continue
        f = v * 1.8 + 32.0
        start = (ts // WINDOW_S) * WINDOW_S
        if per_key_close:
            w = open_.get(k)
            if w is not None and start > w[0]:
                out.append((k, w[1] / w[2]))
                del open_[k]
        else:
            wm = max(wm, ts)
            if wm >= due:
                for kk in sorted((kk for kk, w in open_.items() if w[0] + WINDOW_S <= wm), key=lambda x: open_[x][0]):
                    w = open_.pop(kk)
                    out.append((kk, w[1] / w[2]))
                due = min((w[0] + WINDOW_S for w in open_.values()), default=float("inf"))
        w = open_.get(k)
        if w is None:
            open_[k] = [start, f, 1]
            due = min(due, start + WINDOW_S)
        elif start == w[0]:
            w[1] += f
            w[2] += 1
    return out


def expected_realistic(readings: list[tuple[int, float, float]], per_key_close: bool = False) -> tuple[int, int]:
    """Realistic flow: (raised, cleared) over the closed windows' means."""
    return _hysteresis(window_means(readings, per_key_close))


def expected_for(flow: str, n: int, keys: int) -> tuple[int, int, tuple[int, int] | None]:
    """(raised, cleared) Sluice must publish, and what the Node-RED function must, if other."""
    if flow == "simple":
        return (*expected_alerts(gen_values(n, keys)), None)
    readings = gen_realistic(n, keys)
    sl = expected_realistic(readings)
    nr = expected_realistic(readings, per_key_close=True)
    return sl[0], sl[1], None if nr == sl else nr


# --- /proc ----------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kib(pid: int, name: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# --- helpers ------------------------------------------------------------------------------


def http_get_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
            return resp.status, json.loads(body) if body else None
    except urllib.error.HTTPError as e:
        return e.code, None
    except (OSError, ValueError):
        return 0, None


# --- MQTT wire format, for the raw publisher ------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _mqtt_str(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


class Monitor:
    """A paho client in this process: watches $SYS, alerts and the subjects' ready/done
    messages, and publishes the readiness probes."""

    def __init__(self, port: int):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.lock = threading.Lock()
        self.sys: dict[str, tuple[float, str]] = {}
        self.alerts: list[bytes] = []
        self.last_alert_at = 0.0  # wall time the latest alert arrived
        self.ready = threading.Event()
        self.done: dict[str, Any] | None = None
        self.done_event = threading.Event()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-monitor-{port}")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("monitor client could not subscribe")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(
            [
                ("$SYS/broker/publish/messages/dropped", 0),
                ("$SYS/broker/publish/messages/received", 0),
                ("$SYS/broker/uptime", 0),
                (ALERT_TOPIC, 1),
                (READY_TOPIC, 1),
                (DONE_TOPIC, 1),
            ]
        )

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        with self.lock:
            if msg.topic.startswith("$SYS/"):
                self.sys[msg.topic] = (now, msg.payload.decode(errors="replace"))
            elif msg.topic == ALERT_TOPIC:
                self.alerts.append(msg.payload)
                self.last_alert_at = now
            elif msg.topic == READY_TOPIC:
                self.ready.set()
            elif msg.topic == DONE_TOPIC:
                with contextlib.suppress(ValueError):
                    self.done = json.loads(msg.payload)
                self.done_event.set()

    def probe(self, ts: float | None = None, value: float = 20.0) -> None:
        """A harmless reading; at `ts`, before the run's first reading, so that it does not
        move a window's watermark past the readings to come."""
        payload = json.dumps({"ts": time.time() if ts is None else ts, "value": value})
        self.client.publish(PROBE_TOPIC, payload, qos=0)

    def alert_count(self) -> int:
        with self.lock:
            return len(self.alerts)

    def sys_value(self, topic: str, newer_than: float = 0.0, timeout: float = 3.0) -> int | None:
        """The broker's $SYS counter as of a $SYS update sent after `newer_than`.

        Mosquitto republishes a counter only when it changed, so wait for the uptime (which
        changes every `sys_interval`) to be newer, then take the counter's latest value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                tick = self.sys.get("$SYS/broker/uptime")
            if tick and tick[0] > newer_than:
                break
            time.sleep(0.05)
        time.sleep(0.05)  # the counters of that tick arrive right behind it
        with self.lock:
            got = self.sys.get(topic)
        return int(float(got[1])) if got else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- subjects -------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    label: str
    skipped: str | None = None
    error: str | None = None
    received: int | None = None
    lost: int | None = None
    broker_dropped: int | None = None
    msgs_per_s: float | None = None
    us_per_msg: float | None = None
    peak_rss_mib: float | None = None
    idle_rss_mib: float | None = None
    rss_runs: list[float] = field(default_factory=list)  # VmRSS after each run (--runs), MiB
    slope_mib_per_run: float | None = None
    alerts: int | None = None
    notes: list[str] = field(default_factory=list)


class Subject:
    name = ""
    label = ""
    start_timeout = 30.0
    counts_live = True  # False: progress() is always None, the count comes with final()
    counts_received = True  # False: final() says N once the run is over, it did not count them

    def __init__(self, args: argparse.Namespace, core: int | None, workdir: Path):
        self.args = args
        self.core = core
        self.workdir = workdir
        self.proc: subprocess.Popen[Any] | None = None
        self.monitor: Monitor | None = None
        self.pub: subprocess.Popen[Any] | None = None  # the publisher of the current run

    def start(self, broker_port: int) -> None:
        raise NotImplementedError

    def ready(self) -> bool:
        """True once the subject has seen a probe message (so it is subscribed)."""
        raise NotImplementedError

    def send_probe(self, monitor: Monitor) -> None:
        """One readiness probe (sent every 0.25 s until ready() says yes)."""
        monitor.probe(self.args.base - 2 * WINDOW_S if self.args.flow == "realistic" else None)

    def baseline(self) -> None:
        """Remember counters right before the publisher starts."""

    def progress(self) -> int | None:
        """Data messages received so far, or None when this subject reports only at the end."""
        raise NotImplementedError

    def final(self) -> tuple[int, float] | None:
        """(received, wall time of the last message) when the subject reported it itself."""
        return None

    def chain_check(self) -> str | None:
        return None

    def stop(self) -> None:
        stop_process(self.proc)

    def log_tail(self) -> str:
        path = self.workdir / f"{self.name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return ""


class BareSubject(Subject):
    name = "bare"
    label = "bare gmqtt + json"
    counts_live = False

    def start(self, broker_port: int) -> None:
        self._ready = threading.Event()
        self._result: dict[str, Any] | None = None
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--role",
            "bare",
            "--port",
            str(broker_port),
            "--n",
            str(self.args.n),
            "--qos",
            str(self.args.qos),
        ]
        logf = open(self.workdir / "bare.log", "wb")
        self.proc = subprocess.Popen(pinned(self.core, argv), stdout=subprocess.PIPE, stderr=logf, text=True)
        logf.close()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            line = line.strip()
            if line == "READY":
                self._ready.set()
            elif line.startswith("{"):
                self._result = json.loads(line)

    def ready(self) -> bool:
        return self._ready.is_set()

    def progress(self) -> int | None:
        return self._result["received"] if self._result else None

    def final(self) -> tuple[int, float] | None:
        if self._result is None:
            return None
        return self._result["received"], self._result["last"] or time.time()


def sluice_config(flow: str, broker_port: int, data_dir: Path, qos: int = 0, console_port: int = 0) -> str:
    """The benchmark's `sluice run` config for `flow` (also used by the correctness test)."""
    window = (
        f"      - {{id: mean, type: window, input: fahrenheit, kind: tumbling, size: {WINDOW_S:g}s, aggregate: mean}}\n"
        if flow == "realistic"
        else ""
    )
    return f"""\
gateway: {{id: bench, data_dir: "{data_dir}"}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {broker_port}}}
pipelines:
  - name: bench
    nodes:
      - {{id: temp, type: mqtt, connection: plant, topic: "{DATA_FILTER}", key: "topic[1]",
         qos: {qos}}}
      - {{id: valid, type: filter, input: temp,
         where: "value > {VALID_MIN} && value < {VALID_MAX}"}}
      - {{id: fahrenheit, type: map, input: valid, value: "value * 1.8 + 32.0"}}
{window}      - {{id: hot, type: threshold, input: {"mean" if window else "fahrenheit"},
         above: {ABOVE_F}, clear_below: {CLEAR_F}}}
      - {{id: out, type: mqtt_out, input: hot, connection: plant, topic: "{ALERT_TOPIC}"}}
console: {{host: 127.0.0.1, port: {console_port}, auth: false}}
"""


class SluiceSubject(Subject):
    name = "sluice"
    label = "sluice, console used"
    # node ids of the benchmark pipeline
    SOURCE, FIRST_OP, LAST_OP, SINK = "temp", "valid", "hot", "out"

    def config_text(self, broker_port: int) -> str:
        return sluice_config(
            self.args.flow, broker_port, self.workdir / f"{self.name}-data", self.args.qos, self.console_port
        )

    @staticmethod
    def available() -> str | None:
        """None when `sluice run` can be used, else why not."""
        if not SLUICE_BIN.exists():
            return f"{SLUICE_BIN} does not exist (run `make deps`)"
        try:
            out = subprocess.run([str(SLUICE_BIN), "run", "--help"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"`sluice run --help` failed: {e}"
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["?"])[-1]
            return f"`sluice run` is not available yet ({last})"
        return None

    def start(self, broker_port: int) -> None:
        self.console_port = free_port()
        cfg = self.workdir / "sluice-bench.yaml"
        cfg.write_text(self.config_text(broker_port))
        check = subprocess.run([str(SLUICE_BIN), "validate", str(cfg)], capture_output=True, text=True, timeout=60)
        if check.returncode != 0:
            raise RuntimeError(
                "sluice validate rejected the benchmark config:\n" + (check.stdout + check.stderr).strip()
            )
        help_text = subprocess.run(
            [str(SLUICE_BIN), "run", "--help"], capture_output=True, text=True, timeout=30
        ).stdout
        argv = [str(SLUICE_BIN), "run", str(cfg)]
        if "--log-level" in help_text:
            argv += ["--log-level", "warning"]
        logf = open(self.workdir / "sluice.log", "wb")
        self.proc = subprocess.Popen(pinned(self.core, argv), stdout=logf, stderr=subprocess.STDOUT, cwd=self.workdir)
        logf.close()
        self._base = 0

    def _nodes(self) -> dict[str, dict[str, Any]] | None:
        status, data = http_get_json(f"http://127.0.0.1:{self.console_port}/api/pipelines")
        if status != 200 or not isinstance(data, dict):
            return None
        for p in data.get("pipelines", []):
            if p.get("name") == "bench":
                return {n["id"]: n for n in p.get("nodes", [])}
        return None

    def _counter(self, nodes: dict[str, dict[str, Any]] | None, node: str, which: str) -> int:
        if not nodes or node not in nodes:
            return 0
        return int((nodes[node].get("counters") or {}).get(which, 0))

    def ready(self) -> bool:
        status, _ = http_get_json(f"http://127.0.0.1:{self.console_port}/healthz")
        if status != 200:
            return False
        return self._counter(self._nodes(), self.SOURCE, "out") > 0

    def baseline(self) -> None:
        nodes = self._nodes()
        self._base = self._counter(nodes, self.SOURCE, "out")
        self._base_first = self._counter(nodes, self.FIRST_OP, "in")
        self._base_last = self._counter(nodes, self.LAST_OP, "in")

    def progress(self) -> int | None:
        nodes = self._nodes()
        if nodes is None:
            return None
        self._last_nodes = nodes
        # The message has been through the whole chain once the last operator saw it, or was
        # filtered out on the way (the filter's `in` counts it either way).
        return self._counter(nodes, self.SOURCE, "out") - self._base

    def chain_check(self) -> str | None:
        nodes = self._nodes() or getattr(self, "_last_nodes", None)
        if not nodes:
            return "could not read /api/pipelines"
        src = self._counter(nodes, self.SOURCE, "out") - self._base
        first = self._counter(nodes, self.FIRST_OP, "in") - self._base_first
        last = self._counter(nodes, self.LAST_OP, "in") - self._base_last
        errors = sum(self._counter(nodes, n, "errors") for n in nodes)
        dropped = sum(self._counter(nodes, n, "dropped") for n in nodes)
        sink_in = self._counter(nodes, self.SINK, "in")
        return (
            f"source out {src}, filter in {first}, threshold in {last}, sink in {sink_in}, "
            f"errors {errors}, dropped {dropped}"
        )


class QuietSluiceSubject(SluiceSubject):
    """`sluice run` with the same config, whose console nobody opens: readiness and the end of a
    run are read from MQTT only, so the console's web stack (loaded at its first request) stays
    out of the process. Readiness: hot probes (95 °C, one window apart in event time for the
    realistic flow) make the key `probe` raise one alert. A run is over once every expected
    alert arrived (the first run) or, for later runs, the publisher is done, and the process'
    CPU time stood still for 0.5 s. It cannot count what it received, so `received` and `lost`
    are not reported; the alerts equal to the oracle say every reading went through."""

    name = "sluice_quiet"
    label = "sluice, console idle"
    counts_live = False
    counts_received = False

    def start(self, broker_port: int) -> None:
        super().start(broker_port)
        self._probe_ts = self.args.base - 200 * WINDOW_S
        self._alerts0 = 0
        self._first_run = True
        self._cpu: tuple[float, float] = (-1.0, 0.0)  # (CPU seconds, since when unchanged)

    def send_probe(self, monitor: Monitor) -> None:
        monitor.probe(self._probe_ts if self.args.flow == "realistic" else None, value=95.0)
        self._probe_ts += WINDOW_S

    def ready(self) -> bool:
        return self.monitor is not None and self.monitor.alert_count() > 0

    def baseline(self) -> None:
        assert self.monitor is not None
        self._alerts0 = self.monitor.alert_count()
        self._cpu = (-1.0, 0.0)

    def progress(self) -> int | None:
        return None

    def final(self) -> tuple[int, float] | None:
        assert self.monitor is not None and self.proc is not None
        if self._first_run:
            if self.monitor.alert_count() - self._alerts0 < getattr(self.args, "expected_total", 0):
                return None
        elif self.pub is None or self.pub.poll() is None:
            return None
        cpu, now = proc_cpu_seconds(self.proc.pid), time.monotonic()
        if cpu != self._cpu[0]:
            self._cpu = (cpu, now)
            return None
        if now - self._cpu[1] < 0.5:
            return None
        self._first_run = False
        return self.args.n, self.monitor.last_alert_at or time.time()

    def chain_check(self) -> str | None:
        return "received/lost not counted: its console stays unopened (alerts and CPU read from outside)"


NODERED_FUNC = """\
const s = flow.get('bench');
const key = msg.topic.split('/')[1];
if (key === 'probe') {
    return {topic: '%(ready)s', payload: {ready: true}};
}
s.n += 1;
if (s.n === 1) s.first = Date.now() / 1000;
const p = msg.payload;
const v = p.value;
let out = null;
if (typeof v === 'number' && v > %(vmin)s && v < %(vmax)s) {
    let f = v * 1.8 + 32.0;
    let ts = p.ts;
    if (%(window)s) {
        // per-key tumbling mean: a reading of a later window closes the key's open one
        const start = Math.floor(ts / %(size)s) * %(size)s;
        const w = s.win[key];
        let closed = null;
        if (w === undefined) {
            s.win[key] = {start: start, sum: f, n: 1};
        } else if (start > w.start) {
            closed = {ts: w.start + %(size)s, value: w.sum / w.n};
            w.start = start; w.sum = f; w.n = 1;
        } else if (start === w.start) {
            w.sum += f; w.n += 1;
        }
        f = closed === null ? null : closed.value;
        if (closed !== null) ts = closed.ts;
    }
    const hot = s.hot[key] === true;
    if (f === null) {
        // no window closed
    } else if (!hot && f > %(above)s) {
        s.hot[key] = true;
        out = {topic: '%(alerts)s', payload: {key: key, ts: p.ts, value: f, state: 'alert'}};
    } else if (hot && f < %(clear)s) {
        s.hot[key] = false;
        out = {topic: '%(alerts)s', payload: {key: key, ts: p.ts, value: f, state: 'clear'}};
    }
}
if (s.n %% %(n)d === 0) {
    s.last = Date.now() / 1000;
    if (out !== null) node.send(out);
    out = {topic: '%(done)s', payload: {count: s.n, first: s.first, last: s.last}};
}
return out;
"""


class NodeRedSubject(Subject):
    name = "nodered"
    label = "Node-RED"
    start_timeout = 60.0

    @staticmethod
    def red_js() -> Path:
        return NODERED_DIR / "node_modules" / "node-red" / "red.js"

    @staticmethod
    def installed_version() -> str | None:
        try:
            pkg = json.loads((NODERED_DIR / "node_modules" / "node-red" / "package.json").read_text())
        except (OSError, ValueError):
            return None
        version = str(pkg.get("version", ""))
        return version if version.startswith(NODERED_VERSION + ".") else None

    @classmethod
    def prepare(cls, quick: bool) -> str | None:
        """Install Node-RED into the cache when needed. None when ready, else why skipped."""
        node = shutil.which("node")
        if node is None:
            return "node is not installed"
        if cls.installed_version():
            return None
        npm = shutil.which("npm")
        if npm is None:
            return "npm is not installed"
        if quick:
            return (
                f"--quick does not install Node-RED and it is not cached in "
                f"{NODERED_DIR.relative_to(ROOT)} (run once without --quick)"
            )
        NODERED_DIR.mkdir(parents=True, exist_ok=True)
        log(f"installing node-red@{NODERED_VERSION} with npm into {NODERED_DIR} ...")
        t0 = time.monotonic()
        out = subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(NODERED_DIR),
                "--no-audit",
                "--no-fund",
                "--omit=dev",
                "--loglevel=error",
                f"node-red@{NODERED_VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if out.returncode != 0 or not cls.installed_version():
            tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-5:])
            return f"npm install node-red@{NODERED_VERSION} failed: {tail}"
        log(f"installed Node-RED {cls.installed_version()} in {time.monotonic() - t0:.0f} s")
        return None

    def start(self, broker_port: int) -> None:
        self.ui_port = free_port()
        user_dir = NODERED_DIR / "userdir"
        if user_dir.exists():
            shutil.rmtree(user_dir)
        user_dir.mkdir(parents=True)
        func = NODERED_FUNC % {
            "ready": READY_TOPIC,
            "alerts": ALERT_TOPIC,
            "done": DONE_TOPIC,
            "vmin": VALID_MIN,
            "vmax": VALID_MAX,
            "above": ABOVE_F,
            "clear": CLEAR_F,
            "n": self.args.n,
            "window": "true" if self.args.flow == "realistic" else "false",
            "size": f"{WINDOW_S:g}",
        }
        flows = [
            {"id": "bench_tab", "type": "tab", "label": "bench"},
            {
                "id": "bench_broker",
                "type": "mqtt-broker",
                "name": "plant",
                "broker": "127.0.0.1",
                "port": str(broker_port),
                "clientid": "",
                "autoConnect": True,
                "usetls": False,
                "protocolVersion": "4",
                "keepalive": "60",
                "cleansession": True,
                "birthTopic": "",
                "closeTopic": "",
                "willTopic": "",
            },
            {
                "id": "bench_in",
                "type": "mqtt in",
                "z": "bench_tab",
                "name": "temp",
                "topic": DATA_FILTER,
                "qos": str(self.args.qos),
                "datatype": "json",
                "broker": "bench_broker",
                "nl": False,
                "rap": True,
                "rh": 0,
                "inputs": 0,
                "wires": [["bench_fn"]],
            },
            {
                "id": "bench_fn",
                "type": "function",
                "z": "bench_tab",
                "name": "filter, map, window, threshold",
                "func": func,
                "outputs": 1,
                "timeout": 0,
                "noerr": 0,
                "initialize": "flow.set('bench', {n: 0, hot: {}, win: {}, first: null, last: null});",
                "finalize": "",
                "libs": [],
                "wires": [["bench_out"]],
            },
            {
                "id": "bench_out",
                "type": "mqtt out",
                "z": "bench_tab",
                "name": "alerts",
                "topic": "",
                "qos": "1",
                "retain": "false",
                "broker": "bench_broker",
                "wires": [],
            },
            {
                "id": "bench_http",
                "type": "http in",
                "z": "bench_tab",
                "url": "/bench/count",
                "method": "get",
                "upload": False,
                "wires": [["bench_count"]],
            },
            {
                "id": "bench_count",
                "type": "function",
                "z": "bench_tab",
                "func": "const s = flow.get('bench') || {n: 0};\n"
                "msg.payload = {count: s.n, first: s.first, last: s.last};\nreturn msg;",
                "outputs": 1,
                "wires": [["bench_resp"]],
            },
            {
                "id": "bench_resp",
                "type": "http response",
                "z": "bench_tab",
                "statusCode": "",
                "headers": {},
                "wires": [],
            },
        ]
        (user_dir / "flows.json").write_text(json.dumps(flows, indent=1))
        settings = user_dir / "settings.js"
        settings.write_text(
            "module.exports = {\n"
            f"  uiPort: {self.ui_port},\n"
            "  uiHost: '127.0.0.1',\n"
            f"  userDir: {json.dumps(str(user_dir))},\n"
            "  flowFile: 'flows.json',\n"
            "  credentialSecret: false,\n"
            "  httpAdminRoot: false,\n"
            "  httpNodeRoot: '/',\n"
            "  functionExternalModules: false,\n"
            "  diagnostics: {enabled: false, ui: false},\n"
            "  telemetry: {enabled: false},\n"
            "  runtimeState: {enabled: false, ui: false},\n"
            "  contextStorage: {default: {module: 'memory'}},\n"
            "  logging: {console: {level: 'warn', metrics: false, audit: false}},\n"
            "};\n"
        )
        node = shutil.which("node") or "node"
        argv = [node, str(self.red_js()), "--settings", str(settings), "--userDir", str(user_dir)]
        logf = open(self.workdir / "nodered.log", "wb")
        self.proc = subprocess.Popen(pinned(self.core, argv), stdout=logf, stderr=subprocess.STDOUT, cwd=user_dir)
        logf.close()

    def ready(self) -> bool:
        assert self.monitor is not None
        return self.monitor.ready.is_set()

    _base = 0  # the function's count before this run (--runs)

    def baseline(self) -> None:
        assert self.monitor is not None
        status, data = http_get_json(f"http://127.0.0.1:{self.ui_port}/bench/count")
        self._base = int(data.get("count", 0)) if status == 200 and isinstance(data, dict) else 0
        self.monitor.done = None
        self.monitor.done_event.clear()

    def progress(self) -> int | None:
        assert self.monitor is not None
        if self.monitor.done_event.is_set() and self.monitor.done:
            return int(self.monitor.done["count"]) - self._base
        status, data = http_get_json(f"http://127.0.0.1:{self.ui_port}/bench/count")
        if status != 200 or not isinstance(data, dict):
            return None
        return int(data.get("count", 0)) - self._base

    def final(self) -> tuple[int, float] | None:
        assert self.monitor is not None
        if self.monitor.done:
            return int(self.monitor.done["count"]) - self._base, float(self.monitor.done["last"])
        return None


# --- one measured run -----------------------------------------------------------------------


def crossing_time(polls: list[tuple[float, int]], target: int) -> float | None:
    """When a polled, growing count reached `target`, interpolated between the two polls around
    it (the first point is the publisher's start with count 0)."""
    for (t0, c0), (t1, c1) in itertools.pairwise(polls):
        if c1 >= target and c1 > c0:
            return t0 + (t1 - t0) * (target - c0) / (c1 - c0)
    return polls[-1][0] if polls else None


def run_publisher(port: int, args: argparse.Namespace, core: int | None) -> subprocess.Popen[str]:
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--role",
        "publish",
        "--port",
        str(port),
        "--n",
        str(args.n),
        "--keys",
        str(args.keys),
        "--qos",
        str(args.qos),
        "--flow",
        args.flow,
        "--base",
        repr(args.base),
    ]
    return subprocess.Popen(pinned(core, argv), stdout=subprocess.PIPE, text=True)


def measure(subject: Subject, args: argparse.Namespace, cores: tuple[int | None, int | None], tmp: Path) -> Result:
    res = Result(subject.name, subject.label)
    broker = Mosquitto(tmp / f"broker-{subject.name}", core=cores[0]).start()
    monitor: Monitor | None = None
    try:
        monitor = Monitor(broker.port)
        subject.monitor = monitor
        t_launch = time.monotonic()
        subject.start(broker.port)
        assert subject.proc is not None
        pid = subject.proc.pid

        # Ready: the subject has seen one of our probes, so its subscription is in place.
        deadline = time.monotonic() + subject.start_timeout
        last_probe = 0.0
        while not subject.ready():
            if subject.proc.poll() is not None:
                raise RuntimeError(
                    f"{subject.label} exited with {subject.proc.returncode} before it was ready:\n" + subject.log_tail()
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{subject.label} not ready after {subject.start_timeout:.0f} s:\n" + subject.log_tail()
                )
            if time.monotonic() - last_probe > 0.25:
                subject.send_probe(monitor)
                last_probe = time.monotonic()
            time.sleep(0.05)
        log(f"  {subject.name}: ready after {time.monotonic() - t_launch:.1f} s")
        time.sleep(0.5)  # let late probes land before the baseline
        subject.baseline()
        idle = proc_status_kib(pid, "VmRSS")
        res.idle_rss_mib = idle / 1024 if idle else None
        alerts0 = monitor.alert_count()
        cpu0 = proc_cpu_seconds(pid)

        t_run = time.monotonic()
        pub = run_publisher(broker.port, args, cores[0])
        subject.pub = pub
        n = args.n
        deadline_s = DEADLINE_BASE_S + n / DEADLINE_MIN_RATE
        run_deadline = time.monotonic() + deadline_s
        polls: list[tuple[float, int]] = []  # (wall time, count) of each progress poll
        t_done: float | None = None  # when the subject reported the time of its last message
        # Idle is judged only on counts the subject gave: "no answer" is not "no progress".
        last_growth = time.time()
        received = 0
        unanswered = 0  # progress polls without a count
        while True:
            time.sleep(POLL_INTERVAL)
            fin = subject.final()
            if fin is not None:
                received, t_done = fin
                break
            t_a = time.time()
            count = subject.progress()
            now = time.time()
            if count is None:
                unanswered += 1
                last_growth = now
            else:
                polls.append(((t_a + now) / 2, count))
                if count != received:
                    last_growth = now
                received = count
                if count >= n:
                    break
            if subject.proc.poll() is not None:
                raise RuntimeError(
                    f"{subject.label} exited with {subject.proc.returncode} during the run:\n" + subject.log_tail()
                )
            if pub.poll() is not None and now - last_growth > IDLE_TIMEOUT:
                why = (
                    f"given up: its count stayed at {received:,} for {IDLE_TIMEOUT:.0f} s after the publisher "
                    "finished (messages lost, or the subject stalled)"
                )
                res.notes.append(why)
                log(f"  {subject.name}: {why}")
                break
            if time.monotonic() > run_deadline:
                if not subject.counts_live:
                    said = "it reports its count only at the end"
                elif polls:
                    said = f"last count {received:,}" + (f", {unanswered} polls unanswered" if unanswered else "")
                else:
                    said = "it answered no progress poll"
                why = (
                    f"given up: no final report within {deadline_s:.0f} s ({DEADLINE_BASE_S:.0f} s + N at "
                    f"{DEADLINE_MIN_RATE:,.0f} msg/s; {said})"
                )
                log(f"  {subject.name}: {why}")
                if not polls:
                    raise RuntimeError(why)  # no count at all: nothing to report as measured
                res.notes.append(why)
                break
        # Let the tail (alerts leaving through the sink) finish inside the measured window: until
        # every expected alert arrived, or the count stood still for a second (30 s at most).
        stable_since = time.monotonic()
        seen = monitor.alert_count()
        settle_deadline = time.monotonic() + 30
        want = getattr(args, "expected_total", None)
        while time.monotonic() < settle_deadline:
            if want is not None and seen - alerts0 >= want:
                break
            if time.monotonic() - stable_since >= (1.0 if want is not None else 0.3):
                break
            time.sleep(0.05)
            if monitor.alert_count() != seen:
                seen, stable_since = monitor.alert_count(), time.monotonic()
        cpu1 = proc_cpu_seconds(pid)
        hwm = proc_status_kib(pid, "VmHWM")
        log(f"  {subject.name}: run and settle took {time.monotonic() - t_run:.1f} s")

        try:
            out, _ = pub.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pub.kill()
            out, _ = pub.communicate()
        pub_info = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        if pub.returncode != 0 or not pub_info.get("flushed"):
            res.notes.append(f"publisher problem: rc={pub.returncode} {pub_info}")
        sent = int(pub_info.get("sent", n))
        t_start = float(pub_info.get("t_start", 0.0))

        if t_done is None:
            t_done = crossing_time([(t_start, 0), *polls], received)
        if subject.counts_received:
            res.received = received
            res.lost = sent - received
        if received > 0:
            res.us_per_msg = (cpu1 - cpu0) * 1e6 / received
            if t_done and t_start and t_done > t_start:
                res.msgs_per_s = received / (t_done - t_start)
        res.peak_rss_mib = hwm / 1024 if hwm else None
        res.alerts = monitor.alert_count() - alerts0
        res.broker_dropped = monitor.sys_value("$SYS/broker/publish/messages/dropped", newer_than=time.time())
        if pub_info.get("publish_s"):
            res.notes.append(f"publisher {sent / pub_info['publish_s']:,.0f} msg/s")
        check = subject.chain_check()
        if check:
            res.notes.append(check)
        if args.runs > 1 and subject.name != "bare":
            more_runs(subject, args, cores, broker.port, pid, res)
    except Exception as e:
        res.error = str(e)
    finally:
        t_stop = time.monotonic()
        subject.stop()
        log(f"  {subject.name}: stopped in {time.monotonic() - t_stop:.1f} s")
        if monitor is not None:
            monitor.close()
        broker.stop()
    return res


def more_runs(
    subject: Subject, args: argparse.Namespace, cores: tuple[int | None, int | None], port: int, pid: int, res: Result
) -> None:
    """Runs 2..N against the same subject process, each continuing the event time of the one
    before: its RSS after each run, and the slope (least squares, MiB per run)."""
    rss = proc_status_kib(pid, "VmRSS")
    res.rss_runs = [rss / 1024 if rss else 0.0]
    span = (args.n + args.keys - 1) // args.keys * READING_DT
    for r in range(1, args.runs):
        subject.baseline()
        again = argparse.Namespace(**{**vars(args), "base": args.base + r * span})
        pub = run_publisher(port, again, cores[0])
        subject.pub = pub
        deadline = time.monotonic() + DEADLINE_BASE_S + args.n / DEADLINE_MIN_RATE
        last, last_growth = -1, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
            fin = subject.final()
            count = fin[0] if fin is not None else subject.progress()
            if count is not None and count >= args.n:
                break
            if count != last:
                last, last_growth = count if count is not None else last, time.monotonic()
            elif pub.poll() is not None and time.monotonic() - last_growth > IDLE_TIMEOUT:
                res.notes.append(f"run {r + 1}: count stayed at {last:,}")
                break
        pub.communicate(timeout=120)
        time.sleep(1.0)  # the tail of alerts
        rss = proc_status_kib(pid, "VmRSS")
        res.rss_runs.append(rss / 1024 if rss else 0.0)
        log(f"  {subject.name}: run {r + 1}/{args.runs}: RSS {res.rss_runs[-1]:.1f} MiB")
    hwm = proc_status_kib(pid, "VmHWM")
    res.peak_rss_mib = max(res.peak_rss_mib or 0.0, hwm / 1024 if hwm else 0.0)
    xs = range(len(res.rss_runs))
    mx, my = sum(xs) / len(xs), sum(res.rss_runs) / len(xs)
    den = sum((x - mx) ** 2 for x in xs)
    res.slope_mib_per_run = sum((x - mx) * (y - my) for x, y in zip(xs, res.rss_runs, strict=True)) / den


# --- roles run in child processes ---------------------------------------------------------


def role_publish(args: argparse.Namespace) -> int:
    """Raw MQTT 3.1.1 publisher: pre-encoded PUBLISH packets written in 64 KiB chunks. For QoS 1
    it waits for every PUBACK; then PINGREQ/PINGRESP proves the broker has read everything
    before DISCONNECT."""
    n, qos = args.n, args.qos
    if args.flow == "realistic":
        readings = gen_realistic(n, args.keys, args.base)
    else:
        base = time.time()
        readings = [(k, base + i * 1e-5, v) for i, (k, v) in enumerate(gen_values(n, args.keys))]
    topics = [f"bench/{key_name(k)}/temp".encode() for k in range(args.keys)]
    first = 0x30 | (qos << 1)
    packets = []
    for i, (k, ts, v) in enumerate(readings):
        payload = b'{"ts": %.3f, "value": %s}' % (ts, repr(v).encode())
        pid = ((i % 65535) + 1).to_bytes(2, "big") if qos else b""
        packets.append(_packet(first, _mqtt_str(topics[k]) + pid + payload))

    sock = socket.create_connection(("127.0.0.1", args.port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    client_id = f"bench-pub-{os.getpid()}".encode()
    connect = b"\x00\x04MQTT\x04\x02" + (60).to_bytes(2, "big") + _mqtt_str(client_id)
    sock.sendall(_packet(0x10, connect))
    connack = b""
    while len(connack) < 4:
        chunk = sock.recv(4 - len(connack))
        if not chunk:
            print(json.dumps({"error": "no CONNACK"}))
            return 1
        connack += chunk
    if connack[0] != 0x20 or connack[3] != 0:
        print(json.dumps({"error": f"CONNACK {connack!r}"}))
        return 1
    sock.settimeout(None)

    acked = 0
    pingresp = threading.Event()

    def reader() -> None:
        nonlocal acked
        buf = bytearray()
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            pos = 0
            while True:
                if len(buf) - pos < 2:
                    break
                mult, length, j = 1, 0, pos + 1
                while j < len(buf):
                    b = buf[j]
                    length += (b & 0x7F) * mult
                    mult *= 128
                    j += 1
                    if not b & 0x80:
                        break
                else:
                    break
                if len(buf) - j < length:
                    break
                ptype = buf[pos] >> 4
                if ptype == 4:
                    acked += 1
                elif ptype == 13:
                    pingresp.set()
                pos = j + length
            del buf[:pos]

    threading.Thread(target=reader, daemon=True).start()

    t_start = time.time()
    chunk: list[bytes] = []
    size = 0
    for i, p in enumerate(packets):
        chunk.append(p)
        size += len(p)
        if size >= 65536:
            # Never have more than half the packet-id space in flight.
            while qos and i + 1 - acked > 30000:
                time.sleep(0.0005)
            sock.sendall(b"".join(chunk))
            chunk, size = [], 0
    if chunk:
        sock.sendall(b"".join(chunk))
    t_written = time.time()
    deadline = time.monotonic() + 120
    while qos and acked < n and time.monotonic() < deadline:
        time.sleep(0.001)
    sock.sendall(b"\xc0\x00")  # PINGREQ: answered only after everything before it was read
    flushed = pingresp.wait(60) and (not qos or acked >= n)
    t_end = time.time()
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    print(
        json.dumps(
            {
                "sent": n,
                "acked": acked if qos else None,
                "flushed": bool(flushed),
                "t_start": t_start,
                "t_written": t_written,
                "t_end": t_end,
                "publish_s": t_end - t_start,
            }
        ),
        flush=True,
    )
    return 0 if flushed else 1


async def _bare_main(args: argparse.Namespace) -> int:
    from gmqtt import Client

    n = args.n
    count = 0
    first = last = 0.0
    done = asyncio.Event()
    ready = False

    def on_message(client: Any, topic: str, payload: bytes, qos: int, properties: Any) -> int:
        nonlocal count, first, last, ready
        json.loads(payload)
        if topic == PROBE_TOPIC:
            if not ready:
                ready = True
                print("READY", flush=True)
            return 0
        count += 1
        last = time.time()
        if count == 1:
            first = last
        if count >= n:
            done.set()
        return 0

    async def on_message_acked(client: Any, topic: str, payload: bytes, qos: int, properties: Any) -> int:
        return on_message(client, topic, payload, qos, properties)

    # QoS 1: gmqtt's manual acknowledgement (MQTT 5), the way an application acknowledges a reading
    # only once it has handled it: an async on_message whose result is the PUBACK's reason code.
    client = Client(f"bench-bare-{os.getpid()}", optimistic_acknowledgement=args.qos == 0)
    client.on_message = on_message_acked if args.qos else on_message
    client.on_connect = lambda c, flags, rc, props: c.subscribe(DATA_FILTER, qos=args.qos)
    await client.connect("127.0.0.1", args.port, keepalive=60)
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.25)
        if count and time.time() - last > IDLE_TIMEOUT:
            break
    print(json.dumps({"received": count, "first": first, "last": last}), flush=True)
    await client.disconnect()
    # Stay alive until the harness has read our CPU time and peak RSS, then stops us.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), 60)
    return 0


def role_bare(args: argparse.Namespace) -> int:
    return asyncio.run(_bare_main(args))


# --- report ---------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, 3)


def report(args: argparse.Namespace, results: list[Result], env: dict[str, Any]) -> dict[str, Any]:
    by = {r.name: r for r in results}
    raised, cleared, nodered_expected = expected_for(args.flow, args.n, args.keys)
    print()
    print(
        f"MQTT ingest, {args.flow} flow: {args.n:,} readings over {args.keys} keys, QoS {args.qos}; "
        f"broker+publisher on core {env['pub_core']}, subject on core {env['subject_core']}"
    )
    print(
        f"mosquitto {env['mosquitto']}; expected alerts: {raised} raised + {cleared} cleared = {raised + cleared}"
        + (f" (Node-RED's per-key closing: {sum(nodered_expected)})" if nodered_expected else "")
        + "; RSS in MiB"
    )
    head = (
        f"{'subject':<20}{'received':>10}{'lost':>7}{'dropped':>9}{'msg/s':>10}"
        f"{'CPU µs/msg':>12}{'idle RSS':>10}{'peak RSS':>10}{'alerts':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        if r.skipped or r.error:
            what = f"skipped: {r.skipped}" if r.skipped else "FAILED"
            print(f"{r.label:<20}{what}")
            continue
        print(
            f"{r.label:<20}{_fmt(r.received, ','):>10}{r.lost if r.lost is not None else '-':>7}"
            f"{r.broker_dropped if r.broker_dropped is not None else '-':>9}"
            f"{_fmt(r.msgs_per_s, ',.0f'):>10}{_fmt(r.us_per_msg, '.1f'):>12}"
            f"{_fmt(r.idle_rss_mib, '.1f'):>10}{_fmt(r.peak_rss_mib, '.1f'):>10}"
            f"{r.alerts if r.alerts is not None else '-':>8}"
        )
    for r in results:
        if r.rss_runs:
            print(
                f"  {r.name}: RSS after each of {len(r.rss_runs)} runs: "
                + " ".join(f"{x:.1f}" for x in r.rss_runs)
                + f" MiB; slope {r.slope_mib_per_run:+.2f} MiB per run"
            )
        for note in r.notes:
            print(f"  {r.name}: {note}")
        if r.error:
            print(f"  {r.name}: ERROR: {r.error}")

    bare, sl, nr = by.get("bare"), by.get("sluice"), by.get("nodered")
    quiet = by.get("sluice_quiet")
    ratio = _ratio(bare and bare.us_per_msg, sl and sl.us_per_msg)
    vs_nodered = _ratio(nr and nr.us_per_msg, sl and sl.us_per_msg)
    # The memory goals are for the gateway at work, its console unopened (the console's web stack
    # loads at its first request); the row with the console polled is printed beside it.
    mem = quiet if quiet and not (quiet.skipped or quiet.error) else None
    rss = mem.peak_rss_mib if mem else None
    idle = mem.idle_rss_mib if mem else None
    ok_sl = bool(sl and not (sl.skipped or sl.error))
    goals = {
        "vs_nodered": None if vs_nodered is None else vs_nodered >= GOAL_VS_NODERED,
        "ratio": None if ratio is None else ratio >= GOAL_RATIO,
        "sluice_rss": None if rss is None else rss <= GOAL_SLUICE_RSS_MIB,
        "sluice_idle_rss": None if idle is None else idle <= GOAL_SLUICE_IDLE_MIB,
        "sluice_lost_0": (sl.lost == 0 and sl.broker_dropped == 0) if ok_sl and sl else None,
        "sluice_alerts_expected": (sl.alerts == raised + cleared) if ok_sl and sl else None,
        "sluice_quiet_alerts_expected": (mem.alerts == raised + cleared) if mem else None,
    }

    def verdict(value: Any, ok: bool | None) -> str:
        if ok is None:
            return "n/a"
        return f"{value} ({'met' if ok else 'NOT met'})"

    print()
    print(f"ratio      = bare µs/msg / sluice µs/msg    = {verdict(ratio, goals['ratio'])}   goal >= {GOAL_RATIO}")
    print(
        f"vs_nodered = Node-RED µs/msg / sluice µs/msg = "
        f"{verdict(vs_nodered, goals['vs_nodered'])}   goal >= {GOAL_VS_NODERED}"
    )
    print(
        f"sluice peak RSS = {verdict(_fmt(rss, '.1f') + ' MiB', goals['sluice_rss'])}"
        f"   goal <= {GOAL_SLUICE_RSS_MIB:.0f} MiB (console idle)"
    )
    print(
        f"sluice idle RSS = {verdict(_fmt(idle, '.1f') + ' MiB', goals['sluice_idle_rss'])}"
        f"   goal <= {GOAL_SLUICE_IDLE_MIB:.0f} MiB (console idle)"
    )
    if ok_sl and sl:
        print(
            f"with the console in use (/api/pipelines polled every {POLL_INTERVAL:g} s): "
            f"idle {_fmt(sl.idle_rss_mib, '.1f')} MiB, peak {_fmt(sl.peak_rss_mib, '.1f')} MiB"
        )

    line: dict[str, Any] = {
        "bench": "mqtt_ingest",
        "ratio": ratio,
        "vs_nodered": vs_nodered,
        "n": args.n,
        "keys": args.keys,
        "qos": args.qos,
        "flow": args.flow,
        "runs": args.runs,
        "quick": args.quick,
    }
    for name in ("bare", "sluice_quiet", "sluice", "nodered"):
        r = by.get(name) or Result(name, name)
        ok = not (r.skipped or r.error)
        line[f"{name}_us_per_msg"] = round(r.us_per_msg, 2) if ok and r.us_per_msg else None
        line[f"{name}_msgs_per_s"] = round(r.msgs_per_s) if ok and r.msgs_per_s else None
        line[f"{name}_peak_rss_mib"] = round(r.peak_rss_mib, 1) if ok and r.peak_rss_mib else None
        line[f"{name}_idle_rss_mib"] = round(r.idle_rss_mib, 1) if ok and r.idle_rss_mib else None
        if name != "bare" and args.runs > 1:
            line[f"{name}_rss_runs_mib"] = [round(x, 1) for x in r.rss_runs] if ok else None
            line[f"{name}_rss_slope_mib_per_run"] = (
                round(r.slope_mib_per_run, 3) if ok and r.slope_mib_per_run is not None else None
            )
        line[f"{name}_received"] = r.received if ok else None
        line[f"{name}_lost"] = r.lost if ok else None
        line[f"{name}_broker_dropped"] = r.broker_dropped if ok else None
        if name != "bare":
            line[f"{name}_alerts"] = r.alerts if ok else None
    line["expected_alerts_raised"] = raised
    line["expected_alerts_cleared"] = cleared
    line["goals_met"] = goals
    line["skipped"] = {r.name: r.skipped for r in results if r.skipped} or None
    line["errors"] = {r.name: r.error.splitlines()[0] for r in results if r.error} or None
    line["nodered_version"] = env.get("nodered_version")
    return line


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="readings to publish (default 200000)")
    ap.add_argument("--keys", type=int, default=100, help="distinct keys (default 100)")
    ap.add_argument("--qos", type=int, choices=(0, 1), default=0, help="subscription QoS")
    ap.add_argument(
        "--flow",
        choices=("realistic", "simple"),
        default="realistic",
        help="realistic (default): with a 10 s window and ~35k alerts per 200k readings; simple: without",
    )
    ap.add_argument("--base", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="N=20000 (unless --n), under 30 s; no Node-RED install (uses it when cached)",
    )
    ap.add_argument("--skip-nodered", action="store_true", help="do not run Node-RED")
    ap.add_argument(
        "--runs",
        type=int,
        default=1,
        help="publish N times to the same sluice / Node-RED process: RSS after each run and its slope",
    )
    ap.add_argument(
        "--only", choices=("bare", "sluice_quiet", "sluice", "nodered"), action="append", help=argparse.SUPPRESS
    )
    ap.add_argument("--role", choices=("publish", "bare"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.n is None:
        args.n = 20_000 if args.quick else 200_000
    if args.n < 1 or args.keys < 1 or args.keys > 999:
        ap.error("--n must be >= 1 and --keys between 1 and 999")
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if args.base is None:
        args.base = realistic_base(args.n * args.runs, args.keys)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "publish":
        return role_publish(args)
    if args.role == "bare":
        return role_bare(args)

    t_begin = time.monotonic()
    ncpu = len(os.sched_getaffinity(0))
    if ncpu >= 2 and shutil.which("taskset"):
        cores: tuple[int | None, int | None] = (0, 1)
        os.sched_setaffinity(0, {0})  # this process (and the monitor thread) stays off core 1
    else:
        cores = (None, None)
        log("fewer than 2 cores or no taskset: nothing is pinned, figures are noisier")
    mosq = find_mosquitto()
    if mosq is None:
        log("mosquitto not found: run scripts/ensure_mosquitto.sh (or apt-get install mosquitto)")
        return 2
    mosq_version = (
        subprocess.run([mosq, "-h"], capture_output=True, text=True)
        .stdout.split("\n")[0]
        .replace("mosquitto version ", "")
    )
    env: dict[str, Any] = {
        "pub_core": "-" if cores[0] is None else cores[0],
        "subject_core": "-" if cores[1] is None else cores[1],
        "mosquitto": mosq_version.strip() or "?",
    }

    raised, cleared, _ = expected_for(args.flow, args.n, args.keys)
    args.expected_total = raised + cleared  # the settle after a run waits for these
    compile_sources(SLUICE_BIN.parent / "python", ROOT)  # RSS and CPU of an installed gateway's modules
    wanted = args.only or ["bare", "sluice_quiet", "sluice", "nodered"]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmpname:
        tmp = Path(tmpname)
        for name in ("bare", "sluice_quiet", "sluice", "nodered"):
            if name not in wanted:
                continue
            if name == "bare":
                subject: Subject = BareSubject(args, cores[1], tmp)
            elif name in ("sluice", "sluice_quiet"):
                cls = QuietSluiceSubject if name == "sluice_quiet" else SluiceSubject
                why = SluiceSubject.available()
                if why:
                    results.append(Result(name, cls.label, skipped=why))
                    continue
                subject = cls(args, cores[1], tmp)
            else:
                if args.skip_nodered:
                    results.append(Result("nodered", NodeRedSubject.label, skipped="--skip-nodered"))
                    continue
                why = NodeRedSubject.prepare(args.quick)
                if why:
                    results.append(Result("nodered", NodeRedSubject.label, skipped=why))
                    continue
                env["nodered_version"] = NodeRedSubject.installed_version()
                subject = NodeRedSubject(args, cores[1], tmp)
            log(f"measuring {subject.label} ...")
            t0 = time.monotonic()
            res = measure(subject, args, cores, tmp)
            log(f"{subject.label}: done in {time.monotonic() - t0:.1f} s")
            results.append(res)
    line = report(args, results, env)
    line["wall_s"] = round(time.monotonic() - t_begin, 1)
    print(json.dumps(line))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
