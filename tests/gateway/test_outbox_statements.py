"""The outbox deletes acknowledged rows with a few statement shapes, not one per count of ids:
each shape is compiled and kept in the connection's statement cache (128 of them), and one per
count held megabytes of one-off ``IN (?, ?, …)`` statements on a long-running gateway."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway._records import IN_LIST_SIZES, in_list
from gateway.outbox import SqliteOutboxStore


def test_deletes_of_every_size_use_a_few_statements_and_delete_exactly_those_rows(tmp_path: Path) -> None:
    store = SqliteOutboxStore(tmp_path / "outbox.db", synchronous="OFF")
    store.open()
    seen: set[str] = set()

    def trace(sql: str) -> None:  # the statement with its values bound: its shape is the statement
        if sql.startswith("DELETE FROM outbox WHERE id IN"):
            seen.add(re.sub(r"\d+", "?", sql))

    store._db.set_trace_callback(trace)  # type: ignore[union-attr]
    body = b'{"v": 1}'
    first, *_ = store.append([("c", "t", "k", body, False, len(body))] * 7000, [], 1 << 30, None)
    ids = list(range(first, first + 7000))
    at = 0
    for n in range(1, 115):  # 6,555 ids in deletes of 1 … 114
        store.delete(ids[at : at + n])
        at += n
    assert len(seen) <= len(IN_LIST_SIZES)
    assert store.stats()[0] == 7000 - at  # every id deleted once, padding deleted nothing else
    remaining = [r[0] for r in store._db.execute("SELECT id FROM outbox ORDER BY id")]  # type: ignore[union-attr]
    assert remaining == ids[at:]


def test_in_list_pads_with_the_last_value() -> None:
    for n in range(1, 501):
        marks, params = in_list(list(range(n)))
        assert marks.count("?") == len(params) in IN_LIST_SIZES
        assert params[:n] == list(range(n)) and set(params[n:]) <= {n - 1}


def test_rows_are_inserted_in_order_with_their_ids_in_any_count(tmp_path: Path) -> None:
    """Rows go in 32 to a statement and the rest one by one: every count keeps ids and order."""
    store = SqliteOutboxStore(tmp_path / "outbox.db", synchronous="OFF")
    store.open()
    expected: list[tuple[int, str, bytes]] = []
    for n in (1, 31, 32, 33, 64, 100, 0, 7):
        rows = [("c", f"t{len(expected) + i}", "k", b'{"i":%d}' % (len(expected) + i), False, 60) for i in range(n)]
        results = [(i, "c", r[1], f"rid-{r[1]}") for i, r in enumerate(rows) if i % 2]
        first, *_ = store.append(rows, [], 1 << 30, None, results)
        expected += [(first + i, r[1], r[3]) for i, r in enumerate(rows)]
    db = store._db
    assert db is not None
    got = [(i, t, bytes(b)) for i, t, b in db.execute("SELECT id, topic, body FROM outbox ORDER BY id")]
    assert got == expected and [e[0] for e in expected] == list(range(1, len(expected) + 1))
    # each result id is remembered with the seq of its own row
    by_seq = dict(db.execute("SELECT seq, rid FROM results UNION ALL SELECT seq, rid FROM results_new"))
    assert by_seq and all(by_seq[i] == f"rid-{t}" for i, t, _ in expected if i in by_seq)
    assert store.known_results([("c", "t2", "rid-t2"), ("c", "t1", "rid-t1")]) == {("c", "t2", "rid-t2")}
    store.close()


@given(st.lists(st.integers(1, 300), max_size=400))
@settings(max_examples=60, deadline=None)
def test_a_delete_of_any_ids_removes_exactly_those_rows_and_counts_them(ids: list[int]) -> None:
    """Runs of consecutive ids are deleted as ranges, the rest by list: either way exactly the ids
    given go, and the store's count and bytes follow."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteOutboxStore(Path(tmp) / "outbox.db", synchronous="OFF")
        store.open()
        rows = [("c", "t", "k", b'{"i":%d}' % i, False, 50 + i) for i in range(1, 301)]
        store.append(rows, [], 1 << 30, None)
        store.delete(ids)
        db = store._db
        assert db is not None
        left = {r[0] for r in db.execute("SELECT id FROM outbox")}
        assert left == set(range(1, 301)) - set(ids)
        assert (store._count, store._bytes) == store.stats() == (len(left), sum(50 + i for i in left))
        store.close()
