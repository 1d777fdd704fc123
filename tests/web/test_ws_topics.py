"""The console WebSocket's ``alerts`` and ``llm`` topics: pushed alert steps, every token, bounded per client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.runtime import Gateway
from gateway.web.ws import _Client
from tests._fake_openai import Behaviour, FakeOpenAI
from tests._util import wait_for
from tests.gateway._harness import running_gateway

from .conftest import Browserish, base_url, web_of
from .test_ws import _StalledSocket, receive, ws_url


def _config(data_dir: Path, llm_url: str) -> str:
    return f"""
gateway: {{id: ws-topics, data_dir: "{data_dir}"}}
llm:
  providers:
    cloud: {{type: remote, url: {llm_url}}}
pipelines:
  - name: plant
    nodes:
      - id: sensors
        type: simulate
        interval: 100ms
        seed: 1
        sensors:
          - {{key: boiler/temp, base: 99, amplitude: 0.1, period: 60s, noise: 0.01}}
      - id: hot
        type: threshold
        input: sensors
        above: 95
        clear_below: 90
      - id: book
        type: alert
        input: hot
      - id: explain
        type: llm
        input: sensors
        provider: cloud
        output: stream
        coalesce_by: null
        max_queue: 4
        prompt: "why is {{{{ key }}}} at {{{{ value }}}}?"
      - id: out
        type: log
        input: explain
console: {{host: 127.0.0.1, port: 0}}
"""


@pytest.fixture
async def llm_server() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as s:
        yield s


@pytest.fixture
async def gw(tmp_path: Path, llm_server: FakeOpenAI) -> AsyncIterator[Gateway]:
    async with running_gateway(_config(tmp_path / "data", llm_server.url)) as g:
        yield g


async def _connect(admin: Browserish) -> aiohttp.ClientWebSocketResponse:
    ws = await admin.http.ws_connect(ws_url(admin, admin.csrf), origin=admin.base)
    await receive(ws, "hello")
    return ws


async def test_llm_topic_carries_every_chunk_then_the_result(gw: Gateway, admin: Browserish) -> None:
    ws = await _connect(admin)
    try:
        await ws.send_json({"op": "subscribe", "topic": "llm"})
        assert (await receive(ws, "ok"))["topic"] == "llm"
        by_request: dict[int, list[dict[str, Any]]] = {}
        done: dict[int, dict[str, Any]] = {}

        async def whole_answer() -> int:
            while True:
                m = await receive(ws, "llm")
                assert m["dropped"] == 0
                for c in m["chunks"]:
                    assert (c["pipeline"], c["node"], c["key"]) == ("plant", "explain", "boiler/temp")
                    if "done" in c:
                        done[c["request"]] = c
                    else:
                        by_request.setdefault(c["request"], []).append(c)
                for rid, c in done.items():
                    seen = by_request.get(rid, [])
                    if c["done"] == "ok" and seen and seen[0]["seq"] == 0:
                        return rid

        rid = await asyncio.wait_for(whole_answer(), 10)
        # unsampled: every chunk of the answer, in order, as the model streamed it
        assert [c["seq"] for c in by_request[rid]] == [0, 1, 2, 3, 4]
        assert "".join(c["text"] for c in by_request[rid]) == "The boiler is hot."
        assert done[rid]["tokens_per_s"] > 0 and by_request[rid][0]["provider"] == "cloud"

        st = await receive(ws, "llm_stats", pred=lambda m: any(n["ok"] for n in m["nodes"]))
        (node,) = st["nodes"]
        assert node["node"] == "explain" and node["max_depth"] == 4 and 0 <= node["depth"] <= 4
        assert set(node["shed"]) >= {"queue_full", "deadline", "coalesced", "breaker_open"}
        assert node["tokens_per_s"] > 0
        assert st["providers"][0]["name"] == "cloud" and st["dropped"] == 0

        await ws.send_json({"op": "unsubscribe", "topic": "llm"})
        await receive(ws, "ok", pred=lambda m: m["op"] == "unsubscribe")
        explain = gw.pipelines["plant"].nodes[gw.pipelines["plant"].index["explain"]]
        assert "_console_emit_hooks" not in explain.__dict__  # nobody listens: the node emits unwrapped
    finally:
        await ws.close()


async def test_stalled_llm_client_is_bounded_counts_drops_and_others_keep_up(
    gw: Gateway, admin: Browserish, llm_server: FakeOpenAI
) -> None:
    llm_server.default = Behaviour(tokens=["tok "] * 40)
    hub = web_of(gw).hub
    stalled = _Client(_StalledSocket(), 999, "stalled", size=4, llm_size=8)  # type: ignore[arg-type]
    hub.clients.add(stalled)
    hub._subscribe_llm(stalled)
    sender = asyncio.create_task(stalled.send_loop())
    ws = await _connect(admin)
    try:
        await ws.send_json({"op": "subscribe", "topic": "llm"})
        await wait_for(lambda: stalled.llm_dropped >= 20, timeout=10)
        assert stalled.llm is not None and len(stalled.llm) <= 8  # bounded, whatever the client does
        assert len(stalled.buf) <= 4
        assert hub.llm_dropped >= stalled.llm_dropped
        # the live client is not held back by the stalled one: it gets whole answers, nothing dropped
        m = await receive(ws, "llm", pred=lambda m: any(c.get("done") == "ok" for c in m["chunks"]))
        assert m["dropped"] == 0
        st = await receive(ws, "llm_stats")
        assert st["dropped"] == 0
        await ws.send_json({"op": "subscribe", "topic": "stats"})
        s = await receive(ws, "stats")
        assert s["ws"]["llm_dropped"] >= 20
        status, text = await admin.get("/metrics")
        assert status == 200
        line = next(x for x in text.splitlines() if x.startswith('sluice_console_ws_dropped_total{what="llm_chunk"}'))
        assert float(line.split()[-1]) >= 20
    finally:
        hub.clients.discard(stalled)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        await ws.close()


async def test_events_and_llm_hooks_on_one_node_come_and_go_in_any_order(gw: Gateway, admin: Browserish) -> None:
    p = gw.pipelines["plant"]
    explain = p.nodes[p.index["explain"]]
    original = explain.ctx.emit
    ws = await _connect(admin)
    try:
        await ws.send_json({"op": "subscribe", "topic": "llm"})
        await receive(ws, "ok")
        await ws.send_json({"op": "subscribe", "topic": "events", "pipeline": "plant", "node": "explain"})
        await receive(ws, "ok", pred=lambda m: m["topic"] == "events")
        await ws.send_json({"op": "unsubscribe", "topic": "llm"})
        await receive(ws, "ok", pred=lambda m: m["topic"] == "llm")
        # the events tap still sees the node's streamed chunks after the llm hook left first
        m = await receive(ws, "events", pred=lambda m: m["node"] == "explain")
        assert any(e["value"]["llm"] in ("chunk", "ok") for e in m["events"])
        await ws.send_json({"op": "unsubscribe", "topic": "events", "pipeline": "plant", "node": "explain"})
        await wait_for(lambda: explain.ctx.emit is original, timeout=5)
    finally:
        await ws.close()


async def test_alerts_topic_pushes_each_lifecycle_step(gw: Gateway, admin: Browserish) -> None:
    ws = await _connect(admin)
    try:
        await ws.send_json({"op": "subscribe", "topic": "alerts"})
        await receive(ws, "ok")
        # the detector opened the alert as the gateway started; the operator's steps come live
        book = gw.alerts.book  # type: ignore[union-attr]
        await wait_for(lambda: book.counts["opened"] >= 1, timeout=10)
        status, body = await admin.get("/api/alerts?state=open")
        alert = body["alerts"][0]
        status, body = await admin.post(f"/api/alerts/{alert['id']}/ack", {"note": "on it"})
        assert status == 200, body
        acked = await receive(ws, "alert", pred=lambda m: m["action"] == "acknowledged")
        assert acked["alert"]["id"] == alert["id"] and acked["alert"]["state"] == "acknowledged"
        assert acked["alert"]["acked_by"] == "admin" and acked["alert"]["pipeline"] == "plant"
        assert "connection" not in acked["alert"]  # the public view, as GET /api/alerts gives it
        status, body = await admin.post(f"/api/alerts/{alert['id']}/resolve", {})
        assert status == 200, body
        resolved = await receive(ws, "alert", pred=lambda m: m["action"] == "resolved")
        assert resolved["alert"]["state"] == "resolved"
        await ws.send_json({"op": "unsubscribe", "topic": "alerts"})
        await receive(ws, "ok", pred=lambda m: m["op"] == "unsubscribe")
        assert web_of(gw).hub._on_alert in gw.alerts.listeners  # type: ignore[union-attr]
    finally:
        await ws.close()


async def test_history_api_serves_the_initial_chart_series(gw: Gateway, admin: Browserish) -> None:
    # the charts page asks this for the series before it appends live points
    status, body = await admin.get("/api/history?key=boiler/temp&from=0&to=10")
    assert status == 200 and body["columns"][0] == "t" and body["points"] == []
    status, body = await admin.get("/api/history?key=")
    assert status == 400
    assert base_url(gw).startswith("http://127.0.0.1:")


async def test_llm_stream_follows_a_hot_reload(gw: Gateway, admin: Browserish, llm_server: FakeOpenAI) -> None:
    p = gw.pipelines["plant"]
    old = p.nodes[p.index["explain"]]
    ws = await _connect(admin)
    try:
        await ws.send_json({"op": "subscribe", "topic": "llm"})
        await receive(ws, "llm_stats", pred=lambda m: m["nodes"][0]["max_depth"] == 4)
        assert "_console_emit_hooks" in old.__dict__
        text = _config(gw.data_dir, llm_server.url).replace("max_queue: 4", "max_queue: 3")
        status, body = await admin.post("/api/config/save", {"text": text})
        assert status == 200 and body["reloaded"], body
        assert gw.pipelines["plant"] is not p
        assert "_console_emit_hooks" not in old.__dict__  # the replaced node is let go
        await receive(ws, "llm_stats", pred=lambda m: m["nodes"][0]["max_depth"] == 3)
        # the new node's tokens come on the same subscription
        new = gw.pipelines["plant"].nodes[gw.pipelines["plant"].index["explain"]]
        assert "_console_emit_hooks" in new.__dict__
        ok_before = new.n_ok
        m = await receive(
            ws, "llm", pred=lambda m: any(c.get("done") == "ok" for c in m["chunks"]) and new.n_ok > ok_before
        )
        assert m["dropped"] == 0
    finally:
        await ws.close()
