"""The ``websocket`` source against a real aiohttp WebSocket server: messages, bad input, reconnects."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests._util import free_port, wait_for
from tests.gateway._harness import node, running_gateway


class Peer:
    """A WebSocket server whose connected clients the test can talk to, stop and restart."""

    def __init__(self, port: int):
        self.port = port
        self.clients: list[web.WebSocketResponse] = []
        self.received: list[Any] = []
        self.connects = 0
        self.headers: list[str | None] = []
        self.runner: web.AppRunner | None = None

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connects += 1
        self.headers.append(request.headers.get("Authorization"))
        self.clients.append(ws)
        async for msg in ws:
            self.received.append(msg.data)
        self.clients.remove(ws)
        return ws

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/feed", self.handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        for ws in list(self.clients):
            await ws.close()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def send(self, data: str | bytes) -> None:
        await wait_for(lambda: self.clients)
        for ws in self.clients:
            if isinstance(data, bytes):
                await ws.send_bytes(data)
            else:
                await ws.send_str(data)


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    p = Peer(free_port())
    await p.start()
    yield p
    await p.stop()


def config(tmp_path: Path, port: int, extra: str = "") -> str:
    return f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data"}}
pipelines:
  - name: p
    nodes:
      - {{id: ws, type: websocket, url: "ws://127.0.0.1:{port}/feed", reconnect_max: 0.3s{extra}}}
      - {{id: plausible, type: filter, input: ws, where: "value > -100.0"}}
      - {{id: out, type: log, input: plausible, level: debug}}
console: {{port: 0, auth: false}}
"""


async def test_messages_become_readings(tmp_path: Path, peer: Peer) -> None:
    extra = ', headers: {Authorization: "Bearer t0k"}, subscribe: {op: subscribe, topic: sensors}'
    async with running_gateway(config(tmp_path, peer.port, extra)) as gw:
        src = node(gw, "p", "ws")
        await wait_for(lambda: peer.received)
        assert json.loads(peer.received[0]) == {"op": "subscribe", "topic": "sensors"}
        assert peer.headers == ["Bearer t0k"]
        await peer.send(json.dumps({"temp": 21.5, "ts": 1700000000}))
        await peer.send(b'{"a": 1}\n{"b": 2}')  # NDJSON in a binary frame
        await peer.send(json.dumps([{"c": 3}, {"d": 4, "label": "x"}]))  # an array of objects
        await wait_for(lambda: node(gw, "p", "plausible").n_out == 5)
        assert src.health()["state"] == "up" and src.health()["messages"] == 3


async def test_bad_messages_are_dead_lettered(tmp_path: Path, peer: Peer) -> None:
    async with running_gateway(config(tmp_path, peer.port)) as gw:
        src = node(gw, "p", "ws")
        await peer.send("not json")
        await peer.send('{"v": NaN}')
        await peer.send('{"name": "no numbers"}')
        await peer.send('{"v": 7}')
        await wait_for(lambda: src.n_out == 1 and src.counters()["malformed"] == 3)
        c = src.counters()
        assert (c["malformed_garbage"], c["malformed_nonfinite"], c["malformed_malformed"]) == (1, 1, 1)
        assert gw.dead_letters.counts[("p", "ws")] == 3
        assert any("ws://127.0.0.1" in r["reason"] and "not JSON" in r["reason"] for r in gw.dead_letters.recent)


async def test_reconnects_after_close_and_outage(tmp_path: Path, peer: Peer) -> None:
    async with running_gateway(config(tmp_path, peer.port)) as gw:
        src = node(gw, "p", "ws")
        await wait_for(lambda: peer.clients)
        for ws in list(peer.clients):
            await ws.close()  # the server hangs up: reconnect
        await wait_for(lambda: peer.connects == 2 and peer.clients)
        assert src.health()["losses"] == 1

        await peer.stop()  # the server is gone: down, with the reason
        await wait_for(lambda: "cannot connect" in (src.health().get("reason") or ""))
        assert src.health()["state"] == "down"
        await peer.start()
        await wait_for(lambda: src.health()["state"] == "up", timeout=10)
        await peer.send('{"v": 1}')
        await wait_for(lambda: src.n_out == 1)


def test_url_must_be_websocket(tmp_path: Path) -> None:
    from gateway.config import parse_config
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config(config(tmp_path, 1).replace("ws://", "http://"), "t.yaml", {})
    assert "url" in "\n".join(str(i) for i in err.value.issues)
