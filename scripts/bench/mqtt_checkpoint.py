#!/usr/bin/env python3
"""How much of each state checkpoint the QoS 1 MQTT source's list takes: the messages it took
(packet id and CRC-32 of topic and payload) and does not yet know the broker has acknowledged.

A gateway in this process reads QoS 1 readings from a Mosquitto of its own (free loopback port,
no persistence) into a 10 s tumbling window (a stateful node: PUBACKs go out only after the
checkpoint that holds the readings, about a second later). Two phases:

  steady    readings published at a steady rate (1,000/s by default)
  burst     B readings published at once (the broker's queue for a gateway that was away)

After every checkpoint the bench reads what the state store was given for the source (its row,
as written to ``state.db``): how many messages, how many bytes. ``ratio`` is the largest
checkpoint of the burst ÷ the largest of the steady phase. The output ends with one JSON line.

  .venv/bin/python scripts/bench/mqtt_checkpoint.py [--rate 1000] [--seconds 20] [--burst 50000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from _common import Mosquitto, at_rate, checkpoint_summary, checkpointed_source, log, until  # noqa: E402


def source_row(pipeline: Any) -> tuple[int, int]:
    """(messages, bytes) of the source's row as the checkpointer last wrote it."""
    rows = pipeline.checkpointer._last_json.get("src", {})
    n = 0
    for v in rows.values():
        held = json.loads(v)  # base64 of 6 bytes a message (nodes/sources.py), or {packet id: crc} before
        n += len(base64.b64decode(held)) // 6 if isinstance(held, str) else len(held)
    return n, sum(len(k) + len(v) for k, v in rows.items())


async def run(port: int, workdir: Path, rate: int, seconds: float, burst: int) -> dict[str, Any]:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-publisher")
    pub.max_inflight_messages_set(1000)
    pub.max_queued_messages_set(0)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    sent = 0

    def publish(n: int) -> None:
        nonlocal sent
        for i in range(sent, sent + n):
            pub.publish(f"sensors/k{i % 100}", json.dumps({"value": i % 50, "ts": 1.7e9 + i / rate}), qos=1)
        sent += n

    source = '{id: src, type: mqtt, connection: plant, topic: "sensors/+", key: "topic[1]", qos: 1}'
    connections = f"connections:\n  plant: {{type: mqtt, host: 127.0.0.1, port: {port}}}\n"
    try:
        async with checkpointed_source(source, workdir, source_row, "steady", connections) as got:
            src = got.src
            await until(lambda: src.health().get("state") == "connected")
            await asyncio.sleep(0.5)  # subscribed
            log(f"steady: {rate} readings/s for {seconds:g} s")
            await at_rate(rate, seconds, publish)
            await until(lambda: src.n_in >= sent)
            await asyncio.sleep(3)  # the last ones acknowledged and confirmed
            got.phase = "burst"
            log(f"burst: {burst} readings at once")
            t1 = time.monotonic()
            publish(burst)
            await until(lambda: src.n_in >= sent)
            drain_s = time.monotonic() - t1
            await asyncio.sleep(3)
    finally:
        pub.loop_stop()
        pub.disconnect()
    return {"samples": got.samples, "drain_s": drain_s}


def summary(samples: list[tuple[int, int]]) -> dict[str, Any]:
    out = checkpoint_summary(samples, ("held", "bytes"))
    out["bytes_per_message"] = round(sum(s[1] for s in samples) / max(1, sum(s[0] for s in samples)), 1)
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--burst", type=int, default=50_000)
    ap.add_argument("--quick", action="store_true", help="8 s steady, a 20,000-reading burst")
    a = ap.parse_args()
    if a.quick:
        a.seconds, a.burst = 8.0, 20_000
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto").start()
        try:
            got = await run(broker.port, Path(tmp) / "gw", a.rate, a.seconds, a.burst)
        finally:
            broker.stop()
    steady, burst = summary(got["samples"].get("steady", [])), summary(got["samples"].get("burst", []))
    print()
    print(f"{'phase':<7} {'checkpoints':>11} {'held median':>11} {'held max':>8} {'bytes median':>12} "
          f"{'bytes max':>10} {'bytes/msg':>9}")  # fmt: skip
    for name, s in (("steady", steady), ("burst", burst)):
        print(f"{name:<7} {s['checkpoints']:>11} {s['held_median']:>11} {s['held_max']:>8} {s['bytes_median']:>12} "
              f"{s['bytes_max']:>10} {s['bytes_per_message']:>9}")  # fmt: skip
    drain_rate = round(a.burst / got["drain_s"])
    print(f"\nsteady at {a.rate} readings/s; a burst of {a.burst} taken in {got['drain_s']:.1f} s ({drain_rate}/s)")
    ratio = round(burst["bytes_max"] / max(1, steady["bytes_max"]), 2)
    print(f"ratio = largest burst checkpoint / largest steady checkpoint = {ratio}")
    print(json.dumps({"bench": "mqtt_checkpoint", "ratio": ratio, "rate": a.rate, "burst": a.burst,
                      "burst_per_s": drain_rate, "steady": steady, "during_burst": burst,
                      "quick": a.quick}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
