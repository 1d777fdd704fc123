"""Field-device sources: ``serial`` (line and framed codecs), ``modbus`` (RTU and TCP polling), ``websocket``.

Each keeps reading when cables are pulled: a port or device that fails is retried with capped,
jittered backoff, its ``health()`` says ``down`` with the reason meanwhile, and it resumes by
itself. Bad input never stops a source: every rejected line, frame or register read is counted by
kind and dead-lettered with the reason.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

import serial
from pydantic import Field
from serial_asyncio_fast import create_serial_connection

from firmware_bridges import CodecOptions, DecodeError, Reading, make_decoder
from gateway._retry import backoff
from gateway.engine import SourceQueue
from gateway.events import Event
from gateway.node import Duration, NodeOptions, Source, register

__all__ = ["SerialSource"]

log = logging.getLogger(__name__)


class _Health:
    """A device link's state for ``health()``: up/down with the reason, since when, how often lost."""

    def __init__(self, what: str):
        self.what = what
        self.state = "starting"
        self.reason: str | None = None
        self.since = 0.0
        self.losses = 0
        self.next_retry: float | None = None

    def up(self, now: float) -> None:
        self.state, self.reason, self.since, self.next_retry = "up", None, now, None

    def down(self, now: float, reason: str, retry_in: float) -> None:
        if self.state != "down":
            self.since = now
            if self.state == "up":
                self.losses += 1
        self.state, self.reason, self.next_retry = "down", reason, retry_in

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"state": self.state, "device": self.what, "since": self.since, "losses": self.losses}
        if self.reason:
            d["reason"] = self.reason
        if self.next_retry is not None:
            d["retry_in"] = round(self.next_retry, 3)
        return d


# --- serial ---------------------------------------------------------------------------------

_PARITY = {"none": serial.PARITY_NONE, "even": serial.PARITY_EVEN, "odd": serial.PARITY_ODD,
           "mark": serial.PARITY_MARK, "space": serial.PARITY_SPACE}


class SerialOptions(NodeOptions):
    type: Literal["serial"]
    port: str = Field(description="Device path (/dev/ttyUSB0, /dev/serial/by-id/…) or a pyserial URL "
                                  "(socket://host:port, rfc2217://…).")
    baud: int = Field(9600, gt=0, description="Baud rate.")
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["none", "even", "odd", "mark", "space"] = "none"
    stopbits: Literal[1, 1.5, 2] = 1
    flow_control: Literal["none", "rtscts", "dsrdtr", "xonxoff"] = "none"
    codec: CodecOptions = Field(description="What the device sends: json, csv, kv, nmea or cobs (with options).")
    reconnect_max: Duration = Field(30.0, gt=0, description="Longest wait between attempts to reopen the port.")
    batch: int = Field(500, ge=1, le=100_000, description="Largest micro-batch handed to the pipeline.")


class _SerialProtocol(asyncio.Protocol):
    def __init__(self, source: SerialSource):
        self.source = source
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.source._on_data(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


@register
class SerialSource(Source):
    """Read a serial port through an asyncio transport and decode it with a firmware codec.

    Bytes are decoded in the transport's read callback and handed over as one batch per read;
    when the pipeline queue is full, the transport stops reading (the UART and OS buffers hold
    the rest, then the device's flow control) until the queue drains to half.
    """

    Options = SerialOptions
    options: SerialOptions

    def __init__(self, options: SerialOptions, ctx: Any):
        super().__init__(options, ctx)
        self._decoder = make_decoder(options.codec)
        self._health = _Health(options.port)
        self._transport: asyncio.Transport | None = None
        self._out: SourceQueue | None = None
        self.n_bytes = 0
        self.n_malformed = 0
        self.by_kind: dict[str, int] = {}

    def health(self) -> dict[str, Any]:
        h = self._health.as_dict()
        h["bytes"] = self.n_bytes
        h["decoder"] = dict(self._decoder.stats)
        return h

    def counters(self) -> dict[str, int]:
        c = super().counters()
        c["malformed"] = self.n_malformed
        for kind, n in self.by_kind.items():
            c[f"malformed_{kind}"] = n
        return c

    # reading ------------------------------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        self.n_bytes += len(data)
        readings, errors = self._decoder.feed(data)
        if errors:
            self._reject(errors)
        if readings:
            self._hand_over(readings)

    def _reject(self, errors: list[DecodeError]) -> None:
        port = self.options.port
        for e in errors:
            self.n_malformed += 1
            self.by_kind[e.kind] = self.by_kind.get(e.kind, 0) + 1
            self.n_errors += 1
            self.ctx.dead_letters.record(self.ctx.pipeline, self.id, f"{port}: {e}", None, e.raw)

    def _hand_over(self, readings: list[Reading]) -> None:
        now = self.ctx.clock()
        sid = self.id
        self.n_in += len(readings)
        events = [Event(r.key, now if r.ts is None else r.ts, r.value, sid) for r in readings]
        out = self._out
        if out is None:
            return
        step = self.options.batch
        room = True
        for i in range(0, len(events), step):
            room = out.put_nowait(events[i : i + step])
        t = self._transport
        if not room and t is not None and t.is_reading():
            t.pause_reading()
            out.when_room(lambda: self._resume(t))

    def _resume(self, t: asyncio.Transport) -> None:
        if t is self._transport and not t.is_closing():
            t.resume_reading()

    async def _open(self) -> tuple[asyncio.Transport, _SerialProtocol]:
        o = self.options
        flow = o.flow_control
        transport, protocol = await create_serial_connection(
            asyncio.get_running_loop(), lambda: _SerialProtocol(self), o.port,
            baudrate=o.baud, bytesize=o.bytesize, parity=_PARITY[o.parity], stopbits=o.stopbits,
            rtscts=flow == "rtscts", dsrdtr=flow == "dsrdtr", xonxoff=flow == "xonxoff",
        )
        return transport, protocol  # type: ignore[return-value]

    async def run(self, output: SourceQueue) -> None:
        o = self.options
        self._out = output
        attempt = 0
        while True:
            try:
                transport, protocol = await self._open()
            except (serial.SerialException, OSError, ValueError) as exc:
                delay = backoff(attempt, o.reconnect_max)
                attempt += 1
                reason = f"cannot open: {exc}"
                if self._health.state != "down":
                    log.warning("serial %s/%s: %s %s; retrying with backoff", self.ctx.pipeline, self.id,
                                o.port, reason)
                self._health.down(self.ctx.clock(), reason, delay)
                await asyncio.sleep(delay)
                continue
            self._transport = transport
            resumed = self._health.state == "down"
            self._health.up(self.ctx.clock())
            attempt = 0
            log.info("serial %s/%s: %s %s at %d baud (%s)", self.ctx.pipeline, self.id, o.port,
                     "resumed" if resumed else "open", o.baud, o.codec.type)
            try:
                exc = await protocol.lost
            finally:
                self._transport = None
                if not transport.is_closing():
                    transport.abort()
                    # the transport closes the port in a thread; wait so nothing outlives the node
                    try:
                        await asyncio.wait_for(asyncio.shield(protocol.lost), 5)
                    except (TimeoutError, asyncio.CancelledError):
                        pass
                self._reject(self._decoder.flush())
            reason = f"lost: {exc}" if exc else "closed"
            delay = backoff(0, o.reconnect_max)
            attempt = 1
            log.warning("serial %s/%s: %s %s; reopening", self.ctx.pipeline, self.id, o.port, reason)
            self._health.down(self.ctx.clock(), reason, delay)
            await asyncio.sleep(delay)
