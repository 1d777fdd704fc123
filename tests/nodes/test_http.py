"""The ``http`` push source on a real console port, and ``http_poll`` against a real aiohttp server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import aiohttp
import pytest
from aiohttp import web

from gateway.events import Event
from gateway.node import NodeOptions, Sink, register
from gateway.runtime import Gateway
from tests._util import free_port, wait_for
from tests.gateway._harness import node, running_gateway

TOKEN = "s3cret-ingest-token-0123"


class GatedOptions(NodeOptions):
    type: Literal["t_gated_http"]


@register
class Gated(Sink):
    """A sink that writes only while the test lets it: a slow device downstream."""

    Options = GatedOptions
    gate: ClassVar[asyncio.Event | None] = None
    written: ClassVar[list[Event]] = []

    async def write(self, batch: list[Event]) -> None:
        assert Gated.gate is not None
        await Gated.gate.wait()
        Gated.written.extend(batch)


def push_config(tmp_path: Path, extra: str = "", sink: str = "{id: out, type: log, input: push, level: debug}") -> str:
    return f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data", queue_size: 10, sink_queue_size: 10}}
pipelines:
  - name: p
    nodes:
      - {{id: push, type: http, token: "${{INGEST_TOKEN}}"{extra}}}
      - {sink}
console: {{port: 0, auth: true}}
"""


async def post(gw: Gateway, path: str, body: bytes, token: str | None = TOKEN, **headers: str) -> tuple[int, Any, Any]:
    assert gw.console is not None
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    url = f"http://127.0.0.1:{gw.console.port}{path}"
    async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers


ENV = {"INGEST_TOKEN": TOKEN}


async def test_push_json_array_and_ndjson(tmp_path: Path) -> None:
    # the console's own login is on (auth: true): the ingest route is guarded by the source's token only
    async with running_gateway(push_config(tmp_path), ENV) as gw:
        src = node(gw, "p", "push")
        await wait_for(lambda: "push" in gw.links.ingest)
        status, body, _ = await post(gw, "/ingest/push", b'{\n  "temp": 21.5,\n  "ts": 1700000000\n}')
        assert (status, body) == (202, {"accepted": 1, "rejected": 0})
        status, body, _ = await post(gw, "/ingest/push", json.dumps([{"a": 1}, {"b": 2, "label": "x"}]).encode())
        assert (status, body) == (202, {"accepted": 2, "rejected": 0})
        status, body, _ = await post(
            gw, "/ingest/push", b'{"c": 3}\n{"d": 4}\n', **{"Content-Type": "application/x-ndjson"}
        )
        assert (status, body) == (202, {"accepted": 2, "rejected": 0})
        await wait_for(lambda: node(gw, "p", "out").n_in == 5)
        assert src.counters()["http_202"] == 3 and src.health()["state"] == "up"
        # no such source: the answer a source gives a wrong token, so nobody can probe for names
        status, body, _ = await post(gw, "/ingest/nosuch", b'{"a": 1}')
        assert status == 401 and "nosuch" not in body["error"]
        status, _, _ = await post(gw, "/ingest/nosuch", b'{"a": 1}', token=None)
        assert status == 401


async def test_bad_token_is_401(tmp_path: Path) -> None:
    async with running_gateway(push_config(tmp_path), ENV) as gw:
        src = node(gw, "p", "push")
        await wait_for(lambda: "push" in gw.links.ingest)
        for token in (None, "wrong-token-wrong-token", TOKEN + "x"):
            status, body, headers = await post(gw, "/ingest/push", b'{"a": 1}', token=token)
            assert status == 401 and "Bearer" in body["error"] and "WWW-Authenticate" in headers
        status, _, _ = await post(gw, "/ingest/push", b'{"a": 1}', token=None, Authorization=f"Basic {TOKEN}")
        assert status == 401
        assert src.n_in == 0 and src.counters()["http_401"] == 4


async def test_malformed_body_is_400_and_dead_lettered(tmp_path: Path) -> None:
    async with running_gateway(push_config(tmp_path), ENV) as gw:
        src = node(gw, "p", "push")
        await wait_for(lambda: "push" in gw.links.ingest)
        status, body, _ = await post(gw, "/ingest/push", b"not json at all")
        assert status == 400 and "not JSON" in body["error"]
        status, body, _ = await post(gw, "/ingest/push", b"")
        assert status == 400 and "empty body" in body["error"]
        status, body, _ = await post(gw, "/ingest/push", b'{"name": "no numbers"}')
        assert status == 400 and "no numeric field" in body["error"]
        # a body with good and bad lines: the good ones are taken, the bad listed and dead-lettered
        status, body, _ = await post(gw, "/ingest/push", b'{"a": 1}\n{broken\n{"b": NaN}\n')
        assert status == 202 and body["accepted"] == 1 and body["rejected"] == 2 and len(body["errors"]) == 2
        await wait_for(lambda: gw.dead_letters.counts.get(("p", "push")) == 5)
        c = src.counters()
        assert c["malformed"] == 5 and c["malformed_garbage"] == 2 and c["malformed_nonfinite"] == 1
        assert any("POST /ingest/push" in r["reason"] and "not JSON" in r["reason"] for r in gw.dead_letters.recent)
        await wait_for(lambda: node(gw, "p", "out").n_in == 1)


async def test_body_over_the_limit_is_413(tmp_path: Path) -> None:
    async with running_gateway(push_config(tmp_path, ", max_body: 100"), ENV) as gw:
        await wait_for(lambda: "push" in gw.links.ingest)
        big = json.dumps([{"v": i} for i in range(50)]).encode()
        status, body, _ = await post(gw, "/ingest/push", big)
        assert status == 413 and "100" in body["error"]

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
            for _ in range(10):
                yield b'{"v": 1}\n{"w": 2}\n'

        assert gw.console is not None
        url = f"http://127.0.0.1:{gw.console.port}/ingest/push"
        async with (
            aiohttp.ClientSession() as s,
            s.post(url, data=chunked(), headers={"Authorization": f"Bearer {TOKEN}"}) as resp,
        ):
            assert resp.status == 413
        assert node(gw, "p", "push").n_in == 0


async def test_full_pipeline_is_429_with_retry_after(tmp_path: Path) -> None:
    Gated.gate = asyncio.Event()
    Gated.written = []
    text = push_config(tmp_path, ", retry_after: 2s", "{id: out, type: t_gated_http, input: push}")
    accepted = 0
    async with running_gateway(text.replace("id: gw1,", "id: gw1, shutdown_timeout: 5s,"), ENV) as gw:
        src = node(gw, "p", "push")
        await wait_for(lambda: "push" in gw.links.ingest)
        status = 202
        sent = 0
        while status == 202:  # the sink holds its first batch: its queue, then the input queue fill
            sent += 1
            assert sent < 100, "the pipeline never pushed back"
            status, body, headers = await post(gw, "/ingest/push", json.dumps([{"v": sent}, {"w": sent}]).encode())
            if status == 202:
                accepted += body["accepted"]
        assert status == 429 and headers["Retry-After"] == "2" and body["retry_after"] == 2
        assert src.health()["paused"] is True
        assert gw.pipelines["p"].queue.full
        Gated.gate.set()  # the device answers again: everything accepted arrives, and pushing works again
        await wait_for(lambda: len(Gated.written) == accepted)
        status, body, _ = await post(gw, "/ingest/push", b'{"z": 1}')
        assert status == 202
        await wait_for(lambda: len(Gated.written) == accepted + 1)
    assert src.counters()["http_429"] == 1


def test_push_needs_a_strong_token_and_the_console(tmp_path: Path) -> None:
    from gateway.config import parse_config
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config(push_config(tmp_path), "t.yaml", {"INGEST_TOKEN": "short"})
    assert "token" in "\n".join(str(i) for i in err.value.issues)
    with pytest.raises(ConfigError) as err:
        parse_config(push_config(tmp_path).replace("auth: true", "enabled: false"), "t.yaml", ENV)
    assert "console.enabled is false" in "\n".join(str(i) for i in err.value.issues)
    pipe = push_config(tmp_path).split("pipelines:\n", 1)[1].split("console:")[0]
    two = push_config(tmp_path).replace("console:", pipe.replace("name: p", "name: q") + "console:")
    with pytest.raises(ConfigError) as err:
        parse_config(two, "t.yaml", ENV)
    assert "/ingest/push is one URL" in "\n".join(str(i) for i in err.value.issues)


# --- http_poll -------------------------------------------------------------------------------


class Remote:
    """An HTTP server the poll source reads; the test sets what it answers, stops and restarts it."""

    def __init__(self, port: int):
        self.port = port
        self.body = b'{"temp": 20.5}'
        self.etag: str | None = None
        self.status = 200
        self.requests: list[dict[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.waiting: asyncio.Event | None = None  # long-poll: hold requests until set

    async def handler(self, request: web.Request) -> web.Response:
        self.requests.append(dict(request.headers))
        if self.waiting is not None:
            await self.waiting.wait()
            self.waiting = asyncio.Event()
        if self.etag and request.headers.get("If-None-Match") == self.etag:
            return web.Response(status=304)
        headers = {"ETag": self.etag} if self.etag else None
        return web.Response(body=self.body, status=self.status, headers=headers, content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/data", self.handler)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def remote() -> AsyncIterator[Remote]:
    r = Remote(free_port())
    await r.start()
    yield r
    if r.waiting is not None:
        r.waiting.set()
    await r.stop()


def poll_config(tmp_path: Path, port: int, extra: str = "", interval: str = "50ms") -> str:
    return f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data"}}
pipelines:
  - name: p
    nodes:
      - {{id: poll, type: http_poll, url: "http://127.0.0.1:{port}/data",
          interval: {interval}, reconnect_max: 0.3s{extra}}}
      - {{id: out, type: log, input: poll, level: debug}}
console: {{enabled: false}}
"""


async def test_poll_reads_json_with_headers_and_etag(tmp_path: Path, remote: Remote) -> None:
    remote.etag = '"v1"'
    async with running_gateway(poll_config(tmp_path, remote.port, ', headers: {X-Key: "k1"}')) as gw:
        src = node(gw, "p", "poll")
        await wait_for(lambda: len(remote.requests) >= 3)
        assert src.n_in == 1  # the first answer; later ones are 304 Not Modified
        assert remote.requests[0]["X-Key"] == "k1" and "If-None-Match" not in remote.requests[0]
        assert remote.requests[1]["If-None-Match"] == '"v1"'
        remote.body, remote.etag = b'[{"temp": 21.0}, {"hum": 40}]', '"v2"'
        await wait_for(lambda: src.n_in == 3)
        await wait_for(lambda: node(gw, "p", "out").n_in == 3)
        assert src.health()["state"] == "up"


async def test_poll_interval_follows_the_nodes_monotonic_clock(tmp_path: Path, remote: Remote) -> None:
    """The poll interval is timed by ``ctx.monotonic``: an hour on the node's clock is the next
    request, though only a moment passed on the wall."""
    from gateway.config import parse_config
    from gateway.deadletter import DeadLetters
    from gateway.engine import Pipeline
    from gateway.node import NodeContext

    now = [500.0]
    dl = DeadLetters(None)

    def ctx(node_id: str) -> NodeContext:
        return NodeContext("gw1", "p", node_id, str(tmp_path), None, dl, monotonic=lambda: now[0])

    p = Pipeline("p", parse_config(poll_config(tmp_path, remote.port, interval="1h")).nodes["p"], ctx)
    task = asyncio.create_task(p.run())
    try:
        await wait_for(lambda: len(remote.requests) == 1 and p.nodes[p.index["out"]].n_in == 1, timeout=15)
        now[0] += 3600.0  # an hour on the node's clock, a moment on the wall
        await wait_for(lambda: len(remote.requests) == 2, timeout=15)
        now[0] += 3600.0
        # the third answer through to the sink too, before the pipeline stops
        await wait_for(lambda: len(remote.requests) == 3 and p.nodes[p.index["out"]].n_in == 3, timeout=15)
    finally:
        p.stop()
        await asyncio.wait_for(task, 15)
    assert p.nodes[p.index["out"]].n_in == 3


async def test_poll_dead_letters_bad_answers(tmp_path: Path, remote: Remote) -> None:
    remote.body = b"<html>oops</html>"
    async with running_gateway(poll_config(tmp_path, remote.port)) as gw:
        src = node(gw, "p", "poll")
        await wait_for(lambda: src.counters()["malformed"] >= 1)
        assert any("/data" in r["reason"] and "not JSON" in r["reason"] for r in gw.dead_letters.recent)
        assert src.health()["state"] == "up"  # the server answers; its data is what is wrong
        remote.body = b'{"v": 1}'
        await wait_for(lambda: src.n_in >= 1)


async def test_poll_answer_over_max_body_is_dead_lettered(tmp_path: Path, remote: Remote) -> None:
    remote.body = json.dumps([{"v": i} for i in range(100)]).encode()
    async with running_gateway(poll_config(tmp_path, remote.port, ", max_body: 200")) as gw:
        src = node(gw, "p", "poll")
        await wait_for(lambda: src.counters().get("malformed_overlong", 0) >= 1)
        assert any("over 200 bytes" in r["reason"] for r in gw.dead_letters.recent)
        assert src.n_in == 0 and src.health()["state"] == "up"


async def test_poll_server_down_then_back(tmp_path: Path, remote: Remote) -> None:
    async with running_gateway(poll_config(tmp_path, remote.port)) as gw:
        src = node(gw, "p", "poll")
        await wait_for(lambda: src.n_in >= 1 and src.health()["state"] == "up")
        remote.status = 503
        await wait_for(lambda: "HTTP 503" in (src.health().get("reason") or ""))
        await remote.stop()
        await wait_for(lambda: "cannot fetch" in (src.health().get("reason") or ""))
        assert src.health()["state"] == "down" and src.health()["losses"] == 1
        assert any("poll" in p and "down" in p for p in gw.health()["problems"])
        remote.status = 200
        remote.body = b'{"back": 1}'
        await remote.start()
        await wait_for(lambda: src.health()["state"] == "up", timeout=10)
        await wait_for(lambda: node(gw, "p", "out").n_in >= 2)


async def test_long_poll_asks_again_at_once(tmp_path: Path, remote: Remote) -> None:
    remote.waiting = asyncio.Event()
    extra = ", mode: long_poll, timeout: 10s"
    async with running_gateway(poll_config(tmp_path, remote.port, extra, interval="1h")) as gw:
        src = node(gw, "p", "poll")
        for i in range(3):  # interval is an hour: only long-polling explains each new request
            await wait_for(lambda i=i: len(remote.requests) == i + 1)
            remote.body = json.dumps({"n": i}).encode()
            assert remote.waiting is not None
            remote.waiting.set()
            await wait_for(lambda i=i: src.n_in == i + 1)


def test_a_body_nested_too_deeply_is_a_bad_line_not_an_exception() -> None:
    from firmware_bridges import JsonCodec
    from nodes.http import _BodyDecoder

    dec = _BodyDecoder(JsonCodec(type="json", max_line=1_000_000))
    readings, errors = dec.decode(b"[" * 100_000 + b"]" * 100_000)
    assert readings == [] and [e.kind for e in errors] == ["malformed"]
    readings, errors = dec.decode(b'[{"t": 1.5}, {"t": 2.5}]')
    assert [tuple(r) for r in readings] == [("t", 1.5, None), ("t", 2.5, None)] and errors == []


def test_a_body_with_an_integer_python_refuses_is_a_bad_line_not_an_exception() -> None:
    """Over 4,300 digits, json.loads raises a plain ValueError; the push endpoint answered 500 for it."""
    from firmware_bridges import JsonCodec
    from nodes.http import _BodyDecoder

    dec = _BodyDecoder(JsonCodec(type="json", max_line=1_000_000))
    readings, errors = dec.decode(b'[{"a": 1}, {"b": ' + b"1" * 5000 + b"}]")
    assert readings == [] and [e.kind for e in errors] == ["malformed"]
    readings, errors = dec.decode(b'{"a": 1}\n{"b": ' + b"1" * 5000 + b"}\n")  # NDJSON: the good line stays
    assert [tuple(r) for r in readings] == [("a", 1.0, None)] and [e.kind for e in errors] == ["malformed"]
