"""Every store writer against one record no file can hold: the record is dropped (dead-lettered or
counted), the rest is written, and the writer goes on. Real SQLite files throughout.

Bad records: a lone surrogate in text (SQLite cannot encode it), NaN where a column is NOT NULL
(SQLite stores NaN as NULL), an int beyond 64 bits, a value nested too deeply to serialise.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gateway.alerts import AlertBook
from gateway.deadletter import DeadLetters
from gateway.events import Event
from gateway.history import History
from gateway.outbox import Outbox
from gateway.store import StateStore
from tests._util import wait_for

SURROGATE = "t\ud800"


def deep(n: int) -> Any:
    v: Any = 1.0
    for _ in range(n):
        v = {"a": v}
    return v


async def test_dead_letters_escape_text_and_outlive_an_unwritable_row(tmp_path: Path) -> None:
    dl = DeadLetters(tmp_path / "deadletter.db")
    task = asyncio.create_task(dl.run())
    try:
        dl.record("p", "n", f"bad key {SURROGATE}", Event(SURROGATE, 1.0, 2.0, "s"))
        dl.record("p", "n\udfff", "reason", raw=SURROGATE)
        dl.record("p", "n", "too deep", Event("k", 1.0, deep(50_000), "s"))  # json.dumps and repr both give up
        rows = await wait_for(lambda: (r := dl.read()) and len(r) == 3 and r, timeout=10)
        by_reason = {r["reason"]: r for r in rows}
        assert by_reason["bad key t\\ud800"]["key"] == "t\\ud800"
        assert '"key": "t\\ud800"' in by_reason["bad key t\\ud800"]["payload"]
        assert by_reason["reason"]["node"] == "n\\udfff" and by_reason["reason"]["payload"] == "t\\ud800"
        assert "nested too deeply" in by_reason["too deep"]["payload"]
        # A row record() would never build (a type SQLite cannot bind): it alone is lost, counted.
        dl._pending.append((time.time(), "p", "n", {"not": "text"}, None, ""))
        dl.record("p", "n", "after the bad row", raw=b"x")
        await wait_for(lambda: any(r["reason"] == "after the bad row" for r in dl.read()), timeout=10)
        assert dl.lost == 1 and not task.done()
        dl.record("p", "n", "and the writer goes on", raw=b"y")
        await wait_for(lambda: any(r["reason"] == "and the writer goes on" for r in dl.read()), timeout=10)
        assert dl.lost == 1 and dl.total == 5 and not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await dl.close()


async def test_state_store_drops_only_the_rows_no_file_can_hold(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db", commit_interval=0.01)
    await store.start()
    try:
        store.write([("p", "n", "good", b"1"), ("p", "n", SURROGATE, b"2"), ("p\udc00", "n", "k", b"3")])
        await store.flush()
        assert store.load_state("p", "n") == {"good": b"1"}
        assert store.rejected_rows == 2 and store.state == "ok"
        # statements (the history's deltas) too: an int beyond 64 bits, then the writer goes on
        assert store.execute("INSERT INTO state VALUES (?,?,?,?,?)", [("p", "n", "big", 10**30, 0.0)])
        store.write([("p", "n", "later", b"4")])
        await store.flush()
        assert store.load_state("p", "n") == {"good": b"1", "later": b"4"}
        assert store.rejected_rows == 3 and store.write_errors == 0
        assert store._thread is not None and store._thread.is_alive()
    finally:
        await store.close()


async def test_history_deltas_with_a_bad_key_or_nan_cost_only_those_buckets(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db", commit_interval=0.01)
    await store.start()
    try:
        h = History(store)
        h.add("good", 100.0, 1.0)
        h.add(SURROGATE, 100.0, 2.0)  # a lone surrogate in the key
        h.add("nan", 100.0, math.nan)  # NaN: NULL in a NOT NULL column
        h.flush()
        await store.flush()
        assert h.query("good", 0, 200)["points"] and not h.query("nan", 0, 200)["points"]
        assert store.rejected_rows == 2 * len(h.tiers) and store.state == "ok"
        h.add("good", 101.0, 3.0)
        h.flush()
        await store.flush()
        assert [p[4] for p in h.query("good", 0, 200)["points"]] == [1.0, 1.0]  # count per 1 s bucket
    finally:
        await store.close()


async def test_alert_book_rejects_one_item_and_takes_the_rest(tmp_path: Path) -> None:
    def item(akey: str, reading: Any = 95.0, key: str = "s1") -> dict[str, Any]:
        value = {"state": "raised", "alert_key": akey, "severity": "critical", "reading": reading, "rule": "r"}
        return {"pipeline": "p", "node": "hot", "key": key, "ts": 1.0, "value": value}

    book = AlertBook(tmp_path / "alerts.db")
    await book.open()
    try:
        rejected: list[tuple[int, BaseException]] = []
        steps = await book.apply(
            [item("p/hot/s1"), item(f"p/hot/{SURROGATE}"), item("p/hot/s3", deep(50_000)), item("p/hot/s4")],
            on_rejected=lambda i, exc: rejected.append((i, exc)),
        )
        assert [(a, al["alert_key"]) for a, al in steps] == [("opened", "p/hot/s1"), ("opened", "p/hot/s4")]
        assert [i for i, _ in rejected] == [1, 2] and book.rejected == 2
        assert isinstance(rejected[0][1], UnicodeEncodeError) and isinstance(rejected[1][1], RecursionError)
        assert {a["alert_key"] for a in await book.list()} == {"p/hot/s1", "p/hot/s4"}  # nothing half-written
        ((action, _),) = await book.apply([item("p/hot/s1", 99.0)])  # the book goes on
        assert action == "updated"
    finally:
        await book.close()


async def test_outbox_refuses_one_message_and_commits_the_rest(tmp_path: Path) -> None:
    refused: list[tuple[str, str, bytes, str]] = []
    # a link that never connects: this test is about what the store takes, not about sending
    link = SimpleNamespace(name="c", connected=False, state="down", last_error=None, send_window=1)
    ob = Outbox(tmp_path / "outbox.db", "gw1", {"c": link}, on_refused=lambda *a: refused.append(a))
    await ob.open()
    try:
        bad = f"t/{SURROGATE}"
        first = await ob.put(
            [
                ("c", "t/good", {"v": 1}, None),
                ("c", bad, {"v": 2}, None),  # a topic no broker or file takes
                ("c", bad, {"v": 2.5}, None),  # the same again, right after: refused again
                ("c", "t/ok", {"v": 3}, f"t\x00{SURROGATE}"),  # an ordering key likewise
                ("c", "t/deep", {"v": deep(50_000)}, None),  # nested too deeply to serialise
                ("c", "t/good2", {"v": 5}, None),
            ]
        )
        assert ob.count == 2 and ob.last_id == first + 1 and ob.rejected == 4
        assert [r[1] for r in refused] == ["t/t\\ud800", "t/t\\ud800", "t/ok", "t/deep"]
        assert all(r[3].startswith("not stored in the outbox") for r in refused)
        await ob.put([("c", "t/after", {"v": 6}, None)])
        db = sqlite3.connect(tmp_path / "outbox.db")
        try:
            assert [r[0] for r in db.execute("SELECT topic FROM outbox ORDER BY id")] == [
                "t/good",
                "t/good2",
                "t/after",
            ]
        finally:
            db.close()
    finally:
        await ob.close()
