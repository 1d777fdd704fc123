#!/usr/bin/env python3
"""The per-alert path in process, without sockets: what one alert costs from the threshold to
the delete of its acknowledged outbox row.

Window-mean events (each with its window's result id) go through a real ``threshold`` (every
event raises or clears), a real ``mqtt_out`` and the gateway's outbox on a real SQLite file
(WAL, ``synchronous=FULL``, result ids looked up and stored); the outbox sends each row through
``MqttLink``'s PUBLISH builder, whose socket write is a list here, and the broker's PUBACKs are
handed to the link 16 per "read" as they would come from the socket; acknowledged rows are then
deleted. Batches of 100 alerts. No broker and no network, so the path is the same in every run:
under callgrind its instruction count repeats to within ~1 %, which timing on a busy machine
does not (the network part, one socket write per batch and the PUBACK reads, is what
``mqtt_ingest.py`` adds).

The figure is CPU time of the process (all threads: the loop's and the outbox's SQLite thread)
per alert, as the difference of a short and a long run (start-up and imports cancel out); the
fsync of each commit is included as CPU time the kernel spends, not as waiting.

  .venv/bin/python scripts/bench/alert_path.py [--batches 200] [--quick]

Instructions instead of time (stable under load): run the role twice under callgrind and take
the difference, e.g.
  PYTHONHASHSEED=0 valgrind --tool=callgrind .venv/bin/python scripts/bench/alert_path.py --role run --batches 5
  PYTHONHASHSEED=0 valgrind --tool=callgrind .venv/bin/python scripts/bench/alert_path.py --role run --batches 25
  (total instructions of the second minus the first) / 2,000 = instructions per alert
(``--separate-threads=yes`` splits the loop's share from the SQLite thread's.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PER_BATCH = 100  # alerts per batch: 50 keys, one raise and one clear each
ACKS_PER_READ = 16


async def run(batches: int) -> int:
    """Send ``batches`` batches of alerts through the path; the number of alerts acknowledged."""
    from gmqtt.mqtt.utils import IdGenerator

    from gateway.config import MqttConnection
    from gateway.events import Event
    from gateway.mqtt import MqttLink
    from gateway.node import NodeContext
    from gateway.outbox import Outbox
    from nodes.detectors import Threshold, ThresholdOptions
    from nodes.sinks import MqttOut, MqttOutOptions

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        link = MqttLink("plant", MqttConnection(type="mqtt", host="127.0.0.1", port=1), "alert-path")
        # The link's client as far as publishing and acknowledging use it; its socket is a list.
        written: list[bytes] = []
        protocol = SimpleNamespace(proto_ver=4, write_data=written.append)
        link._client = SimpleNamespace(
            _connection=SimpleNamespace(_protocol=protocol),
            _package_handler=SimpleNamespace(id_generator=IdGenerator(max=65535)),
            is_connected=True,
        )
        link._connected.set()
        outbox = Outbox(d / "outbox.db", "bench", {"plant": link})
        # The deletes are flushed after each batch below, not every 50 ms of wall time: under
        # callgrind, where a run is ~50 times slower, those timed commits came at random points
        # and made the instruction count vary by ~2 % between runs of the same code.
        outbox._deleter = asyncio.Event().wait  # type: ignore[method-assign]
        await outbox.open()
        sending = asyncio.create_task(outbox.run())
        services = SimpleNamespace(outbox=outbox, publisher=lambda name: link)
        ctx = NodeContext(
            gateway_id="bench", pipeline="bench", node_id="hot", data_dir=str(d), services=services, dead_letters=None
        )
        hot = Threshold(ThresholdOptions(id="hot", type="threshold", input="mean", above=90, clear_below=10), ctx)
        out = MqttOut(
            MqttOutOptions(
                id="out", type="mqtt_out", input="hot", connection="plant", topic="sluice/{gateway}/alerts/{pipeline}"
            ),
            ctx,
        )
        await out.start()
        ts = 1733600000.0
        for b in range(batches):
            events = []
            for v in (95.0, 5.0):  # a raise, then a clear, for each key
                ts += 10.0
                events += [
                    Event(
                        f"sensor-{k:03d}", ts, v, "mean", {"result_id": f"bench/mean/sensor-{k:03d}/{ts!r}/{ts + 10!r}"}
                    )
                    for k in range(PER_BATCH // 2)
                ]
            alerts = hot.process_batch(events)
            await out.write(alerts)  # returns once committed
            while outbox.published < (b + 1) * PER_BATCH:
                await asyncio.sleep(0)  # the sender's turn
                mids = sorted(link._acks)
                for at in range(0, len(mids), ACKS_PER_READ):
                    link._pubacks(mids[at : at + ACKS_PER_READ])
            written.clear()
            await outbox._flush_deletes()
        published = outbox.published
        await outbox.close()
        sending.cancel()
        if outbox.count:
            raise RuntimeError(f"{outbox.count} rows left in the outbox")
        return published


def bare(batches: int) -> int:
    """The floor for a durable alert in Python: the same JSON bodies built with ``json.dumps``,
    written 100 to a transaction into a SQLite file (WAL, ``synchronous=FULL``) and deleted after
    the next commit; no threshold, no result ids, no MQTT packets."""
    import sqlite3

    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "bare.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE q (id INTEGER PRIMARY KEY, topic TEXT, body BLOB)")
        ts = 1733600000.0
        for _ in range(batches):
            rows = []
            for v, state in ((95.0, "raised"), (5.0, "cleared")):
                ts += 10.0
                for k in range(PER_BATCH // 2):
                    value = {"state": state, "key": f"sensor-{k:03d}", "reading": v}
                    body = json.dumps({"pipeline": "bench", "key": f"sensor-{k:03d}", "ts": ts, "value": value})
                    rows.append(("sluice/bench/alerts/bench", body.encode()))
            db.execute("BEGIN")
            db.execute("DELETE FROM q")
            db.executemany("INSERT INTO q (topic, body) VALUES (?, ?)", rows)
            db.execute("COMMIT")
        db.close()
    return batches * PER_BATCH


def cpu_of(batches: int, role: str = "run") -> tuple[float, int]:
    """(CPU seconds of a child process running ``batches``, alerts it handled)."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--role", role, "--batches", str(batches)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["cpu_s"], result["alerts"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=200, help="batches of 100 alerts in the long run")
    ap.add_argument("--quick", action="store_true", help="60 batches, two pairs of runs")
    ap.add_argument("--pairs", type=int, default=3, help="short/long run pairs (the lowest is reported)")
    ap.add_argument("--role", choices=("main", "run", "bare"), default="main", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role != "main":
        t0 = time.process_time()
        n = asyncio.run(run(args.batches)) if args.role == "run" else bare(args.batches)
        print(json.dumps({"cpu_s": time.process_time() - t0, "alerts": n}))
        return
    if args.quick:
        args.batches, args.pairs = 60, 2
    short = max(1, args.batches // 10)
    per_alert: dict[str, list[float]] = {"run": [], "bare": []}
    for _ in range(args.pairs):  # alternating, so that both see the same moments of a busy machine
        for role, got in per_alert.items():
            (c0, n0), (c1, n1) = cpu_of(short, role), cpu_of(args.batches, role)
            got.append((c1 - c0) / (n1 - n0) * 1e6)
    path, floor = min(per_alert["run"]), min(per_alert["bare"])
    print("alert path in process: threshold -> mqtt_out -> outbox (FULL sync) -> PUBLISH -> PUBACK -> delete")
    print(f"{args.batches} batches of {PER_BATCH} alerts against {short}; {args.pairs} pairs; lowest of the pairs")
    print("| subject | CPU µs per alert | all pairs |")
    print("| --- | ---: | --- |")
    for role, label in (("bare", "bare SQLite insert + delete, FULL sync"), ("run", "sluice alert path")):
        print(f"| {label} | {min(per_alert[role]):.1f} | {', '.join(f'{x:.1f}' for x in per_alert[role])} |")
    print(
        json.dumps(
            {
                "bench": "alert_path",
                "ratio": round(floor / path, 3) if path > 0 else None,
                "us_per_alert": round(path, 2),
                "us_per_alert_all": [round(x, 2) for x in per_alert["run"]],
                "bare_us_per_alert": round(floor, 2),
                "alerts": args.batches * PER_BATCH,
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
