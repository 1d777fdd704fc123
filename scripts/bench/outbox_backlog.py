#!/usr/bin/env python3
"""Outbox backlog sweep: a gateway whose uplink was down, then comes back.

For each backlog size (10k / 100k / 1M alerts; ``--quick``: 10k / 100k), against a real Mosquitto
broker of its own (free loopback port, ``max_queued_messages`` high, persistence on so that a
subscriber's session survives the outage):

  accept     the alerts are put into the outbox (batches of ``--batch``, one durable commit each,
             as the mqtt_out sink does under load) while the broker is down: msg/s, and the bytes
             of ``outbox.db`` + its WAL per queued message
  start      the outbox is closed with the backlog in it and opened again (a gateway restarting
             during the outage): seconds and process CPU of the open
  drain      the broker starts, the outbox's link reconnects, and everything is sent at QoS 1 and
             deleted on PUBACK: seconds from the reconnect until the outbox is empty, msg/s, time
             to the first message, peak RSS and its growth over the drain, peak WAL size
  reconnect  half-way through the drain the broker stops and starts again: seconds and process
             CPU from the link's reconnect to the first PUBACK after it (what the sender reads
             before it sends again)
  delivered  a subscriber (``mosquitto_sub``, QoS 1, persistent session) counts what arrives:
             every ``seq`` once (lost = 0), duplicates (QoS 1 allows some after a reconnect; none
             here), and every ``result_id`` once
  after      the disk left once the drain's deletes are committed: ``outbox.db`` + WAL bytes,
             pages on SQLite's free list, and after the outbox closes

A ``quota`` row queues the largest size into a quota that holds about a quarter of it, so every
commit past the quota also drops the oldest rows (the quota check at scale), and reports the most
``outbox.db`` and its WAL took meanwhile (the quota bounds both).

The baseline, in the same run: a bare gmqtt QoS 1 publisher sending the same payloads (envelope
included) from memory, with at most ``inflight`` unacknowledged, to the same kind of broker and
subscriber, once before and once after the sweep. The closing JSON line's ``ratio`` = Sluice drain
msg/s (largest size) / the baseline's mean msg/s.

  .venv/bin/python scripts/bench/outbox_backlog.py [--quick] [--sizes 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import gmqtt  # noqa: E402
from _common import Mosquitto, log  # noqa: E402

from gateway.config import MqttConnection  # noqa: E402
from gateway.envelope import Envelope, encode_fields  # noqa: E402
from gateway.mqtt import MqttLink  # noqa: E402
from gateway.outbox import MIN_QUOTA, Outbox, OutboxConfig  # noqa: E402

TOPIC = "sluice/bench/alerts/plant"
INFLIGHT = 256
KEYS = 100
PAGE = os.sysconf("SC_PAGE_SIZE")


def find(name: str) -> str:
    for c in (shutil.which(name), f"/usr/bin/{name}", f"/usr/local/bin/{name}"):
        if c and os.access(c, os.X_OK):
            return c
    raise SystemExit(f"{name} not found: run scripts/ensure_mosquitto.sh (or apt-get install mosquitto-clients)")


def broker(workdir: Path) -> Mosquitto:
    """A Mosquitto of our own that keeps sessions (and what is queued for them) across a restart."""
    return Mosquitto(
        workdir,
        extra=f"persistence true\npersistence_location {workdir}/\nautosave_interval 0\nmax_queued_messages 100000000",
    )


class Subscriber:
    """``mosquitto_sub`` at QoS 1 with a persistent session: writes each payload as a line, until stopped
    (a broker restart makes it receive some messages twice, so it cannot count them itself)."""

    def __init__(self, port: int, client_id: str, topic: str, out: Path):
        self.args = [
            find("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-c", "-i", client_id,
            "-t", topic,
        ]  # fmt: skip
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        self.n = 0

    def create_session(self) -> None:
        """Subscribe once and leave: the broker then queues this topic for the client while it is away."""
        subprocess.run([*self.args, "-E"], check=True, timeout=10, stdout=subprocess.DEVNULL)

    def start(self, n: int) -> None:
        self.n = n
        with open(self.out, "wb") as f:
            self.proc = subprocess.Popen(self.args, stdout=f, stderr=subprocess.DEVNULL)

    async def wait(self, limit: float) -> float | None:
        """When (``time.perf_counter()``) the last line came, once ``n`` lines or more came and
        nothing more for a second; ``None`` if that did not happen within ``limit`` seconds. Stops it."""
        assert self.proc is not None
        deadline = time.monotonic() + limit
        size, grew = -1, time.perf_counter()
        try:
            while time.monotonic() < deadline:
                now = self.out.stat().st_size
                if now != size:
                    size, grew = now, time.perf_counter()
                elif time.perf_counter() - grew > 1.0 and self._lines() >= self.n:
                    return grew
                await asyncio.sleep(0.05)
            return None
        finally:
            self.proc.terminate()
            self.proc.wait(10)

    def _lines(self) -> int:
        with open(self.out, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))

    def check(self, n: int, first_seq: int) -> dict[str, int]:
        """What arrived: seqs lost, seqs twice, result ids not the ones their seq was sent with, lines
        that are not ours. Message ``seq`` carries ``fields(seq - 1)``. A bitmap, not a set: the
        harness's own memory stays out of the RSS figures of the next row."""
        seen = bytearray(n)
        got = dup_seq = bad_rid = bad = 0
        with open(self.out, "rb") as f:
            for line in f:
                try:
                    msg = json.loads(line)
                    seq, rid = msg["seq"], msg["result_id"]
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                if not first_seq <= seq < first_seq + n:
                    bad += 1
                    continue
                if seen[seq - first_seq]:
                    dup_seq += 1
                    continue
                seen[seq - first_seq] = 1
                got += 1
                if rid != fields(seq - 1)["result_id"]:
                    bad_rid += 1
        return {"received": got, "lost": n - got, "dup_seq": dup_seq, "bad_result_id": bad_rid, "unexpected": bad}


def fields(i: int) -> dict[str, Any]:
    """An alert as a threshold node's raise reaches mqtt_out (with its result id)."""
    key = f"boiler-{i % KEYS:03d}"
    ts = 1764300000.0 + i * 0.001
    return {
        "pipeline": "plant",
        "source": "hot",
        "key": key,
        "ts": ts,
        "value": {
            "state": "raised",
            "alert_key": f"plant/hot/{key}",
            "severity": "warning",
            "reading": 91.5,
            "rule": "temp above 90",
        },
        "result_id": f"plant/hot/{key}/{ts}/raised",
    }


def message(i: int) -> tuple[str, str, dict[str, Any], str]:
    f = fields(i)
    return "plant", TOPIC, f, f"{TOPIC}\x00{f['key']}"


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def disk(path: Path) -> tuple[int, int]:
    """(database bytes, WAL bytes)."""
    wal = path.with_name(path.name + "-wal")
    return (path.stat().st_size if path.exists() else 0, wal.stat().st_size if wal.exists() else 0)


def cpu_of(proc: Any) -> float:
    """CPU seconds (user + system) a child process has used so far."""
    with open(f"/proc/{proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def freelist(path: Path) -> int:
    """Bytes on SQLite's free list (read through a connection of its own, read-only)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        pages = db.execute("PRAGMA freelist_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
        return int(pages) * int(size)
    finally:
        db.close()


@dataclass
class Sampler:
    """Peak RSS and WAL size, sampled every 20 ms on the loop (costs the subject next to nothing)."""

    wal: Path
    peak_rss: int = 0
    peak_wal: int = 0
    peak_disk: int = 0  # outbox.db + WAL
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    def reset(self) -> None:
        self.peak_rss = rss()
        self.peak_wal = self.peak_disk = 0

    async def _run(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, rss())
            with_wal = self.wal.stat().st_size if self.wal.exists() else 0
            self.peak_wal = max(self.peak_wal, with_wal)
            db = self.wal.with_name(self.wal.name.removesuffix("-wal"))
            self.peak_disk = max(self.peak_disk, with_wal + (db.stat().st_size if db.exists() else 0))
            await asyncio.sleep(0.02)

    def start(self) -> None:
        self.reset()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def _link(port: int) -> MqttLink:
    conn = MqttConnection(type="mqtt", host="127.0.0.1", port=port, status=False, reconnect_max=0.5)
    return MqttLink("plant", conn, f"bench-backlog-{os.getpid()}-{time.monotonic_ns()}")


async def sweep_one(n: int, batch: int, work: Path, max_bytes: int) -> dict[str, Any]:
    """Queue ``n`` alerts while the broker is down, bring it back, drain; measure every phase."""
    mq = broker(work / "broker").start()
    sub = Subscriber(mq.port, f"bench-sub-{n}", TOPIC, work / "received.txt")
    sub.create_session()
    mq.stop()

    path = work / "outbox.db"
    link = _link(mq.port)
    ob = Outbox(path, "bench", {"plant": link}, OutboxConfig(inflight=INFLIGHT, max_bytes=max_bytes))
    await ob.open()
    tasks = [asyncio.create_task(link.run()), asyncio.create_task(ob.run())]
    sampler = Sampler(path.with_name(path.name + "-wal"))
    sampler.start()
    r: dict[str, Any] = {"n": n}
    try:
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            await ob.put([message(i) for i in range(start, min(n, start + batch))])
        r["accept_s"] = time.perf_counter() - t0
        r["accept_msg_s"] = n / r["accept_s"]
        r["queued"] = ob.count
        r["dropped"] = ob.dropped
        db, wal = disk(path)
        r["db_bytes"], r["wal_bytes"] = db, wal
        r["bytes_per_msg"] = (db + wal) / ob.count
        r["accept_peak_wal"] = sampler.peak_wal
        r["accept_peak_disk"] = max(sampler.peak_disk, db + wal)
        r["quota"] = max_bytes
        first_seq = ob.last_id - ob.count + 1
        queued = ob.count

        # a restart during the outage: close with the backlog in it, open again
        await ob.close()
        await asyncio.gather(tasks.pop(), return_exceptions=True)
        ob = Outbox(path, "bench", {"plant": link}, OutboxConfig(inflight=INFLIGHT, max_bytes=max_bytes))
        t0, cpu0 = time.perf_counter(), time.process_time()
        await ob.open()
        r["start_s"], r["start_cpu_s"] = time.perf_counter() - t0, time.process_time() - cpu0
        assert ob.count == queued
        tasks.append(asyncio.create_task(ob.run()))

        sampler.reset()
        r["rss_before"] = sampler.peak_rss
        mq.start()
        sub.start(queued)
        await link.wait_connected()
        t0, cpu0, broker0 = time.perf_counter(), time.process_time(), cpu_of(mq.proc)
        while ob.published == 0:  # noqa: ASYNC110 -- polling a counter costs the subject nothing
            await asyncio.sleep(0.002)
        r["first_s"] = time.perf_counter() - t0
        # half-way: the broker goes away and comes back; time the sender's restart after the reconnect
        while ob.published < queued // 2:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        t_down = time.perf_counter()
        mq.stop()
        while link.connected:  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        mq.start()
        await link.wait_connected()
        t1, cpu1, acked = time.perf_counter(), time.process_time(), ob.published
        while ob.published == acked:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        r["reconnect_first_s"] = time.perf_counter() - t1
        r["reconnect_cpu_s"] = time.process_time() - cpu1
        r["outage_s"] = t1 - t_down
        while ob.count > 0:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        r["drain_s"] = time.perf_counter() - t0 - r["outage_s"]
        r["drain_cpu_us"] = (time.process_time() - cpu0) / queued * 1e6
        r["drain_msg_s"] = queued / r["drain_s"]
        r["broker_cpu"] = (cpu_of(mq.proc) - broker0) / r["drain_s"]
        r["rss_peak"] = sampler.peak_rss
        r["drain_peak_wal"] = sampler.peak_wal
        last = await sub.wait(60 + queued / 5000)
        delivered = last is not None
        r["delivered_s"] = (last or time.perf_counter()) - t0 - r["outage_s"]
        r.update(sub.check(queued, first_seq))
        r["complete"] = delivered
        # the deletes are committed every 50 ms; free space may then go back a step at a time
        t1, last, still = time.perf_counter(), disk(path), 0.0
        while still < 2.0 and time.perf_counter() - t1 < 120:  # a reclaim step may take a while under load
            await asyncio.sleep(0.1)
            now = disk(path)
            still, last = (still + 0.1 if now == last else 0.0), now
        r["settle_s"] = time.perf_counter() - t1 - still
        db, wal = disk(path)
        r["after_db"], r["after_wal"] = db, wal
        r["after_free"] = freelist(path)
    finally:
        await sampler.stop()
        await ob.close()
        await link.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        mq.stop()
    db, wal = disk(path)
    r["closed_db"], r["closed_wal"] = db, wal
    return r


async def baseline(n: int, work: Path) -> float:
    """msg/s of a bare gmqtt QoS 1 publisher (from memory, at most INFLIGHT unacknowledged)."""
    mq = broker(work / "broker").start()
    sub = Subscriber(mq.port, "bench-sub-bare", TOPIC, work / "received.txt")
    try:
        sub.create_session()
        sub.start(n)
        env = Envelope("bench")
        bodies = [env.wrap(encode_fields(fields(i)), i + 1, True) for i in range(n)]
        client = gmqtt.Client(f"bench-bare-{os.getpid()}")
        await client.connect("127.0.0.1", mq.port, version=gmqtt.constants.MQTTv50)
        storage = client._persistent_storage
        t0 = time.perf_counter()
        for body in bodies:
            while len(storage._messages) >= INFLIGHT:  # noqa: ASYNC110 -- bare gmqtt has no ack event
                await asyncio.sleep(0.0005)
            client.publish(TOPIC, body, qos=1)
        await storage.wait_empty()
        rate = n / (time.perf_counter() - t0)
        await client.disconnect()
        if await sub.wait(60 + n / 5000) is None:
            log("baseline: the subscriber did not receive every message")
        got = sub.check(n, 1)
        if got["lost"]:
            log(f"baseline: {got['lost']} lost")
        return rate
    finally:
        mq.stop()


def mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def table(rows: list[dict[str, Any]], base: float, bases: list[float]) -> None:
    print()
    print(
        f"{'backlog':>9} {'accept':>9} {'B/msg':>6} {'disk MiB':>9} {'1st s':>6} {'drain s':>8} {'msg/s':>8}"
        f" {'ratio':>6} {'µs/msg':>7} {'broker':>6} {'RSS MiB':>8} {'+RSS':>6} {'WALpk':>6} {'lost':>5} {'dup':>4}"
        f" {'after MiB':>10} {'in s':>5} {'free MiB':>9} {'closed':>7}"
    )
    for r in rows:
        print(
            f"{r['label']:>9} {r['accept_msg_s']:>7.0f}/s {r['bytes_per_msg']:>6.0f}"
            f" {mib(r['db_bytes'] + r['wal_bytes']):>9} {r['first_s']:>6.2f} {r['drain_s']:>8.2f}"
            f" {r['drain_msg_s']:>8.0f} {r['drain_msg_s'] / base:>6.2f} {r['drain_cpu_us']:>7.1f}"
            f" {r['broker_cpu']:>6.0%}"
            f" {mib(r['rss_peak']):>8} {mib(r['rss_peak'] - r['rss_before']):>6} {mib(r['drain_peak_wal']):>6}"
            f" {r['lost']:>5} {r['dup_seq']:>4} {mib(r['after_db'] + r['after_wal']):>10} {r['settle_s']:>5.1f}"
            f" {mib(r['after_free']):>9} {mib(r['closed_db'] + r['closed_wal']):>7}"
        )
    print(
        f"{'bare':>9} {'':>9} {'':>6} {'':>9} {'':>6} {'':>8} {base:>8.0f} {1:>6.2f}   (gmqtt QoS 1 from memory;"
        f" mean of {' and '.join(f'{b:.0f}' for b in bases)}, before and after the sweep)"
    )
    print()
    print(f"{'backlog':>9} {'start s':>8} {'start CPU s':>12} {'reconnect s':>12} {'reconnect CPU s':>16}")
    for r in rows:
        print(
            f"{r['label']:>9} {r['start_s']:>8.3f} {r['start_cpu_s']:>12.3f} {r['reconnect_first_s']:>12.3f}"
            f" {r['reconnect_cpu_s']:>16.3f}"
        )
    print()
    print(
        "start: open() of an outbox closed with the backlog in it; reconnect: the broker stopped and started\n"
        "half-way through the drain, from the link's reconnect to the first PUBACK after it (seconds, and\n"
        "the process's CPU over that time). The drain's time and msg/s leave the outage out."
    )
    print()
    print(
        "accept: put while the broker is down (batches, one commit each); B/msg: outbox.db + WAL per queued\n"
        "message; 1st s: reconnect to first PUBACK; drain: reconnect to the outbox empty; ratio: drain msg/s\n"
        "/ bare; µs/msg: process CPU over the drain; broker: Mosquitto's CPU over the drain (of one core);\n"
        "+RSS: peak over the drain minus before it; WALpk: peak WAL during the drain; lost/dup: seqs the\n"
        "subscriber missed / got twice (and each result id is checked against its seq); after: db + WAL\n"
        "once they stop changing for 2 s after the drain, in s seconds; free: of which on SQLite's free list;\n"
        "closed: db + WAL after close."
    )


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="backlog sizes, comma-separated")
    ap.add_argument("--batch", type=int, default=500, help="alerts per put while offline (one commit each)")
    ap.add_argument("--no-quota-row", action="store_true", help="skip the row that runs into the quota")
    ap.add_argument("--baseline-n", type=int, default=100_000, help="messages for the bare gmqtt baseline")
    ap.add_argument("--quick", action="store_true", help="10k and 100k backlogs, a 20k quota row, a 20k baseline")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes, args.baseline_n = [10_000, 100_000], 20_000
    rows = []
    bases = []
    with tempfile.TemporaryDirectory(prefix="sluice-bench-backlog-") as tmp:
        work = Path(tmp)
        # the baseline before and after the sweep (the machine's load changes over minutes)
        log(f"baseline: bare gmqtt, {args.baseline_n} messages at QoS 1 ...")
        bases.append(await baseline(args.baseline_n, work / "bare0"))
        for n in sizes:
            log(f"backlog {n}: queue while the broker is down, then drain ...")
            (work / str(n)).mkdir()
            r = await sweep_one(n, args.batch, work / str(n), 10**12)
            r["label"] = f"{n:,}"
            rows.append(r)
            shutil.rmtree(work / str(n))
        if not args.no_quota_row:
            n = 40_000 if args.quick else max(sizes)
            # about a quarter of n fits (half in --quick): the quota counts outbox.db's pages in use
            # (messages, result ids, indexes) and 5 MiB for the WAL; it is at least 10 MB
            per = rows[-1]["bytes_per_msg"]
            quota = max(MIN_QUOTA, int(n / 4 * per))
            log(f"quota: {n} into a {quota}-byte quota ...")
            (work / "quota").mkdir()
            r = await sweep_one(n, args.batch, work / "quota", quota)
            r["label"] = f"q{n // 1000}k"
            rows.append(r)
            shutil.rmtree(work / "quota")
        log(f"baseline again: bare gmqtt, {args.baseline_n} messages at QoS 1 ...")
        bases.append(await baseline(args.baseline_n, work / "bare1"))
    base = sum(bases) / len(bases)
    table(rows, base, bases)
    main_row = max((r for r in rows if not r["label"].startswith("q")), key=lambda r: r["n"])
    problems = [r for r in rows if r["lost"] or r["bad_result_id"] or r["unexpected"] or not r["complete"]]
    for r in rows:
        if r["label"].startswith("q"):
            print(
                f"quota row: {r['queued']:,} kept and {r['dropped']:,} dropped of {r['n']:,} into a {r['quota']:,}-byte"
                f" quota; outbox.db + WAL at most {r['accept_peak_disk']:,} bytes while queueing (sampled every 20 ms"
                " and after the last commit)"
            )
    for r in problems:
        print(f"PROBLEM at {r['label']}: {r}")
    print(
        json.dumps(
            {
                "bench": "outbox_backlog",
                "ratio": round(main_row["drain_msg_s"] / base, 3),
                "baseline_msg_s": round(base),
                "baseline_runs_msg_s": [round(b) for b in bases],
                "sizes": {
                    r["label"]: {
                        "accept_msg_s": round(r["accept_msg_s"]),
                        "bytes_per_msg": round(r["bytes_per_msg"]),
                        "queued": r["queued"],
                        "dropped": r["dropped"],
                        "quota": r["quota"],
                        "accept_peak_disk": r["accept_peak_disk"],
                        "first_s": round(r["first_s"], 3),
                        "start_s": round(r["start_s"], 3),
                        "start_cpu_s": round(r["start_cpu_s"], 3),
                        "reconnect_first_s": round(r["reconnect_first_s"], 3),
                        "reconnect_cpu_s": round(r["reconnect_cpu_s"], 3),
                        "drain_s": round(r["drain_s"], 2),
                        "drain_msg_s": round(r["drain_msg_s"]),
                        "delivered_s": round(r["delivered_s"], 2),
                        "broker_cpu": round(r["broker_cpu"], 2),
                        "rss_peak_mib": round(r["rss_peak"] / 2**20, 1),
                        "rss_growth_mib": round((r["rss_peak"] - r["rss_before"]) / 2**20, 1),
                        "lost": r["lost"],
                        "dup_seq": r["dup_seq"],
                        "after_bytes": r["after_db"] + r["after_wal"],
                        "settle_s": round(r["settle_s"], 1),
                        "after_free_bytes": r["after_free"],
                        "closed_bytes": r["closed_db"] + r["closed_wal"],
                    }
                    for r in rows
                },
            }
        )
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
