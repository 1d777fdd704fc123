"""OpenSSL loads only when something imports it, or at start for a config that may use TLS (gateway._tls).

`sluice run` as a real process against a real Mosquitto: with a plain config it delivers its
alerts and has neither libssl/libcrypto nor Python's _ssl/_hashlib mapped (read from
/proc/PID/maps), by default (loaded at its first import) and with SLUICE_TLS=auto (kept out);
with SLUICE_TLS=1 it has them; with a config that uses TLS (a CA file) it delivers over TLS.
Inside a process that keeps OpenSSL out, asyncio and hashlib work and a request for TLS says why
it failed; in one that imported asyncio without it, the first `import ssl` gives asyncio what it
needs for a real TLS connection, and hashlib imported afterwards uses OpenSSL.

(The configs hold tmp_path, named after the test: the names here keep "tls", "ssl" and "cert"
out of their first 30 characters, which pytest uses.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway._tls import config_may_use_tls
from tests._util import MosquittoBroker, wait_for_sync
from tests.gateway.test_outbox_tls import make_ca, make_server_cert

ROOT = Path(__file__).resolve().parents[2]
OPENSSL = ("libssl", "libcrypto", "/_ssl.", "/_hashlib.")


def config(tmp_path: Path, port: int, connection_extra: str = "") -> str:
    return f"""\
gateway: {{id: gw-lazy, data_dir: "{tmp_path}/data"}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {port}{connection_extra}}}
pipelines:
  - name: boiler
    nodes:
      - {{id: sim, type: simulate, count: 40, interval: 1, realtime: false,
          sensors: [{{key: s1, base: 50, amplitude: 50, period: 4, noise: 0}}]}}
      - {{id: hot, type: threshold, input: sim, above: 75, clear_below: 25}}
      - {{id: out, type: mqtt_out, input: hot, connection: plant, topic: lazy/alerts}}
console: {{enabled: false}}
"""


class Alerts:
    """A paho subscriber of lazy/alerts, over TLS when given a CA."""

    def __init__(self, port: int, ca: Path | None = None):
        self.got: list[bytes] = []
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"lazy-{os.getpid()}-{port}")
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca))
        self.client.on_connect = lambda c, *a: c.subscribe("lazy/alerts", 1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = lambda c, u, msg: self.got.append(msg.payload)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the test's subscriber could not subscribe"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lazy.yaml"
    path.write_text(text)
    return path


def openssl_mapped(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({line.split()[-1] for line in maps.splitlines() if any(s in line for s in OPENSSL)})


@pytest.mark.parametrize("lean", [True, False])
def test_a_plain_config_runs_without_openssl(
    tmp_path: Path, mosquitto: MosquittoBroker, run_sluice: Any, lean: bool
) -> None:
    """lean: SLUICE_TLS=auto keeps it out; without SLUICE_TLS it loads at its first import."""
    alerts = Alerts(mosquitto.port)
    try:
        proc = run_sluice(config_file(tmp_path, config(tmp_path, mosquitto.port)), lean=lean)
        wait_for_sync(lambda: len(alerts.got) == 20 or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, (tmp_path / "run0.log").read_text()
        assert openssl_mapped(proc.pid) == []
    finally:
        alerts.close()


def test_with_sluice_tls_1_a_plain_config_loads_openssl_at_start(
    tmp_path: Path, mosquitto: MosquittoBroker, run_sluice: Any
) -> None:
    alerts = Alerts(mosquitto.port)
    try:
        proc = run_sluice(config_file(tmp_path, config(tmp_path, mosquitto.port)), lean="1")
        wait_for_sync(lambda: len(alerts.got) == 20 or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, (tmp_path / "run0.log").read_text()
        assert any("/_ssl." in path for path in openssl_mapped(proc.pid))  # as any Python
    finally:
        alerts.close()


@pytest.fixture
def tls_broker(tmp_path: Path, mosquitto_factory: Any) -> tuple[Any, Path]:
    d = tmp_path / "pki"
    d.mkdir()
    ca_key, ca_cert, ca_path = make_ca(d, "test-ca")
    cert, key = make_server_cert(d, ca_key, ca_cert)
    return mosquitto_factory(extra=f"certfile {cert}\nkeyfile {key}\n"), ca_path


@pytest.mark.parametrize("lean", [True, False])
def test_a_tls_config_runs_over_tls(tmp_path: Path, tls_broker: tuple[Any, Path], run_sluice: Any, lean: bool) -> None:
    broker, ca = tls_broker
    alerts = Alerts(broker.port, ca)
    try:
        proc = run_sluice(config_file(tmp_path, config(tmp_path, broker.port, f', ca_file: "{ca}"')), lean=lean)
        wait_for_sync(lambda: len(alerts.got) == 20 or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, (tmp_path / "run0.log").read_text()
        assert any("/_ssl." in path for path in openssl_mapped(proc.pid))
    finally:
        alerts.close()


KEPT_OUT = """
from gateway._tls import blocked, keep_out_unless_needed
kept = keep_out_unless_needed("connections: {plant: {type: mqtt, tls: false}}", {"SLUICE_TLS": "auto"})
import asyncio, hashlib, hmac, json, sys

async def main():
    await asyncio.sleep(0)
    return "ok"

try:
    import ssl
    error = None
except ImportError as exc:
    error = str(exc)
print(json.dumps({
    "kept": kept and blocked(),
    "asyncio": asyncio.run(main()),
    "sha256": hashlib.sha256(b"sluice").hexdigest(),
    "hmac": hmac.new(b"k", b"sluice", "sha256").hexdigest(),
    "ssl_error": error,
    "loaded": sorted(m for m in ("ssl", "_ssl", "_hashlib") if sys.modules.get(m) is not None),
}))
"""


def test_a_process_that_keeps_openssl_out_still_hashes_and_says_why_tls_fails() -> None:
    out = subprocess.run([sys.executable, "-c", KEPT_OUT], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["kept"] is True and got["asyncio"] == "ok" and got["loaded"] == []
    import hashlib
    import hmac

    assert got["sha256"] == hashlib.sha256(b"sluice").hexdigest()
    assert got["hmac"] == hmac.new(b"k", b"sluice", "sha256").hexdigest()
    assert "SLUICE_TLS=auto" in got["ssl_error"] and "config" in got["ssl_error"]


DEFERRED = """
import json, sys
from gateway._tls import deferred, deferred_openssl

with deferred_openssl("connections: {plant: {type: mqtt, tls: false}}", {}) as done:
    import asyncio, secrets  # as `sluice run` does: pydantic imports secrets, which imports hmac and hashlib

OPENSSL = ("ssl", "_ssl", "_hashlib", "hashlib", "hmac")
inside = sorted(m for m in OPENSSL if sys.modules.get(m) is not None)
with open("/proc/self/maps") as f:
    mapped_inside = sorted({l.split()[-1] for l in f if "libssl" in l or "libcrypto" in l})
import ssl  # as a TLS connection, the console's web stack or a Kafka node would, later

async def main():
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(sys.argv[1], sys.argv[2])

    async def echo(reader, writer):
        writer.write(b"pong:" + await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=sys.argv[3])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname="localhost")
    writer.write(b"ping\\n")
    answer = await reader.readline()
    cipher = writer.get_extra_info("cipher")
    writer.close()
    server.close()
    await server.wait_closed()
    return answer.decode(), cipher is not None

answer, encrypted = asyncio.run(main())
import hashlib, hmac
print(json.dumps({
    "done": done and deferred(), "inside": inside, "mapped_inside": mapped_inside,
    "answer": answer, "encrypted": encrypted,
    "hashlib_openssl": hashlib.__dict__.get("_hashlib") is not None,
    "hmac_openssl": hmac.__dict__.get("_hashopenssl") is not None,
    "pbkdf2": hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", 2).hex(),
    "compare": secrets.compare_digest(b"a", b"a"),
}))
"""


def test_asyncio_imported_without_openssl_makes_tls_connections_after_its_first_import(tmp_path: Path) -> None:
    ca_key, ca_cert, ca_path = make_ca(tmp_path, "test-ca")
    cert, key = make_server_cert(tmp_path, ca_key, ca_cert)
    out = subprocess.run(
        [sys.executable, "-c", DEFERRED, str(cert), str(key), str(ca_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["done"] is True and got["inside"] == [] and got["mapped_inside"] == [], got
    assert got["answer"] == "pong:ping\n" and got["encrypted"] is True, got
    assert got["hashlib_openssl"] is True and got["hmac_openssl"] is True, got
    import hashlib

    assert got["pbkdf2"] == hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", 2).hex() and got["compare"] is True


@pytest.mark.parametrize(
    ("text", "env", "may"),
    [
        ("connections: {plant: {type: mqtt, host: b}}", {}, False),
        ("connections: {plant: {type: mqtt, host: b, tls: false}}", {}, False),
        ("connections: {plant: {type: mqtt, host: b, tls: true}}", {}, True),
        ("connections: {plant: {type: mqtt, host: b, ca_file: /etc/ca.pem}}", {}, True),
        ("nodes: [{type: http_poll, url: 'HTTPS://x'}]", {}, True),
        ("nodes: [{type: redis, url: 'rediss://x'}]", {}, True),
        ("nodes: [{type: webhook, url: '${HOOK}'}]", {"HOOK": "https://example.com/h"}, True),
        ("nodes: [{type: webhook, url: '${HOOK}'}]", {"HOOK": "http://10.0.0.2/h"}, False),
        ("nodes: [{type: webhook, url: '${HOOK:-https://example.com}'}]", {}, True),
        ("nodes: [{id: a, type: window}, {id: b, type: 'mqtt_out'}]", {}, False),
        ("nodes: [{id: k, type: kafka}]", {}, True),  # aiokafka's stack imports ssl
        ("nodes:\n  - id: m\n    type: modbus\n", {}, True),  # so does pymodbus
        ("nodes: [{id: p, type: my_plugin}]", {}, True),  # unknown: it may
        ("nodes: [{id: p, type: ${KIND}}]", {"KIND": "map"}, True),
    ],
)
def test_what_counts_as_a_config_that_may_use_tls(text: str, env: dict[str, str], may: bool) -> None:
    assert config_may_use_tls(text, env) is may


RELOAD = """
from gateway._tls import keep_out_unless_needed

PLAIN = '''
gateway: {{id: gw-reload, data_dir: "{data}"}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, interval: 1s, sensors: [{{key: a}}]}}
      - {{id: out, type: log, input: sim}}
console: {{enabled: false}}
'''
# a plain webhook, and a comment that only mentions a certificate: reloads live
PLAIN_HOOK = PLAIN.replace("type: log, input: sim", "type: webhook, input: sim, url: 'http://127.0.0.1:9/h'").replace(
    "console:", "# a certificate comes later\\nconsole:"
)
HOOK = PLAIN.replace("type: log, input: sim", "type: webhook, input: sim, url: 'https://127.0.0.1:9/h'")
assert keep_out_unless_needed(PLAIN, {{"SLUICE_TLS": "auto"}})
import asyncio, json
from gateway.config import parse_config
from gateway.errors import ReloadError
from gateway.runtime import Gateway

async def main():
    gw = Gateway(parse_config(PLAIN, "t.yaml", {{}}))
    task = asyncio.create_task(gw.run(install_signals=False))
    for _ in range(600):
        if gw.state == "running" or task.done():
            break
        await asyncio.sleep(0.05)
    errors = []
    for text in (PLAIN_HOOK, HOOK):
        try:
            await gw.reload(parse_config(text, "t.yaml", {{}}))
            errors.append(None)
        except ReloadError as exc:
            errors.append(str(exc))
    gw.stop()
    await task
    print(json.dumps({{"errors": errors}}))

asyncio.run(main())
"""


def test_a_reload_needing_encryption_in_a_lean_process_asks_for_a_restart(tmp_path: Path) -> None:
    code = RELOAD.format(data=str(tmp_path / "data"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    plain, tls = json.loads(out.stdout.strip().splitlines()[-1])["errors"]
    assert plain is None
    assert tls is not None and "TLS" in tls and "restart the gateway" in tls


LEAN_LOADS = """
import json
from gateway._tls import LEAN_TYPES, keep_out_unless_needed
assert keep_out_unless_needed("", {"SLUICE_TLS": "auto"})
from gateway.node import _node_entry_points
import gateway.llm, llama_cpp  # the local LLM provider's stack
failed = {}
for name, ep in sorted(_node_entry_points().items()):
    if name in LEAN_TYPES:
        try:
            ep.load()
        except ImportError as exc:
            failed[name] = str(exc)
# and the libraries those nodes import when they start (a node's module imports them lazily)
import importlib
for name, library in {"http": "aiohttp", "http_poll": "aiohttp", "webhook": "aiohttp", "mqtt": "gmqtt",
                      "mqtt_out": "gmqtt", "homeassistant": "gmqtt", "redis": "redis.asyncio",
                      "redis_out": "redis.asyncio", "lookup": "redis.asyncio"}.items():
    if name in LEAN_TYPES:
        try:
            importlib.import_module(library)
        except Exception as exc:  # redis-py 8 without ssl: AttributeError
            failed[name] = f"{library}: {type(exc).__name__}: {exc}"
print(json.dumps(failed))
"""


def test_every_type_counted_as_lean_imports_without_openssl() -> None:
    out = subprocess.run([sys.executable, "-c", LEAN_LOADS], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}
