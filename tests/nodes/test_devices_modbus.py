"""The ``modbus`` source against a real pymodbus server: TCP and RTU (over a pty null-modem), profiles,
batching, exception responses, a silent slave, NaN values and a server that dies and comes back;
and against a hand-written slave whose replies are malformed."""

from __future__ import annotations

import asyncio
import math
import os
import struct
import tty
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pymodbus.framer.rtu import FramerRTU

from firmware_bridges.modbus import DeviceMap, Point, load_profile
from firmware_bridges.simulators import ModbusFault, ModbusSimulator, PtyBridge
from gateway import node as node_mod
from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.events import Event
from gateway.node import NodeOptions, Sink, register
from tests._util import free_port, wait_for
from tests.gateway._harness import get, node, running_gateway


class CollectOptions(NodeOptions):
    type: Literal["t_mb_collect"]


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
    node_mod._REGISTRY.pop("t_mb_collect", None)


CUSTOM = DeviceMap(
    points=[
        Point(name="count", table="holding", address=100, type="int32", word_order="little"),
        Point(name="flags_run", table="holding", address=102, type="bit", bit=3),
        Point(name="model", table="holding", address=103, type="string", length=4),
        Point(name="relay", table="coil", address=5),
        Point(name="level", table="input", address=0, type="float64", scale=0.5, unit="m"),
    ]
)

CUSTOM_YAML = """[{name: count, table: holding, address: 100, type: int32, word_order: little},
                  {name: flags_run, table: holding, address: 102, type: bit, bit: 3},
                  {name: model, table: holding, address: 103, type: string, length: 4},
                  {name: relay, table: coil, address: 5},
                  {name: level, table: input, address: 0, type: float64, scale: 0.5, unit: m}]"""


def config(tmp_path: Path, port: int, slaves: str, extra: str = "") -> str:
    return f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data"}}
pipelines:
  - name: plant
    nodes:
      - id: bus
        type: modbus
        host: 127.0.0.1
        port: {port}
        interval: 0.1s
        timeout: 0.3s
        reconnect_max: 0.5s
        slave_retry_max: 1s
        slaves: {slaves}{extra}
      - {{id: out, type: t_mb_collect, input: bus}}
console: {{port: 0, auth: false}}
"""


def latest(gw: Any, key: str) -> Any:
    for e in reversed(node(gw, "plant", "out").events):
        if e.key == key:
            return e.value
    return None


def count(gw: Any, key: str) -> int:
    return sum(1 for e in node(gw, "plant", "out").events if e.key == key)


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSimulator]:
    s = ModbusSimulator({1: load_profile("sdm120"), 2: load_profile("xy-md02"), 3: CUSTOM}, seed=7)
    await s.start_tcp(port=free_port())
    yield s
    await s.stop()


SLAVES = f"""
          - {{unit: 1, name: meter, profile: sdm120, groups: {{fast: 0.1s, energy: 0.1s}}}}
          - {{unit: 2, name: room, profile: xy-md02, groups: {{fast: 0.1s, settings: 0.1s}}}}
          - {{unit: 3, name: tank, points: {CUSTOM_YAML}}}"""


async def test_tcp_profiles_and_register_map_end_to_end(tmp_path: Path, sim: ModbusSimulator) -> None:
    sim.set(1, "voltage", 231.5)
    sim.set(2, "temperature", -4.2)
    sim.set(3, "count", -123456)
    sim.set(3, "flags_run", 1)
    sim.set(3, "model", "PLC7")
    sim.set(3, "relay", 1)
    sim.set(3, "level", 3.25)
    assert sim.port is not None
    async with running_gateway(config(tmp_path, sim.port, SLAVES)) as gw:
        await wait_for(
            lambda: (
                latest(gw, "tank.level") is not None
                and latest(gw, "meter.total_energy") is not None
                and latest(gw, "room.humidity_offset") is not None
            )
        )
        assert latest(gw, "meter.voltage") == 231.5
        assert latest(gw, "room.temperature") == pytest.approx(-4.2)
        assert latest(gw, "tank.count") == -123456.0
        assert latest(gw, "tank.flags_run") == 1.0
        assert latest(gw, "tank.model") == {"text": "PLC7"}
        assert latest(gw, "tank.relay") == 1.0
        assert latest(gw, "tank.level") == 3.25
        assert 49 < latest(gw, "meter.frequency") < 51
        src = node(gw, "plant", "bus")
        # batching: sdm120's 14 points are 2 reads per round, not 14
        polls_of_meter = {p.group: len(p.blocks) for p in src.polls if p.slave.key == "meter"}
        assert polls_of_meter == {"fast": 1, "energy": 2}
        assert src.health()["state"] == "up" and src.health()["slaves"]["meter"]["state"] == "ok"
        _status, body = await get(gw, "/healthz")
        assert body["status"] == "ok", body


async def test_exception_and_silent_slave_do_not_stall_the_others(tmp_path: Path, sim: ModbusSimulator) -> None:
    sim.faults[2] = ModbusFault(dead=True)
    sim.faults[3] = ModbusFault(exception=2)
    assert sim.port is not None
    async with running_gateway(config(tmp_path, sim.port, SLAVES)) as gw:
        src = node(gw, "plant", "bus")
        await wait_for(lambda: src.counters()["modbus_timeout"] >= 2 and src.counters()["modbus_exception"] >= 3)
        # the healthy meter keeps its rate while unit 2 is skipped with backoff between timeouts
        start = count(gw, "meter.voltage")
        await wait_for(lambda: count(gw, "meter.voltage") >= start + 10, timeout=5)
        h = src.health()
        assert h["state"] == "degraded"
        room, tank = h["slaves"]["room"], h["slaves"]["tank"]
        assert room["state"] == "down" and room["bad"]["temperature"] == "no reply within 0.3s"
        assert tank["bad"]["level"] == "exception 2 (illegal data address)"
        assert latest(gw, "room.temperature") is None and latest(gw, "tank.level") is None
        # a silent slave is retried with backoff, not every 0.1 s
        assert src.counters()["modbus_timeout"] < src.counters()["modbus_exception"]

        sim.faults.clear()
        await wait_for(
            lambda: latest(gw, "room.temperature") is not None and latest(gw, "tank.level") is not None, timeout=10
        )
        await wait_for(lambda: src.health()["state"] == "up")
        assert src.health()["slaves"]["room"]["state"] == "ok"


async def test_polls_and_retries_follow_the_nodes_monotonic_clock(tmp_path: Path, sim: ModbusSimulator) -> None:
    """Poll intervals and a silent slave's backoff are timed by ``ctx.monotonic``, not the process's
    clock: an hour on the node's clock is the next round, though only a moment passed on the wall."""
    from gateway.deadletter import DeadLetters
    from gateway.engine import Pipeline
    from gateway.node import NodeContext

    sim.faults[2] = ModbusFault(dead=True)
    assert sim.port is not None
    slaves = """
          - {unit: 1, name: meter, profile: sdm120, groups: {fast: 1h, energy: 1h}}
          - {unit: 2, name: room, profile: xy-md02, groups: {fast: 1h, settings: 1h}}"""
    text = config(tmp_path, sim.port, slaves).replace("interval: 0.1s", "interval: 1h")
    text = text.replace("slave_retry_max: 1s", "slave_retry_max: 30m")
    now = [1000.0]
    dl = DeadLetters(None)

    def ctx(node_id: str) -> NodeContext:
        return NodeContext("gw1", "plant", node_id, str(tmp_path), None, dl, monotonic=lambda: now[0])

    p = Pipeline("plant", parse_config(text).nodes["plant"], ctx)
    src, out = p.nodes[p.index["bus"]], p.nodes[p.index["out"]]

    def rounds() -> int:
        return sum(1 for e in out.events if e.key == "meter.voltage")

    task = asyncio.create_task(p.run())
    try:
        await wait_for(lambda: rounds() == 1 and src.counters()["modbus_timeout"] == 1, timeout=15)
        retry_at = src.slaves[1].retry_at
        assert 1000.0 < retry_at <= 1000.0 + 30 * 60  # on the node's clock
        now[0] += 3600.0  # an hour on the node's clock, a moment on the wall
        await wait_for(lambda: rounds() == 2 and src.counters()["modbus_timeout"] == 2, timeout=15)
        assert src.slaves[1].retry_at > now[0]  # backed off again from the node's "now"
        now[0] += 3600.0
        await wait_for(lambda: rounds() == 3 and src.counters()["modbus_timeout"] == 3, timeout=15)
        assert src.n_overruns == 0  # each round came on time by the node's clock
    finally:
        p.stop()
        await asyncio.wait_for(task, 15)


async def test_nan_values_are_dead_lettered(tmp_path: Path, sim: ModbusSimulator) -> None:
    sim.set(1, "frequency", math.nan)
    sim.set(1, "voltage", math.inf)
    assert sim.port is not None
    async with running_gateway(config(tmp_path, sim.port, "[{unit: 1, name: meter, profile: sdm120}]")) as gw:
        src = node(gw, "plant", "bus")
        await wait_for(lambda: src.counters()["modbus_nonfinite"] >= 2 and latest(gw, "meter.current") is not None)
        assert latest(gw, "meter.frequency") is None and latest(gw, "meter.voltage") is None
        assert src.health()["slaves"]["meter"]["bad"]["frequency"] == "decodes to nan"
        reasons = [r["reason"] for r in gw.dead_letters.recent]
        assert any("meter.voltage decodes to inf" in r for r in reasons), reasons
        assert src.counters()["malformed"] == src.counters()["modbus_nonfinite"]


async def test_server_that_dies_is_down_then_resumes(tmp_path: Path) -> None:
    port = free_port()
    sim = await ModbusSimulator({1: load_profile("pzem016")}).start_tcp(port=port)
    try:
        async with running_gateway(config(tmp_path, port, "[{unit: 1, name: pz, profile: pzem016}]")) as gw:
            src = node(gw, "plant", "bus")
            await wait_for(lambda: latest(gw, "pz.voltage") is not None)
            await sim.stop()
            await wait_for(lambda: src.health()["state"] == "down")
            assert src.health()["slaves"]["pz"]["bad"]["voltage"]
            _status, body = await get(gw, "/healthz")
            assert body["status"] == "degraded" and any("plant/bus: down" in p for p in body["problems"]), body
            sim.set(1, "voltage", 199.9)
            await sim.start_tcp(port=port)
            await wait_for(lambda: latest(gw, "pz.voltage") == pytest.approx(199.9), timeout=10)
            assert src.health()["state"] == "up" and src.counters()["modbus_disconnect"] >= 1
    finally:
        await sim.stop()


async def test_rtu_over_a_pty_null_modem(tmp_path: Path) -> None:
    bridge = PtyBridge().start()
    sim = ModbusSimulator({1: load_profile("xy-md02"), 2: load_profile("pzem016")}, seed=3)
    sim.set(1, "humidity", 55.5)
    sim.set(2, "current", 1.234)
    try:
        await sim.start_rtu(bridge.a, baudrate=9600)
        text = config(tmp_path, 0, "[{unit: 1, name: th, profile: xy-md02}, {unit: 2, name: pz, profile: pzem016}]")
        text = text.replace("host: 127.0.0.1", f"transport: rtu\n        device: {bridge.b}\n        baud: 9600")
        text = text.replace("        port: 0\n", "")
        async with running_gateway(text) as gw:
            await wait_for(lambda: latest(gw, "th.humidity") is not None and latest(gw, "pz.current") is not None)
            assert latest(gw, "th.humidity") == pytest.approx(55.5)
            assert latest(gw, "pz.current") == pytest.approx(1.234)
            # a pulled RS485 cable: both slaves go silent, then answer again
            bridge.cut = True
            src = node(gw, "plant", "bus")
            await wait_for(lambda: src.health()["slaves"]["th"]["state"] == "down")
            bridge.cut = False
            n = count(gw, "th.humidity")
            await wait_for(lambda: count(gw, "th.humidity") > n, timeout=10)
            assert src.health()["slaves"]["th"]["state"] == "ok"
            # line noise: every frame fails its CRC, so no reply is valid; the points go bad, then recover
            bridge.corrupt = True
            await wait_for(lambda: src.health()["slaves"]["pz"]["state"] == "down")
            bridge.corrupt = False
            n = count(gw, "pz.current")
            await wait_for(lambda: count(gw, "pz.current") > n, timeout=10)
            assert gw.state == "running"
    finally:
        await sim.stop()
        bridge.close()


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(config(tmp_path, 502, "[{unit: 1, profile: nope}, {unit: 2}]"), "t.yaml", {})
    text = "\n".join(str(i) for i in err.value.issues)
    assert "unknown device profile 'nope'" in text and "sdm120" in text, text
    assert "either `profile`" in text, text


async def test_rtu_port_missing_at_start_then_plugged_in(tmp_path: Path) -> None:
    link = tmp_path / "ttyRS485"
    text = config(tmp_path, 0, "[{unit: 1, name: th, profile: xy-md02}]")
    text = text.replace("host: 127.0.0.1", f"transport: rtu\n        device: {link}").replace("        port: 0\n", "")
    async with running_gateway(text) as gw:
        src = node(gw, "plant", "bus")
        await wait_for(lambda: src.health()["state"] == "down")
        assert str(link) in src.health()["reason"], src.health()
        _status, body = await get(gw, "/healthz")
        assert body["status"] == "degraded", body
        bridge = PtyBridge().start()
        sim = ModbusSimulator({1: load_profile("xy-md02")})
        try:
            await sim.start_rtu(bridge.a)
            link.symlink_to(bridge.b)
            await wait_for(lambda: latest(gw, "th.temperature") is not None, timeout=10)
            # every point was marked bad while the port was missing; each poll group clears its own
            # points when it reads them, so the source is "up" once the settings group has been read too
            await wait_for(lambda: src.health()["state"] == "up", timeout=10)
            assert not src.health()["slaves"]["th"].get("bad"), src.health()
        finally:
            await sim.stop()
            bridge.close()


# --- malformed replies ----------------------------------------------------------------------
# No library server sends a short reply, a reply for another function or unit, an inconsistent
# byte count or a bad CRC on purpose, so the peer below is a plain asyncio Modbus TCP server (and,
# for RTU, a pty whose far end answers with frames written by hand). Unit 1 misbehaves; unit 2 is
# a healthy slave on the same bus, whose readings must keep coming.

Reply = Callable[[int, int, int], tuple[int, bytes]]  # (unit, function, count) -> (unit sent, PDU)


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
    handlers: set[asyncio.Task[None]] = set()

    async def start(reply: Reply) -> int:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                while True:
                    tid, _pid, length, unit = struct.unpack(">HHHB", await r.readexactly(7))
                    fc, _addr, n = struct.unpack(">BHH", (await r.readexactly(length - 1))[:5])
                    sent_unit, pdu = reply(unit, fc, n)
                    w.write(struct.pack(">HHHB", tid, 0, len(pdu) + 1, sent_unit) + pdu)
                    await w.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                w.close()
                handlers.discard(task)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for s in servers:
        s.close()
    for t in list(handlers):  # a connection the gateway left open: its writer closes in the finally
        t.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    for s in servers:
        await s.wait_closed()


POINTS = "[" + ", ".join(f"{{name: r{i}, address: {i}}}" for i in range(10)) + "]"
MIXED = f"[{{unit: 1, name: bad, points: {POINTS}}}, {{unit: 2, name: good, points: {POINTS}}}]"


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
    async with running_gateway(config(tmp_path, port, MIXED)) as gw:
        await check_only_the_bad_slave_suffers(gw, MISBEHAVIOURS[misbehaviour][1])


async def test_reply_from_another_slave_on_the_bus_is_a_timeout(tmp_path: Path, tcp_slave: Any) -> None:
    """A unit on the same bus answering is most likely a late reply: silence for the slave asked, not a bad reply."""

    def reply(unit: int, fc: int, n: int) -> tuple[int, bytes]:
        return 2, registers(fc, list(range(100, 100 + n)))  # unit 2 answers every request

    port = await tcp_slave(reply)
    async with running_gateway(config(tmp_path, port, MIXED)) as gw:
        src = node(gw, "plant", "bus")
        await wait_for(lambda: src.counters()["modbus_timeout"] >= 2 and count(gw, "good.r0") >= 3)
        assert src.counters()["modbus_bad_reply"] == 0, src.counters()
        assert src.health()["slaves"]["bad"]["bad"]["r0"] == "no reply within 0.3s"


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
        text = config(tmp_path, 0, MIXED).replace("        port: 0\n", "")
        text = text.replace(
            "host: 127.0.0.1", f"transport: rtu\n        device: {os.ttyname(slave)}\n        baud: 115200"
        )
        async with running_gateway(text) as gw:
            await check_only_the_bad_slave_suffers(gw, reason)
    finally:
        loop.remove_reader(master)
        os.close(master)
        os.close(slave)
