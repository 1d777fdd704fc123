#!/usr/bin/env python3
"""What the event-time bound and the ingest clock cost on a source's hand-over.

Every batch a source hands to its pipeline goes through ``SourceQueue.put_nowait``; a source
whose readings can carry their own time (``max_future``, default 5 min) has each reading's time
compared with the ingest clock there. Subjects, back to back on the same batches of readings
stamped with the current time:

- ``unbounded``: ``put_nowait`` of a source without ``max_future`` (modbus, simulate);
- ``bounded``: the same with ``max_future: 5m`` (mqtt, serial, http, websocket, kafka, redis);
- ``mqtt decode``: the MQTT source's decoding of one JSON reading with a ``ts`` (what a reading
  costs before the hand-over, for scale);
- ``time.time`` / ``ingest clock``: one stamp from the system clock, and from the ingest clock
  (the monotonic clock plus an anchor).

Reported: ns per reading for each subject (CPU time, best of several runs), ns per stamp for each
clock, and ``ratio`` = readings per second of decode + bounded hand-over ÷ decode + unbounded
hand-over (1.0: the bound is free).
Ends with one JSON line.

    .venv/bin/python scripts/bench/event_time_bound.py [--quick] [--batch B]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gateway.clock import IngestClock  # noqa: E402  # after the path set-up above
from gateway.deadletter import DeadLetters  # noqa: E402
from gateway.engine import BatchQueue, SourceQueue  # noqa: E402
from gateway.events import Event  # noqa: E402
from gateway.node import Duration, NodeContext, NodeOptions, Source  # noqa: E402


class _Options(NodeOptions):
    type: Literal["bench_src"] = "bench_src"
    max_future: Duration | None = None


class _Src(Source):
    Options = _Options


def _handover(bounded: bool, batches: list[list[Event]], rounds: int) -> float:
    """CPU ns per reading for ``put_nowait`` (the queue is emptied between rounds)."""
    ctx = NodeContext("gw", "p", "src", "/tmp", None, DeadLetters(None), clock=IngestClock())
    node = _Src(_Options(id="src", max_future=300.0 if bounded else None), ctx)
    best = float("inf")
    n = sum(len(b) for b in batches)
    for _ in range(rounds):
        q = BatchQueue(10**9)
        out = SourceQueue(q, 0, node)
        t0 = time.process_time_ns()
        for b in batches:
            out.put_nowait(b)
        best = min(best, (time.process_time_ns() - t0) / n)
    return best


def _clock(fn: Any, n: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time_ns() - t0) / n)
    return best


def _decode(n: int, rounds: int) -> float:
    from nodes.sources import MqttSource

    ctx = NodeContext("gw", "p", "m", "/tmp", None, DeadLetters(None), clock=IngestClock())
    src = MqttSource(MqttSource.Options(id="m", type="mqtt", connection="c", topic="s/+", key="topic[1]"), ctx)
    payloads = [json.dumps({"ts": time.time() + i * 0.001, "value": 20.0 + i % 10}).encode() for i in range(1000)]
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time_ns()
        for i in range(n):
            src.decode("s/k1", payloads[i % 1000])
        best = min(best, (time.process_time_ns() - t0) / n)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer readings and rounds (< 30 s)")
    ap.add_argument("--batch", type=int, default=500, help="readings per batch (the mqtt source's default)")
    args = ap.parse_args()
    n, rounds = (200_000, 5) if args.quick else (2_000_000, 9)
    now = time.time()
    events = [Event(f"k{i % 100}", now + (i % 50) * 0.01, 1.0, "src") for i in range(n)]
    batches = [events[i : i + args.batch] for i in range(0, n, args.batch)]
    unbounded = _handover(False, batches, rounds)
    bounded = _handover(True, batches, rounds)
    decode = _decode(n // 4, rounds)
    wall = _clock(time.time, n, rounds)
    ingest = _clock(IngestClock(), n, rounds)
    print(f"{'subject':<16} {'ns/reading':>11}")
    print(f"{'unbounded':<16} {unbounded:>11.1f}")
    print(f"{'bounded (5m)':<16} {bounded:>11.1f}")
    print(f"{'mqtt decode':<16} {decode:>11.1f}")
    print(f"{'subject':<16} {'ns/stamp':>11}")
    print(f"{'time.time':<16} {wall:>11.1f}")
    print(f"{'ingest clock':<16} {ingest:>11.1f}")
    ratio = (decode + unbounded) / (decode + bounded)
    print(
        f"ratio (decode + bounded ÷ decode + unbounded, readings/s): {ratio:.3f}; "
        f"batch {args.batch}, {n} readings, best of {rounds}"
    )
    print(
        json.dumps(
            {
                "bench": "event_time_bound",
                "ratio": round(ratio, 3),
                "unbounded_ns_per_reading": round(unbounded, 1),
                "bounded_ns_per_reading": round(bounded, 1),
                "mqtt_decode_ns_per_reading": round(decode, 1),
                "time_time_ns": round(wall, 1),
                "ingest_clock_ns": round(ingest, 1),
                "batch": args.batch,
                "readings": n,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
