"""The console's web stack loads at the first connection: a gateway nobody looks at carries no
aiohttp, and the first request (plain, several at once, a /ws upgrade, over TLS) is answered as
any later one. The editor's YAML stack (ruamel.yaml) loads only when the editor is used."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests._util import wait_for

from .conftest import base_url
from .test_auth import _self_signed
from .test_ws import receive

ROOT = Path(__file__).resolve().parents[2]
OPEN = "{host: 127.0.0.1, port: 0, auth: false}"

SCRIPT = """
import asyncio, json, logging, sys
from gateway.config import parse_config
from gateway.runtime import Gateway

CONFIG = '''
gateway: {{id: lazy, data_dir: "{data}"}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, interval: 50ms, sensors: [{{key: t, base: 20}}]}}
      - {{id: out, type: log, input: sim}}
console: {{host: 127.0.0.1, port: 0, auth: false}}
'''

logging.basicConfig(level=logging.INFO)

async def main():
    gw = Gateway(parse_config(CONFIG, "t.yaml", {{}}))
    task = asyncio.create_task(gw.run(install_signals=False))
    while gw.state != "running" and not task.done():
        await asyncio.sleep(0.05)
    before = "aiohttp" in sys.modules or "gateway.web" in sys.modules
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.console.port)
    writer.write(b"GET /healthz HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nConnection: close\\r\\n\\r\\n")
    answer = await reader.read()
    writer.close()
    gw.stop()
    await task
    after = {{"aiohttp": "aiohttp" in sys.modules, "ruamel": "ruamel.yaml" in sys.modules}}
    print(json.dumps({{"before": before, "after": after, "answer": answer.decode()}}))

asyncio.run(main())
"""


def test_a_running_gateway_imports_no_web_stack_until_a_request(tmp_path: Path) -> None:
    code = SCRIPT.format(data=str(tmp_path / "data"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["before"] is False, "aiohttp or gateway.web imported before any request"
    assert result["after"] == {"aiohttp": True, "ruamel": False}  # the editor's YAML stack: at its first use
    head, _, body = result["answer"].partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and json.loads(body)["status"] == "ok"
    assert "console: web console loaded" in out.stderr


async def test_first_requests_at_once_are_all_answered(make_gateway: Callable) -> None:
    async with make_gateway(console=OPEN) as gw:
        assert not gw.console.loaded
        async with aiohttp.ClientSession() as s:

            async def get(path: str) -> tuple[int, Any]:
                async with s.get(base_url(gw) + path) as r:
                    return r.status, await r.json()

            answers = await asyncio.gather(*(get(p) for p in ["/healthz", "/api/pipelines"] * 4))
        assert gw.console.loaded
        assert [status for status, _ in answers] == [200] * 8
        assert answers[0][1]["status"] == "ok"
        assert answers[1][1]["pipelines"][0]["name"] == "plant"


async def test_a_websocket_upgrade_as_the_first_connection(make_gateway: Callable) -> None:
    async with make_gateway(console=OPEN) as gw:
        assert not gw.console.loaded
        base = base_url(gw)
        async with aiohttp.ClientSession() as s, s.ws_connect(base.replace("http", "ws") + "/ws", origin=base) as ws:
            assert (await receive(ws, "hello", limit=60))["interval"] == 1.0
            await ws.send_json({"op": "subscribe", "topic": "stats"})
            await receive(ws, "stats", limit=60)  # the stats ticker started with the console
        assert gw.console.loaded


async def test_tls_as_the_first_connection(make_gateway: Callable, tmp_path: Path) -> None:
    import ssl

    cert, key = _self_signed(tmp_path)
    console = f'{{host: 127.0.0.1, port: 0, auth: false, tls_cert: "{cert}", tls_key: "{key}"}}'
    async with make_gateway(console=console) as gw:
        assert not gw.console.loaded
        ctx = ssl.create_default_context(cafile=cert)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
            s.get(f"https://127.0.0.1:{gw.console.port}/api/pipelines") as r,
        ):
            assert r.status == 200 and (await r.json())["state"] == "running"
            assert r.headers["Strict-Transport-Security"].startswith("max-age=")


async def test_a_connection_closed_before_the_load_harms_nothing(make_gateway: Callable) -> None:
    async with make_gateway(console=OPEN) as gw:
        _, writer = await asyncio.open_connection("127.0.0.1", gw.console.port)
        writer.close()
        await writer.wait_closed()
        await wait_for(lambda: gw.console.loaded)
        async with aiohttp.ClientSession() as s, s.get(base_url(gw) + "/healthz") as r:
            assert r.status == 200


async def test_a_console_with_no_account_yet_loads_at_start_and_says_its_setup_code(
    make_gateway: Callable, caplog: Any
) -> None:
    async with make_gateway() as gw:  # auth on, a fresh data dir
        assert gw.console.loaded
        code = gw.console.web.auth.setup_code
        assert code and any(code in r.getMessage() for r in caplog.records)
