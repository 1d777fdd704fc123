"""Simulated field devices for tests and demos: a serial device on a pty speaking any codec, and
Modbus slaves (TCP or RTU, pymodbus) serving device maps with changing values and optional faults.

:class:`PtyDevice` is the device's end of a pseudo-terminal pair; the gateway opens the other end
(``path``, or a stable symlink like udev's ``/dev/serial/by-id/…``) as if it were a USB serial
adapter. ``unplug()`` and ``plug()`` make the port vanish and come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import random
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .codecs import CobsCodec, CsvCodec, JsonCodec, KeyValueCodec, NmeaCodec, make_encoder
from .modbus import DeviceMap, Point, encode_point

__all__ = ["ModbusFault", "ModbusSimulator", "PtyBridge", "PtyDevice", "SerialSimulator", "sample_record"]


class PtyDevice:
    """The device side of a pty pair. Writes go to whoever opened :attr:`path` (or :attr:`link`)."""

    def __init__(self, link: str | Path | None = None):
        self.link = Path(link) if link is not None else None
        self.master: int | None = None
        self.slave: int | None = None
        self.path = ""
        self.plug()

    def plug(self) -> str:
        """Connect (again): a fresh pty pair, raw from the start so no byte is translated."""
        if self.master is not None:
            return self.path
        master, slave = os.openpty()
        tty.setraw(slave)
        tty.setraw(master)
        os.set_blocking(master, False)
        self.master, self.slave = master, slave
        self.path = os.ttyname(slave)
        if self.link is not None:
            tmp = self.link.with_name(self.link.name + ".new")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(self.path)
            tmp.replace(self.link)  # atomic re-point, as udev does
        return self.path

    def unplug(self) -> None:
        """The device vanishes: the pty is closed and the link removed; readers get an I/O error."""
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()
        for fd in (self.master, self.slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.master = self.slave = None

    close = unplug

    @property
    def plugged(self) -> bool:
        return self.master is not None

    def write(self, data: bytes) -> int:
        """Write what fits without blocking; returns the number of bytes written (0 when the pty is full)."""
        if self.master is None:
            raise OSError("the simulated device is unplugged")
        try:
            return os.write(self.master, data)
        except BlockingIOError:
            return 0

    async def send(self, data: bytes) -> None:
        """Write all of ``data``, waiting while the pty buffer is full (the reader is slow or paused)."""
        view = memoryview(data)
        while view:
            n = self.write(view)
            view = view[n:]
            if view:
                await asyncio.sleep(0.005)

    def __enter__(self) -> PtyDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unplug()


def sample_record(codec: Any, t: float, rng: random.Random) -> dict[str, float]:
    """A realistic reading for a device speaking ``codec`` at ``t`` seconds into the run."""
    if isinstance(codec, NmeaCodec):
        return {
            "gps.lat": 52.52 + 0.001 * math.sin(t / 60),
            "gps.lon": 13.405 + 0.001 * math.cos(t / 60),
            "gps.alt": 34.0 + rng.gauss(0, 0.5),
            "gps.sats": 9,
            "gps.hdop": 0.9,
            "gps.speed": 1.2 + rng.random(),
            "gps.course": (t * 3) % 360,
            "ts": time.time(),
            "wind.rel.angle": (180 + 40 * math.sin(t / 30)) % 360,
            "wind.rel.speed": max(0.0, 5 + rng.gauss(0, 1)),
            "xdr.AIRT": round(18 + 3 * math.sin(t / 300), 2),
        }
    if isinstance(codec, CobsCodec):
        rec: dict[str, float] = {}
        for i, f in enumerate(codec.fields):
            if f.type == "pad":
                continue
            if f.name == codec.ts_field:
                rec[f.name] = int(time.time())
                continue
            base = 20.0 + 10 * i + 2 * math.sin(t / 30 + i)
            if f.type.startswith("u"):
                base = abs(base)
            rec[f.name] = base
        return rec
    temp = round(21.0 + 2 * math.sin(t / 60) + rng.gauss(0, 0.1), 2)
    hum = round(45.0 + 5 * math.cos(t / 90) + rng.gauss(0, 0.3), 1)
    if isinstance(codec, CsvCodec) and codec.columns:
        return {
            c: round(20 + i + math.sin(t / 60), 2)
            for i, c in enumerate(codec.columns)
            if c not in (codec.ts_field, codec.device_field)
        }
    assert isinstance(codec, JsonCodec | KeyValueCodec | CsvCodec)
    return {"temp": temp, "hum": hum, "vbat": round(3.3 - t / 1e6, 3)}


class SerialSimulator:
    """A serial device: writes a reading every ``interval`` seconds, with optional line noise."""

    def __init__(
        self, codec: Any, device: PtyDevice, interval: float = 1.0, noise: float = 0.0, seed: int | None = None
    ):
        self.codec = codec
        self.device = device
        self.interval = interval
        self.noise = noise
        self.rng = random.Random(seed)
        self.encoder = make_encoder(codec)
        self.sent = 0

    def next_bytes(self, t: float) -> bytes:
        data = self.encoder.encode(sample_record(self.codec, t, self.rng))
        if self.noise and self.rng.random() < self.noise:
            # corrupt one byte, as a noisy line would: the gateway must dead-letter it and resync
            i = self.rng.randrange(len(data) - 1) if len(data) > 1 else 0
            data = data[:i] + bytes([data[i] ^ (1 << self.rng.randrange(7))]) + data[i + 1 :]
        return data

    async def run(self, count: int | None = None) -> None:
        start = time.monotonic()
        while count is None or self.sent < count:
            await self.device.send(self.next_bytes(time.monotonic() - start))
            self.sent += 1
            await asyncio.sleep(self.interval)


# --- a null-modem cable between two ptys ------------------------------------------------------


class PtyBridge:
    """Two pty pairs joined like a null-modem cable: what is written to ``a`` is read at ``b`` and back.

    Modbus RTU tests run a pymodbus serial server on one end and the gateway on the other. The
    relay runs in the event loop (``loop.add_reader`` on both master ends), so start it inside one.
    """

    def __init__(self) -> None:
        self._a = PtyDevice()
        self._b = PtyDevice()
        self.a, self.b = self._a.path, self._b.path
        self.cut = False  # True: the cable is pulled, bytes are dropped
        self.corrupt = False  # True: one bit of every chunk is flipped (CRC errors on the line)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> PtyBridge:
        self._loop = asyncio.get_running_loop()
        assert self._a.master is not None and self._b.master is not None
        self._loop.add_reader(self._a.master, self._relay, self._a.master, self._b.master)
        self._loop.add_reader(self._b.master, self._relay, self._b.master, self._a.master)
        return self

    def _relay(self, src: int, dst: int) -> None:
        try:
            data = os.read(src, 65536)
        except (BlockingIOError, OSError):
            return
        if data and self.corrupt:
            data = bytes([data[0] ^ 0x10]) + data[1:]
        if data and not self.cut:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(dst, data)

    def close(self) -> None:
        if self._loop is not None:
            for dev in (self._a, self._b):
                if dev.master is not None:
                    self._loop.remove_reader(dev.master)
        self._a.unplug()
        self._b.unplug()


# --- Modbus devices ---------------------------------------------------------------------------


@dataclass
class ModbusFault:
    """How a simulated slave misbehaves: an exception code for every read, a reply delay, dropped replies."""

    exception: int | None = None
    delay: float = 0.0
    drop: float = 0.0  # probability of not answering at all (the client times out)
    dead: bool = False  # never answers


def _typical(p: Point, unit: int, t: float, rng: random.Random) -> float:
    """A plausible, slowly changing value for a point, by its unit and name."""
    wave = math.sin(t / 30.0 + unit)
    u = (p.unit or "").lower()
    n = p.name.lower()
    if "offset" in n or "alarm" in n or "code" in n:
        v = 0.0
    elif n == "address":
        v = float(unit)
    elif u == "v":
        v = 230.0 + 2.0 * wave + rng.gauss(0, 0.2)
    elif u == "a":
        v = 5.0 + 3.0 * wave
    elif u in ("w", "va", "var"):
        v = 1150.0 + 690.0 * wave
    elif u == "hz":
        v = 50.0 + 0.05 * wave
    elif u in ("kwh", "kvarh", "wh"):
        v = 1000.0 + t * (0.001 if u != "wh" else 1.0)
    elif u == "°c":
        v = 21.0 + 2.0 * wave + rng.gauss(0, 0.05)
    elif u == "%":
        v = 45.0 + 5.0 * wave
    elif u == "deg":
        v = 18.0 + 5.0 * wave
    elif "factor" in n:
        v = 0.95 + 0.03 * wave
    elif p.is_bit_table or p.type == "bit":
        v = float(int(t / 10) % 2)
    else:
        v = 100.0 + 10.0 * wave
    if p.type.startswith("uint"):
        v = max(v, 0.0)
    return v


class ModbusSimulator:
    """Slaves serving device maps through a real pymodbus server (TCP or RTU), values changing with time.

    ``set(unit, point, value)`` pins a value (tests); ``faults[unit]`` injects misbehaviour.
    """

    def __init__(
        self, slaves: dict[int, DeviceMap], seed: int | None = None, faults: dict[int, ModbusFault] | None = None
    ):
        self.slaves = slaves
        self.faults: dict[int, ModbusFault] = faults or {}
        self.rng = random.Random(seed)
        self.pinned: dict[tuple[int, str], float | str] = {}
        self.requests: dict[int, int] = {u: 0 for u in slaves}
        self._t0 = time.monotonic()
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self.port: int | None = None

    def set(self, unit: int, point: str, value: float | str) -> None:
        self.pinned[(unit, point)] = value

    def value(self, unit: int, p: Point) -> float | str:
        pinned = self.pinned.get((unit, p.name))
        if pinned is not None:
            return pinned
        if p.type == "string":
            return f"SIM{unit:03d}"
        return _typical(p, unit, time.monotonic() - self._t0, self.rng)

    def _blocks(self, dmap: DeviceMap) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        from pymodbus.simulator import DataType, SimData

        out: list[list[Any]] = []
        for table in ("coil", "discrete", "holding", "input"):
            pts = [p for p in dmap.points if p.table == table]
            bits = table in ("coil", "discrete")
            kind = DataType.BITS if bits else DataType.REGISTERS
            if not pts:
                out.append([SimData(0, count=16 if bits else 1, values=False if bits else 0, datatype=kind)])
                continue
            lo = min(p.address for p in pts)
            hi = max(p.address + p.count for p in pts)
            if bits:
                lo -= lo % 16
                hi += -hi % 16
            out.append([SimData(lo, count=hi - lo, values=False if bits else 0, datatype=kind)])
        return out[0], out[1], out[2], out[3]

    async def _action(
        self, unit: int, fc: int, start: int, address: int, count: int, regs: list[int], set_values: Any
    ) -> Any:
        from pymodbus.constants import ExcCodes

        self.requests[unit] = self.requests.get(unit, 0) + 1
        fault = self.faults.get(unit)
        if fault is not None:
            if fault.dead or (fault.drop and self.rng.random() < fault.drop):
                await asyncio.sleep(3600)  # never answers; cancelled when the server stops
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.exception is not None:
                return ExcCodes(fault.exception)
        table = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}.get(fc)
        if table is None or set_values is not None:
            return None
        dmap = self.slaves[unit]
        for p in dmap.points:
            if p.table != table or p.address + p.count <= address or p.address >= address + count:
                continue
            words = encode_point(p, self.value(unit, p), dmap.order(p))
            if table in ("coil", "discrete"):
                i, b = divmod(p.address - start * 16, 16)
                if 0 <= i < len(regs):
                    regs[i] = (regs[i] | (1 << b)) if words[0] else (regs[i] & ~(1 << b))
                continue
            for k, w in enumerate(words):
                i = p.address - start + k
                if 0 <= i < len(regs):
                    if p.type == "bit":
                        mask = 1 << (p.bit or 0)
                        regs[i] = (regs[i] & ~mask) | (w & mask)
                    else:
                        regs[i] = w
        return None

    def devices(self) -> list[Any]:
        from pymodbus.simulator import SimDevice

        return [
            SimDevice(id=unit, simdata=self._blocks(dmap), action=functools.partial(self._action, unit))
            for unit, dmap in self.slaves.items()
        ]

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 5020) -> ModbusSimulator:
        from pymodbus.server import ModbusTcpServer

        self._server = ModbusTcpServer(self.devices(), address=(host, port))
        self.port = port
        return await self._serve()

    async def start_rtu(self, path: str, baudrate: int = 9600, parity: str = "N", stopbits: int = 1) -> ModbusSimulator:
        from pymodbus.framer import FramerType
        from pymodbus.server import ModbusSerialServer

        self._server = ModbusSerialServer(
            self.devices(),
            framer=FramerType.RTU,
            port=path,
            baudrate=baudrate,
            parity=parity,
            stopbits=stopbits,
            reconnect_delay=0.2,
        )
        return await self._serve()

    async def _serve(self) -> ModbusSimulator:
        await self._server.serve_forever(background=True)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()
            self._server = None
