"""Field-device sources: ``serial`` (line and framed codecs), ``modbus`` (RTU and TCP polling), ``websocket``.

Each keeps reading when cables are pulled: a port or device that fails is retried with capped,
jittered backoff, its ``health()`` says ``down`` with the reason meanwhile, and it resumes by
itself. Bad input never stops a source: every rejected line, frame or register read is counted by
kind and dead-lettered with the reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import select
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import serial
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer.rtu import FramerRTU
from serial_asyncio_fast import create_serial_connection

from firmware_bridges import CodecOptions, DecodeError, JsonCodec, make_decoder
from firmware_bridges.modbus import DeviceMap, Point, ReadBlock, decode_point, load_profile, plan_reads
from gateway.api import (
    Duration,
    Event,
    NodeOptions,
    Source,
    SourceOutput,
    backoff,
    max_future_field,
    register,
    secret_field,
)
from nodes._decoding import DecodingSource, DeviceHealth, to_events

__all__ = ["ModbusSource", "SerialSource", "WebSocketSource"]

log = logging.getLogger(__name__)


# --- serial ---------------------------------------------------------------------------------

# Bytes taken per read. pyserial-asyncio-fast reads 1 KiB per wakeup and has no setting for it:
# at speed (a USB CDC device, a burst from a buffering logger) every wakeup then carries a handful
# of lines through the whole pipeline. A read never waits for more than is there, so a larger
# size costs no latency; the kernel's tty buffer (4 KiB) is what one read can see.
READ_SIZE = 16384
# Seconds between checks that a port whose reading is paused (pipeline full) is still there.
HANGUP_CHECK = 1.0


def set_read_size(transport: asyncio.BaseTransport, size: int) -> None:
    """Let one wakeup of a serial transport read up to ``size`` bytes (a private attribute: checked)."""
    if isinstance(getattr(transport, "_max_read_size", None), int):
        transport._max_read_size = size  # type: ignore[attr-defined]


_PARITY = {
    "none": serial.PARITY_NONE,
    "even": serial.PARITY_EVEN,
    "odd": serial.PARITY_ODD,
    "mark": serial.PARITY_MARK,
    "space": serial.PARITY_SPACE,
}


class SerialOptions(NodeOptions):
    type: Literal["serial"]
    max_future: Duration | None = max_future_field()
    port: str = Field(
        description="Device path (/dev/ttyUSB0, /dev/serial/by-id/…) or a pyserial URL "
        "(socket://host:port, rfc2217://…)."
    )
    baud: int = Field(9600, gt=0, description="Baud rate.")
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["none", "even", "odd", "mark", "space"] = "none"
    stopbits: Literal[1, 1.5, 2] = 1
    flow_control: Literal["none", "rtscts", "dsrdtr", "xonxoff"] = "none"
    codec: CodecOptions = Field(description="What the device sends: json, csv, kv, nmea or cobs (with options).")
    reconnect_max: Duration = Field(30.0, gt=0, description="Longest wait between attempts to reopen the port.")
    batch: int = Field(500, ge=1, le=100_000, description="Largest micro-batch handed to the pipeline.")


class _PortReader:
    """A serial transport as the engine's backpressure sees a reader (``SourceOutput.pause_while_full``).

    pyserial-asyncio's transport has no ``is_reading()``, so the state is kept here; one reader
    per opened port, so a resume that comes after the port was reopened touches nothing.
    """

    __slots__ = ("_on_pause", "reading", "transport")

    def __init__(self, transport: asyncio.Transport, on_pause: Any):
        self.transport = transport
        self._on_pause = on_pause
        self.reading = True

    def pause_reading(self) -> None:
        if self.reading and not self.transport.is_closing():
            self.reading = False
            self.transport.pause_reading()
            self._on_pause(self)

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            if not self.transport.is_closing():
                self.transport.resume_reading()


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
class SerialSource(DecodingSource):
    """Read a serial port through an asyncio transport and decode it with a firmware codec.

    Bytes are decoded in the transport's read callback and handed over as one batch per read;
    when the pipeline queue is full, the engine pauses the transport's reading (the UART and OS
    buffers hold the rest, then the device's flow control) until the queue drains to half.
    """

    Options = SerialOptions
    options: SerialOptions

    def __init__(self, options: SerialOptions, ctx: Any):
        super().__init__(options, ctx)
        self._decoder = make_decoder(options.codec)
        self._health = DeviceHealth(options.port)
        self._transport: asyncio.Transport | None = None
        self._reader: _PortReader | None = None
        self._out: SourceOutput | None = None
        self.n_bytes = 0
        self._hangup_check: asyncio.TimerHandle | None = None  # one pending _check_hangup at most

    def health(self) -> dict[str, Any]:
        h = self._health.as_dict()
        h["bytes"] = self.n_bytes
        h["paused"] = self._reader is not None and not self._reader.reading
        h["decoder"] = dict(self._decoder.stats)
        return h

    # reading ------------------------------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        self.n_bytes += len(data)
        events, errors = self._decoder.feed_as(data, Event, self.ctx.clock(), self.id)
        if errors:
            self._reject_all(errors)
        if events:
            self._hand_over(events)

    def _reject_all(self, errors: list[DecodeError]) -> None:
        for e in errors:
            self._reject(self.options.port, e.kind, str(e), e.raw)

    def _hand_over(self, events: list[Event]) -> None:
        self.n_in += len(events)
        out = self._out
        if out is None:
            return
        step = self.options.batch
        room = True
        for i in range(0, len(events), step):
            room = out.put_nowait(events[i : i + step])
        if not room and self._reader is not None:
            out.pause_while_full(self._reader)

    def _watch_hangup(self, reader: _PortReader) -> None:
        if self._hangup_check is None:
            self._hangup_check = asyncio.get_running_loop().call_later(
                HANGUP_CHECK, self._check_hangup, reader.transport
            )

    def _check_hangup(self, t: asyncio.Transport) -> None:
        """While paused nothing reads the port, so nothing would notice it vanish: ask the fd.

        A vanished USB adapter or a closed pty raises POLLHUP/POLLERR on the port's descriptor.
        Reading is then resumed, so what the port still holds is read and its error ends the
        connection as usual (reopened with backoff, health down meanwhile).
        """
        self._hangup_check = None
        reader = self._reader
        if reader is None or reader.transport is not t or reader.reading or t.is_closing():
            return  # the next pause starts a new check
        fd = getattr(getattr(t, "serial", None), "fd", None)
        if fd is None:
            return
        poller = select.poll()
        poller.register(fd, 0)  # no events asked for: hang-ups and errors are always reported
        try:
            hung = any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _fd, ev in poller.poll(0))
        except OSError:
            hung = True
        if not hung:
            self._hangup_check = asyncio.get_running_loop().call_later(HANGUP_CHECK, self._check_hangup, t)
            return
        log.info("serial %s/%s: %s hung up while reading was paused", self.ctx.pipeline, self.id, self.options.port)
        reader.resume_reading()

    async def _open(self) -> tuple[asyncio.Transport, _SerialProtocol]:
        o = self.options
        flow = o.flow_control
        transport, protocol = await create_serial_connection(
            asyncio.get_running_loop(),
            lambda: _SerialProtocol(self),
            o.port,
            baudrate=o.baud,
            bytesize=o.bytesize,
            parity=_PARITY[o.parity],
            stopbits=o.stopbits,
            rtscts=flow == "rtscts",
            dsrdtr=flow == "dsrdtr",
            xonxoff=flow == "xonxoff",
        )
        set_read_size(transport, READ_SIZE)
        return transport, protocol  # type: ignore[return-value]

    async def run(self, output: SourceOutput) -> None:
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
                    log.warning(
                        "serial %s/%s: %s %s; retrying with backoff", self.ctx.pipeline, self.id, o.port, reason
                    )
                self._health.down(self.ctx.clock(), reason, delay)
                await asyncio.sleep(delay)
                continue
            self._transport = transport
            self._reader = _PortReader(transport, self._watch_hangup)
            resumed = self._health.state == "down"
            self._health.up(self.ctx.clock())
            attempt = 0
            log.info(
                "serial %s/%s: %s %s at %d baud (%s)",
                self.ctx.pipeline,
                self.id,
                o.port,
                "resumed" if resumed else "open",
                o.baud,
                o.codec.type,
            )
            try:
                exc = await protocol.lost
            finally:
                self._transport = None
                self._reader = None
                if self._hangup_check is not None:
                    self._hangup_check.cancel()
                    self._hangup_check = None
                if not transport.is_closing():
                    transport.abort()
                    # the transport closes the port in a thread; wait so nothing outlives the node
                    try:
                        await asyncio.wait_for(asyncio.shield(protocol.lost), 5)
                    except (TimeoutError, asyncio.CancelledError):
                        pass
                self._reject_all(self._decoder.flush())
            reason = f"lost: {exc}" if exc else "closed"
            delay = backoff(0, o.reconnect_max)
            attempt = 1
            log.warning("serial %s/%s: %s %s; reopening", self.ctx.pipeline, self.id, o.port, reason)
            self._health.down(self.ctx.clock(), reason, delay)
            await asyncio.sleep(delay)


# --- modbus ---------------------------------------------------------------------------------

_EXCEPTIONS = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


class SlaveOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: int = Field(ge=0, le=255, description="Modbus unit (slave) id.")
    name: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]*$", description="Key prefix for its points; default `unit<N>`."
    )
    profile: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]*$",  # a name, never a path: nothing outside config/devices/ is read
        description="A device profile from config/devices/ (e.g. sdm120).",
    )
    points: list[Point] | None = Field(None, description="The register map, when there is no profile.")
    groups: dict[str, Duration] = Field(default_factory=dict, description="Poll group -> interval (overrides).")
    max_gap: int | None = Field(None, ge=0, le=125, description="Overrides the map's max_gap.")
    word_order: Literal["big", "little"] | None = Field(None, description="Overrides the map's default.")
    byte_order: Literal["big", "little"] | None = None

    @model_validator(mode="after")
    def _one_map(self) -> SlaveOptions:
        if (self.profile is None) == (self.points is None):
            raise ValueError("give either `profile` (a device in config/devices/) or `points` (a register map)")
        if self.profile is not None:
            load_profile(self.profile)  # ValueError names the known profiles
        return self

    @property
    def key(self) -> str:
        return self.name or f"unit{self.unit}"

    def device_map(self) -> DeviceMap:
        dmap = load_profile(self.profile) if self.profile else DeviceMap(points=self.points or [])
        changes: dict[str, Any] = {}
        if self.max_gap is not None:
            changes["max_gap"] = self.max_gap
        if self.word_order:
            changes["word_order"] = self.word_order
        if self.byte_order:
            changes["byte_order"] = self.byte_order
        return dmap.model_copy(update=changes) if changes else dmap


class ModbusOptions(NodeOptions):
    type: Literal["modbus"]
    transport: Literal["tcp", "rtu"] = Field("tcp", description="tcp: Modbus TCP to host:port; rtu: RS485 serial.")
    host: str | None = Field(None, description="TCP: the device or gateway address.")
    port: int = Field(502, ge=1, le=65535, description="TCP port.")
    device: str | None = Field(None, description="RTU: the serial port (/dev/ttyUSB0).")
    baud: int = Field(9600, gt=0)
    parity: Literal["none", "even", "odd"] = "none"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    slaves: list[SlaveOptions] = Field(min_length=1, description="Devices on this bus or connection.")
    interval: Duration = Field(1.0, gt=0, description="Poll interval of groups without their own.")
    timeout: Duration = Field(1.0, gt=0, description="How long to wait for one reply.")
    reconnect_max: Duration = Field(30.0, gt=0, description="Longest wait between attempts to reconnect.")
    slave_retry_max: Duration = Field(30.0, gt=0, description="Longest wait before polling a silent slave again.")

    @model_validator(mode="after")
    def _endpoint(self) -> ModbusOptions:
        if self.transport == "tcp" and not self.host:
            raise ValueError("transport tcp needs `host`")
        if self.transport == "rtu" and not self.device:
            raise ValueError("transport rtu needs `device` (the serial port)")
        units = [s.unit for s in self.slaves]
        if len(set(units)) != len(units):
            raise ValueError("two slaves have the same unit id")
        keys = [s.key for s in self.slaves]
        if len(set(keys)) != len(keys):
            raise ValueError("two slaves have the same name")
        return self


class _Slave:
    def __init__(self, o: SlaveOptions):
        self.o = o
        self.unit = o.unit
        self.key = o.key
        self.map = o.device_map()
        self.bad: dict[str, str] = {}
        self.failures = 0
        self.retry_at = 0.0
        self.last_ok: float | None = None
        self.reads = 0

    def health(self) -> dict[str, Any]:
        state = "ok" if not self.bad else ("down" if self.failures else "degraded")
        d: dict[str, Any] = {"unit": self.unit, "state": state, "reads": self.reads, "last_ok": self.last_ok}
        if self.bad:
            d["bad"] = dict(self.bad)
        return d


@dataclass(slots=True)
class _Poll:
    slave: _Slave
    group: str
    interval: float
    blocks: list[ReadBlock]
    due: float = 0.0


class _LinkLost(Exception):
    pass


_FUNCTIONS = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}


class _ReplyWatch:
    """What pymodbus's framer did with the bytes that came back for the current request.

    pymodbus drops a reply that fails its CRC or comes from another unit without a word (the
    request then times out), and one whose PDU it cannot decode makes it close the connection,
    which would cost every slave on the bus a reconnect. Wrapping the client's framer lets the
    poller say why a request got no answer, and turns an undecodable reply into one failed
    request. ``problem`` is reset before each request. With a pymodbus whose framer is not where
    this looks (the version is pinned), the watch does nothing and such replies read as silence.
    """

    def __init__(self, client: Any, units: set[int]):
        self.problem: str | None = None
        self.raw: str | None = None  # the bytes of an undecodable reply, for the dead letter
        self._unit = 0
        framer = getattr(getattr(client, "ctx", None), "framer", None)
        if framer is None or not callable(getattr(framer, "decode", None)):
            return
        decode, handle = framer.decode, framer.handleFrame
        # bytes consumed with no frame: RTU drops a frame that fails its CRC; TCP, an empty PDU
        dropped = "a reply failed its CRC check" if isinstance(framer, FramerRTU) else "a reply with no PDU"

        def watched_decode(data: bytes) -> tuple[int, int, int, bytes]:
            used, unit, tid, frame = decode(data)
            if used and not frame:
                self.problem = dropped
            elif frame and self._unit and unit != self._unit and unit not in units:
                # a unit on this bus is most likely answering late, which is its own timeout
                self.problem = f"a reply came from unit {unit}"
            return used, unit, tid, frame

        def watched_handle(data: bytes, unit: int, tid: int) -> tuple[int, Any]:
            self._unit = unit
            try:
                return handle(data, unit, tid)
            except ModbusException:
                self.problem = "a reply could not be decoded"
                self.raw = bytes(data[:64]).hex(" ")
                return len(data), None  # dropped: the request times out, the link stays

        framer.decode = watched_decode
        framer.handleFrame = watched_handle


@register
class ModbusSource(Source):
    """Poll Modbus slaves (TCP or RTU) by register map; one task per bus, so requests never overlap.

    Each poll group of each slave has its own interval; its points are batched into as few reads
    as the protocol allows. An exception response marks the read's points bad with the reason and
    is retried next interval; a slave that does not answer is skipped for a backoff that grows to
    ``slave_retry_max``, so one dead slave costs the bus one timeout per retry, not per poll.
    Losing the connection (TCP) or port (RTU) marks everything down and reconnects with backoff.
    A full pipeline makes ``put`` wait, which simply delays the next poll.
    """

    Options = ModbusOptions
    options: ModbusOptions

    def __init__(self, options: ModbusOptions, ctx: Any):
        super().__init__(options, ctx)
        self.slaves = [_Slave(s) for s in options.slaves]
        what = f"{options.host}:{options.port}" if options.transport == "tcp" else str(options.device)
        self._health = DeviceHealth(what)
        self.polls: list[_Poll] = []
        for s in self.slaves:
            groups: dict[str, list[Point]] = {}
            for p in s.map.points:
                groups.setdefault(p.group, []).append(p)
            for g, pts in groups.items():
                interval = s.o.groups.get(g) or s.map.groups.get(g) or options.interval
                blocks = plan_reads(pts, s.map.max_registers, s.map.max_gap)
                self.polls.append(_Poll(s, g, float(interval), blocks))
        self.faults: dict[str, int] = {
            "exception": 0,  # the slave answered with an exception code
            "timeout": 0,  # no reply
            "bad_reply": 0,  # a reply that failed its CRC, came from another unit, or does not fit the read
            "nonfinite": 0,  # a value that decodes to NaN/inf
            "disconnect": 0,
        }
        self.n_reads = 0
        self.n_overruns = 0

    def health(self) -> dict[str, Any]:
        h = self._health.as_dict()
        h["slaves"] = {s.key: s.health() for s in self.slaves}
        if h["state"] == "up" and any(s.bad for s in self.slaves):
            h["state"] = "degraded"
            h["reason"] = "; ".join(f"{s.key}: {next(iter(s.bad.values()))}" for s in self.slaves if s.bad)
        return h

    def counters(self) -> dict[str, int]:
        c = super().counters()
        c["reads"] = self.n_reads
        c["malformed"] = self.faults["nonfinite"] + self.faults["bad_reply"]
        for k, v in self.faults.items():
            c[f"modbus_{k}"] = v
        return c

    def _client(self) -> Any:
        o = self.options
        if o.transport == "tcp":
            return AsyncModbusTcpClient(o.host or "", port=o.port, timeout=o.timeout, retries=0, reconnect_delay=0)
        return AsyncModbusSerialClient(
            o.device or "",
            baudrate=o.baud,
            bytesize=o.bytesize,
            parity={"none": "N", "even": "E", "odd": "O"}[o.parity],
            stopbits=o.stopbits,
            timeout=o.timeout,
            retries=0,
            reconnect_delay=0,
        )

    async def run(self, output: SourceOutput) -> None:
        o = self.options
        attempt = 0
        while True:
            client = self._client()
            watch = _ReplyWatch(client, {s.unit for s in self.slaves})
            try:
                ok = await client.connect()
                if not ok:
                    raise _LinkLost(f"cannot connect to {self._health.what}")
                resumed = self._health.state == "down"
                self._health.up(self.ctx.clock())
                attempt = 0
                log.info(
                    "modbus %s/%s: %s %s (%d slaves)",
                    self.ctx.pipeline,
                    self.id,
                    "reconnected to" if resumed else "connected to",
                    self._health.what,
                    len(self.slaves),
                )
                now = self.ctx.monotonic()
                for p in self.polls:
                    p.due = now
                await self._poll_loop(client, watch, output)
            except _LinkLost as exc:
                reason = str(exc)
            finally:
                client.close()
            self.faults["disconnect"] += 1
            for s in self.slaves:
                for p in s.map.points:
                    s.bad[p.name] = reason
            delay = backoff(attempt, o.reconnect_max)
            attempt += 1
            if self._health.state != "down":
                log.warning("modbus %s/%s: %s; retrying with backoff", self.ctx.pipeline, self.id, reason)
            self._health.down(self.ctx.clock(), reason, delay)
            await asyncio.sleep(delay)

    async def _poll_loop(self, client: Any, watch: _ReplyWatch, output: SourceOutput) -> None:
        while True:
            poll = min(self.polls, key=lambda p: p.due)
            await self.ctx.sleep_until(poll.due)
            s = poll.slave
            now = self.ctx.monotonic()
            if s.retry_at > now:  # a silent slave waits for its retry; the others go on
                poll.due = max(poll.due + poll.interval, s.retry_at)
                continue
            events = await self._poll(client, watch, poll)
            if events:
                self.n_in += len(events)
                await output.put(events)
            poll.due += poll.interval
            now = self.ctx.monotonic()
            if poll.due < now:
                self.n_overruns += 1
                poll.due = now + poll.interval

    async def _poll(self, client: Any, watch: _ReplyWatch, poll: _Poll) -> list[Event]:
        s = poll.slave
        events: list[Event] = []
        for block in poll.blocks:
            read = {
                "coil": client.read_coils,
                "discrete": client.read_discrete_inputs,
                "holding": client.read_holding_registers,
                "input": client.read_input_registers,
            }[block.table]
            self.n_reads += 1
            s.reads += 1
            watch.problem = watch.raw = None
            try:
                rr = await read(block.start, count=block.count, device_id=s.unit)
            except ModbusException as exc:
                if not client.connected:
                    # This slave's reply may be what broke the link: it waits out a backoff
                    # after the reconnect, so the others are polled first.
                    self._back_off(s)
                    raise _LinkLost(f"connection lost: {exc}") from None
                if watch.problem is None:
                    self.faults["timeout"] += 1
                    self._slave_silent(s, poll, f"no reply within {self.options.timeout:g}s")
                else:  # it answered, but nothing usable came back
                    self._dead_letter("bad_reply", f"{s.key} (unit {s.unit}): {watch.problem}", watch.raw)
                    self._slave_silent(s, poll, watch.problem)
                return events
            if rr.isError():
                code = getattr(rr, "exception_code", None)
                reason = f"exception {code} ({_EXCEPTIONS.get(code or 0, 'unknown')})"
                self.faults["exception"] += 1
                self._mark_bad(s, block.points, reason)
                continue
            bits = block.table in ("coil", "discrete")
            data = rr.bits if bits else rr.registers
            fc = _FUNCTIONS[block.table]
            if rr.function_code != fc:
                self._bad_reply(s, block, f"a function {rr.function_code} reply to a function {fc} read", data)
                continue
            # bits come in whole bytes: up to 7 past the count are padding
            if len(data) < block.count or len(data) >= block.count + (8 if bits else 1):
                unit = "bits" if bits else "registers"
                self._bad_reply(s, block, f"{len(data)} {unit} in the reply to a read of {block.count}", data)
                continue
            events.extend(self._decode(s, block, data))
        if s.failures:
            log.info("modbus %s/%s: slave %s (unit %d) answers again", self.ctx.pipeline, self.id, s.key, s.unit)
        s.failures = 0
        s.retry_at = 0.0
        return events

    def _bad_reply(self, s: _Slave, block: ReadBlock, reason: str, data: list[Any]) -> None:
        """A reply that cannot be trusted: the read's points go bad, and it is counted and dead-lettered."""
        what = f"{s.key} (unit {s.unit}) {block.table} {block.start}+{block.count}: {reason}"
        if s.bad.get(block.points[0].name) != reason:  # once per change, not per poll
            log.warning("modbus %s/%s: %s", self.ctx.pipeline, self.id, what)
        self._dead_letter("bad_reply", what, repr(data))
        self._mark_bad(s, block.points, reason)

    def _dead_letter(self, kind: str, what: str, raw: str | None) -> None:
        """A fault with data behind it: counted by kind and as an error, and kept as a dead letter."""
        self.faults[kind] += 1
        self.n_errors += 1
        self.ctx.dead_letters.record(self.ctx.pipeline, self.id, what, None, raw)

    def _slave_silent(self, s: _Slave, poll: _Poll, reason: str) -> None:
        if not s.failures:
            log.warning(
                "modbus %s/%s: slave %s (unit %d): %s; retrying with backoff",
                self.ctx.pipeline,
                self.id,
                s.key,
                s.unit,
                reason,
            )
        self._back_off(s)
        self._mark_bad(s, [p for b in poll.blocks for p in b.points], reason)

    def _back_off(self, s: _Slave) -> None:
        """One more failure in a row: the slave is next asked after a backoff that grows with them."""
        s.failures += 1
        s.retry_at = self.ctx.monotonic() + backoff(s.failures - 1, self.options.slave_retry_max)

    def _mark_bad(self, s: _Slave, points: list[Point], reason: str) -> None:
        for p in points:
            if s.bad.get(p.name) != reason:
                s.bad[p.name] = reason

    def _decode(self, s: _Slave, block: ReadBlock, data: list[Any]) -> list[Event]:
        now = self.ctx.clock()
        out: list[Event] = []
        for p in block.points:
            off = p.address - block.start
            raw = data[off : off + p.count]
            v = decode_point(p, raw, s.map.order(p))  # the reply's length was checked: no short data
            if isinstance(v, float) and not math.isfinite(v):
                self._dead_letter("nonfinite", f"{s.key}.{p.name} decodes to {v} (registers {raw})", repr(raw))
                self._mark_bad(s, [p], f"decodes to {v}")
                continue
            s.bad.pop(p.name, None)
            value = {"text": v} if isinstance(v, str) else v
            # the profile's unit rides along for sinks that show it (e.g. Home Assistant sensors)
            out.append(Event(f"{s.key}.{p.name}", now, value, self.id, {"unit": p.unit} if p.unit else None))
        if out:
            s.last_ok = now
        return out


# --- websocket ------------------------------------------------------------------------------


class WebSocketOptions(NodeOptions):
    type: Literal["websocket"]
    max_future: Duration | None = max_future_field()
    url: str = Field(pattern=r"^wss?://", description="ws:// or wss:// URL of the device or service.")
    headers: dict[str, str] = secret_field(default_factory=dict, description="Sent with the handshake (e.g. a token).")
    subscribe: Any = Field(None, description="A message (text, or JSON for a mapping/list) sent after each connect.")
    codec: JsonCodec = Field(
        default_factory=lambda: JsonCodec(type="json"),
        description="How messages become readings: JSON objects (one per message or line).",
    )
    heartbeat: Duration = Field(30.0, gt=0, description="Ping interval; a silent peer is dropped after 2 missed.")
    reconnect_max: Duration = Field(30.0, gt=0, description="Longest wait between attempts to reconnect.")

    @field_validator("codec", mode="before")
    @classmethod
    def _codec_shorthand(cls, v: Any) -> Any:
        return {"type": v} if isinstance(v, str) else v


@register
class WebSocketSource(DecodingSource):
    """A WebSocket client: every text or binary message holds one JSON object (or NDJSON lines, or a
    JSON array of objects); numeric fields become readings. Reconnects with backoff. While the
    pipeline is full the source stops reading, so the peer feels TCP backpressure.
    """

    Options = WebSocketOptions
    options: WebSocketOptions

    def __init__(self, options: WebSocketOptions, ctx: Any):
        super().__init__(options, ctx)
        self._decoder = make_decoder(options.codec)
        self._health = DeviceHealth(options.url)
        self.n_messages = 0

    def health(self) -> dict[str, Any]:
        h = self._health.as_dict()
        h["messages"] = self.n_messages
        return h

    def decode(self, data: bytes) -> list[Event]:
        self.n_messages += 1
        body = data.strip()
        if body.startswith(b"["):
            try:
                items = json.loads(body)
            except (ValueError, RecursionError):  # not JSON, an over-long integer, too deep
                items = None  # the line decoder says what is wrong
            if isinstance(items, list):
                body = b"\n".join(json.dumps(x).encode() for x in items)
        readings, errors = self._decoder.feed(body + b"\n")
        for e in errors:
            self._reject(self.options.url, e.kind, str(e), data)
        now = self.ctx.clock()
        self.n_in += len(readings)
        return to_events(readings, now, self.id)

    async def run(self, output: SourceOutput) -> None:
        o = self.options
        attempt = 0
        async with aiohttp.ClientSession(headers=o.headers) as session:
            while True:
                try:
                    async with session.ws_connect(o.url, heartbeat=o.heartbeat, autoping=True) as ws:
                        resumed = self._health.state == "down"
                        self._health.up(self.ctx.clock())
                        attempt = 0
                        log.info(
                            "websocket %s/%s: %s %s",
                            self.ctx.pipeline,
                            self.id,
                            "reconnected to" if resumed else "connected to",
                            o.url,
                        )
                        if o.subscribe is not None:
                            if isinstance(o.subscribe, str):
                                await ws.send_str(o.subscribe)
                            else:
                                await ws.send_json(o.subscribe)
                        reason = await self._receive(ws, output)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    reason = f"cannot connect: {exc or type(exc).__name__}"
                delay = backoff(attempt, o.reconnect_max)
                attempt += 1
                if self._health.state != "down":
                    log.warning("websocket %s/%s: %s; reconnecting with backoff", self.ctx.pipeline, self.id, reason)
                self._health.down(self.ctx.clock(), reason, delay)
                await asyncio.sleep(delay)

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse, output: SourceOutput) -> str:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                events = self.decode(msg.data.encode())
            elif msg.type == aiohttp.WSMsgType.BINARY:
                events = self.decode(msg.data)
            elif msg.type == aiohttp.WSMsgType.ERROR:
                return f"lost: {ws.exception()}"
            else:
                continue
            if events:
                await output.put(events)
        return f"closed by peer (code {ws.close_code})"
