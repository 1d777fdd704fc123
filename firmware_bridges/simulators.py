"""Simulated field devices for tests and demos: a serial device on a pty, speaking any codec.

:class:`PtyDevice` is the device's end of a pseudo-terminal pair; the gateway opens the other end
(``path``, or a stable symlink like udev's ``/dev/serial/by-id/…``) as if it were a USB serial
adapter. ``unplug()`` and ``plug()`` make the port vanish and come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import time
import tty
from pathlib import Path
from typing import Any

from .codecs import CobsCodec, CsvCodec, JsonCodec, KeyValueCodec, NmeaCodec, make_encoder

__all__ = ["PtyDevice", "SerialSimulator", "sample_record"]


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
            "gps.lat": 52.52 + 0.001 * math.sin(t / 60), "gps.lon": 13.405 + 0.001 * math.cos(t / 60),
            "gps.alt": 34.0 + rng.gauss(0, 0.5), "gps.sats": 9, "gps.hdop": 0.9,
            "gps.speed": 1.2 + rng.random(), "gps.course": (t * 3) % 360, "ts": time.time(),
            "wind.rel.angle": (180 + 40 * math.sin(t / 30)) % 360, "wind.rel.speed": max(0.0, 5 + rng.gauss(0, 1)),
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
        return {c: round(20 + i + math.sin(t / 60), 2) for i, c in enumerate(codec.columns)
                if c not in (codec.ts_field, codec.device_field)}
    assert isinstance(codec, JsonCodec | KeyValueCodec | CsvCodec)
    return {"temp": temp, "hum": hum, "vbat": round(3.3 - t / 1e6, 3)}


class SerialSimulator:
    """A serial device: writes a reading every ``interval`` seconds, with optional line noise."""

    def __init__(self, codec: Any, device: PtyDevice, interval: float = 1.0, noise: float = 0.0,
                 seed: int | None = None):
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
