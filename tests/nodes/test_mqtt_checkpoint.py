"""The QoS 1 MQTT source across a kill between the state checkpoint and the PUBACKs: readings the
saved windows already hold, which the broker sends again because it never read their PUBACK, are
acknowledged without being counted twice (a real Mosquitto, `sluice run` subprocesses)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import sqlite3
import sys
import urllib.request
import zlib
from pathlib import Path
from subprocess import DEVNULL
from typing import Any

import pytest

from tests._proxy import LineProxy, MqttFramer
from tests._util import MosquittoBroker, free_port, mqtt_client, wait_for
from tests.gateway._harness import NO_AUTH, node, running_gateway
from tests.nodes._checkpoint import saved_watermark

T0 = 1_700_000_000.0  # readings i at T0 + i/10, keys k0..k2: whole 10 s windows of 100 readings


class HeldLine(LineProxy):
    """A TCP proxy to the broker whose gateway-to-broker direction can be held: what the gateway
    writes (its PUBACKs) is swallowed while the broker's messages still come through — the state
    of a gateway killed after its checkpoint, before its PUBACKs reached the broker."""

    def __init__(self, target_port: int):
        super().__init__(target_port)
        self.hold = False
        self.held_bytes = 0

    def passes(self, data: bytes, upstream: bool, framer: MqttFramer) -> int:
        if upstream and self.hold:
            self.held_bytes += len(data)
            return 0
        return len(data)


def crc_zero_payload(topic: str, value: int, ts: float) -> bytes:
    """A reading whose CRC-32 as the source takes it (over the topic, then the payload) is 0: a
    padding field of four printable bytes, solved for (the CRC is affine in them over GF(2))."""
    base = zlib.crc32(topic.encode())
    for nonce in range(10_000):
        head = json.dumps({"value": value, "ts": ts, "n": nonce})[:-1].encode() + b', "pad": "'

        def crc(x: int, head: bytes = head) -> int:
            return zlib.crc32(head + x.to_bytes(4, "little") + b'"}', base)

        # x with crc(x) == 0: XOR of the columns crc(bit) ^ crc(0) over x's bits equals crc(0)
        basis: list[tuple[int, int]] = []  # (vector, bits of x making it), distinct top bits
        for b in range(32):
            v, m = crc(1 << b) ^ crc(0), 1 << b
            for bv, bm in basis:
                if v ^ bv < v:
                    v, m = v ^ bv, m ^ bm
            if v:
                basis = sorted([*basis, (v, m)], reverse=True)
        v, x = crc(0), 0
        for bv, bm in basis:
            if v ^ bv < v:
                v, x = v ^ bv, x ^ bm
        pad = x.to_bytes(4, "little")
        if v == 0 and all(0x20 <= c < 0x7F and c not in b'"\\' for c in pad):
            payload = head + pad + b'"}'
            assert zlib.crc32(payload, base) == 0
            return payload
    raise AssertionError("no printable padding found")


def config(tmp_path: Path, port: int, gateway: str, out: str, console: int | None = None) -> str:
    ui = f"{{port: {console}{NO_AUTH}}}" if console else "{enabled: false}"
    return f"""\
gateway: {{id: {gateway}, data_dir: "{tmp_path}/{gateway}"}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {port}}}
pipelines:
  - name: c
    nodes:
      - {{id: src, type: mqtt, connection: plant, topic: "plant/+", key: "topic[1]", qos: 1}}
      - {{id: w, type: window, input: src, kind: tumbling, size: 10s, aggregate: sum}}
      - {{id: out, type: mqtt_out, input: w, connection: plant, topic: "{out}/{{key}}"}}
console: {ui}
"""


def _get(port: int, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def source_and_window(port: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    pipes = _get(port, "/api/pipelines")
    if pipes is None:
        return None
    nodes = {n["id"]: n for n in pipes["pipelines"][0]["nodes"]}
    return nodes["src"], nodes["w"]


def saved_taken(state_db: Path) -> tuple[int, int]:
    """(messages, bytes) of the source's list in the last checkpoint of ``state_db``."""
    with contextlib.closing(sqlite3.connect(f"file:{state_db}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT key, value FROM state WHERE pipeline='c' AND node='src'").fetchall()
    n = size = 0
    for key, value in rows:
        held = json.loads(value)  # base64 of a packet id (2 bytes) and a CRC (4 bytes) a message
        n += len(base64.b64decode(held)) // 6
        size += len(key) + len(value)
    return n, size


def results(messages: list[Any], prefix: str) -> dict[tuple[str, float], float]:
    """Window results by (key, window end), the warm-up's left out; one sent twice must be the same."""
    out: dict[tuple[str, float], float] = {}
    for m in messages:
        if m.topic.startswith(prefix + "/k"):
            b = json.loads(m.payload)
            k = (b["key"], b["ts"])
            assert out.setdefault(k, b["value"]) == b["value"], f"window {k} emitted with two values"
    return out


@pytest.mark.parametrize("how", ["kill", "reconnect"])
async def test_qos1_readings_sent_again_after_the_checkpoint_are_not_counted_twice(
    tmp_path: Path, mosquitto: MosquittoBroker, how: str
) -> None:
    """The gateway's PUBACKs are held back on their way to the broker; a checkpoint holding those
    readings is committed; then SIGKILL (or the connection is cut: the same gateway reconnects).
    The broker sends them again to the next run, which must acknowledge them without putting
    them into windows that hold them: the windows then equal those of a gateway never
    interrupted. (Before, the open window counted them twice.)"""
    line = await HeldLine(mosquitto.port).start()
    sluice = str(Path(sys.executable).parent / "sluice")
    console = free_port()
    cfg = tmp_path / "killed.yaml"
    cfg.write_text(config(tmp_path, line.port, "gwk", "wins", console))
    state_db = tmp_path / "gwk" / "state.db"
    sent = 0

    # one of the readings held back has a CRC of 0 (recognised like any other when sent again)
    crc_zero = crc_zero_payload("plant/k1", 520, T0 + 52.0)

    def publish(pub: Any, count: int) -> list[Any]:
        nonlocal sent
        infos = [
            pub.paho.publish(
                f"plant/k{i % 3}", crc_zero if i == 520 else json.dumps({"value": i, "ts": T0 + i / 10}), qos=1
            )
            for i in range(sent, sent + count)
        ]
        sent += count
        return infos

    async def saved_up_to(i: int) -> None:
        await wait_for(lambda: (saved_watermark(state_db, "c", "w") or 0.0) >= T0 + i / 10, timeout=30)

    procs: list[asyncio.subprocess.Process] = []
    try:
        with mqtt_client(mosquitto, subscribe=["wins/#", "wref/#"]) as sub, mqtt_client(mosquitto) as pub:
            async with running_gateway(config(tmp_path, mosquitto.port, "gwref", "wref")) as ref:
                procs.append(
                    await asyncio.create_subprocess_exec(sluice, "run", str(cfg), stdout=DEVNULL, stderr=DEVNULL)
                )

                def both_subscribed() -> bool:
                    got = source_and_window(console)
                    if got is not None and got[1]["counters"]["in"] > 0 and node(ref, "c", "w").n_in > 0:
                        return True
                    # warm-up readings, before T0 and on a key of their own, until both windows take them
                    pub.paho.publish("plant/warm", json.dumps({"value": 0, "ts": T0 - 50}), qos=1)
                    return False

                await wait_for(both_subscribed, timeout=30, interval=0.2)
                infos = publish(pub, 300)
                await wait_for(lambda: all(i.is_published() for i in infos), timeout=30)
                await saved_up_to(299)

                line.hold = True  # from now on the gateway's PUBACKs do not reach the broker
                publish(pub, 250)
                await saved_up_to(549)  # a checkpoint holds every reading whose PUBACK was held
                assert line.held_bytes > 0, "nothing was held back; this proves nothing"
                n, size = saved_taken(state_db)  # what the checkpoint holds of the messages taken
                assert n >= 250 and size <= 9 * n, (n, size)
                if how == "kill":
                    procs[0].send_signal(signal.SIGKILL)
                    await procs[0].wait()
                else:
                    line.cut()
                line.hold = False
                infos = publish(pub, 500)  # and more while the gateway is away
                await wait_for(lambda: all(i.is_published() for i in infos), timeout=30)
                if how == "kill":
                    procs.append(
                        await asyncio.create_subprocess_exec(sluice, "run", str(cfg), stdout=DEVNULL, stderr=DEVNULL)
                    )
                expected = 3 * ((sent - 1) // 100)  # every window but the last, which the watermark has not passed
                await wait_for(lambda: len(results(sub.messages, "wref")) == expected, timeout=60)
                await wait_for(lambda: len(results(sub.messages, "wins")) == expected, timeout=90)
                assert results(sub.messages, "wins") == results(sub.messages, "wref")
                src, _ = source_and_window(console) or ({}, {})
                # the broker did send them again, and the source knew them
                assert src["health"]["skipped_on_resume"] > 0, src
    finally:
        for p in procs:
            if p.returncode is None:
                p.terminate()
                await asyncio.wait_for(p.wait(), 20)
        await line.close()


async def test_qos1_a_broker_that_lost_the_session_has_nothing_taken_for_a_copy(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """Killed with readings whose PUBACKs were held back, the gateway comes back to a broker that
    restarted without its session (no persistence). That broker sends nothing again: the new
    session's packet ids start over, and the same readings published again under the very same
    packet ids are new messages, counted — not taken for copies of the ones the checkpoint holds
    (which would lose them)."""
    line = await HeldLine(mosquitto.port).start()
    sluice = str(Path(sys.executable).parent / "sluice")
    console = free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(config(tmp_path, line.port, "gwk", "wins", console))
    state_db = tmp_path / "gwk" / "state.db"

    def taken() -> int:
        got = source_and_window(console)
        return 0 if got is None else got[0]["counters"]["in"]

    async def warm_up(pub: Any, at_least: int) -> int:
        """Warm-up readings (before T0, on a key of their own) until the source takes ``at_least``."""

        def enough() -> bool:
            if taken() >= at_least:
                return True
            pub.paho.publish("plant/warm", json.dumps({"value": 0, "ts": T0 - 50}), qos=1)
            return False

        await wait_for(enough, timeout=30, interval=0.2)
        return taken()

    readings = [(f"plant/k{i % 3}", json.dumps({"value": i, "ts": T0 + i / 10})) for i in range(210)]
    procs: list[asyncio.subprocess.Process] = []
    try:
        with mqtt_client(mosquitto, subscribe="wins/#") as sub, mqtt_client(mosquitto) as pub:
            procs.append(await asyncio.create_subprocess_exec(sluice, "run", str(cfg), stdout=DEVNULL, stderr=DEVNULL))
            await warm_up(pub, 3)
            line.hold = True
            for topic, payload in readings[:100]:  # packet ids warm+1 .. warm+100
                pub.paho.publish(topic, payload, qos=1)
            await wait_for(lambda: (saved_watermark(state_db, "c", "w") or 0.0) >= T0 + 9.9, timeout=30)
            await wait_for(lambda: saved_taken(state_db)[0] >= 100, timeout=30)
            warm = taken() - 100  # packet ids 1..warm went to warm-up readings, the next 100 to these
            procs[0].send_signal(signal.SIGKILL)
            await procs[0].wait()
            mosquitto.stop()
            mosquitto.start()  # without persistence: every session is gone
            line.hold = False
            pub.wait_connected()
            sub.wait_connected()
            procs.append(await asyncio.create_subprocess_exec(sluice, "run", str(cfg), stdout=DEVNULL, stderr=DEVNULL))
            await warm_up(pub, warm)  # the readings below then get the packet ids they had before
            for topic, payload in readings:  # the first 100 under the packet ids they had before
                pub.paho.publish(topic, payload, qos=1)

            def window(end: float) -> dict[str, float]:
                got = [json.loads(m.payload) for m in sub.messages if m.topic.startswith("wins/k")]
                return {b["key"]: b["value"] for b in got if b["ts"] == end}

            await wait_for(lambda: len(window(T0 + 20)) == 3, timeout=60)
            src, _ = source_and_window(console) or ({}, {})
            assert src["health"]["skipped_on_resume"] == 0, src
            first = {f"k{k}": 2.0 * sum(i for i in range(100) if i % 3 == k) for k in range(3)}
            assert window(T0 + 10) == first  # the restored hundred and the hundred sent again
            assert window(T0 + 20) == {f"k{k}": float(sum(i for i in range(100, 200) if i % 3 == k)) for k in range(3)}
    finally:
        for p in procs:
            if p.returncode is None:
                p.terminate()
                await asyncio.wait_for(p.wait(), 20)
        await line.close()
