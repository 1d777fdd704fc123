"""History: downsampled per-key tiers in state.db, the history sink, and GET /api/history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.history import History
from gateway.store import StateStore
from tests._util import wait_for
from tests.gateway._harness import NO_AUTH, get, running_gateway
from tests.nodes.test_windows_restart import config, node, test_nodes  # noqa: F401  # registers t_replay


async def test_tiers_merge_deltas_and_pick_a_resolution(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db", commit_interval=0.01)
    await store.start()
    try:
        h = History(store, tiers=((1.0, 100.0), (10.0, 10_000.0)))
        for t, v in ((1000.2, 1.0), (1000.7, 3.0), (1001.5, 5.0), (1012.0, 7.0)):
            h.add("a", t, v)
        h.flush()
        h.add("a", 1000.9, 2.0)  # a later delta for a bucket already written
        h.add("b", 1000.0, 9.0)
        h.flush()
        await store.flush()
        got = h.query("a", 1000.0, 1020.0)
        assert got["tier"] == 1.0
        assert got["points"] == [
            [1000.0, 2.0, 1.0, 3.0, 3.0, 2.0],
            [1001.0, 5.0, 5.0, 5.0, 1.0, 5.0],
            [1012.0, 7.0, 7.0, 7.0, 1.0, 7.0],
        ]
        coarse = h.query("a", 1000.0, 1020.0, max_points=5)
        assert coarse["tier"] == 10.0
        assert coarse["points"] == [[1000.0, 11.0 / 4, 1.0, 5.0, 4.0, 5.0], [1010.0, 7.0, 7.0, 7.0, 1.0, 7.0]]
        # retention follows event time: the fine tier keeps 100 s behind the newest reading
        h.add("a", 1200.0, 0.0)
        h._last_prune = -1e9
        h.flush()
        await store.flush()
        assert h.query("a", 1100.0, 1300.0)["points"] == [[1200.0, 0.0, 0.0, 0.0, 1.0, 0.0]]
        db = store.reader()
        try:
            assert db.execute("SELECT COUNT(*) FROM history WHERE tier = 0 AND bucket < 1100").fetchone()[0] == 0
            assert db.execute("SELECT COUNT(*) FROM history WHERE tier = 1").fetchone()[0] == 4
        finally:
            db.close()
    finally:
        await store.close()


async def test_history_sink_and_api_across_a_restart(tmp_path: Path) -> None:
    events = [["boiler/temp", 1000.0 + i * 0.25, float(i % 4)] for i in range(40)]  # 10 s, 4 per second
    text = config(tmp_path, events, "type: window, kind: tumbling, size: 5s, aggregate: mean", None)
    text = text.replace(
        "      - {id: out, type: t_keep, input: win}\n",
        "      - {id: out, type: t_keep, input: win}\n      - {id: hist, type: history, input: src}\n",
    )
    text = text.replace("console: {enabled: false}", f"console: {{host: 127.0.0.1, port: 0{NO_AUTH}}}")
    async with running_gateway(text) as gw:
        await wait_for(lambda: node(gw, "hist").n_in == 40, timeout=10)
    more = text.replace(json.dumps(events), json.dumps([*events, ["boiler/temp", 1000.5, 10.0]]))
    async with running_gateway(more) as gw:
        # the replay resumes at 40; n_out (not n_in) says the sink's write, in its own task, is done
        await wait_for(lambda: node(gw, "hist").n_out == 1, timeout=10)
        gw.history.flush()
        await gw.store.flush()
        status, body = await get(gw, "/api/history?key=boiler/temp&from=1000&to=1010")
        assert status == 200, body
        assert body["tier"] == 1.0 and body["columns"] == ["t", "mean", "min", "max", "count", "last"]
        assert [p[0] for p in body["points"]] == [1000.0 + i for i in range(10)]
        first = body["points"][0]  # 0, 1, 2, 3 before the restart, 10 after it
        assert first[4] == 5.0 and first[1] == pytest.approx(16.0 / 5) and first[3] == 10.0
        status, body = await get(gw, "/api/history?key=boiler/temp&from=1010&to=1000")
        assert status == 400
        status, body = await get(gw, "/api/history")
        assert status == 400 and "key" in body["error"]


async def test_history_counts_what_a_full_store_cannot_take(tmp_path: Path) -> None:
    from gateway.store import StoreError

    store = StateStore(tmp_path / "state.db", commit_interval=0.01, quota_bytes=64 * 1024)
    await store.start()
    try:
        store.write([("p", "n", "big", bytes(256 * 1024))])
        with pytest.raises(StoreError):
            await store.flush()
        h = History(store)
        h.add("a", 1000.0, 1.0)
        h.add("b", 1000.0, 1.0)
        h.flush()
        assert h.dropped == 6  # two keys x three tiers, counted, not silently lost
        assert h.health()["pending"] == 0
    finally:
        await store.close()
