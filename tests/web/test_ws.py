"""The console's WebSocket: handshake security, stats every second, node event taps, bounded buffers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from gateway.runtime import Gateway
from gateway.web.ws import _Client
from tests._util import wait_for

from .conftest import Browserish, base_url, web_of


def ws_url(c: Browserish, csrf: str | None = None) -> str:
    return c.base.replace("http://", "ws://") + "/ws" + (f"?csrf={csrf}" if csrf else "")


async def receive(
    ws: aiohttp.ClientWebSocketResponse,
    kind: str,
    limit: float = 10.0,
    pred: Callable[[dict[str, Any]], bool] = lambda m: True,
) -> dict[str, Any]:
    async def loop() -> dict[str, Any]:
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            data = json.loads(msg.data)
            if data["type"] == kind and pred(data):
                return data

    return await asyncio.wait_for(loop(), limit)


async def test_handshake_needs_login_origin_and_csrf(gw: Gateway, admin: Browserish, client_factory: Callable) -> None:
    anon = client_factory()
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await anon.http.ws_connect(ws_url(anon), origin=anon.base)
    assert e.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await admin.http.ws_connect(ws_url(admin, admin.csrf), origin="http://evil.example")
    assert e.value.status == 403  # cross-site WebSocket hijacking
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await admin.http.ws_connect(ws_url(admin), origin=admin.base)
    assert e.value.status == 403  # no CSRF token
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await admin.http.ws_connect(ws_url(admin, "forged"), origin=admin.base)
    assert e.value.status == 403
    ws = await admin.http.ws_connect(ws_url(admin, admin.csrf), origin=admin.base)
    try:
        assert (await receive(ws, "hello"))["interval"] == 1.0
    finally:
        await ws.close()


async def test_script_with_token_needs_no_origin(gw: Gateway, admin: Browserish) -> None:
    status, tok = await admin.post("/api/tokens", {"name": "watcher", "role": "viewer"})
    assert status == 201
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(
            base_url(gw).replace("http", "ws") + "/ws", headers={"Authorization": f"Bearer {tok['token']}"}
        )
        try:
            await receive(ws, "hello")
        finally:
            await ws.close()


async def test_stats_every_interval_with_live_counters(gw: Gateway, admin: Browserish) -> None:
    ws = await admin.http.ws_connect(ws_url(admin, admin.csrf), origin=admin.base)
    try:
        await ws.send_json({"op": "subscribe", "topic": "stats"})
        await receive(ws, "ok")
        first = await receive(ws, "stats")
        second = await receive(ws, "stats")
        assert first["gateway"]["gateway_id"] == "web-test"
        assert {"cpu_percent", "memory", "disk", "process"} <= set(first["system"])
        p1 = first["pipelines"][0]
        p2 = second["pipelines"][0]
        assert p1["name"] == "plant" and p2["events_in"] > p1["events_in"]  # counters are live
        nodes = {n["id"]: n for n in second["detail"][0]["nodes"]}
        assert nodes["sensors"]["queue"]["capacity"] > 0
        assert second["ws"]["clients"] == 1
        await ws.send_json({"op": "subscribe", "topic": "bogus"})
        assert "unknown" in (await receive(ws, "error"))["message"]
        await ws.send_str("not json")
        assert "expected" in (await receive(ws, "error"))["message"]
    finally:
        await ws.close()


async def test_event_taps_on_source_and_operator_and_their_removal(gw: Gateway, admin: Browserish) -> None:
    p = gw.pipelines["plant"]
    hot = p.nodes[p.index["hot"]]
    ws = await admin.http.ws_connect(ws_url(admin, admin.csrf), origin=admin.base)
    try:
        await ws.send_json({"op": "subscribe", "topic": "events", "pipeline": "plant", "node": "nope"})
        assert "no node" in (await receive(ws, "error"))["message"]
        await ws.send_json({"op": "subscribe", "topic": "events", "pipeline": "plant", "node": "hot"})
        await receive(ws, "ok")
        assert "process_batch" in hot.__dict__  # tapped while someone listens
        m = await receive(ws, "events", pred=lambda m: m["node"] == "hot")
        assert m["events"] and all(e["key"] == "boiler/temp" for e in m["events"])
        await ws.send_json({"op": "subscribe", "topic": "events", "pipeline": "plant", "node": "sensors"})
        m = await receive(ws, "events", pred=lambda m: m["node"] == "sensors")
        assert {e["key"] for e in m["events"]} <= {"boiler/temp", "pump/vibration"}
        await ws.send_json({"op": "unsubscribe", "topic": "events", "pipeline": "plant", "node": "hot"})
        await wait_for(lambda: "process_batch" not in hot.__dict__, timeout=5)
    finally:
        await ws.close()
    await wait_for(lambda: "_process" not in p.__dict__, timeout=5, message="source tap removed on close")
    hub = web_of(gw).hub
    await wait_for(lambda: not hub.clients and not hub._taps, timeout=5)


class _StalledSocket:
    """A browser that never reads: every send waits forever."""

    async def send_str(self, text: str) -> None:
        await asyncio.Event().wait()


async def test_stalled_client_drops_are_counted_and_others_keep_receiving(gw: Gateway, admin: Browserish) -> None:
    hub = web_of(gw).hub
    hub.interval = 0.02
    stalled = _Client(_StalledSocket(), 999, "stalled", size=4)  # type: ignore[arg-type]
    stalled.stats = True
    hub.clients.add(stalled)
    sender = asyncio.create_task(stalled.send_loop())
    ws = await admin.http.ws_connect(ws_url(admin, admin.csrf), origin=admin.base)
    try:
        await ws.send_json({"op": "subscribe", "topic": "stats"})
        await wait_for(lambda: stalled.dropped >= 10, timeout=10)
        assert len(stalled.buf) <= 4  # bounded, whatever the client does
        m = await receive(ws, "stats", pred=lambda m: m["ws"]["dropped"] >= 10)
        assert m["ws"]["dropped"] >= stalled.dropped - 5
        assert hub.dropped >= 10
    finally:
        hub.clients.discard(stalled)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        await ws.close()
