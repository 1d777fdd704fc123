"""The outbox deletes acknowledged rows with a few statement shapes, not one per count of ids:
each shape is compiled and kept in the connection's statement cache (128 of them), and one per
count held megabytes of one-off ``IN (?, ?, …)`` statements on a long-running gateway."""

from __future__ import annotations

import re
from pathlib import Path

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
