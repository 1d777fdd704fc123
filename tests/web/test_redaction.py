"""No secret of the config leaves the gateway: a running gateway whose webhooks, pollers and broker
connection carry credentials in URLs, headers and secret options, read through every way out a
viewer (or a stranger) has: /healthz, /metrics, /api/*, /ws, the logs page and dead letters."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway._log import RECENT, Redacting
from gateway.runtime import Gateway
from tests._util import free_port, wait_for
from tests.gateway._harness import running_gateway

from .conftest import PASSWORD, Browserish, base_url, web_of

# Every one of these is a secret in the config below; none may appear in anything read back.
SECRETS = [
    "userinfo-pass-1",
    "query-token-2",
    "header-bearer-3",
    "poll-api-key-4",
    "poll-header-5",
    "broker-pass-6",
    "ingest-token-7-long-enough",
    "refused-query-8",
]

CONFIG = """
gateway: {{id: redact-test, data_dir: "{data}"}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {closed}, username: gw, password: broker-pass-6, reconnect_max: 1s}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, interval: 100ms, sensors: [{{key: a}}]}}
      - id: hook
        type: webhook
        input: sim
        url: "http://alice:userinfo-pass-1@127.0.0.1:{closed}/hook?token=query-token-2&v=1"
        headers: {{X-Auth: "Bearer header-bearer-3"}}
        reconnect_max: 1s
      - id: refused
        type: webhook
        input: sim
        url: "http://127.0.0.1:{refusing}/hook?sig=refused-query-8"
      - id: poll
        type: http_poll
        url: "http://127.0.0.1:{closed}/data?api_key=poll-api-key-4"
        headers: {{X-Api-Key: poll-header-5}}
        interval: 200ms
      - {{id: push, type: http, token: ingest-token-7-long-enough}}
      - {{id: out, type: mqtt_out, input: sim, connection: plant}}
console: {{host: 127.0.0.1, port: 0}}
"""


@pytest.fixture
async def refusing_server() -> AsyncIterator[int]:
    """A webhook receiver that answers 400: the gateway dead-letters what it sent, with the URL in the reason."""

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=400, text="bad request")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield port
    await runner.cleanup()


@pytest.fixture
async def leaky(tmp_path: Path, refusing_server: int) -> AsyncIterator[Gateway]:
    root = logging.getLogger()
    root.addHandler(RECENT)
    text = CONFIG.format(data=tmp_path / "data", closed=free_port(), refusing=refusing_server)
    try:
        async with running_gateway(text) as gw:
            yield gw
    finally:
        root.removeHandler(RECENT)


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


async def _viewer(gw: Gateway) -> Browserish:
    admin = Browserish(base_url(gw))
    await admin.setup_admin(gw)
    status, _ = await admin.post("/api/users", {"name": "viewer", "password": PASSWORD, "role": "viewer"})
    assert status == 201
    await admin.close()
    v = Browserish(base_url(gw))
    assert (await v.login("viewer"))[0] == 200
    return v


async def test_no_secret_leaves_through_any_way_out(leaky: Gateway) -> None:
    gw = leaky
    pipeline = gw.pipelines["p"]

    def health_of(nid: str) -> dict[str, Any]:
        return pipeline.nodes[pipeline.index[nid]].health()  # type: ignore[no-any-return]

    # wait until every failure with a secret in its text has happened: webhook down, poll down,
    # broker down, a refused delivery dead-lettered, and log lines about them
    await wait_for(lambda: health_of("hook").get("state") == "down", timeout=20)
    await wait_for(lambda: gw.dead_letters.total > 0, timeout=20)
    await wait_for(lambda: any("127.0.0.1" in ln["msg"] for ln in RECENT.lines), timeout=20)
    assert "query-token-2" in json.dumps(health_of("hook"))  # the raw data holds it: redaction is what hides it

    base = base_url(gw)
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/healthz") as r:
            anonymous = await r.json()
        assert anonymous == {"status": "degraded"}  # a stranger learns the status only
        async with s.get(base + "/metrics") as r:
            metrics = await r.text()
        assert not _leaks(metrics)

    v = await _viewer(gw)
    try:
        seen: dict[str, str] = {}
        for path in (
            "/healthz",
            "/api/pipelines",
            "/api/overview",
            "/api/logs",
            "/api/deadletters",
            "/api/pipelines/p/nodes/hook",
            "/api/pipelines/p/nodes/poll",
            "/api/pipelines/p/nodes/push",
            "/api/editor/model",
        ):
            status, body = await v.get(path)
            assert status == 200, (path, status, body)
            seen[path] = json.dumps(body)
            assert not _leaks(seen[path]), (path, _leaks(seen[path]))
        # details are there for a logged-in viewer, with the secrets masked in place
        assert "connections" in json.loads(seen["/healthz"])
        assert "alice" not in seen["/healthz"] and "alice" not in seen["/api/pipelines"]
        assert "***@127.0.0.1" in seen["/api/pipelines"] and "token=***" in seen["/api/pipelines"]
        hook = json.loads(seen["/api/pipelines/p/nodes/hook"])["options"]
        assert hook["headers"] == {"X-Auth": "***"} and "token=***" in hook["url"]
        assert json.loads(seen["/api/pipelines/p/nodes/push"])["options"]["token"] == "***"
        assert "sig=***" in seen["/api/deadletters"]
        assert any("127.0.0.1" in ln["msg"] for ln in json.loads(seen["/api/logs"])["lines"])

        ws = await v.http.ws_connect(f"{base}/ws?csrf={v.csrf}", headers={"Origin": base})
        await ws.send_json({"op": "subscribe", "topic": "stats"})
        msg = await ws.receive_str(timeout=10)
        while json.loads(msg).get("type") != "stats":
            msg = await ws.receive_str(timeout=10)
        await ws.close()
        assert "detail" in msg and not _leaks(msg)
    finally:
        await v.close()

    # an API token with the viewer role reads the same redacted health
    admin = Browserish(base)
    assert (await admin.login("admin"))[0] == 200
    status, tok = await admin.post("/api/tokens", {"name": "mon", "role": "viewer"})
    await admin.close()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {tok['token']}"}) as s:
        async with s.get(base + "/healthz") as r:
            text = await r.text()
    assert "connections" in text and not _leaks(text)


async def test_log_lines_are_redacted_on_stderr_too(leaky: Gateway) -> None:
    record = logging.LogRecord(
        "t", logging.WARNING, __file__, 1, "POST %s failed: %s", ("http://u:userinfo-pass-1@h/x?k=v", "boom"), None
    )
    Redacting().filter(record)
    assert not _leaks(record.getMessage()) and "***@h" in record.getMessage()
    # values the running config marks secret are caught in any text, not only in URLs
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "broker said %s", ("broker-pass-6 rejected",), None)
    Redacting().filter(record)
    assert record.getMessage() == "broker said *** rejected"


def test_schema_marks_secret_options() -> None:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "schema"], capture_output=True, text=True, check=True)
    schema = json.loads(out.stdout)

    def props(const: str) -> dict[str, Any]:
        return next(
            d["properties"]
            for d in schema["$defs"].values()
            if d.get("properties", {}).get("type", {}).get("const") == const
        )

    assert props("webhook")["headers"]["secret"] is True
    assert props("http_poll")["headers"]["secret"] is True
    assert props("http")["token"]["secret"] is True
    assert props("websocket")["headers"]["secret"] is True
    assert props("mqtt")  # the source; the connection's password is in $defs as well
    text = json.dumps(schema)
    assert text.count('"secret": true') >= 7


async def test_unauthenticated_healthz_answers_status_only(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(base_url(gw) + "/healthz") as r:
            assert r.status == 200 and await r.json() == {"status": "ok"}
    assert web_of(gw).auth.enabled


@pytest.mark.parametrize("node", ["type: webhook, input: sim", "type: http_poll"])
async def test_credentials_in_url_and_authorization_header_are_refused(
    gw: Gateway, admin: Browserish, tmp_path: Path, node: str
) -> None:
    """aiohttp refuses such a request outright: the node would never send, so the config says so."""
    text = f"""
gateway: {{id: g, data_dir: "{tmp_path}"}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, sensors: [{{key: a}}]}}
      - {{id: n, {node}, url: "http://u:pw@127.0.0.1:9/x", headers: {{Authorization: "Bearer t"}}}}
"""
    status, data = await admin.post("/api/config/validate", {"text": text})
    assert status == 200 and data["valid"] is False
    assert any("not both" in e["message"] for e in data["errors"]), data
