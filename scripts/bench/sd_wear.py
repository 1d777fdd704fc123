#!/usr/bin/env python3
"""SD-card wear: bytes the gateway writes to disk per 1,000 readings, at the defaults and low_wear.

Runs `sluice run` twice on a real disk (the data dir under .cache/, never tmpfs), each time with
the same pipeline a small plant gateway runs — 20 simulated sensors at 20 readings/s each → a
10 s window per key → mqtt_out, every reading → a history sink, and a threshold (crossed by two
spiking sensors twice a minute) → alerts and mqtt_out, through the outbox to a Mosquitto of its own —
first with `gateway.storage: durable` (the default), then `low_wear`. Between two points after
start-up it reads the process's `write_bytes` from /proc/PID/io (what reached the block layer:
SQLite pages, WAL, fsyncs) and the source's reading count from /metrics.

Figures: bytes per 1,000 readings for each profile and `ratio` = durable ÷ low_wear (how many
times less the low-wear profile writes; higher is better). The output ends with one JSON line.

  .venv/bin/python scripts/bench/sd_wear.py [--seconds 60] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _common import Mosquitto, free_port, log

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def config(data: Path, broker: int, console: int, storage: str, sensors: int, interval: float) -> str:
    # a plant at work: readings wander below the threshold; two sensors spike past it twice a
    # minute, so alerts come at a few a minute (an alert step is the costliest write there is)
    spikes = ", anomalies: [{kind: spike, every: 30s, size: 60}]"
    keys = ", ".join(
        f"{{key: s{i}, base: {50 + i}, amplitude: 10.0, period: {20 + i}s, noise: 0.5{spikes if i < 2 else ''}}}"
        for i in range(sensors)
    )
    return f"""\
gateway: {{id: wear, data_dir: "{data}", storage: {storage}}}
connections:
  local: {{type: mqtt, host: 127.0.0.1, port: {broker}}}
console: {{host: 127.0.0.1, port: {console}, auth: false}}
pipelines:
  - name: plant
    nodes:
      - {{id: sim, type: simulate, interval: {interval}s, seed: 1, sensors: [{keys}]}}
      - {{id: avg, type: window, input: sim, kind: tumbling, size: 10s, aggregate: mean}}
      - {{id: hist, type: history, input: sim}}
      - {{id: hot, type: threshold, input: sim, above: 90, clear_below: 80}}
      - {{id: alerts, type: alert, input: hot}}
      - {{id: out, type: mqtt_out, input: [avg, hot], connection: local}}
"""


def write_bytes(pid: int) -> int:
    text = Path(f"/proc/{pid}/io").read_text()
    return int(re.search(r"^write_bytes: (\d+)", text, re.M).group(1))  # type: ignore[union-attr]


def readings(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(r'^sluice_node_out_total\{[^}]*node="sim"[^}]*\} ([0-9.e+]+)', text, re.M)
    return int(float(m.group(1))) if m else 0


def run_profile(storage: str, seconds: float, work: Path, broker: int, sensors: int, interval: float) -> dict[str, Any]:
    data = work / f"data-{storage}"
    shutil.rmtree(data, ignore_errors=True)
    port = free_port()
    cfg = work / f"{storage}.yaml"
    cfg.write_text(config(data, broker, port, storage, sensors, interval))
    proc = subprocess.Popen(
        [PY, "-m", "gateway.cli", "run", str(cfg)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # wait for the console, then let start-up writes (schema, first checkpoint) pass
            try:
                readings(port)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sluice run did not start: {proc.stderr.read()[-2000:]}") from None  # type: ignore[union-attr]
                time.sleep(0.2)
        time.sleep(3)
        w0, r0, t0 = write_bytes(proc.pid), readings(port), time.monotonic()
        time.sleep(seconds)
        w1, r1, t1 = write_bytes(proc.pid), readings(port), time.monotonic()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    n = r1 - r0
    return {
        "storage": storage,
        "readings": n,
        "seconds": t1 - t0,
        "bytes": w1 - w0,
        "bytes_per_1k": (w1 - w0) / n * 1000 if n else float("nan"),
        "mib_per_day": (w1 - w0) / (t1 - t0) * 86400 / 2**20,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="measured time per profile")
    ap.add_argument("--sensors", type=int, default=20)
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between readings of each sensor")
    ap.add_argument("--quick", action="store_true", help="10 s per profile")
    args = ap.parse_args()
    if args.quick:
        args.seconds = 10.0
    (ROOT / ".cache").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sd-wear-", dir=ROOT / ".cache"))  # a real disk, not tmpfs
    mq = Mosquitto(work / "broker").start()
    broker = mq.port
    try:
        rate = args.sensors / args.interval
        log(f"sd_wear: {args.sensors} sensors at {rate:,.0f} readings/s, {args.seconds:g} s per profile, in {work}")
        results = [
            run_profile(s, args.seconds, work, broker, args.sensors, args.interval) for s in ("durable", "low_wear")
        ]
    finally:
        mq.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'profile':<10} {'readings':>9} {'written':>12} {'bytes/1k readings':>18} {'MiB/day':>9}")
    for r in results:
        row = f"{r['storage']:<10} {r['readings']:>9,} {r['bytes']:>12,}"
        print(f"{row} {r['bytes_per_1k']:>18,.0f} {r['mib_per_day']:>9,.1f}")
    durable, low = results
    ratio = durable["bytes_per_1k"] / low["bytes_per_1k"] if low["bytes_per_1k"] else float("inf")
    print(f"low_wear writes {ratio:.1f}x less than the default")
    print(
        json.dumps(
            {
                "bench": "sd_wear",
                "ratio": round(ratio, 2),
                "bytes_per_1k_readings": {
                    "durable": round(durable["bytes_per_1k"]),
                    "low_wear": round(low["bytes_per_1k"]),
                },
                "mib_per_day": {"durable": round(durable["mib_per_day"], 1), "low_wear": round(low["mib_per_day"], 1)},
                "readings_per_s": round(durable["readings"] / durable["seconds"]),
                "seconds": args.seconds,
                "machine": f"{os.uname().machine}, {os.cpu_count()} cores",
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
