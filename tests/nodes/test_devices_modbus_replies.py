"""Malformed Modbus replies: the ``modbus`` source against a slave that answers wrongly, byte by byte.

No library server sends a short reply, a reply for another function or unit, an inconsistent byte
count or a bad CRC on purpose, so the peer here is a plain asyncio Modbus TCP server (and, for
RTU, a pty whose far end answers with frames written by hand). Unit 1 misbehaves; unit 2 is a
healthy slave on the same bus, whose readings must keep coming.
"""

from __future__ import annotations

import asyncio
import os
import struct
import tty
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pymodbus.framer.rtu import FramerRTU

from gateway import node as node_mod
from gateway.events import Event
from gateway.node import NodeOptions, Sink, register
from tests._util import wait_for
from tests.gateway._harness import node, running_gateway

Reply = Callable[[int, int, int], tuple[int, bytes]]  # (unit, function, count) -> (unit sent, PDU)


class CollectOptions(NodeOptions):
    type: Literal["t_mbr_collect"]


class Collect(Sink):
    Options = CollectOptions

    def __init__(self, options: Any, ctx: Any):
        super().__init__(options, ctx)
        self.events: list[Event] = []

    async def write(self, batch: list[Event]) -> None:
        self.events.extend(batch)


@pytest.fixture(autouse=True)
def collect_sink() -> Iterator[None]:
    register(Collect)
    yield
    node_mod._REGISTRY.pop("t_mbr_collect", None)


def registers(function: int, values: list[int], byte_count: int | None = None) -> bytes:
    data = b"".join(struct.pack(">H", v) for v in values)
    return bytes([function, len(data) if byte_count is None else byte_count]) + data


MISBEHAVIOURS: dict[str, tuple[Callable[[int, int], tuple[int, bytes]], str]] = {
    # name: (unit 1's reply to (function, count), the reason its points get)
    "short": (lambda fc, n: (1, registers(fc, list(range(n))[:6])), "6 registers in the reply to a read of 10"),
    "long": (lambda fc, n: (1, registers(fc, list(range(n + 2)))), "12 registers in the reply to a read of 10"),
    "other function": (lambda fc, n: (1, registers(4, [7777] * n)), "a function 4 reply to a function 3 read"),
    "other unit": (lambda fc, n: (9, registers(fc, list(range(n)))), "a reply came from unit 9"),
    # claims 20 bytes, sends 12: pymodbus cannot decode it (and would drop the connection)
    "byte count": (lambda fc, n: (1, registers(fc, list(range(6)), byte_count=20)), "a reply could not be decoded"),
}


def behaviour(name: str) -> Reply:
    bad, _reason = MISBEHAVIOURS[name]

    def reply(unit: int, fc: int, n: int) -> tuple[int, bytes]:
        return bad(fc, n) if unit == 1 else (unit, registers(fc, list(range(100, 100 + n))))

    return reply


@pytest.fixture
async def tcp_slave() -> AsyncIterator[Callable[[Reply], Any]]:
    servers: list[asyncio.Server] = []

    async def start(reply: Reply) -> int:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while True:
                    tid, _pid, length, unit = struct.unpack(">HHHB", await r.readexactly(7))
                    fc, _addr, n = struct.unpack(">BHH", (await r.readexactly(length - 1))[:5])
                    sent_unit, pdu = reply(unit, fc, n)
                    w.write(struct.pack(">HHHB", tid, 0, len(pdu) + 1, sent_unit) + pdu)
                    await w.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for s in servers:
        s.close()


POINTS = "[" + ", ".join(f"{{name: r{i}, address: {i}}}" for i in range(10)) + "]"


def config(tmp_path: Path, where: str) -> str:
    return f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data"}}
pipelines:
  - name: plant
    nodes:
      - id: bus
        type: modbus
        {where}
        interval: 0.1s
        timeout: 0.3s
        reconnect_max: 0.5s
        slave_retry_max: 1s
        slaves: [{{unit: 1, name: bad, points: {POINTS}}}, {{unit: 2, name: good, points: {POINTS}}}]
      - {{id: out, type: t_mbr_collect, input: bus}}
console: {{port: 0, auth: false}}
"""


async def check_only_the_bad_slave_suffers(gw: Any, reason: str) -> None:
    src = node(gw, "plant", "bus")
    out = node(gw, "plant", "out")
    await wait_for(lambda: src.counters()["modbus_bad_reply"] >= 2)
    good = sum(1 for e in out.events if e.key == "good.r0")
    await wait_for(lambda: sum(1 for e in out.events if e.key == "good.r0") >= good + 3, timeout=10)
    h = src.health()
    assert h["state"] == "degraded" and h["losses"] == 0, h  # the link itself stayed up
    assert h["slaves"]["bad"]["bad"]["r0"] == reason, h
    assert h["slaves"]["good"]["state"] == "ok", h
    assert not [e for e in out.events if e.key.startswith("bad.")]  # nothing from a reply that cannot be trusted
    c = src.counters()
    assert c["malformed"] == c["modbus_bad_reply"] and c["modbus_disconnect"] == 0, c
    letters = [r["reason"] for r in gw.dead_letters.recent]
    assert any(reason in r and "bad (unit 1)" in r for r in letters), letters


@pytest.mark.parametrize("misbehaviour", list(MISBEHAVIOURS))
async def test_tcp_malformed_reply_marks_that_slave_bad_only(tmp_path: Path, tcp_slave: Any, misbehaviour: str) -> None:
    port = await tcp_slave(behaviour(misbehaviour))
    async with running_gateway(config(tmp_path, f"host: 127.0.0.1\n        port: {port}")) as gw:
        await check_only_the_bad_slave_suffers(gw, MISBEHAVIOURS[misbehaviour][1])


def rtu(unit: int, pdu: bytes) -> bytes:
    frame = bytes([unit]) + pdu
    return frame + FramerRTU.compute_CRC(frame).to_bytes(2, "big")


@pytest.mark.parametrize("misbehaviour", ["bad crc", "short", "other function"])
async def test_rtu_malformed_reply_marks_that_slave_bad_only(tmp_path: Path, misbehaviour: str) -> None:
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    os.set_blocking(master, False)
    if misbehaviour == "bad crc":
        reason = "a reply failed its CRC check"

        def answer(unit: int, fc: int, n: int) -> bytes:
            frame = rtu(unit, registers(fc, list(range(100, 100 + n))))
            return frame[:-1] + bytes([frame[-1] ^ 0xFF]) if unit == 1 else frame
    else:
        reply = behaviour(misbehaviour)
        reason = MISBEHAVIOURS[misbehaviour][1]

        def answer(unit: int, fc: int, n: int) -> bytes:
            return rtu(*reply(unit, fc, n))

    pending = bytearray()

    def on_request() -> None:  # every request of the source is 8 bytes: unit, function, address, count, CRC
        try:
            pending.extend(os.read(master, 4096))
        except OSError:
            return
        while len(pending) >= 8:
            unit, fc, _addr, n = struct.unpack(">BBHH", bytes(pending[:6]))
            del pending[:8]
            os.write(master, answer(unit, fc, n))

    loop = asyncio.get_running_loop()
    loop.add_reader(master, on_request)
    try:
        where = f"transport: rtu\n        device: {os.ttyname(slave)}\n        baud: 115200"
        async with running_gateway(config(tmp_path, where)) as gw:
            await check_only_the_bad_slave_suffers(gw, reason)
    finally:
        loop.remove_reader(master)
        os.close(master)
        os.close(slave)
