#!/usr/bin/env python3
"""Outbox benchmark: durable publishing at QoS 1 through Sluice's outbox, beside bare gmqtt.

Against a Mosquitto broker of its own (free loopback port), in one invocation:

  bare     a gmqtt client publishing N JSON messages at QoS 1 with at most W unacknowledged
           (the floor: no disk at all)
  outbox   the same N messages put into the outbox in batches of B (each batch committed to
           SQLite with synchronous=FULL before put() returns, as the mqtt_out sink does), sent
           through an MqttLink and deleted on PUBACK; timed until the last one is acknowledged
  drain    a backlog of D messages put while the broker is unreachable, then the broker starts:
           time until the outbox is empty, and SQLite bytes per queued message

Figures: msg/s for bare and outbox and their ratio (goal >= 0.5), drain msg/s and seconds
(goal: 100,000 in under a minute), bytes per queued message. The output ends with one JSON line.

  .venv/bin/python scripts/bench/outbox_publish.py [--n 50000] [--backlog 100000] [--batch 500] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import gmqtt  # noqa: E402
from _common import Mosquitto, log  # noqa: E402

from gateway.config import MqttConnection  # noqa: E402
from gateway.mqtt import MqttLink  # noqa: E402
from gateway.outbox import Outbox, OutboxConfig  # noqa: E402

GOAL_RATIO = 0.5
GOAL_DRAIN_S = 60.0
WINDOW = 256


def payload(i: int) -> dict[str, Any]:
    return {
        "pipeline": "bench",
        "source": "hot",
        "key": f"k{i % 100:03d}",
        "ts": 1764300000.0 + i * 0.001,
        "value": {
            "state": "raised",
            "alert_key": f"bench/hot/k{i % 100:03d}",
            "severity": "warning",
            "reading": 91.5,
            "rule": "k above 90",
        },
    }


async def bare(port: int, n: int) -> float:
    client = gmqtt.Client(f"bench-bare-{os.getpid()}")
    await client.connect("127.0.0.1", port, version=gmqtt.constants.MQTTv50)
    storage = client._persistent_storage
    bodies = [
        json.dumps(
            {"gateway_id": "bench", "seq": i + 1, "replayed": False, **payload(i)}, separators=(",", ":")
        ).encode()
        for i in range(n)
    ]
    t0 = time.perf_counter()
    for body in bodies:
        while len(storage._messages) >= WINDOW:  # noqa: ASYNC110 -- bare gmqtt has no ack event
            await asyncio.sleep(0.0005)
        client.publish("bench/alerts", body, qos=1)
    await storage.wait_empty()
    dt = time.perf_counter() - t0
    await client.disconnect()
    return n / dt


def _link(port: int) -> MqttLink:
    conn = MqttConnection(type="mqtt", host="127.0.0.1", port=port, status=False, reconnect_max=0.5)
    return MqttLink("bench", conn, f"bench-outbox-{os.getpid()}-{time.monotonic_ns()}")


async def outbox_live(port: int, n: int, batch: int, workdir: Path) -> tuple[float, float]:
    """(msg/s, CPU µs per message of the whole process: the loop and the outbox's SQLite thread)."""
    link = _link(port)
    ob = Outbox(workdir / "live.db", "bench", {"bench": link}, OutboxConfig(inflight=WINDOW, max_bytes=10**10))
    await ob.open()
    tasks = [asyncio.create_task(link.run()), asyncio.create_task(ob.run())]
    await link.wait_connected()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for start in range(0, n, batch):
        await ob.put([("bench", "bench/alerts", payload(i), None) for i in range(start, min(n, start + batch))])
    while ob.published < n:  # noqa: ASYNC110 -- polling a counter costs the subject nothing
        await asyncio.sleep(0.005)
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    await ob.close()
    await link.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return n / dt, cpu / n * 1e6


async def drain(broker: Mosquitto, backlog: int, workdir: Path) -> tuple[float, float, float]:
    broker.stop()
    link = _link(broker.port)
    path = workdir / "drain.db"
    ob = Outbox(path, "bench", {"bench": link}, OutboxConfig(inflight=WINDOW, max_bytes=10**10))
    await ob.open()
    tasks = [asyncio.create_task(link.run()), asyncio.create_task(ob.run())]
    for start in range(0, backlog, 1000):
        await ob.put([("bench", "bench/alerts", payload(i), None) for i in range(start, min(backlog, start + 1000))])
    size = sum(p.stat().st_size for p in workdir.glob("drain.db*"))  # noqa: ASYNC240 -- not timed
    per_msg = size / backlog
    broker.start()
    await link.wait_connected()
    t0 = time.perf_counter()
    while ob.count > 0:  # noqa: ASYNC110 -- polling a counter costs the subject nothing
        await asyncio.sleep(0.01)
    dt = time.perf_counter() - t0
    await ob.close()
    await link.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return backlog / dt, dt, per_msg


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="messages for bare and outbox")
    ap.add_argument("--backlog", type=int, default=100_000, help="messages queued offline for the drain")
    ap.add_argument(
        "--batch",
        type=int,
        default=500,
        help="messages per outbox put, one commit each (what a sink gets per write under load)",
    )
    ap.add_argument("--quick", action="store_true", help="10,000 messages and a 20,000 backlog")
    args = ap.parse_args()
    if args.quick:
        args.n, args.backlog = 10_000, 20_000
    with tempfile.TemporaryDirectory(prefix="sluice-bench-outbox-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work).start()
        try:
            log(f"bare gmqtt: {args.n} messages at QoS 1 ...")
            bare_rate = await bare(broker.port, args.n)
            log(f"outbox: {args.n} messages in batches of {args.batch} ...")
            ob_rate, ob_cpu_us = await outbox_live(broker.port, args.n, args.batch, work)
            log(f"drain: a {args.backlog}-message backlog ...")
            drain_rate, drain_s, per_msg = await drain(broker, args.backlog, work)
        finally:
            broker.stop()
    ratio = ob_rate / bare_rate
    print(f"{'subject':<10} {'msg/s':>10}")
    print(f"{'bare':<10} {bare_rate:>10.0f}")
    print(
        f"{'outbox':<10} {ob_rate:>10.0f}   ratio {ratio:.2f} (goal >= {GOAL_RATIO}); "
        f"{ob_cpu_us:.1f} µs CPU per message (put, commit, publish, PUBACK, delete)"
    )
    print(
        f"{'drain':<10} {drain_rate:>10.0f}   {args.backlog} in {drain_s:.1f} s "
        f"(goal: 100,000 in < {GOAL_DRAIN_S:.0f} s); {per_msg:.0f} bytes per queued message"
    )
    print(
        json.dumps(
            {
                "bench": "outbox_publish",
                "ratio": round(ratio, 3),
                "n": args.n,
                "bare_msg_s": round(bare_rate),
                "outbox_msg_s": round(ob_rate),
                "outbox_cpu_us_per_msg": round(ob_cpu_us, 2),
                "backlog": args.backlog,
                "drain_msg_s": round(drain_rate),
                "drain_s": round(drain_s, 2),
                "bytes_per_queued_message": round(per_msg),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
