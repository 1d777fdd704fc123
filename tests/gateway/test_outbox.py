"""The outbox on its own: durable put, seq, PUBACK-only deletion, replay flags, quota, fairness.

The broker is held at the one seam (a link object with publish_acked); the SQLite file is real.
Tests against a real Mosquitto live in test_outbox_faults.py.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import LinkError
from gateway.outbox import Outbox, OutboxConfig
from tests._util import wait_for


class FakeLink:
    """A broker link that acknowledges each publish on the next loop turn (or holds the acks)."""

    def __init__(self, window: int = 50):
        self.connected = False
        self._up = asyncio.Event()
        self.sent: list[dict[str, Any]] = []
        self.topics: list[str] = []
        self.pending: list[asyncio.Future[None]] = []
        self.auto_ack = True
        self.send_window = window
        self.refuse: set[int] = set()

    @property
    def in_flight(self) -> int:
        return sum(1 for f in self.pending if not f.done())

    def up(self) -> None:
        self.connected = True
        self._up.set()

    def down(self) -> None:
        self.connected = False
        self._up.clear()
        for f in self.pending:
            if not f.done():
                f.set_exception(LinkError("fake", "connection lost"))
        self.pending.clear()

    async def wait_connected(self) -> None:
        await self._up.wait()

    def publish_acked(self, topic: str, payload: bytes, retain: bool = False) -> asyncio.Future[None]:
        if not self.connected:
            raise LinkError("fake", "not connected")
        msg = json.loads(payload)
        self.sent.append(msg)
        self.topics.append(topic)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        if msg["seq"] in self.refuse:
            exc = LinkError("fake", "refused")
            exc.refused = True  # type: ignore[attr-defined]
            asyncio.get_running_loop().call_soon(fut.set_exception, exc)
        elif self.auto_ack:
            asyncio.get_running_loop().call_soon(fut.set_result, None)
        return fut

    def publish_acked_many(self, messages: list[tuple[str, bytes, bool]]) -> list[asyncio.Future[None]]:
        room = self.send_window - self.in_flight
        return [self.publish_acked(t, p, r) for t, p, r in messages[:room]]

    def ack_all(self) -> None:
        for f in self.pending:
            if not f.done():
                f.set_result(None)


def rows_in(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    finally:
        db.close()


async def started(tmp_path: Path, link: FakeLink, **cfg: Any) -> tuple[Outbox, asyncio.Task[None]]:
    ob = Outbox(tmp_path / "outbox.db", "gw1", {"plant": link}, OutboxConfig(**cfg), seq_path=tmp_path / "seq")
    await ob.open()
    return ob, asyncio.create_task(ob.run())


def msgs(n: int, key: str = "k", start: int = 0) -> list[tuple[str, str, dict[str, Any], str]]:
    return [("plant", "t/out", {"key": key, "value": start + i}, key) for i in range(n)]


async def test_put_commits_then_sends_and_deletes_on_ack(tmp_path: Path) -> None:
    link = FakeLink()
    link.auto_ack = False
    ob, task = await started(tmp_path, link)
    try:
        first = await ob.put(msgs(5))
        assert first == 1
        assert rows_in(tmp_path / "outbox.db") == 5  # durable before any send
        link.up()
        await wait_for(lambda: len(link.sent) == 5)
        assert [m["seq"] for m in link.sent] == [1, 2, 3, 4, 5]
        assert all(m["gateway_id"] == "gw1" and m["replayed"] is False for m in link.sent)
        assert link.sent[0] == {"gateway_id": "gw1", "seq": 1, "replayed": False, "key": "k", "value": 0}
        link.pending[0].set_result(None)  # the broker acknowledges the first one only
        await wait_for(lambda: rows_in(tmp_path / "outbox.db") < 5)
        assert rows_in(tmp_path / "outbox.db") == 4  # the deleter ran: the four not acknowledged are still there
        link.ack_all()
        await wait_for(lambda: rows_in(tmp_path / "outbox.db") == 0)
        assert ob.count == 0 and ob.published == 5
    finally:
        await ob.close()
        task.cancel()


async def test_lost_connection_resends_with_replayed_true(tmp_path: Path) -> None:
    link = FakeLink()
    link.auto_ack = False
    ob, task = await started(tmp_path, link)
    try:
        link.up()
        await ob.put(msgs(3))
        await wait_for(lambda: len(link.sent) == 3)
        link.down()  # no PUBACK came: the broker may or may not have them
        link.auto_ack = True
        link.up()
        await wait_for(lambda: len(link.sent) == 6)
        assert [(m["seq"], m["replayed"]) for m in link.sent[3:]] == [(1, True), (2, True), (3, True)]
        await ob.put(msgs(1))
        await wait_for(lambda: len(link.sent) == 7)
        assert (link.sent[6]["seq"], link.sent[6]["replayed"]) == (4, False)
        await wait_for(lambda: ob.count == 0)
    finally:
        await ob.close()
        task.cancel()


async def test_restart_keeps_rows_seq_never_goes_back(tmp_path: Path) -> None:
    link = FakeLink()
    ob, task = await started(tmp_path, link)
    await ob.put(msgs(4))
    await ob.close()
    await asyncio.gather(task, return_exceptions=True)
    assert rows_in(tmp_path / "outbox.db") == 4

    link2 = FakeLink()
    ob2, task2 = await started(tmp_path, link2)
    try:
        assert ob2.count == 4
        await ob2.put(msgs(1))
        link2.up()
        await wait_for(lambda: len(link2.sent) == 5)
        assert [(m["seq"], m["replayed"]) for m in link2.sent] == [
            (1, True),
            (2, True),
            (3, True),
            (4, True),
            (5, False),
        ]
        await wait_for(lambda: ob2.count == 0)
    finally:
        await ob2.close()
        task2.cancel()

    # even with the database gone, numbering continues above everything used before
    (tmp_path / "outbox.db").unlink()
    for extra in ("outbox.db-wal", "outbox.db-shm"):
        (tmp_path / extra).unlink(missing_ok=True)
    ob3, task3 = await started(tmp_path, FakeLink())
    try:
        assert await ob3.put(msgs(1)) > 5
    finally:
        await ob3.close()
        task3.cancel()


async def test_quota_drops_oldest_and_counts_exactly(tmp_path: Path) -> None:
    link = FakeLink()
    ob, task = await started(tmp_path, link, max_messages=100)
    try:
        for i in range(5):
            await ob.put(msgs(50, start=i * 50))
        assert ob.dropped == 150 and ob.count == 100
        assert rows_in(tmp_path / "outbox.db") == 100
        link.up()
        await wait_for(lambda: len(link.sent) == 100)
        assert [m["seq"] for m in link.sent] == list(range(151, 251))
        assert ob.health()["dropped"] == 150
    finally:
        await ob.close()
        task.cancel()
    # the dropped count survives a restart
    ob2, task2 = await started(tmp_path, FakeLink(), max_messages=100)
    try:
        assert ob2.dropped == 150
    finally:
        await ob2.close()
        task2.cancel()


async def test_byte_quota(tmp_path: Path) -> None:
    ob, task = await started(tmp_path, FakeLink(), max_bytes=10_000_000)
    try:
        for _ in range(20):
            await ob.put([("plant", "t", {"blob": "x" * 150_000}, None)] * 5)
        assert ob.dropped > 0
        assert ob.bytes <= 10_000_000
        assert ob.count + ob.dropped == 100
        assert ob.problems()  # nearly full is reported on /healthz
    finally:
        await ob.close()
        task.cancel()


async def test_live_messages_share_the_link_with_the_backlog_and_keys_stay_in_order(tmp_path: Path) -> None:
    link = FakeLink(window=50)
    link.auto_ack = False
    ob, task = await started(tmp_path, link)
    try:
        # a backlog built while offline, for keys a and b
        for i in range(10):
            await ob.put(msgs(50, "a", i * 50) + msgs(50, "b", i * 50))
        link.up()
        await wait_for(lambda: len(link.sent) == 50)  # the window is full; nothing is acknowledged yet
        # live traffic while the backlog waits: a new key, and more for key a
        await ob.put(msgs(5, "c") + msgs(5, "a", 1000))
        link.auto_ack = True
        link.ack_all()
        await wait_for(lambda: ob.count == 0, timeout=20)
        keys = [m["key"] for m in link.sent]
        last_backlog = max(i for i, m in enumerate(link.sent) if m["seq"] <= 1000)
        assert keys.index("c") < 120, "live messages waited for the whole backlog"
        assert keys.index("c") < last_backlog
        for k in "abc":
            seqs = [m["seq"] for m in link.sent if m["key"] == k]
            assert seqs == sorted(seqs), f"key {k} out of order"
        assert len(link.sent) == 1010
    finally:
        await ob.close()
        task.cancel()


async def test_rate_cap() -> None:
    from gateway.outbox import _RateCap

    now = [100.0]
    cap = _RateCap(10.0, clock=lambda: now[0])
    for _ in range(10):  # a burst of one second's worth
        await asyncio.wait_for(cap.take(), 1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(cap.take(), 0.05)  # the 11th waits for time to pass
    now[0] += 0.125
    await asyncio.wait_for(cap.take(), 1)  # 1/8 s later there is room for one more


async def test_refused_message_is_handed_over_not_retried(tmp_path: Path) -> None:
    link = FakeLink()
    refused: list[tuple[str, str, bytes, str]] = []
    ob = Outbox(tmp_path / "outbox.db", "gw1", {"plant": link}, OutboxConfig(), on_refused=lambda *a: refused.append(a))
    await ob.open()
    task = asyncio.create_task(ob.run())
    try:
        link.refuse = {2}
        link.up()
        await ob.put(msgs(3))
        await wait_for(lambda: ob.count == 0)
        assert ob.refused == 1 and ob.published == 2
        assert refused and refused[0][0] == "plant" and json.loads(refused[0][2])["seq"] == 2
    finally:
        await ob.close()
        task.cancel()


async def test_unknown_connection_and_bad_body(tmp_path: Path) -> None:
    ob, task = await started(tmp_path, FakeLink())
    try:
        with pytest.raises(Exception, match="unknown connection 'nope'"):
            await ob.put([("nope", "t", {}, None)])
        with pytest.raises(ValueError, match="JSON object"):
            await ob.put([("plant", "t", b"[1]", None)])
        assert ob.count == 0
    finally:
        await ob.close()
        task.cancel()


def test_sizes_parse() -> None:
    assert OutboxConfig(max_bytes="64MB").max_bytes == 64_000_000
    assert OutboxConfig(max_bytes="1GiB").max_bytes == 1024**3
    with pytest.raises(ValueError, match="not a size"):
        OutboxConfig(max_bytes="lots")


# --- property: whatever the link does, everything arrives, in order per key ------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from("abc"), st.integers(min_value=1, max_value=30)),
        st.tuples(st.just("up")),
        st.tuples(st.just("down")),
        st.tuples(st.just("ack")),
        st.tuples(st.just("tick")),
    ),
    min_size=1,
    max_size=25,
)


async def _play(ops: list[tuple[Any, ...]], path: Path) -> tuple[FakeLink, Outbox]:
    link = FakeLink(window=7)
    link.auto_ack = False
    ob = Outbox(path / "outbox.db", "gw1", {"plant": link}, OutboxConfig(inflight=5))
    await ob.open()
    task = asyncio.create_task(ob.run())
    n = 0
    try:
        for op in ops:
            if op[0] == "put":
                await ob.put([("plant", "t", {"key": op[1], "n": n + i}, op[1]) for i in range(op[2])])
                n += op[2]
            elif op[0] == "up":
                link.up()
            elif op[0] == "down":
                link.down()
            elif op[0] == "ack":
                link.ack_all()
            for _ in range(5):
                await asyncio.sleep(0)
        link.auto_ack = True
        link.ack_all()
        link.up()
        await wait_for(lambda: ob.count == 0, timeout=10)
        assert ob.last_id == n
    finally:
        await ob.close()
        task.cancel()
    return link, ob


@settings(max_examples=40, deadline=None)
@given(_ops, st.sampled_from([4, 20_000]))
def test_any_link_behaviour_delivers_everything_in_order(ops: list[tuple[Any, ...]], cache: int) -> None:
    import gateway.outbox

    saved = gateway.outbox._LIVE_CACHE
    gateway.outbox._LIVE_CACHE = cache  # small: the sender often reads back from disk
    try:
        with tempfile.TemporaryDirectory() as d:
            link, ob = asyncio.run(_play(ops, Path(d)))
    finally:
        gateway.outbox._LIVE_CACHE = saved
    first: dict[int, dict[str, Any]] = {}
    order: dict[str, list[int]] = {}
    for m in link.sent:
        if m["seq"] in first:
            assert m["replayed"], m
            continue
        first[m["seq"]] = m
        order.setdefault(m["key"], []).append(m["seq"])
    assert set(first) == set(range(1, ob.last_id + 1))
    for key, seqs in order.items():
        assert seqs == sorted(seqs), key


def test_delivery_when_the_memory_copy_overflows(monkeypatch: pytest.MonkeyPatch) -> None:
    # rows beyond the memory copy are read back from disk; nothing is skipped or sent twice
    import gateway.outbox

    monkeypatch.setattr(gateway.outbox, "_LIVE_CACHE", 5)
    ops: list[tuple[Any, ...]] = [
        ("put", "a", 30),
        ("up",),
        ("put", "b", 12),
        ("ack",),
        ("put", "a", 9),
        ("down",),
        ("put", "c", 20),
        ("up",),
        ("tick",),
        ("put", "a", 7),
        ("ack",),
    ]
    with tempfile.TemporaryDirectory() as d:
        link, _ = asyncio.run(_play(ops, Path(d)))
    seqs = [m["seq"] for m in link.sent if not m["replayed"]]
    assert len(seqs) == len(set(seqs))
    assert {m["seq"] for m in link.sent} == set(range(1, 79))


class SinkLink(FakeLink):
    """A link a sink registers itself (as a webhook, Kafka or a third-party forwarding sink does)."""

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        pass

    def configure(self, other: Any) -> None:
        pass


async def test_messages_owed_to_any_sinks_link_are_told_from_a_dropped_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A third-party forwarding sink's link (``clamp:p/out``) is a sink's, like ``webhook:…``: after a
    restart its messages are not reported as owed to a broker connection the config dropped, but,
    once no sink took it up, as owed to a sink the config no longer has."""
    ob, task = await started(tmp_path, FakeLink())
    ob.register_link("clamp:p/out", SinkLink())
    await ob.put([("clamp:p/out", "t", {"v": 1}, None)])
    await ob.close()
    await asyncio.gather(task, return_exceptions=True)

    monkeypatch.setattr(Outbox, "UNCLAIMED_AFTER", 0.1)
    caplog.set_level("WARNING", logger="gateway.outbox")
    ob2, task2 = await started(tmp_path, FakeLink())
    try:
        await wait_for(lambda: "no sink in the config has" in caplog.text, timeout=10)
    finally:
        await ob2.close()
        task2.cancel()
    assert "messages for clamp:p/out (ordering keys waiting: 1), which no sink in the config has" in caplog.text
    assert "which the config no longer has" not in caplog.text


def test_send_order_interleaves_backlog_and_live_but_keeps_each_keys_order() -> None:
    """The sender's scheduler, driven synchronously: backlog and live take turns, and a live row
    waits while its key still has backlog to go."""
    from gateway.outbox import Row, SendOrder

    def row(i: int, key: str) -> Row:
        return Row(i, "plant", "t", key, b"{}", False, 10)

    backlog = [row(1, "a"), row(2, "b"), row(3, "a"), row(4, "c")]
    order = SendOrder({"a": 3, "b": 2, "c": 4})
    order.backlog.extend(backlog)
    order.live.extend([row(5, "a"), row(6, "d"), row(7, "b"), row(8, "e")])
    sent = []
    while (r := order.next()) is not None:
        sent.append(r.id)
    assert order.deferred == {}
    order.finish_backlog()
    while (r := order.next()) is not None:
        sent.append(r.id)
    # 5 (a) waits for 3, 7 (b) for 2; 6 (d) and 8 (e) have no backlog and take their turns
    assert sent == [1, 6, 2, 7, 3, 5, 4, 8]
    for key in "abcde":
        ids = [i for i in sent if {1: "a", 2: "b", 3: "a", 4: "c", 5: "a", 6: "d", 7: "b", 8: "e"}[i] == key]
        assert ids == sorted(ids)


def test_send_order_releases_what_waited_when_the_backlog_ends_early() -> None:
    from gateway.outbox import Row, SendOrder

    order = SendOrder({"a": 9})  # the store said a's backlog ends at 9, but the rows were trimmed
    order.live.append(Row(10, "plant", "t", "a", b"{}", False, 10))
    assert order.next() is None and list(order.deferred) == ["a"]
    order.finish_backlog()
    assert [order.next().id, order.next()] == [10, None]  # type: ignore[union-attr]


def test_send_order_lets_a_key_go_once_the_backlog_is_past_its_last_row_even_if_that_row_is_gone() -> None:
    """The store's summary may name a last row already acknowledged (sent live in an earlier
    connected period): the key's live rows wait until the backlog sent is past that id, not until
    the whole backlog went out."""
    from gateway.outbox import Row, SendOrder

    def row(i: int, key: str) -> Row:
        return Row(i, "plant", "t", key, b"{}", False, 10)

    order = SendOrder({"a": 2, "b": 3, "c": 40})  # b's row 3 is gone
    order.backlog.extend([row(1, "a"), row(2, "a"), row(4, "c"), row(5, "c"), row(6, "c"), row(40, "c")])
    order.live.extend([row(41, "b"), row(42, "c"), row(43, "b")])
    sent = []
    while (r := order.next()) is not None:
        sent.append(r.id)
    assert sent == [1, 2, 4, 41, 5, 43, 6, 40, 42]  # b waits until the backlog is past 3, c until 40


async def test_rows_and_result_ids_are_stored_as_put_whether_or_not_a_batch_shares_its_topic(tmp_path: Path) -> None:
    """A batch whose rows share connection, topic and retain flag binds those once per statement;
    any other batch binds them per row. Either way each row and result id lands as it was put,
    in order, in statements of every size (45 rows: 32 + 8 + 4 + 1)."""
    ob = Outbox(tmp_path / "outbox.db", "gw1", {"plant": FakeLink(), "other": FakeLink()}, seq_path=tmp_path / "seq")
    await ob.open()
    alike = [("plant", "t/out", {"v": i, "result_id": f"r/{i}"}, f"k{i % 3}") for i in range(45)]
    mixed = [
        ("plant" if i % 2 else "other", f"t/{i % 3}", {"v": 100 + i, "result_id": f"m/{i}"}, None) for i in range(45)
    ]
    await ob.put(alike, retain=True)
    await ob.put(mixed)
    await ob.put(mixed[:7], retain=False)  # taken before: none stored again
    await ob.close()
    db = sqlite3.connect(tmp_path / "outbox.db")
    try:
        got = db.execute("SELECT id, connection, topic, okey, body, retain FROM outbox ORDER BY id").fetchall()
        kept = db.execute("SELECT seq, connection, topic, rid FROM results_new ORDER BY seq").fetchall()
    finally:
        db.close()
    want = [(c, t, k if k is not None else t, json.dumps(f, separators=(",", ":")).encode()) for c, t, f, k in alike]
    want += [(c, t, t, json.dumps(f, separators=(",", ":")).encode()) for c, t, f, _ in mixed]
    assert [(c, t, k, bytes(b)) for _, c, t, k, b, _ in got] == want
    assert [r for *_, r in got] == [1] * 45 + [0] * 45
    assert [i for i, *_ in got] == list(range(1, 91))
    assert kept == [(i + 1, c, t, f["result_id"]) for i, (c, t, f, _) in enumerate(alike + mixed)]
    assert ob.duplicates == 7
