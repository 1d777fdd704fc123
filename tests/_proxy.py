"""A TCP proxy to a broker for fault tests: what passes each way can be held or swallowed, and the
line cut. Subclasses decide per read how much goes through (:meth:`LineProxy.passes`); the MQTT
framer lets them count packets by kind."""

from __future__ import annotations

import asyncio
from typing import Self


class MqttFramer:
    """Splits one direction of an MQTT byte stream into packets; ``feed`` returns ``(offset,
    first byte)`` of each packet that starts in the bytes given (offset 0 for one whose fixed
    header began in earlier bytes)."""

    def __init__(self) -> None:
        self._left = 0  # bytes of the current packet still to come
        self._header = bytearray()  # a fixed header split across reads
        self._start = 0

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        starts: list[tuple[int, int]] = []
        i = 0
        self._start = 0
        while i < len(data):
            if self._left:
                step = min(self._left, len(data) - i)
                self._left -= step
                i += step
                continue
            if not self._header:
                self._start = i
            self._header.append(data[i])
            i += 1
            h = self._header
            if len(h) >= 2 and not h[-1] & 0x80:  # the remaining length's last byte
                length = sum((b & 0x7F) << (7 * n) for n, b in enumerate(h[1:]))
                starts.append((self._start, h[0]))
                self._left = length
                self._header = bytearray()
        return starts


class LineProxy:
    """Listens on a free loopback port (:attr:`port`) and forwards each connection to
    127.0.0.1:``target_port``. Every read goes through :meth:`passes`, which says how many of its
    first bytes go on (all of them here); each direction of a connection has its own
    :class:`MqttFramer` for subclasses that count packets."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def passes(self, data: bytes, upstream: bool, framer: MqttFramer) -> int:
        """How many of ``data``'s first bytes go on; ``upstream``: from the client to the broker."""
        return len(data)

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            w.close()
            return
        self._writers += [w, uw]
        for src, dst, upstream in ((r, uw, True), (ur, w, False)):
            t = asyncio.create_task(self._pipe(src, dst, MqttFramer(), upstream))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, framer: MqttFramer, upstream: bool
    ) -> None:
        try:
            while data := await src.read(65536):
                if keep := self.passes(data, upstream, framer):
                    dst.write(data[:keep])
                    await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.transport.abort()

    def cut(self) -> None:
        """Drop every connection through the line (the client reconnects)."""
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
