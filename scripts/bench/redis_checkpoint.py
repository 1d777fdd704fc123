#!/usr/bin/env python3
"""How much of each state checkpoint the redis source's position takes: the ids of the entries it
handed over and had not acknowledged yet when the checkpoint's barrier passed it.

A gateway in this process reads a stream of its own Redis (free loopback port, no persistence)
into a 10 s tumbling window (a stateful node: entries are acknowledged only after the checkpoint
that holds them, about a second later). Two phases:

  steady    entries written at a steady rate (1,000/s by default), read as they come
  backlog   B entries written at once (a site catching up), drained as fast as the source goes

After every checkpoint the bench reads what the state store was given for the source (its rows,
as written to ``state.db``): how many ids, how many bytes. Entry ids are given as independent
writers make them (a few milliseconds apart). ``ratio`` is
(steady phase) the bytes per id as written ÷ what the same ids take as a JSON list of id strings
(how the checkpoint held them before they were packed). The output ends with one JSON line.

  .venv/bin/python scripts/bench/redis_checkpoint.py [--rate 1000] [--seconds 20] [--backlog 100000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import redis.asyncio as aioredis  # noqa: E402
from _common import at_rate, checkpoint_summary, checkpointed_source, log, until  # noqa: E402
from redis_stream import Redis  # noqa: E402

from nodes.redis_streams import unpack_ids  # noqa: E402


def source_rows(pipeline: Any) -> tuple[int, int, int]:
    """(ids, bytes, bytes as a list) of the source's rows as the checkpointer last wrote them: the
    bytes as written, and what the same ids took as a JSON list of id strings before they were packed."""
    rows = pipeline.checkpointer._last_json.get("src", {})
    size = sum(len(k) + len(v) for k, v in rows.items())
    ids = listed = 0
    for k, v in rows.items():
        held = json.loads(v)  # packed text (nodes.redis_streams.pack_ids), or a list of ids before
        held = unpack_ids(held) if isinstance(held, str) else held
        ids += len(held)
        listed += len(k) + len(json.dumps(held, separators=(",", ":")))
    return ids, size, listed


async def run(url: str, workdir: Path, rate: int, seconds: float, backlog: int) -> dict[str, Any]:
    client = aioredis.from_url(url)
    await client.xgroup_create("plant", "g", id="0", mkstream=True)
    written = 0
    rng = random.Random(1)
    last = [int(time.time() * 1000), 0]  # the last entry id written

    async def add(n: int) -> None:
        # ids as many independent writers make them: a millisecond or a few apart at this rate,
        # now and then two in one millisecond (XADD with "*" from one pipelined client would give
        # runs of one millisecond, which pack far better than real traffic)
        nonlocal written
        pipe = client.pipeline(transaction=False)
        for i in range(written, written + n):
            gap = rng.choice((0, 1, 1, 2, 3)) if rate >= 500 else rng.randint(1, max(1, 2000 // rate))
            last[:] = [last[0] + gap, last[1] + 1 if gap == 0 else 0]
            body = {"data": json.dumps({"key": f"k{i % 100}", "value": i % 50, "ts": 1.7e9 + i / rate})}
            pipe.xadd("plant", body, id=f"{last[0]}-{last[1]}")
        await pipe.execute()
        written += n

    source = f'{{id: src, type: redis, url: "{url}", stream: plant, group: g, start: earliest}}'
    try:
        async with checkpointed_source(source, workdir, source_rows, "steady") as got:
            src = got.src
            log(f"steady: {rate} entries/s for {seconds:g} s")
            await at_rate(rate, seconds, add)
            await until(lambda: src.health()["acked"] >= written)
            got.phase = "backlog"
            log(f"backlog: {backlog} entries at once")
            t1 = time.monotonic()
            for _ in range(backlog // 10_000):
                await add(10_000)
            await add(backlog % 10_000)
            await until(lambda: src.health()["acked"] >= written)
            drain_s = time.monotonic() - t1
    finally:
        await client.aclose()
    return {"samples": got.samples, "drain_s": drain_s}


def summary(samples: list[tuple[int, int, int]]) -> dict[str, Any]:
    out = checkpoint_summary(samples, ("ids", "bytes", "list_bytes"))
    ids = max(1, sum(s[0] for s in samples))
    out["bytes_per_id"] = round(sum(s[1] for s in samples) / ids, 2)
    out["list_bytes_per_id"] = round(sum(s[2] for s in samples) / ids, 1)
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--backlog", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="8 s steady, a 30,000-entry backlog")
    a = ap.parse_args()
    if a.quick:
        a.seconds, a.backlog = 8.0, 30_000
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        server = Redis(Path(tmp) / "redis").start()
        try:
            got = await run(server.url, Path(tmp) / "gw", a.rate, a.seconds, a.backlog)
        finally:
            server.stop()
    steady, backlog = summary(got["samples"].get("steady", [])), summary(got["samples"].get("backlog", []))
    print()
    print(f"{'phase':<9} {'checkpoints':>11} {'ids median':>10} {'ids max':>8} {'bytes median':>12} "
          f"{'bytes max':>10} {'bytes/id':>8} {'as list: max':>12} {'bytes/id':>8}")  # fmt: skip
    for name, s in (("steady", steady), ("backlog", backlog)):
        print(f"{name:<9} {s['checkpoints']:>11} {s['ids_median']:>10} {s['ids_max']:>8} {s['bytes_median']:>12} "
              f"{s['bytes_max']:>10} {s['bytes_per_id']:>8} {s['list_bytes_max']:>12} "
              f"{s['list_bytes_per_id']:>8}")  # fmt: skip
    drain_rate = round(a.backlog / got["drain_s"])
    print(f"\nsteady at {a.rate} entries/s; backlog of {a.backlog} drained in {got['drain_s']:.1f} s ({drain_rate}/s)")
    ratio = round(steady["bytes_per_id"] / max(0.01, steady["list_bytes_per_id"]), 3)
    print(f"ratio = packed bytes per id / as a list of ids (steady) = {ratio}")
    print(json.dumps({"bench": "redis_checkpoint", "ratio": ratio, "rate": a.rate, "backlog": a.backlog,
                      "drain_per_s": drain_rate, "steady": steady, "during_backlog": backlog,
                      "quick": a.quick}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
