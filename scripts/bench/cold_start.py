#!/usr/bin/env python3
"""Cold start: from `sluice run` to the first reading processed, as after a power cut.

A Mosquitto of our own; a publisher sends a hot reading (95 °C) every 5 ms on a new key from
before the gateway starts; `sluice run` (no LLM) starts with mqtt -> filter -> map -> threshold
-> mqtt_out, and the clock stops when its first alert arrives back on the broker: process start,
imports, config, state and outbox files, the MQTT connection and subscription, one reading
through the chain and the outbox, one publish. Reported: best and median of R starts (each with
a fresh data directory, so no restored state), and the import share (`python -X importtime`,
the modules a running gateway loads). Also the gateway's resident memory (VmRSS) a second after
its first alert, while nobody has opened the console (whose web stack loads at its first
request), and again after one request to the console. Ends with one JSON line.

    .venv/bin/python scripts/bench/cold_start.py [--quick] [--runs R]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Mosquitto, compile_sources, find_mosquitto, free_port, stop_process

# the same config and binary as the ingest benchmark
from mqtt_ingest import ALERT_TOPIC, ROOT, SLUICE_BIN, sluice_config

GOAL_S = 1.5


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def one_start(tmp: Path, port: int, run: int) -> tuple[float | None, float | None, float | None]:
    """Seconds to the first alert; RSS (MiB) a second later, and after one console request."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    first = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"cold-{run}-{os.getpid()}")
    client.on_connect = lambda c, *a: c.subscribe(ALERT_TOPIC, 1)
    client.on_message = lambda *a: first.set()
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    stop = threading.Event()

    def publish() -> None:
        i = 0
        while not stop.is_set():
            client.publish(f"bench/c{run}-{i}/temp", json.dumps({"value": 95.0}), qos=0)
            i += 1
            time.sleep(0.005)

    cfg = tmp / f"cold-{run}.yaml"
    console_port = free_port()
    cfg.write_text(sluice_config("simple", port, tmp / f"data-{run}", console_port=console_port))
    pub = threading.Thread(target=publish, daemon=True)
    pub.start()
    time.sleep(0.2)  # readings are already flowing when the gateway starts
    log = open(tmp / f"cold-{run}.log", "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen([str(SLUICE_BIN), "run", str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    got = first.wait(30)
    elapsed = time.monotonic() - t0
    rss_idle = rss_console = None
    if got:
        time.sleep(1.0)
        rss_idle = rss_mib(proc.pid)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{console_port}/healthz", timeout=10) as resp:
                resp.read()
            time.sleep(0.5)
            rss_console = rss_mib(proc.pid)
        except OSError as exc:
            print(f"the console did not answer: {exc}", file=sys.stderr)
    stop.set()
    pub.join()
    stop_process(proc)
    log.close()
    client.loop_stop()
    client.disconnect()
    return (elapsed if got else None), rss_idle, rss_console


def import_share() -> tuple[float, list[tuple[float, str]]]:
    """Seconds `python -X importtime` spends importing what `sluice run` imports at start, and
    the largest top-level packages."""
    code = (
        # as `sluice run` does for this config (no TLS in it): OpenSSL loaded at its first use
        "import gateway._tls\n"
        "with gateway._tls.deferred_openssl(''):\n"
        "    import gateway.cli, gateway.runtime, gateway.console\n"
        "import nodes.sources, nodes.operators, nodes.detectors, nodes.sinks, nodes.windows"
    )
    py = SLUICE_BIN.parent / "python"
    out = subprocess.run([str(py), "-X", "importtime", "-c", code], capture_output=True, text=True).stderr
    total = 0.0
    tops: list[tuple[float, str]] = []
    for line in out.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m and not m.group(3):  # a top-level import: its cumulative time
            cum = int(m.group(2)) / 1e6
            total += cum
            tops.append((cum, m.group(4)))
    return total, sorted(tops, reverse=True)[:6]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=None, help="starts (default 7; 3 with --quick)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    runs = args.runs or (3 if args.quick else 7)
    if find_mosquitto() is None:
        print("mosquitto not found: run scripts/ensure_mosquitto.sh", file=sys.stderr)
        return 2
    if not SLUICE_BIN.exists():
        print(f"{SLUICE_BIN} does not exist (run `make deps`)", file=sys.stderr)
        return 2
    compile_sources(SLUICE_BIN.parent / "python", ROOT)  # as an installed gateway has them
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-cold-"))
    times: list[float] = []
    idle: list[float] = []
    console: list[float] = []
    failed = 0
    try:
        broker = Mosquitto(tmp / "broker").start()
        try:
            for r in range(runs):
                t, rss_idle, rss_console = one_start(tmp, broker.port, r)
                if t is None:
                    failed += 1
                else:
                    times.append(t)
                idle += [rss_idle] if rss_idle else []
                console += [rss_console] if rss_console else []
        finally:
            broker.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    imports, tops = import_share()
    print(f"cold start: `sluice run` to the first alert back on the broker (no LLM), {runs} starts")
    if times:
        best, median = min(times), statistics.median(times)
        print(
            f"best {best:.2f} s, median {median:.2f} s (goal <= {GOAL_S} s: {'met' if median <= GOAL_S else 'NOT met'})"
        )
    else:
        best = median = None
        print("no start produced an alert within 30 s")
    print(f"imports alone: {imports:.2f} s; largest: " + ", ".join(f"{n} {t:.2f} s" for t, n in tops))
    rss_idle = statistics.median(idle) if idle else None
    rss_console = statistics.median(console) if console else None
    if rss_idle and rss_console:
        print(f"RSS (median): {rss_idle:.1f} MiB running, console unused; {rss_console:.1f} MiB once it answered")
    print(
        json.dumps(
            {
                "bench": "cold_start",
                "ratio": round(GOAL_S / median, 3) if median else None,
                "best_s": round(best, 3) if best else None,
                "median_s": round(median, 3) if median else None,
                "runs": runs,
                "failed": failed,
                "imports_s": round(imports, 3),
                "rss_console_unused_mib": round(rss_idle, 1) if rss_idle else None,
                "rss_console_loaded_mib": round(rss_console, 1) if rss_console else None,
                "goal_s": GOAL_S,
            }
        )
    )
    return 0 if times else 1


if __name__ == "__main__":
    sys.exit(main())
