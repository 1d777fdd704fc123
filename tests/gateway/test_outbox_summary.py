"""A start and a reconnect under a large backlog read a summary the outbox keeps, not the backlog.

The summary (each ordering key's highest id, the count and the bytes waiting) is what the sender
needs to keep each key's messages in order while live messages take turns with the backlog. These
tests count the SQLite work (virtual machine steps, not time) of a start and a reconnect at two
backlog sizes, and check through a real Mosquitto and a real file that a SIGKILL while queueing,
a restart and reconnects in the middle of the drain lose, repeat or reorder nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

import gateway.outbox
from gateway._migrate import Schema, migrate
from gateway.config import MqttConnection
from gateway.mqtt import MqttLink
from gateway.outbox import SCHEMA, Outbox, OutboxConfig, SqliteOutboxStore
from tests._util import MosquittoBroker, wait_for
from tests.gateway.test_outbox import FakeLink, SinkLink
from tests.gateway.test_outbox_faults import Consumer, outbox_rows

ROOT = Path(__file__).resolve().parents[2]
TOPIC = "sluice/gw1/alerts/plant"


def _rows(start: int, n: int, keys: int = 50) -> list[tuple[str, str, str, bytes, bool, int]]:
    out = []
    for i in range(start, start + n):
        body = json.dumps({"key": f"k{i % keys}", "n": i}).encode()
        out.append(("plant", TOPIC, f"k{i % keys}", body, False, len(body) + 40))
    return out


class _Steps:
    """SQLite virtual machine steps run on the connections opened while it is installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.n = 0
        real = sqlite3.connect

        def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            db = real(*args, **kwargs)
            db.set_progress_handler(self._tick, 100)
            return db

        monkeypatch.setattr(gateway.outbox.sqlite3, "connect", connect)

    def _tick(self) -> int:
        self.n += 100
        return 0


def _work_of_start_and_reconnect(path: Path, queued: int, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """Queue ``queued`` rows (closing cleanly), then count the steps of a start and of a reconnect."""
    store = SqliteOutboxStore(path, synchronous="OFF")
    store.open()
    for at in range(0, queued, 500):
        store.append(_rows(at, min(500, queued - at)), [], 1 << 40, None)
    store.close()
    steps = _Steps(monkeypatch)

    async def run() -> tuple[int, int]:
        ob = Outbox(path, "gw1", {"plant": FakeLink()}, OutboxConfig(max_bytes=1 << 40))
        await ob.open()  # counts, key summary, the connections' check
        try:
            assert ob.count == queued
            started = steps.n
            mark, keys = await ob._run(ob.store.backlog_keys, "plant")  # what a reconnect reads
            assert mark == queued and keys == {f"k{i}": queued - 49 + i for i in range(50)}
            return started, steps.n - started
        finally:
            await ob.close()

    return asyncio.run(run())


def test_a_start_and_a_reconnect_read_the_same_at_any_backlog_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.outbox, "_KEYS_SAVE_EVERY", 1000)
    small = _work_of_start_and_reconnect(tmp_path / "small.db", 3_000, monkeypatch)
    big = _work_of_start_and_reconnect(tmp_path / "big.db", 30_000, monkeypatch)
    # Before the summary, a start read every row twice (counts, connections) and a reconnect once
    # (each key's last id): ten times the backlog was ten times the work.
    assert big[0] < 2 * small[0] + 2000, (small, big)
    assert big[1] == small[1] == 0, (small, big)  # from memory


def test_the_summary_after_a_kill_names_every_key_with_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The saved summary covers up to ``keys_upto``; a start reads the rows after it."""
    monkeypatch.setattr(gateway.outbox, "_KEYS_SAVE_EVERY", 700)
    path = tmp_path / "outbox.db"
    store = SqliteOutboxStore(path, synchronous="OFF")
    store.open()
    for at in range(0, 2_500, 100):
        store.append(_rows(at, 100, keys=7 + at // 100), [], 1 << 40, None)  # new keys keep coming
    store._db.close()  # type: ignore[union-attr]  # no close(): as a kill leaves it
    store = SqliteOutboxStore(path, synchronous="OFF")
    store.open()
    db = sqlite3.connect(path)
    exact = dict(db.execute("SELECT okey, MAX(id) FROM outbox GROUP BY okey").fetchall())
    assert db.execute("SELECT value FROM outbox_meta WHERE name='keys_upto'").fetchone()[0] == 2100
    db.close()
    mark, keys = store.backlog_keys("plant")
    assert mark == 2500 and keys == exact
    assert (store._count, store._bytes) == store.stats()
    store.close()


def test_an_old_file_is_summarised_once_by_its_migration(tmp_path: Path) -> None:
    """A version-2 file (the release before the summary) with a backlog: the step summarises it."""
    path = tmp_path / "outbox.db"
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, path, Schema("outbox", SCHEMA.steps[:2]))
    db.executemany(
        "INSERT INTO outbox (connection, topic, okey, body, retain, size, created) VALUES (?,?,?,?,?,?,0)",
        [r[:6] for r in _rows(0, 300, keys=9)],
    )
    db.close()
    store = SqliteOutboxStore(path, synchronous="OFF")
    info = store.open()
    assert info.count == 300 and info.bytes == sum(r[5] for r in _rows(0, 300, keys=9))
    assert store.backlog_keys("plant") == (300, {f"k{i % 9}": i + 1 for i in range(300)})
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA.version >= 3
    db.close()


# --- through a real broker, with a SIGKILL and reconnects ---------------------------------------

_QUEUER = """
import asyncio, sys
from pathlib import Path
import gateway.outbox
from gateway.config import MqttConnection
from gateway.mqtt import MqttLink
from gateway.outbox import Outbox, OutboxConfig

gateway.outbox._KEYS_SAVE_EVERY = 1000  # saved at 1000, 2000, 3000: the last 500 rows are after it

async def main(path, port, topic):
    link = MqttLink("plant", MqttConnection(type="mqtt", host="127.0.0.1", port=port, status=False), "queuer")
    ob = Outbox(path, "gw1", {"plant": link}, OutboxConfig())
    await ob.open()
    for i in range(0, 3500, 10):  # the broker is down: everything queues
        await ob.put([("plant", topic, {"key": f"k{j % 13}", "n": j}, f"k{j % 13}") for j in range(i, i + 10)])
    print("queued", flush=True)
    await asyncio.sleep(3600)  # until the SIGKILL

asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
"""


@pytest.fixture
def consumer(mosquitto_factory: Any) -> Iterator[tuple[MosquittoBroker, Consumer]]:
    broker = mosquitto_factory(persistence=True)
    c = Consumer(broker, f"c-{broker.port}", TOPIC).start()
    broker.stop()  # the consumer's session waits in the broker's persistence
    try:
        yield broker, c
    finally:
        c.stop()


@contextlib.asynccontextmanager
async def _outbox_to(
    broker: MosquittoBroker, path: Path, config: OutboxConfig, *also: Coroutine[Any, Any, None]
) -> AsyncIterator[tuple[Outbox, MqttLink]]:
    """An outbox on ``path`` sending to ``broker`` through a real MQTT link, running (with ``also``)
    until the block ends."""
    link = MqttLink("plant", MqttConnection(type="mqtt", host="127.0.0.1", port=broker.port, status=False), "gw")
    ob = Outbox(path, "gw1", {"plant": link}, config)
    await ob.open()
    tasks = [asyncio.create_task(link.run()), asyncio.create_task(ob.run())]
    tasks += [asyncio.create_task(c) for c in also]
    try:
        yield ob, link
    finally:
        await ob.close()
        await link.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _delivered(ob: Outbox, sub: Consumer, n: int) -> None:
    """Until the outbox is empty and the consumer has ``n`` distinct seqs."""
    await wait_for(lambda: ob.count == 0, timeout=60)
    await wait_for(lambda: len({m["seq"] for m, _ in sub.got}) >= n, timeout=30)


async def test_a_kill_while_queueing_then_reconnects_mid_drain_keep_each_key_in_order(
    tmp_path: Path, consumer: tuple[MosquittoBroker, Consumer]
) -> None:
    broker, sub = consumer
    path = tmp_path / "outbox.db"
    _queue_and_kill(path, broker.port)
    queued = outbox_rows(path.parent)
    assert queued == 3500

    async with _outbox_to(broker, path, OutboxConfig(inflight=20)) as (ob, link):
        assert ob.count == queued  # the count kept in the file, exact after the kill
        n = ob.last_id

        async def put_live() -> None:  # 40 messages of the same keys as the backlog
            nonlocal n
            await ob.put([("plant", TOPIC, {"key": f"k{j % 13}", "n": j}, f"k{j % 13}") for j in range(n, n + 40)])
            n += 40

        broker.start()
        # live messages of the same keys take turns with the backlog, which the first pass sends
        # past the summary saved before the kill (3000) and a drop ends near its end (3325)
        for drop, at in enumerate((3325, 3400, 3450)):
            await wait_for(lambda d=drop: ob.published >= 1 + d * 80)
            await put_live()
            await wait_for(lambda a=at: ob.published >= a)
            broker.stop()  # in the middle of the drain
            await wait_for(lambda: not link.connected)
            await put_live()
            broker.start()
        await _delivered(ob, sub, n)
    first: dict[int, dict[str, Any]] = {}
    per_key: dict[str, list[int]] = {}
    for m, dup in sub.got:
        if m["seq"] in first:
            assert m["replayed"] or dup, m  # a replay after a lost PUBACK, or the broker's own redelivery
            continue
        first[m["seq"]] = m
        assert m["n"] == m["seq"] - 1 and m["key"] == f"k{m['n'] % 13}"
        per_key.setdefault(m["key"], []).append(m["seq"])
    assert set(first) == set(range(1, n + 1))
    for key, seqs in per_key.items():
        assert seqs == sorted(seqs), f"{key} out of order"


def _queue_and_kill(path: Path, port: int) -> None:
    """3,500 messages queued by a process of its own while the broker is down, then a SIGKILL."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _QUEUER, str(path), str(port), TOPIC],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"queued\n"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


# --- the quota: what the file and its WAL take ----------------------------------------------------


def _on_disk(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


async def test_past_the_quota_the_oldest_go_and_the_file_and_wal_stay_within_it(
    tmp_path: Path, consumer: tuple[MosquittoBroker, Consumer], caplog: pytest.LogCaptureFixture
) -> None:
    """Messages with result ids (remembered beside the messages) into a 10 MB quota while the
    broker is down: past it the oldest are dropped, counted and logged with their seqs; outbox.db
    and its WAL together never exceed the quota; the newest are delivered once the broker is back."""
    broker, sub = consumer
    path = tmp_path / "outbox.db"
    quota = 10_000_000
    pad = "x" * 600
    peak = 0

    async def sample() -> None:  # also between and during commits (they run in the outbox's thread)
        nonlocal peak
        while True:
            peak = max(peak, _on_disk(path))
            await asyncio.sleep(0.002)

    async with _outbox_to(broker, path, OutboxConfig(max_bytes=quota), sample()) as (ob, _):
        for at in range(0, 30_000, 250):  # about 22 MB of messages and result ids
            await ob.put(
                [
                    ("plant", TOPIC, {"key": f"k{j % 13}", "n": j, "result_id": f"plant/avg/k{j % 13}/{j}", "p": pad},
                     f"k{j % 13}")
                    for j in range(at, at + 250)
                ]
            )  # fmt: skip
            peak = max(peak, _on_disk(path))
        assert peak <= quota, peak
        assert ob.dropped > 10_000 and ob.count + ob.dropped == 30_000
        assert ob.health()["disk_bytes"] <= quota
        # the oldest went: what waits is the newest, every one of them
        left = sorted(r[0] for r in sqlite3.connect(path).execute("SELECT id FROM outbox"))
        assert left == list(range(30_000 - ob.count + 1, 30_001))
        # the log says how many and which: the oldest, up to a seq (here all ids below it were dropped)
        said = [
            re.search(r"dropped the (\d+) oldest messages, up to seq (\d+) \((\d+) dropped", r.getMessage())
            for r in caplog.records
        ]
        said = [m for m in said if m]
        assert said and all(int(m[2]) == int(m[3]) for m in said), [m[0] for m in said]
        assert ob.problems()  # nearly full, on /healthz
        kept = ob.count
        broker.start()
        await _delivered(ob, sub, kept)
    assert {m["seq"] for m, _ in sub.got} == set(range(30_000 - kept + 1, 30_001))
    # the count of what was dropped survives a restart
    ob2 = Outbox(path, "gw1", {"plant": FakeLink()}, OutboxConfig(max_bytes=quota))
    await ob2.open()
    try:
        assert ob2.dropped == 30_000 - kept and ob2.count == 0
    finally:
        await ob2.close()


# --- after a reload, and 30 s after a start: what sinks' links are owed ---------------------------


def _owed_work(
    path: Path, queued: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> tuple[list[int], list[str], str]:
    """A backlog of ``queued`` rows for the broker connection (down all along) after rows owed to a
    broker connection and a webhook the config no longer has; then the SQLite steps of a start (it
    names the dropped connection), of closing a webhook link that delivered everything and whose
    sink went, and of the check for messages owed to sinks no pipeline has. Returns the steps,
    the links closed and the log."""
    store = SqliteOutboxStore(path, synchronous="OFF")
    store.open()
    gone = [("gone", TOPIC, "g", b"{}", False, 42)] * 2 + [
        ("webhook:p/gone", "t", f"w{i}", b"{}", False, 42) for i in range(3)
    ]
    store.append(gone, [], 1 << 40, None)
    for at in range(0, queued, 500):
        store.append(_rows(at, min(500, queued - at)), [], 1 << 40, None)
    store.close()
    steps = _Steps(monkeypatch)
    monkeypatch.setattr(Outbox, "UNCLAIMED_AFTER", 3600.0)  # run by hand below

    async def run() -> tuple[list[int], list[str]]:
        ob = Outbox(path, "gw1", {"plant": FakeLink()}, OutboxConfig(max_bytes=1 << 40))  # never connects
        work = [steps.n]
        await ob.open()
        work.append(steps.n)
        task = asyncio.create_task(ob.run())
        try:
            hook = SinkLink()
            hook.up()
            ob.register_link("webhook:p/hook", hook)
            await ob.put([("webhook:p/hook", "t", {"v": i}, f"h{i % 2}") for i in range(4)])
            await wait_for(lambda: len(hook.sent) == 4 and ob.count == queued + 5)
            ob.release_link("webhook:p/hook")  # its sink stopped (a reload took it out)
            work.append(steps.n)
            closed = await ob.retire_idle_links()
            work.append(steps.n)
            ob.UNCLAIMED_AFTER = 0.0
            await ob._warn_unclaimed()
            work.append(steps.n)
        finally:
            await ob.close()
            await asyncio.gather(task, return_exceptions=True)
        return [work[1] - work[0], work[3] - work[2], work[4] - work[3]], closed

    caplog.clear()
    work, closed = asyncio.run(run())
    return work, closed, caplog.text


def test_what_sinks_links_are_owed_is_read_from_the_summary_at_any_backlog_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(gateway.outbox, "_KEYS_SAVE_EVERY", 1000)
    caplog.set_level("INFO", logger="gateway.outbox")
    small, closed_small, said_small = _owed_work(tmp_path / "small.db", 3_000, monkeypatch, caplog)
    big, closed_big, said_big = _owed_work(tmp_path / "big.db", 30_000, monkeypatch, caplog)
    # Counting each connection's rows read the whole backlog: ten times the backlog was ten times
    # the work of each (36,000 SQLite steps each at 3,000 rows; a start's own reads are held by
    # the test above).
    assert big[0] < 2 * small[0] + 2000, (small, big)
    assert big[1] <= small[1] + 200 and big[2] <= small[2] + 200, (small, big)
    for closed, said in ((closed_small, said_small), (closed_big, said_big)):
        assert closed == ["webhook:p/hook"]
        assert "messages for connection 'gone' (ordering keys waiting: 1), which the config no longer has" in said, said
        assert "messages for webhook:p/gone (ordering keys waiting: 3), which no sink in the config has" in said, said
        assert "messages for webhook:p/hook" not in said, said


async def test_a_link_is_closed_only_once_it_is_owed_nothing(tmp_path: Path) -> None:
    """What the summary cannot see is covered by the sender: a key's newest message acknowledged
    while an older one is still in flight, or a link that never got its messages out."""
    ob = Outbox(tmp_path / "outbox.db", "gw1", {"plant": FakeLink()}, OutboxConfig())
    await ob.open()
    task = asyncio.create_task(ob.run())
    try:
        hook = SinkLink()
        hook.auto_ack = False
        ob.register_link("webhook:p/hook", hook)
        await ob.put([("webhook:p/hook", "t", {"v": i}, "a") for i in range(2)])  # one key; not connected
        ob.release_link("webhook:p/hook")
        assert await ob.retire_idle_links() == []  # owed two, sent none
        ob.register_link("webhook:p/hook", SinkLink())  # the sink is back (a reload kept it)
        hook.up()
        await wait_for(lambda: len(hook.pending) == 2)
        hook.pending[1].set_result(None)  # the newer acknowledged first
        await wait_for(lambda: ob.count == 1)
        ob.release_link("webhook:p/hook")
        assert await ob.retire_idle_links() == []  # its key's newest is gone, the older in flight
        hook.pending[0].set_result(None)
        await wait_for(lambda: ob.count == 0)
        assert await ob.retire_idle_links() == ["webhook:p/hook"]
    finally:
        await ob.close()
        await asyncio.gather(task, return_exceptions=True)
