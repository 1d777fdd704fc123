"""Readings that no store can hold as text, through each source's real interface.

A JSON key or string holding a lone surrogate (``"t\\ud800"`` as an escape, or raw surrogate
bytes) is refused at the source as garbage, dead-lettered with the reason, and the gateway goes
on: every store (dead letters, alerts, outbox, state, history) keeps writing the next good
reading. Through real peers: the console port (aiohttp client), Mosquitto, a pty pair, a
websocket and an HTTP server the poll source reads.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from firmware_bridges.simulators import PtyDevice
from gateway.runtime import Gateway
from tests._peers import RedisServer
from tests._util import MosquittoBroker, free_port, mqtt_client, wait_for
from tests.gateway._harness import node, running_gateway

TOKEN = "s3cret-ingest-token-0123"
ENV = {"INGEST_TOKEN": TOKEN}

# Bodies whose text is not Unicode: each must be refused, none may stop the gateway.
LONE_SURROGATES = [
    b'{"t\\ud800": 1}',  # in a key, as the JSON escape
    b'{"t": 1, "unit": "\\udfff"}',  # in a label (a string value)
    b'{"t\\udc00x": 2.5, "ts": 1700000000}',  # a low surrogate alone
    b'{"t\xed\xa0\x80": 1}',  # raw surrogate bytes (json.loads on bytes lets them through)
    b'{"t\\ud83d": 1}\n',  # half of an emoji's pair
]


def stores(tmp_path: Path, port: int, source: str, out_key: str = "push") -> str:
    """A pipeline that reaches every store: window (state), history, alert + mqtt_out (outbox)."""
    return f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data", state: {{checkpoint_interval: 0.2s, commit_interval: 0.05s}}}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {port}, reconnect_max: 1s}}
pipelines:
  - name: p
    nodes:
      - {source}
      - {{id: win, type: window, input: {out_key}, kind: count, count: 2, aggregate: mean}}
      - {{id: hot, type: threshold, input: {out_key}, above: 0, clear_below: -1}}
      - {{id: book, type: alert, input: hot, connection: plant}}
      - {{id: hist, type: history, input: {out_key}}}
      - {{id: out, type: mqtt_out, input: [{out_key}, win], connection: plant, topic: "out/{{key}}"}}
console: {{port: 0, auth: false}}
"""


async def post(gw: Gateway, body: bytes) -> tuple[int, Any]:
    assert gw.console is not None
    url = f"http://127.0.0.1:{gw.console.port}/ingest/push"
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, data=body, headers={"Authorization": f"Bearer {TOKEN}"}) as resp,
    ):
        return resp.status, await resp.json()


def dead_letter_rows(gw: Gateway) -> list[dict[str, Any]]:
    return gw.dead_letters.read(1000)


async def still_writing_every_store(gw: Gateway, sub: Any, deliver: Any, key: str, unsendable: int = 0) -> None:
    """The gateway runs and a good reading reaches the state, history, alert and outbox stores."""
    assert gw.state == "running"
    before = len(sub.payloads(f"out/{key}"))
    await deliver()
    await wait_for(lambda: len(sub.payloads(f"out/{key}")) > before, timeout=15)
    await wait_for(lambda: gw.store.rows_written > 0 and gw.store.state == "ok", timeout=10)
    db = sqlite3.connect(gw.store.path)

    def in_history() -> bool:
        gw.history.flush()  # what the history sink holds (it flushes on its next write otherwise)
        return db.execute("SELECT COUNT(*) FROM history WHERE key=?", (key,)).fetchone()[0] > 0

    try:
        await wait_for(in_history, timeout=10)  # committed by the store's writer thread
    finally:
        db.close()

    def alerted() -> bool:
        adb = sqlite3.connect(f"file:{gw.alerts.book.path}?mode=ro", uri=True)
        try:
            return adb.execute("SELECT COUNT(*) FROM alerts WHERE key=?", (key,)).fetchone()[0] > 0
        finally:
            adb.close()

    await wait_for(alerted, timeout=10)
    assert gw.dead_letters.lost == 0 and gw.outbox.rejected == unsendable and gw.store.rejected_rows == 0


async def test_http_push_refuses_lone_surrogates_and_the_gateway_goes_on(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    source = f'{{id: push, type: http, token: "{TOKEN}"}}'
    with mqtt_client(mosquitto, subscribe=["out/#"]) as sub:
        async with running_gateway(stores(tmp_path, mosquitto.port, source), ENV) as gw:
            src = node(gw, "p", "push")
            await wait_for(lambda: "push" in gw.links.ingest)
            for body in LONE_SURROGATES:
                status, answer = await post(gw, body)
                assert status == 400, (body, answer)
                assert "lone surrogate" in answer["error"] and "not Unicode text" in answer["error"]
            # a body with one good and one bad object: the good one is taken, the bad dead-lettered
            status, answer = await post(gw, b'[{"good": 1}, {"b\\ud800d": 2}]')
            assert status == 202 and answer["accepted"] == 1 and answer["rejected"] == 1
            n = len(LONE_SURROGATES) + 1
            await wait_for(lambda: len(dead_letter_rows(gw)) == n, timeout=10)
            assert src.counters()["malformed_garbage"] == n
            reasons = [r["reason"] for r in dead_letter_rows(gw)]
            assert all("lone surrogate \\u" in r for r in reasons), reasons

            async def deliver() -> None:
                assert (await post(gw, b'{"ok": 5}'))[0] == 202

            await still_writing_every_store(gw, sub, deliver, "ok")


async def test_mqtt_refuses_lone_surrogates_and_nonfinite(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    source = '{id: push, type: mqtt, connection: plant, topic: "in/#", key: "payload.k", value_field: v}'
    bodies = [
        b'{"k": "t\\ud800", "v": 1}',  # the key expression reads a lone surrogate
        b'{"k": "a", "v": {"x\\udc00": 1}}',  # a field name of an object reading
        b'{"k": "a\xed\xb0\x80", "v": 1}',  # raw surrogate bytes
        b'{"k": "a", "v": NaN}',
        b'{"k": "a", "v": {"x": -Infinity}}',
    ]
    with mqtt_client(mosquitto, subscribe=["out/#"]) as sub, mqtt_client(mosquitto) as pub:
        async with running_gateway(stores(tmp_path, mosquitto.port, source)) as gw:
            src = node(gw, "p", "push")

            def subscribed() -> bool:
                pub.publish("in/probe", b'{"k": "probe", "v": 1}', qos=0)
                return src.n_in > 0

            await wait_for(subscribed, timeout=15, interval=0.1)
            for body in bodies:
                pub.publish("in/x", body, qos=1)
            await wait_for(lambda: src.counters()["malformed"] == len(bodies), timeout=10)
            await wait_for(lambda: len(dead_letter_rows(gw)) == len(bodies), timeout=10)
            reasons = [r["reason"] for r in dead_letter_rows(gw)]
            assert sum("lone surrogate" in r for r in reasons) == 3, reasons
            assert sum("not finite" in r for r in reasons) == 2, reasons

            async def deliver() -> None:
                pub.publish("in/x", b'{"k": "ok", "v": 5}', qos=1)

            await still_writing_every_store(gw, sub, deliver, "ok")


async def test_serial_json_lines_refuse_lone_surrogates(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    with PtyDevice() as dev, mqtt_client(mosquitto, subscribe=["out/#"]) as sub:
        source = f'{{id: push, type: serial, port: "{dev.path}", codec: json}}'
        async with running_gateway(stores(tmp_path, mosquitto.port, source)) as gw:
            src = node(gw, "p", "push")
            await wait_for(lambda: src.health()["state"] == "up", timeout=10)
            await dev.send(b"".join(b.rstrip(b"\n") + b"\n" for b in LONE_SURROGATES))
            await wait_for(lambda: src.counters()["malformed"] == len(LONE_SURROGATES), timeout=10)
            await wait_for(lambda: len(dead_letter_rows(gw)) == len(LONE_SURROGATES), timeout=10)
            assert src.counters()["malformed_garbage"] == len(LONE_SURROGATES)

            async def deliver() -> None:
                await dev.send(b'{"ok": 5}\n')

            await still_writing_every_store(gw, sub, deliver, "ok")


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[int]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_websocket_refuses_lone_surrogates(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    outgoing: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        while (msg := await outgoing.get()) is not None:
            await ws.send_bytes(msg)
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    async with serving(app) as http_port:
        source = f'{{id: push, type: websocket, url: "ws://127.0.0.1:{http_port}/ws"}}'
        with mqtt_client(mosquitto, subscribe=["out/#"]) as sub:
            async with running_gateway(stores(tmp_path, mosquitto.port, source)) as gw:
                src = node(gw, "p", "push")
                await wait_for(lambda: src.health()["state"] == "up", timeout=10)
                for body in [*LONE_SURROGATES, b'[{"a\\ud800": 1}]']:
                    outgoing.put_nowait(body)
                n = len(LONE_SURROGATES) + 1
                await wait_for(lambda: src.counters()["malformed"] == n, timeout=10)
                await wait_for(lambda: len(dead_letter_rows(gw)) == n, timeout=10)

                async def deliver() -> None:
                    outgoing.put_nowait(b'{"ok": 5}')

                await still_writing_every_store(gw, sub, deliver, "ok")
        outgoing.put_nowait(None)  # the server's handler ends, so the server stops at once


async def test_http_poll_refuses_lone_surrogates(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    answers = [*LONE_SURROGATES]

    async def handler(request: web.Request) -> web.Response:
        body = answers.pop(0) if answers else b'{"ok": 5}'
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/data", handler)
    async with serving(app) as http_port:
        source = f'{{id: push, type: http_poll, url: "http://127.0.0.1:{http_port}/data", interval: 0.1s}}'
        with mqtt_client(mosquitto, subscribe=["out/#"]) as sub:
            async with running_gateway(stores(tmp_path, mosquitto.port, source)) as gw:
                src = node(gw, "p", "push")
                await wait_for(lambda: src.counters()["malformed"] == len(LONE_SURROGATES), timeout=15)
                await wait_for(lambda: len(dead_letter_rows(gw)) >= len(LONE_SURROGATES), timeout=10)

                async def deliver() -> None:
                    pass  # the server answers good readings from now on

                await still_writing_every_store(gw, sub, deliver, "ok")


def test_reasons_name_the_escape() -> None:
    from firmware_bridges import NotText, loads_json

    for body in LONE_SURROGATES:
        try:
            loads_json(body)
        except NotText as exc:
            assert "lone surrogate \\u" in str(exc)
            str(exc).encode()  # the reason itself is text every store can hold
        else:
            raise AssertionError(f"{body!r} was taken")
    assert loads_json(b'{"e": "\\ud83d\\ude00"}') == {"e": "\U0001f600"}  # a pair is one character
    assert json.loads('"\\u00e9"') == loads_json('"\\u00e9"')


async def test_keys_no_mqtt_topic_may_hold_do_not_stall_the_outbox(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    source = f'{{id: push, type: http, token: "{TOKEN}"}}'
    with mqtt_client(mosquitto, subscribe=["out/#"]) as sub:
        async with running_gateway(stores(tmp_path, mosquitto.port, source), ENV) as gw:
            await wait_for(lambda: "push" in gw.links.ingest)
            status, answer = await post(
                gw, b'{"a#b": 1, "c+d": 2, "e\\u0000f": 3, "\\u0004W!U\\u0007": 4, "g\\ufffeh": 6}'
            )
            assert status == 202, answer  # fine keys for every store but an MQTT topic

            async def deliver() -> None:
                assert (await post(gw, b'{"ok": 5}'))[0] == 202

            # refused by the outbox (the broker would drop the connection, again after every
            # reconnect), dead-lettered with the reason; delivery goes on
            await still_writing_every_store(gw, sub, deliver, "ok", unsendable=5)
            reasons = [r["reason"] for r in dead_letter_rows(gw) if r["node"] == "plant"]
            assert len(reasons) == 5 and all("not stored in the outbox" in r for r in reasons), reasons
            assert any("wildcard" in r for r in reasons) and any("U+0000" in r for r in reasons)
            assert sum("control character or a Unicode non-character" in r for r in reasons) == 2, reasons


async def test_redis_source_refuses_what_is_not_text_and_keeps_reading(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    import redis.asyncio as aioredis

    entries: list[dict[Any, Any]] = [
        {"data": b'{"key": "t\\ud800", "value": 1}'},  # the JSON escape
        {"data": b'{"key": "a", "value": 1, "u": "\xed\xa0\x80"}'},  # raw surrogate bytes
        {b"\xff\xfe": b"1", "data": b'{"key": "a", "value": 1}'},  # a field name that is not UTF-8
        {"data": b'{"key": "ok", "value": 5}'},
    ]
    client = aioredis.from_url(redis_server.url)
    try:
        for fields in entries:
            await client.xadd("plant", fields)
    finally:
        await client.aclose()
    config = f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data"}}
pipelines:
  - name: p
    nodes:
      - {{id: src, type: redis, url: "{redis_server.url}", stream: plant, group: g1, start: earliest}}
      - {{id: out, type: log, input: src, level: debug}}
console: {{enabled: false}}
"""
    async with running_gateway(config) as gw:
        src = node(gw, "p", "src")
        await wait_for(lambda: node(gw, "p", "out").n_in == 1, timeout=15)
        await wait_for(lambda: src.health()["acked"] == len(entries), timeout=10)  # none read again
        assert src.counters()["malformed"] == 3
        await wait_for(lambda: len(dead_letter_rows(gw)) == 3, timeout=10)
        reasons = [r["reason"] for r in dead_letter_rows(gw)]
        assert sum("lone surrogate" in r for r in reasons) == 2, reasons
        assert any("not UTF-8" in r for r in reasons), reasons
        assert gw.pipelines["p"].source_state["src"] == "running"
