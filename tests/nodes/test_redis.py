"""The redis_out sink and the redis source against a real redis-server (started per test, see tests/_peers.py)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from subprocess import DEVNULL
from typing import Any

import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from tests._peers import RedisServer
from tests._util import free_port, wait_for
from tests.gateway._harness import node, running_gateway
from tests.nodes._checkpoint import saved_watermark
from tests.nodes._delivery import check_envelopes
from tests.nodes._reference import tumbling_sums


def sink_config(tmp_path: Path, url: str, *, count: int, interval: str = "1ms", realtime: bool = False,
                extra: str = "") -> str:  # fmt: skip
    return f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data"}}
pipelines:
  - name: p
    nodes:
      - {{id: src, type: simulate, count: {count}, interval: {interval}, realtime: {str(realtime).lower()},
          sensors: [{{key: s1, base: 1, amplitude: 0, noise: 0}}, {{key: s2, base: 2, amplitude: 0, noise: 0}}]}}
      - {{id: out, type: redis_out, input: src, url: "{url}", stream: "readings:{{pipeline}}",
          socket_timeout: 1s, reconnect_max: 300ms{extra}}}
console: {{enabled: false}}
"""


class Reader:
    """Reads a stream back with XRANGE (from a fresh connection each time, so a restarted server is fine)."""

    def __init__(self, url: str, stream: str):
        self.url = url
        self.stream = stream
        self.entries: list[dict[str, Any]] = []

    async def read(self) -> list[dict[str, Any]]:
        client = aioredis.from_url(self.url, decode_responses=True)
        try:
            self.entries = [fields for _, fields in await client.xrange(self.stream)]
        except Exception:
            pass
        finally:
            await client.aclose()
        return self.entries

    def seqs(self) -> set[int]:
        return {int(e["seq"]) for e in self.entries}


async def read_until(reader: Reader, predicate: Any, within: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        await reader.read()
        if predicate():
            return
        assert loop.time() < deadline, f"timed out: {len(reader.entries)} entries, seqs {sorted(reader.seqs())[-5:]}"
        await asyncio.sleep(0.05)


def check_entries(entries: list[dict[str, Any]], n: int, *, replayed: set[int] | None = None) -> None:
    """Every seq 1..n arrived, with the envelope in the data field and the same fields beside it."""
    check_envelopes(((json.loads(e["data"]), e) for e in entries), n, replayed=replayed)


async def test_redis_out_appends_envelopes_and_trims(tmp_path: Path, redis_server: RedisServer) -> None:
    reader = Reader(redis_server.url, "readings:p")
    async with running_gateway(sink_config(tmp_path, redis_server.url, count=50)) as gw:
        await wait_for(lambda: gw.outbox.count == 0 and gw.outbox.published == 100, timeout=20)
        assert node(gw, "p", "out").health()["delivered"] == 100
    check_entries(await reader.read(), 100)
    text = sink_config(tmp_path / "b", redis_server.url, count=500, extra=", maxlen: 100").replace(
        "readings:{pipeline}", "trimmed"
    )
    async with running_gateway(text) as gw:
        await wait_for(lambda: gw.outbox.count == 0 and gw.outbox.published == 1000, timeout=20)
    client = aioredis.from_url(redis_server.url)
    try:
        assert 100 <= await client.xlen("trimmed") < 1000  # MAXLEN ~ trims whole nodes: about 100
    finally:
        await client.aclose()


async def test_redis_out_across_a_server_restart_mid_burst(tmp_path: Path, redis_factory: Any) -> None:
    server = redis_factory(appendonly=True)
    reader = Reader(server.url, "readings:p")
    text = sink_config(tmp_path, server.url, count=150, interval="10ms", realtime=True)
    async with running_gateway(text) as gw:
        sink = node(gw, "p", "out")
        await read_until(reader, lambda: len(reader.entries) >= 20)
        server.stop()
        await wait_for(lambda: sink.health()["state"] == "down", timeout=20)
        server.start()
        await wait_for(lambda: gw.outbox.count == 0 and gw.outbox.published >= 300, timeout=60)
    await reader.read()
    check_entries(reader.entries, 300)


async def test_redis_out_replays_the_outbox_after_a_gateway_restart(tmp_path: Path, redis_factory: Any) -> None:
    server = redis_factory(port=free_port(), start=False)
    text = sink_config(tmp_path, server.url, count=10)
    async with running_gateway(text) as gw:
        await wait_for(lambda: gw.outbox.count == 20, timeout=20)
    server.start()
    async with running_gateway(text) as gw:
        await wait_for(lambda: gw.outbox.count == 0 and gw.outbox.published == 40, timeout=30)
    check_entries(await Reader(server.url, "readings:p").read(), 40, replayed=set(range(1, 21)))


# --- the source -----------------------------------------------------------------------------------


def source_config(
    tmp_path: Path, url: str, *, window: bool = False, extra: str = "", run: str = "", stream: str = "plant"
) -> str:
    mid = (
        "      - {id: w, type: window, input: src, kind: tumbling, size: 10s, aggregate: sum}\n"
        f'      - {{id: wout, type: redis_out, input: w, url: "{url}", stream: wins{run}, reconnect_max: 300ms}}\n'
        if window
        else ""
    )
    return f"""\
gateway: {{id: gw2, data_dir: "{tmp_path}/data2{run}"}}
pipelines:
  - name: c
    nodes:
      - {{id: src, type: redis, url: "{url}", stream: "{stream}", group: g1{run}, start: earliest{extra}}}
{mid}      - {{id: out, type: redis_out, input: src, url: "{url}", stream: copy{run}, reconnect_max: 300ms}}
console: {{enabled: false}}
"""


async def xadd_all(url: str, stream: str, items: list[dict[str, Any]]) -> list[str]:
    """XADD each of ``items``; their entry ids."""
    client = aioredis.from_url(url, decode_responses=True)
    try:
        pipe = client.pipeline(transaction=False)
        for fields in items:
            pipe.xadd(stream, fields)
        return list(await pipe.execute())
    finally:
        await client.aclose()


async def xlen(url: str, stream: str) -> int:
    client = aioredis.from_url(url)
    try:
        return int(await client.xlen(stream))
    finally:
        await client.aclose()


async def pending(url: str, stream: str, group: str) -> int:
    client = aioredis.from_url(url)
    try:
        return int((await client.xpending(stream, group))["pending"])
    finally:
        await client.aclose()


async def test_redis_source_decodes_acks_and_dead_letters(tmp_path: Path, redis_server: RedisServer) -> None:
    await xadd_all(
        redis_server.url,
        "plant",
        [
            {"data": json.dumps({"key": "a", "value": 1, "ts": 1700000000})},
            {"data": json.dumps({"key": "b", "value": 2.5})},
            {"data": "not json"},
            {"other": "field"},
            {"data": json.dumps({"key": "a", "value": 3})},
        ],
    )
    copy = Reader(redis_server.url, "copy")
    async with running_gateway(source_config(tmp_path, redis_server.url)) as gw:
        src = node(gw, "c", "src")
        await read_until(copy, lambda: len(copy.entries) == 3)
        await wait_for(lambda: src.health()["acked"] == 5, timeout=10)
        bodies = [json.loads(e["data"]) for e in copy.entries]
        assert [(b["key"], b["value"]) for b in bodies] == [("a", 1.0), ("b", 2.5), ("a", 3.0)]
        assert bodies[0]["ts"] == 1700000000.0
        reasons = [d["reason"] for d in gw.dead_letters.recent]
        assert any("not JSON" in r for r in reasons) and any("has no field 'data'" in r for r in reasons)
    assert await pending(redis_server.url, "plant", "g1") == 0


async def test_a_cel_key_takes_the_stream_name_apart_at_colons_only(tmp_path: Path, redis_server: RedisServer) -> None:
    """`topic` in a CEL key holds the stream name's :-separated parts, as `stream[N]` takes them: a
    / is an ordinary character of a Redis key (it was split at too, so `topic[1]` was "north")."""
    stream = "site/north:boiler:temp"
    await xadd_all(redis_server.url, stream, [{"data": json.dumps({"value": i})} for i in range(3)])
    key = """, key: 'topic[1] + "@" + topic[0] + "#" + string(size(topic))'"""
    copy = Reader(redis_server.url, "copy")
    async with running_gateway(source_config(tmp_path, redis_server.url, stream=stream, extra=key)):
        await read_until(copy, lambda: len(copy.entries) == 3)
    assert {json.loads(e["data"])["key"] for e in copy.entries} == {"boiler@site/north#3"}


async def test_redis_source_claims_a_dead_consumers_entries(tmp_path: Path, redis_server: RedisServer) -> None:
    url = redis_server.url
    client = aioredis.from_url(url)
    try:
        await client.xgroup_create("plant", "g1", id="0", mkstream=True)
        await xadd_all(url, "plant", [{"data": json.dumps({"key": "k", "value": i})} for i in range(5)])
        # another gateway read these and died before acknowledging them
        got = await client.xreadgroup("g1", "dead-gateway", {"plant": ">"}, count=10)
        assert len(got[0][1]) == 5
    finally:
        await client.aclose()
    copy = Reader(url, "copy")
    async with running_gateway(source_config(tmp_path, url, extra=", claim_idle: 300ms")) as gw:
        await read_until(copy, lambda: len(copy.entries) == 5)
        assert node(gw, "c", "src").health()["claimed"] == 5
        await wait_for(lambda: node(gw, "c", "src").health()["acked"] == 5, timeout=10)
    assert sorted(json.loads(e["data"])["value"] for e in copy.entries) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert await pending(url, "plant", "g1") == 0


async def test_redis_source_no_loss_across_a_gateway_kill(tmp_path: Path, redis_server: RedisServer) -> None:
    """SIGKILL a gateway subprocess mid-stream, at a moment its saved window state holds entries it
    has not acknowledged yet (the checkpoint is on disk, the XACK has not reached Redis): the next one
    reads its pending entries again but hands over only those the saved state does not hold; nothing
    is lost, nothing counted twice, and the windows equal those of a run that was never interrupted."""
    url = redis_server.url
    t0 = 1_700_000_000.0
    ids: list[str] = []  # entry id of reading i

    async def add_more(count: int) -> None:  # whole 10 s windows: 100 readings each
        i0 = len(ids)
        items = [
            {"data": json.dumps({"key": f"k{i % 3}", "value": i, "ts": t0 + i / 10})} for i in range(i0, i0 + count)
        ]
        ids.extend(await xadd_all(url, "plant", items))

    cfg = tmp_path / "consume.yaml"
    cfg.write_text(source_config(tmp_path, url, window=True, extra=", batch: 5"))
    state_db = tmp_path / "data2" / "state.db"
    sluice = str(Path(sys.executable).parent / "sluice")
    copy = Reader(url, "copy")

    def values() -> set[float]:
        return {json.loads(e["data"])["value"] for e in copy.entries}

    async def state_ahead_of_ack() -> bool:
        saved = saved_watermark(state_db, "c", "w")  # the newest reading the saved windows hold: reading i at t0 + i/10
        if saved is None or saved < t0:
            return False
        newest = ids[round((saved - t0) * 10)]
        client = aioredis.from_url(url)
        try:
            return bool(await client.xpending_range("plant", "g1", min=newest, max=newest, count=1))
        finally:
            await client.aclose()

    await add_more(1000)
    first = await asyncio.create_subprocess_exec(sluice, "run", str(cfg), stdout=DEVNULL, stderr=DEVNULL)
    try:
        # entries keep coming (never more than 1000 ahead of the copies) until the moment comes
        while True:
            if await state_ahead_of_ack():
                first.send_signal(signal.SIGSTOP)  # frozen: it acknowledges nothing more
                if await state_ahead_of_ack():
                    break
                first.send_signal(signal.SIGCONT)
            if len(ids) - await xlen(url, "copy") < 1000:
                await add_more(100)
            await asyncio.sleep(0.01)
    finally:
        first.kill()
        await first.wait()
    assert await state_ahead_of_ack(), "the entries were acknowledged after all; the kill proves nothing"
    await add_more(500)  # and more after the kill
    n = len(ids)
    second = await asyncio.create_subprocess_exec(sluice, "run", str(cfg), stdout=DEVNULL, stderr=DEVNULL)
    try:
        await read_until(copy, lambda: values() == set(map(float, range(n))), within=90)
    finally:
        second.terminate()
        await asyncio.wait_for(second.wait(), 20)
    # stopped gracefully: everything it read is acknowledged, nothing is read a third time
    assert await pending(url, "plant", "g1") == 0
    killed = window_results(await Reader(url, "wins").read())
    # the same entries through a gateway that is never interrupted: the same windows
    ref = Reader(url, "wins-ref")
    async with running_gateway(source_config(tmp_path, url, window=True, extra=", batch: 5", run="-ref")):
        expected = 3 * (n // 100 - 1)  # every 10 s window but the last, which the watermark has not passed
        await read_until(ref, lambda: len(window_results(ref.entries)) == expected, within=60)
    assert window_results(ref.entries) == killed


def window_results(entries: list[dict[str, Any]]) -> dict[tuple[str, float], float]:
    """Window results by (key, window end); a result sent twice (at least once) must be the same."""
    out: dict[tuple[str, float], float] = {}
    for e in entries:
        b = json.loads(e["data"])
        k = (b["key"], b["ts"])
        assert out.setdefault(k, b["value"]) == b["value"], f"window {k} emitted with two values"
    return out


async def test_redis_source_across_a_server_restart(tmp_path: Path, redis_factory: Any) -> None:
    """Redis restarts while the source reads (and the sink writes to the same server): nothing is lost."""
    server = redis_factory(appendonly=True)
    url = server.url
    n = 3000
    await xadd_all(url, "plant", [{"data": json.dumps({"key": f"k{i % 3}", "value": i})} for i in range(n)])
    copy = Reader(url, "copy")
    async with running_gateway(source_config(tmp_path, url, extra=", batch: 5")) as gw:
        src = node(gw, "c", "src")
        await wait_for(lambda: src.counters()["in"] >= 300, timeout=30)
        server.stop()
        # redis-py retries with backoff before the source hears of it: a deadline, not a speed check
        await wait_for(lambda: src.health()["state"] == "down", timeout=60)
        server.start()
        await read_until(
            copy, lambda: {json.loads(e["data"])["value"] for e in copy.entries} >= set(map(float, range(n))), within=90
        )
        await wait_for(lambda: src.health()["acked"] >= n, timeout=30)
    assert await pending(url, "plant", "g1") == 0


# --- lookup ---------------------------------------------------------------------------------------


def lookup_config(tmp_path: Path, url: str, extra: str = "") -> str:
    return f"""\
gateway: {{id: gw4, data_dir: "{tmp_path}/data4"}}
pipelines:
  - name: e
    nodes:
      - {{id: src, type: simulate, interval: 20ms,
          sensors: [{{key: s1, base: 1, amplitude: 0, noise: 0}}, {{key: s2, base: 2, amplitude: 0, noise: 0}},
                    {{key: s3, base: 3, amplitude: 0, noise: 0}}]}}
      - {{id: limits, type: lookup, input: src, url: "{url}", hash: asset-limits, into: limit, refresh: 200ms,
          socket_timeout: 500ms{extra}}}
      - {{id: hot, type: filter, input: limits, where: "value > meta.limit.max"}}
      - {{id: out, type: redis_out, input: hot, url: "{url}", stream: hot, reconnect_max: 200ms}}
console: {{enabled: false}}
"""


async def test_lookup_enriches_and_keeps_its_last_copy_while_redis_is_away(tmp_path: Path, redis_factory: Any) -> None:
    server = redis_factory()
    client = aioredis.from_url(server.url)
    try:
        await client.hset("asset-limits", mapping={"s1": '{"max": 0.5}', "s2": '{"max": 5}'})
    finally:
        await client.aclose()
    text = lookup_config(tmp_path, server.url, extra=", missing: drop")
    hot = Reader(server.url, "hot")
    async with running_gateway(text) as gw:
        look = node(gw, "e", "limits")
        await wait_for(lambda: look.health()["state"] == "fresh", timeout=10)
        await read_until(hot, lambda: len(hot.entries) >= 3)
        # s1 is above its limit, s2 is not, s3 has no entry (dropped, counted)
        assert {json.loads(e["data"])["key"] for e in hot.entries} == {"s1"}
        await wait_for(lambda: look.counters()["missing"] > 0, timeout=5)
        server.stop()
        await wait_for(lambda: look.health()["state"] == "stale" and look.health()["error"], timeout=10)
        seen = look.counters()["out"]
        await wait_for(lambda: look.counters()["out"] > seen + 5, timeout=10)  # still enriching
    # a restart while Redis is still away: the copy comes back from the state store
    async with running_gateway(text) as gw:
        look = node(gw, "e", "limits")
        assert look.health()["state"] == "stale" and look.health()["fields"] == 2
        hot_node = node(gw, "e", "hot")
        await wait_for(lambda: hot_node.counters()["out"] >= 3, timeout=10)
        assert look.counters()["unloaded"] == 0


async def test_redis_source_watermark_is_the_slowest_stream(tmp_path: Path, redis_server: RedisServer) -> None:
    """Stream hours:a holds the first and the third hour of readings, hours:b the second, and
    hours:c never has an entry. Each read takes entries of both streams, so one runs an hour ahead
    of the other: with the watermark per stream (the slowest not idle), no reading is late and the
    windows equal the reference. (One watermark for the source closed the first hour's windows at
    the first reading of the second, and dropped the rest of hours:a's first hour as late.)"""
    url = redis_server.url
    t0 = 1_699_999_980.0  # a whole minute

    def hour(h: int) -> list[tuple[str, float, float]]:
        return [(k, t0 + 3600 * h + i * 10, float(1000 * h + i)) for i in range(360) for k in ("a", "b")]

    a, b = hour(0) + hour(2), hour(1)
    for stream, readings in (("hours:a", a), ("hours:b", b)):
        await xadd_all(url, stream, [{"data": json.dumps({"key": k, "value": v, "ts": ts})} for k, ts, v in readings])
    newest = t0 + 3 * 3600 - 10
    expected = {kt: v for kt, v in tumbling_sums(a + b, 60.0).items() if kt[1] <= newest}
    text = f"""\
gateway: {{id: gw5, data_dir: "{tmp_path}/data5"}}
pipelines:
  - name: c
    nodes:
      - {{id: src, type: redis, url: "{url}", streams: ["hours:a", "hours:b", "hours:c"], group: g5, start: earliest,
          batch: 20, idle_timeout: 1s}}
      - {{id: w, type: window, input: src, kind: tumbling, size: 60s, aggregate: sum}}
      - {{id: out, type: redis_out, input: w, url: "{url}", stream: wins5, reconnect_max: 300ms}}
console: {{enabled: false}}
"""
    wins = Reader(url, "wins5")
    async with running_gateway(text) as gw:
        src, w = node(gw, "c", "src"), node(gw, "c", "w")
        await wait_for(lambda: src.counters()["in"] == len(a + b), timeout=60)
        # once both are read to their end they fall idle (hours:c at once), and the watermark is the newest time
        await wait_for(lambda: w.watermark == newest or w.counters()["late"], timeout=30)
        assert w.counters()["late"] == 0
        await read_until(wins, lambda: len(window_results(wins.entries)) == len(expected))
        assert window_results(wins.entries) == expected
        assert src.health()["watermark"] == newest
        assert src.health()["idle_streams"] == ["hours:a", "hours:b", "hours:c"]


def saved_ids(state_db: Path) -> tuple[int, int]:
    """(ids, bytes) of the redis source's position in the last checkpoint of ``state_db``."""
    import contextlib
    import sqlite3

    if not state_db.exists():
        return 0, 0
    with contextlib.closing(sqlite3.connect(f"file:{state_db}?mode=ro", uri=True)) as db:
        try:
            rows = db.execute("SELECT key, value FROM state WHERE pipeline='c' AND node='src'").fetchall()
        except sqlite3.OperationalError:  # not created yet
            return 0, 0
    ids = size = 0
    for key, value in rows:
        held = json.loads(value)
        if isinstance(held, str):  # packed
            from nodes.redis_streams import unpack_ids

            held = unpack_ids(held)
        ids += len(held)
        size += len(key) + len(value)
    return ids, size


async def test_redis_source_checkpoint_packs_the_ids_it_holds(tmp_path: Path, redis_server: RedisServer) -> None:
    """The ids handed over and not yet acknowledged go into each checkpoint packed (about 2 bytes an
    id for entries a few milliseconds apart; ~18 as a list of id strings), and come back whole: a
    restart acknowledges those still pending without counting them again (the kill test above)."""
    url = redis_server.url
    ms = 1_700_000_000_000
    items, ids = [], []
    for i in range(3000):
        ms += (0, 1, 1, 2, 3)[i % 5]
        ids.append(f"{ms}-{1 if i % 5 == 0 else 0}")
        items.append({"data": json.dumps({"key": f"k{i % 3}", "value": i, "ts": 1_700_000_000 + i / 10})})
    client = aioredis.from_url(url)
    try:
        pipe = client.pipeline(transaction=False)
        for eid, fields in zip(ids, items, strict=True):
            pipe.xadd("plant", fields, id=eid)
        await pipe.execute()
    finally:
        await client.aclose()
    state_db = tmp_path / "data2" / "state.db"
    largest = [0, 0]

    def a_full_checkpoint_seen() -> bool:
        n, size = saved_ids(state_db)
        if n > largest[0]:
            largest[:] = [n, size]
        return largest[0] >= 200

    async with running_gateway(source_config(tmp_path, url, window=True, extra=", batch: 50")) as gw:
        await wait_for(a_full_checkpoint_seen, timeout=30, interval=0.005)
        await wait_for(lambda: node(gw, "c", "src").health()["acked"] == 3000, timeout=30)
    n, size = largest
    assert size <= 4 * n, f"{size} bytes for {n} ids"


@given(st.sets(st.tuples(st.integers(0, 2**48), st.integers(0, 2**20)), max_size=300))
def test_packed_ids_come_back_whole_and_in_order(ids: set[tuple[int, int]]) -> None:
    from nodes.redis_streams import pack_ids, unpack_ids

    text = pack_ids([f"{ms}-{seq}" for ms, seq in ids])
    assert unpack_ids(text) == [f"{ms}-{seq}" for ms, seq in sorted(ids)]
