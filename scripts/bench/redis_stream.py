#!/usr/bin/env python3
"""Redis Streams benchmark: the redis_out sink and the redis source beside bare redis-py, in one run.

Against a redis-server of its own (free loopback port, no persistence):

  bare xadd     redis-py's asyncio client appending N entries (the sink's six fields) with
                pipelined XADD, 500 per round trip
  sluice out    the same N events through the redis_out path: put into the outbox in batches of
                B (committed to SQLite, synchronous=FULL, before put() returns), sent by the
                RedisLink in pipelined batches and deleted once Redis answered
  bare read     XREADGROUP 500 at a time, decode each entry's JSON, XACK the batch
  sluice read   a gateway whose pipeline is the redis source and a sink that does nothing
  drain         a backlog of D events put while Redis is down, then it starts: time to empty

Figures: entries/s and CPU µs per entry of this process (Redis runs apart). ``ratio`` = bare
xadd CPU µs ÷ sluice out CPU µs (goal >= 0.5); ``source_ratio`` = bare read ÷ sluice read
(goal >= 0.7). The output ends with one JSON line.

  .venv/bin/python scripts/bench/redis_stream.py [--n 50000] [--backlog 100000] [--quick]
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

import redis.asyncio as aioredis  # noqa: E402
from _common import Server, free_port, log, outbox_with_link, source_cost  # noqa: E402

from nodes.redis_streams import RedisLink, RedisOutOptions  # noqa: E402


class Redis(Server):
    name = "redis-server"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (scripts/install_test_peers.sh)")
        return [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir)]  # fmt: skip


def events(n: int) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"k{i % 100:03d}", {"pipeline": "bench", "source": "src", "key": f"k{i % 100:03d}", "ts": 1.7e9 + i,
                             "value": 20.0 + (i % 50) / 10})
        for i in range(n)
    ]  # fmt: skip


async def bare_xadd(url: str, evs: list[tuple[str, dict[str, Any]]]) -> tuple[float, float]:
    client = aioredis.from_url(url)
    try:
        t, c = time.perf_counter(), time.process_time()
        for i in range(0, len(evs), 500):
            pipe = client.pipeline(transaction=False)
            for seq, (key, fields) in enumerate(evs[i : i + 500], i + 1):
                body = json.dumps({"gateway_id": "gw", "seq": seq, "replayed": False, **fields}).encode()
                pipe.xadd("bare", {"gateway_id": "gw", "seq": seq, "replayed": "false", "pipeline": "bench",
                                   "key": key, "data": body})  # fmt: skip
            await pipe.execute()
        return time.perf_counter() - t, time.process_time() - c
    finally:
        await client.aclose()


async def sluice_out(url: str, workdir: Path, evs: list[tuple[str, dict[str, Any]]], server: Server | None = None):
    opts = RedisOutOptions(id="out", type="redis_out", url=url, stream="sluice", reconnect_max=0.5)
    name = "redis:bench/out"
    msgs = [(name, f"sluice\x00{key}", fields, key) for key, fields in evs]
    async with outbox_with_link(workdir, name, RedisLink(name, opts, "gw", "bench")) as outbox:
        if server is not None:
            for i in range(0, len(msgs), 1000):
                await outbox.put(msgs[i : i + 1000])
            server.start()
        t, c = time.perf_counter(), time.process_time()
        if server is None:
            for i in range(0, len(msgs), 500):
                await outbox.put(msgs[i : i + 500])
        while outbox.count:  # noqa: ASYNC110 -- polling a counter costs the subject nothing
            await asyncio.sleep(0.005)
        return time.perf_counter() - t, time.process_time() - c


async def bare_read(url: str, stream: str, n: int) -> tuple[float, float]:
    client = aioredis.from_url(url)
    try:
        await client.xgroup_create(stream, "bare", id="0")
        got = 0
        t, c = time.perf_counter(), time.process_time()
        while got < n:
            res = await client.xreadgroup("bare", "me", {stream: ">"}, count=500, block=1000)
            for _, entries in res or []:
                for _, fields in entries:
                    json.loads(fields[b"data"])
                got += len(entries)
                await client.xack(stream, "bare", *(e[0] for e in entries))
        return time.perf_counter() - t, time.process_time() - c
    finally:
        await client.aclose()


async def sluice_read(url: str, stream: str, n: int, workdir: Path) -> tuple[float, float]:
    """The redis source in a gateway, from its group created until it has acknowledged ``n`` entries."""
    source = f'{{id: src, type: redis, url: "{url}", stream: {stream}, group: sluice, start: earliest}}'
    return await source_cost(source, workdir, lambda src: src.health()["acked"] >= n)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--backlog", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="10,000 entries and a 20,000 backlog")
    args = ap.parse_args()
    if args.quick:
        args.n, args.backlog = 10_000, 20_000
    evs = events(args.n)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-redis-bench-"))
    server = Redis(workdir / "redis").start()
    try:
        await bare_xadd(server.url, evs[:500])  # warm-up
        bx = await bare_xadd(server.url, evs)
        so = await sluice_out(server.url, workdir / "s", evs)
        log("writes done")
        br = await bare_read(server.url, "bare", args.n + 500)
        sr = await sluice_read(server.url, "bare", args.n + 500, workdir / "c")
        log("reads done")
        down = Redis(workdir / "redis2", port=free_port())
        dr = await sluice_out(down.url, workdir / "d", events(args.backlog), down)
        down.stop()
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    n, nr = args.n, args.n + 500
    rows = [
        ("bare xadd (pipelined)", n, bx),
        ("sluice redis_out (outbox)", n, so),
        ("bare xreadgroup + xack", nr, br),
        ("sluice redis source", nr, sr),
        (f"drain backlog {args.backlog:,}", args.backlog, dr),
    ]
    print(f"{'subject':30} {'entries/s':>12} {'CPU µs/entry':>13}")
    for name, k, (wall, cpu) in rows:
        print(f"{name:30} {k / wall:>12,.0f} {cpu / k * 1e6:>13,.1f}")
    ratio = bx[1] / so[1]
    source_ratio = br[1] / sr[1]
    print(f"ratio (bare xadd CPU µs ÷ sluice redis_out CPU µs): {ratio:.2f} (goal >= 0.5)")
    print(f"source ratio (bare read CPU µs ÷ sluice source CPU µs): {source_ratio:.2f} (goal >= 0.7)")
    print(
        json.dumps(
            {
                "bench": "redis_stream",
                "ratio": round(ratio, 3),
                "source_ratio": round(source_ratio, 3),
                "n": n,
                "bare_xadd_per_s": round(n / bx[0]),
                "bare_xadd_cpu_us": round(bx[1] / n * 1e6, 2),
                "sluice_out_per_s": round(n / so[0]),
                "sluice_out_cpu_us": round(so[1] / n * 1e6, 2),
                "bare_read_per_s": round(nr / br[0]),
                "bare_read_cpu_us": round(br[1] / nr * 1e6, 2),
                "sluice_read_per_s": round(nr / sr[0]),
                "sluice_read_cpu_us": round(sr[1] / nr * 1e6, 2),
                "backlog": args.backlog,
                "drain_s": round(dr[0], 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
