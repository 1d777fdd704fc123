"""The outbox under a backlog: what queued while the link was down, read back in batches and sent.

The broker is held at the one seam (``FakeLink`` from test_outbox.py); the SQLite file is real.
The sizes that matter here (100k, 1M queued) are measured by scripts/bench/outbox_backlog.py;
these tests use small read batches so that a few dozen rows span many of them.
"""

from __future__ import annotations

import asyncio
import tempfile
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
def test_any_link_behaviour_delivers_everything_in_order_across_read_batches(ops: list[tuple[Any, ...]]) -> None:
    saved = gateway.outbox._READ_BATCH
    gateway.outbox._READ_BATCH = 3  # a backlog of a few rows already spans several reads
    try:
        with tempfile.TemporaryDirectory() as d:
            link, ob = asyncio.run(_play(ops, Path(d)))
    finally:
        gateway.outbox._READ_BATCH = saved
    order = _firsts(link.sent)
    assert sorted(s for seqs in order.values() for s in seqs) == list(range(1, ob.last_id + 1))
    for key, seqs in order.items():
        assert seqs == sorted(seqs), key
