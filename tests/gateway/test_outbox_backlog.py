"""The outbox under a backlog: what queued while the link was down, read back in batches and sent.

The broker is held at the one seam (``FakeLink`` from test_outbox.py); the SQLite file is real.
The sizes that matter here (100k, 1M queued) are measured by scripts/bench/outbox_backlog.py;
these tests use small read batches so that a few dozen rows span many of them.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

import gateway.outbox
from tests._util import wait_for
from tests.gateway.test_outbox import FakeLink, _ops, _play, started


def _firsts(sent: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Per key, the seqs in the order they were first sent."""
    seen: set[int] = set()
    order: dict[str, list[int]] = {}
    for m in sent:
        if m["seq"] in seen:
            assert m["replayed"], m
            continue
        seen.add(m["seq"])
        order.setdefault(m["key"], []).append(m["seq"])
    return order


async def test_backlog_of_many_read_batches_survives_a_drop_while_the_next_batch_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sender reads the next batch while it sends the current one; a link lost meanwhile
    # leaves that read behind. The next pass starts again from the oldest unacknowledged row.
    monkeypatch.setattr(gateway.outbox, "_READ_BATCH", 4)
    link = FakeLink(window=3)
    link.auto_ack = False
    ob, task = await started(tmp_path, link)
    try:
        for key in "abc":
            await ob.put([("plant", "t/out", {"key": key, "n": i}, key) for i in range(15)])
        link.up()
        await wait_for(lambda: len(link.sent) == 3)
        link.pending[0].set_result(None)
        link.pending[1].set_result(None)
        await wait_for(lambda: len(link.sent) == 5)
        link.down()
        await ob.put([("plant", "t/out", {"key": "a", "n": 15}, "a")])  # live, behind a's backlog
        link.auto_ack = True
        link.ack_all()
        link.up()
        await wait_for(lambda: ob.count == 0)
        await wait_for(lambda: not ob._to_delete)
    finally:
        await ob.close()
        task.cancel()
    order = _firsts(link.sent)
    assert sorted(s for seqs in order.values() for s in seqs) == list(range(1, 47))
    for key, seqs in order.items():
        assert seqs == sorted(seqs), key
    assert order["a"][-1] == 46
    replays = [m["seq"] for m in link.sent if m["replayed"]]
    assert 1 not in replays and 2 not in replays  # acknowledged before the drop: not sent again


@settings(max_examples=30, deadline=None)
@given(_ops)
def test_any_link_behaviour_delivers_everything_in_order_with_small_read_and_hold_bounds(
    ops: list[tuple[Any, ...]],
) -> None:
    saved = gateway.outbox._READ_BATCH, gateway.outbox._DEFER_MAX
    gateway.outbox._READ_BATCH = 3  # a backlog of a few rows already spans several reads
    gateway.outbox._DEFER_MAX = 2  # and live rows behind it soon wait in the file
    try:
        with tempfile.TemporaryDirectory() as d:
            link, ob = asyncio.run(_play(ops, Path(d)))
    finally:
        gateway.outbox._READ_BATCH, gateway.outbox._DEFER_MAX = saved
    order = _firsts(link.sent)
    assert sorted(s for seqs in order.values() for s in seqs) == list(range(1, ob.last_id + 1))
    for key, seqs in order.items():
        assert seqs == sorted(seqs), key


# --- disk: what a drained backlog leaves behind --------------------------------------------------


def _pages(path: Path) -> tuple[int, int]:
    """(pages in the database, pages of them on the free list), as another reader sees them."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("PRAGMA page_count").fetchone()[0], db.execute("PRAGMA freelist_count").fetchone()[0]
    finally:
        db.close()


def _padded(n: int, key: str = "k") -> list[tuple[str, str, dict[str, Any], str]]:
    return [("plant", "t/out", {"key": key, "pad": "x" * 2000}, key) for _ in range(n)]


async def _queue_and_drain(tmp_path: Path, link: FakeLink, rows: int) -> int:
    """Queue ``rows`` padded messages while the link is down, let them drain, and wait until the
    file holds less than a quarter of the pages it had (a timeout if it never does). Returns the
    pages it had with the backlog queued."""
    ob, task = await started(tmp_path, link)
    path = tmp_path / "outbox.db"
    try:
        for _ in range(rows // 100):
            await ob.put(_padded(100))
        queued = _pages(path)[0]
        link.up()
        await wait_for(lambda: ob.count == 0)
        await wait_for(lambda: _pages(path)[0] < queued / 4)
    finally:
        await ob.close()
        task.cancel()
    return queued


async def test_a_drained_backlog_gives_its_disk_space_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.outbox, "_RECLAIM_MIN", 64 << 10)
    queued = await _queue_and_drain(tmp_path, FakeLink(window=50), 1200)
    assert queued > 600  # 1,200 rows of 2 kB
    # closed: the WAL is gone and the file itself is small again
    assert (tmp_path / "outbox.db").stat().st_size < queued * 4096 / 4


async def test_a_file_from_before_is_converted_once_and_seq_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # outbox.db as an earlier version created it: no auto_vacuum, so free pages cannot be given
    # back until a VACUUM, which must keep the seq counter (sqlite_sequence) and the result ids
    monkeypatch.setattr(gateway.outbox, "_RECLAIM_MIN", 64 << 10)
    path = tmp_path / "outbox.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, connection TEXT NOT NULL,"
        " topic TEXT NOT NULL, okey TEXT NOT NULL, body BLOB NOT NULL, retain INTEGER NOT NULL,"
        " size INTEGER NOT NULL, created REAL NOT NULL)"
    )
    db.close()
    link = FakeLink(window=50)
    await _queue_and_drain(tmp_path, link, 1200)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental from now on
    db.close()

    link2 = FakeLink()
    ob, task = await started(tmp_path, link2)
    try:
        assert await ob.put(_padded(1)) == 1201
        link2.up()
        await wait_for(lambda: len(link2.sent) == 1)
    finally:
        await ob.close()
        task.cancel()
    assert link2.sent[0]["seq"] == 1201


async def test_the_wal_is_cut_back_after_a_big_commit(tmp_path: Path) -> None:
    link = FakeLink()
    ob, task = await started(tmp_path, link)
    wal = tmp_path / "outbox.db-wal"
    try:
        await ob.put(_padded(3000))  # one commit of about 6 MB: the WAL grows past it
        assert wal.stat().st_size > 6 << 20
        for _ in range(3):  # later commits start the WAL over once it was checkpointed
            await ob.put(_padded(1))
        await wait_for(lambda: wal.stat().st_size <= gateway.outbox._WAL_LIMIT)
    finally:
        await ob.close()
        task.cancel()


# --- memory: an outage does not fill the process -------------------------------------------------


async def test_messages_queued_while_offline_are_not_also_held_in_memory(tmp_path: Path) -> None:
    # The sender reads a backlog from the file when the link comes back; a copy in memory of
    # what was queued meanwhile would only be dropped then (up to 20,000 messages of it).
    link = FakeLink()
    ob, task = await started(tmp_path, link)
    try:
        await ob.put(_padded(10))  # the first commit sets up what every later one reuses
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(20):
                await ob.put(_padded(100))
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert held < 1 << 20, held  # the 2,000 messages are 4 MB
        link.up()
        await wait_for(lambda: ob.count == 0)
    finally:
        await ob.close()
        task.cancel()
    assert sorted(m["seq"] for m in link.sent) == list(range(1, 2011))


async def test_live_messages_during_a_long_drain_wait_in_the_file_not_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A live message waits behind its key's backlog. When the backlog takes long to drain and
    # live traffic goes on, what waits beyond a bound stays in the file instead of in memory.
    monkeypatch.setattr(gateway.outbox, "_LIVE_CACHE", 100)
    monkeypatch.setattr(gateway.outbox, "_DEFER_MAX", 50)
    link = FakeLink(window=5)
    link.auto_ack = False
    ob, task = await started(tmp_path, link)
    try:
        await ob.put(_padded(300))  # the backlog, all of key k
        link.up()
        await wait_for(lambda: len(link.sent) == 5)
        await ob.put(_padded(1))  # the first live commit sets up what every later one reuses
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(20):  # 2,000 live messages of key k (4 MB) while the backlog drains slowly
                await ob.put(_padded(100))
                link.ack_all()
                await wait_for(lambda i=i: len(link.sent) >= 5 * (i + 2))
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert held < 1 << 20, held
        link.auto_ack = True
        link.ack_all()
        await wait_for(lambda: ob.count == 0)
    finally:
        await ob.close()
        task.cancel()
    order = _firsts(link.sent)
    assert order["k"] == list(range(1, 2302))
