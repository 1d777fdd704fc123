"""Every use of gmqtt's private insides, in one place, for the versions they were tested with.

gmqtt has no public hook for what the gateway needs: seeing a PUBACK (and its MQTT 5 reason
code), owning reconnects, freeing packet ids a clean session forgot, writing many QoS 1 publishes
in one socket write, pausing the socket reads (backpressure), and handing a plain QoS 0 PUBLISH
straight to ``on_message`` (gmqtt's per-packet path cost more than the pipeline). Each is done
here by one small function over gmqtt's private attributes; :mod:`gateway.mqtt` uses only these. A gmqtt release
outside :data:`TESTED` may have moved any of them: tests/gateway/test_gmqtt_compat.py fails on
such a version, and :func:`check` logs a warning when the gateway runs on one.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import struct
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import gmqtt
from gmqtt.mqtt.constants import MQTTv50
from gmqtt.mqtt.package import Package

__all__ = [
    "PRIVATE_ATTRIBUTES",
    "TESTED",
    "Client",
    "check",
    "connection_open",
    "free_id",
    "id_capacity",
    "id_releaser",
    "install_fast_publish",
    "install_read_gate",
    "next_id",
    "next_ids",
    "on_refused_puback",
    "puback",
    "publish_qos1",
    "route_qos1",
    "write_raw",
]

log = logging.getLogger(__name__)

TESTED = ("0.8.0",)
"""gmqtt versions whose private insides this module was written and tested against."""

PRIVATE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "gmqtt.Client": ("_remove_message_from_queue", "_clear_resend_qos_queue", "reconnect"),
    "client": ("_package_handler", "_persistent_storage", "_connection"),
    "package handler": (
        "id_generator",
        "_handle_puback_packet",
        "on_message",
        "current_connection",
        "_connection_state",
        "_last_msg_in",
        "_logger",
        "_handle_qos_1_publish_packet",
        "_handle_pingresp_packet",
        "_handler_cache",
    ),
    "id generator": ("free_id", "_mid_generate", "_max", "_used_ids", "_last_used_id"),
    "connection": (
        "_protocol",
        "publish",
        "is_closing",
        "close",
        "_last_data_in",
        "put_package",
        "_send_ping_request",
    ),
    "protocol": ("read", "write_data", "proto_ver", "_stream_reader", "_read_packet"),
}
"""What this module touches, by object: the compatibility test checks each still exists."""


@functools.cache
def check() -> bool:
    """Whether the installed gmqtt is one of :data:`TESTED`; warns (once) when it is not."""
    version = getattr(gmqtt, "__version__", "unknown")
    if version in TESTED:
        return True
    log.warning(
        "gmqtt %s is not a version Sluice was tested with (%s): MQTT acknowledgements, "
        "reconnects and backpressure rely on its private insides",
        version,
        ", ".join(TESTED),
    )
    return False


class Client(gmqtt.Client):
    """gmqtt's client with the gateway's hooks: ``on_lost`` instead of gmqtt's own fixed-delay,
    fire-and-forget reconnect, and ``on_acked(mid)`` at each PUBACK/PUBCOMP."""

    on_lost: Callable[[], None] = staticmethod(lambda: None)
    on_acked: Callable[[int], None] = staticmethod(lambda mid: None)

    async def reconnect(self, delay: bool = False) -> None:
        self.on_lost()

    def _remove_message_from_queue(self, mid: int) -> None:
        # gmqtt calls this on PUBACK (and PUBCOMP): the one place an acknowledgement is visible.
        super()._remove_message_from_queue(mid)
        self.on_acked(mid)

    def _clear_resend_qos_queue(self) -> None:
        # A clean session forgets the unacknowledged packets; gmqtt keeps their packet ids
        # reserved forever, and with a broker's small receive maximum (Mosquitto: 20) a few
        # reconnects would exhaust them. Free them with the packets.
        ids = self._package_handler.id_generator
        for mid, _ in self._persistent_storage.get_all():
            ids.free_id(mid)
        super()._clear_resend_qos_queue()


def on_refused_puback(client: gmqtt.Client, refused: Callable[[int, int], None]) -> None:
    """Call ``refused(mid, reason)`` for an MQTT 5 PUBACK whose reason code says the broker
    refused the message (gmqtt ignores the reason code)."""
    handler = client._package_handler
    plain = handler._handle_puback_packet

    def puback(cmd: int, packet: bytes) -> None:
        if len(packet) > 2 and packet[2] >= 0x80:
            (mid,) = struct.unpack("!H", packet[:2])
            refused(mid, packet[2])
        plain(cmd, packet)

    handler._handle_puback_packet = puback


def puback(client: gmqtt.Client, mid: int) -> None:
    """Handle a successful PUBACK for ``mid`` as gmqtt does (for a message gmqtt itself sent)."""
    client._package_handler._handle_puback_packet(0x40, mid.to_bytes(2, "big"))


def free_id(client: gmqtt.Client, mid: int) -> None:
    client._package_handler.id_generator.free_id(mid)


def next_id(client: gmqtt.Client) -> int:
    """A free packet id; raises OverflowError when none is."""
    return client._package_handler.id_generator._mid_generate()


def next_ids(client: gmqtt.Client, n: int) -> list[int]:
    """Up to ``n`` free packet ids, fewer when they run out: the ids gmqtt's generator would hand
    out one by one, in one loop (its own costs about a microsecond an id)."""
    gen = client._package_handler.id_generator
    used = gen._used_ids
    top = gen._max
    last = gen._last_used_id
    out: list[int] = []
    while len(out) < n and len(used) < top - 1:
        last += 1
        if last >= top:  # ids run 1 .. top - 1, then wrap
            last = 0
            continue
        if last not in used:
            used.add(last)
            out.append(last)
    gen._last_used_id = last
    return out


def id_releaser(client: gmqtt.Client) -> Callable[[int], None]:
    """``release(mid)``: give a packet id back to the client's generator (what gmqtt does on a
    PUBACK, without its log call)."""
    return client._package_handler.id_generator._used_ids.discard


def id_capacity(client: gmqtt.Client) -> int:
    """How many packet ids there are (the broker's receive maximum)."""
    return client._package_handler.id_generator._max


def connection_open(client: gmqtt.Client) -> Any:
    """The client's connection when it is open (to close or to write to), else ``None``."""
    conn = client._connection
    return conn if conn is not None and not conn.is_closing() else None


def publish_qos1(client: gmqtt.Client, message: gmqtt.Message) -> int:
    """Publish through the connection, returning the packet id (gmqtt's ``publish`` hides it)."""
    mid, _ = client._connection.publish(message)
    return mid


def write_raw(client: gmqtt.Client) -> tuple[bool, Callable[[bytes], None]]:
    """``(mqtt5, write)``: whether the connection speaks MQTT 5, and a function writing raw packets."""
    proto = client._connection._protocol
    return proto.proto_ver >= MQTTv50, proto.write_data


def install_read_gate(client: gmqtt.Client, gate: asyncio.Event, keepalive: float) -> None:
    """Make the client's read loop wait on ``gate`` before each socket read."""
    conn = client._connection
    proto = conn._protocol
    read = proto.read

    async def gated_read(n: int = -1) -> bytes:
        while not gate.is_set():
            try:
                async with asyncio.timeout(keepalive / 2):  # not wait_for: it can drop a cancel (3.11)
                    await gate.wait()
            except TimeoutError:
                # Paused on purpose: unread bytes prove the broker is alive, so do not let
                # the client's keepalive check drop the connection for missing data.
                if proto._stream_reader is not None and proto._stream_reader._buffer:
                    conn._last_data_in = time.monotonic()
        return await read(n)

    proto.read = gated_read


def _is_async(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn)


OnPublishQos1 = Callable[[str, bytes, int, Callable[[list[int]], None]], None]
"""``(topic, payload, mid, ack)``: a QoS 1 PUBLISH whose PUBACK the receiver sends later, by
calling ``ack(mids)`` once it has handled the messages (many PUBACKs in one socket write)."""


class _Acker:
    """``ack(mids)``: one socket write of a success PUBACK per packet id, on connection ``conn``
    only — after a reconnect the broker redelivers what this connection left unacknowledged.

    ``ack.confirm(callback)`` writes a PINGREQ and calls ``callback()`` at its PINGRESP: the broker
    answers in order, so by then it has read every PUBACK written before (MQTT has no other
    receipt for a PUBACK). gmqtt's own keep-alive PINGREQs are counted, so each PINGRESP is
    matched with the PINGREQ it answers. A connection that closes first never calls back."""

    __slots__ = ("_handler", "_pings", "_write", "conn")

    def __init__(self, client: gmqtt.Client, conn: Any):
        self.conn = conn
        self._handler = client._package_handler
        self._write = conn._protocol.write_data
        self._pings: list[Callable[[], None] | None] = []  # PINGREQs sent, oldest first
        gmqtt_ping = conn._send_ping_request

        def ping() -> None:
            self._pings.append(None)
            gmqtt_ping()

        conn._send_ping_request = ping

    def _open(self) -> bool:
        return self._handler.current_connection is self.conn and not self.conn.is_closing()

    def __call__(self, mids: list[int]) -> None:
        if mids and self._open():
            self._write(b"".join([b"\x40\x02" + mid.to_bytes(2, "big") for mid in mids]))

    def confirm(self, callback: Callable[[], None]) -> None:
        if self._open():
            self._pings.append(callback)
            self._write(b"\xc0\x00")

    def pong(self) -> None:
        if self._pings and (callback := self._pings.pop(0)) is not None:
            callback()


def _puback_writer(client: gmqtt.Client, conn: Any) -> _Acker:
    """The :class:`_Acker` of connection ``conn`` (one per connection)."""
    acker = getattr(client, "_sluice_acker", None)
    if acker is None or acker.conn is not conn:
        acker = client._sluice_acker = _Acker(client, conn)
    return acker


def route_qos1(client: gmqtt.Client, on_qos1: OnPublishQos1) -> None:
    """Every QoS 1 PUBLISH that gmqtt itself handles — those with MQTT 5 properties, and those
    read with the CONNACK, before :func:`install_fast_publish` could take over (a resumed
    session's redeliveries) — goes to ``on_qos1(topic, payload, mid, ack)`` as on the fast path,
    with its packet id; and each PINGRESP to the current connection's ``ack.confirm``. Call once
    per client (its handler outlives the connections)."""
    handler = client._package_handler
    plain = handler._handle_qos_1_publish_packet
    plain_pong = handler._handle_pingresp_packet

    def qos1(mid: int, payload: bytes, topic: Any, properties: Any) -> None:
        conn = client._connection
        if not isinstance(topic, str) or conn is None or handler._connection_state.protocol_version < MQTTv50:
            plain(mid, payload, topic, properties)
            return
        on_qos1(topic, payload, mid, _puback_writer(client, conn))

    def pong(cmd: int, packet: bytes) -> None:
        plain_pong(cmd, packet)
        acker = getattr(client, "_sluice_acker", None)
        if acker is not None and acker.conn is handler.current_connection:
            acker.pong()

    handler._handle_qos_1_publish_packet = qos1
    handler._handle_pingresp_packet = pong
    handler._handler_cache.pop(0xD0, None)


OnMessages = Callable[[list[tuple[str, bytes]]], None]
"""``(messages)``: the plain QoS 0 PUBLISH messages of one socket read, ``(topic, payload)`` in order."""


def install_fast_publish(
    client: gmqtt.Client,
    on_qos1: OnPublishQos1 | None = None,
    on_pubacks: Callable[[list[int]], None] | None = None,
    on_messages: OnMessages | None = None,
) -> None:
    """Hand each plain QoS 0 PUBLISH of the client's connection straight to ``on_message``, and
    each PUBACK straight to the handler's PUBACK method.

    gmqtt takes every packet through a Package, the connection, the handler's dispatch, a debug
    log call, struct formats built per message and a check of whether ``on_message`` is a
    coroutine function; for a QoS 0 PUBLISH without MQTT 5 properties this does the same in
    one loop over the read buffer. Everything else — QoS 1/2, properties (topic aliases), an
    empty or non-UTF-8 topic, a coroutine ``on_message``, gmqtt's debug logging switched on, a
    superseded connection — still goes through gmqtt. Call it after each connect (the protocol
    object is new each time).

    With ``on_qos1`` (MQTT 5, manual acknowledgement), a QoS 1 PUBLISH without properties goes
    to ``on_qos1(topic, payload, mid, ack)`` instead of a task per message through gmqtt's
    coroutine ``on_message``; the receiver acknowledges with ``ack(mids)``.

    With ``on_pubacks``, the packet ids of the successful PUBACKs in one read (no reason code,
    or one below 0x80) go to ``on_pubacks(mids)`` together, in order, before any other packet
    that follows them is handled; a refusal still goes to the handler's PUBACK method.

    With ``on_messages`` (and a plain function as ``on_message``), the plain QoS 0 PUBLISH
    messages of one read go to ``on_messages([(topic, payload), ...])`` in one call instead of
    a call and a properties dict each (dup and retain are not passed on), likewise before any
    other packet that follows them is handled."""
    conn = client._connection
    proto = conn._protocol
    handler = client._package_handler
    general = proto._read_packet
    put = conn.put_package
    state = handler._connection_state
    logger = handler._logger
    known: list[Any] = [None, True]  # the on_message last looked at, and whether it is async
    ack = _puback_writer(client, conn)
    acked: list[int] = []  # packet ids of the PUBACKs read but not yet handed to on_pubacks
    got: list[tuple[str, bytes]] = []  # QoS 0 messages read but not yet handed to on_messages

    def hand_over(pending: list[Any], deliver: Callable[[list[Any]], None]) -> None:
        """``deliver`` what ``pending`` holds, emptied first (deliver may read more)."""
        items = pending[:]
        pending.clear()
        try:
            deliver(items)
        except Exception:
            logger.exception("[MqttPackageHandler] error handling package")

    def flush_acks() -> None:
        hand_over(acked, on_pubacks)  # type: ignore[arg-type]

    def flush_got() -> None:
        hand_over(got, on_messages)  # type: ignore[arg-type]

    def read_packet(data: bytes) -> int:
        on_message = handler.on_message
        if on_message is not known[0]:
            known[0], known[1] = on_message, _is_async(on_message)
        mqtt5 = state.protocol_version >= MQTTv50
        qos1 = on_qos1 is not None and mqtt5
        if (known[1] and not qos1) or handler.current_connection is not conn or logger.isEnabledFor(logging.DEBUG):
            return general(data)
        qos0 = not known[1]
        many = qos0 and on_messages is not None
        skip = 1 if mqtt5 else 0  # an MQTT 5 PUBLISH has a property block (one byte when empty)
        size = len(data)
        pos = 0
        fast = 0
        while size - pos >= 2:
            b = data[pos + 1]
            if b < 0x80:  # a remaining length below 128 (one byte): the common small packet
                i = pos + 2
                length = b
            else:
                # the remaining length: a variable byte integer of at most 4 bytes
                i = pos + 1
                length = shift = 0
                complete = False
                while i < size:
                    b = data[i]
                    i += 1
                    length |= (b & 0x7F) << shift
                    if not b & 0x80:
                        complete = True
                        break
                    shift += 7
                    if shift > 21:
                        return -1  # as gmqtt: a malformed length resets the connection
                if not complete:
                    break  # the packet is not all here yet
            end = i + length
            if end > size:
                break  # the packet is not all here yet
            cmd = data[pos]
            if many and cmd & 0xF6 == 0x30 and length >= 2:  # PUBLISH, QoS 0, for on_messages
                t_end = i + 2 + ((data[i] << 8) | data[i + 1])
                body = t_end + skip
                if t_end > i + 2 and body <= end and (not mqtt5 or data[t_end] == 0):
                    try:
                        topic = data[i + 2 : t_end].decode()
                    except UnicodeDecodeError:
                        topic = None
                    if topic is not None:
                        if acked:
                            flush_acks()  # what follows is handled after the acknowledgements before it
                        got.append((topic, data[body:end]))
                        fast += 1
                        pos = end
                        continue
            if cmd == 0x40 and on_pubacks is not None and length >= 2 and (length == 2 or data[i + 2] < 0x80):
                if got:
                    flush_got()  # the messages before it first
                acked.append((data[i] << 8) | data[i + 1])  # a successful PUBACK: handed over with the others
                fast += 1
                pos = end
                continue
            if got:
                flush_got()
            if acked:
                flush_acks()  # what follows is handled after the acknowledgements before it
            if qos1 and cmd & 0xF6 == 0x32 and length >= 4:  # PUBLISH, QoS 1, acknowledged later
                t_end = i + 2 + ((data[i] << 8) | data[i + 1])
                body = t_end + 3  # packet id, then an empty property block
                if t_end > i + 2 and body <= end and data[t_end + 2] == 0:
                    try:
                        topic = data[i + 2 : t_end].decode()
                    except UnicodeDecodeError:
                        topic = None
                    if topic is not None:
                        try:
                            on_qos1(topic, data[body:end], (data[t_end] << 8) | data[t_end + 1], ack)  # type: ignore[misc]
                        except Exception:
                            logger.exception("[MqttPackageHandler] error handling package")
                        fast += 1
                        pos = end
                        continue
            elif qos0 and cmd & 0xF6 == 0x30 and length >= 2:  # PUBLISH, QoS 0 (dup and retain may be set)
                t_end = i + 2 + ((data[i] << 8) | data[i + 1])
                body = t_end + 1 if mqtt5 else t_end
                if t_end > i + 2 and body <= end and (not mqtt5 or data[t_end] == 0):
                    try:
                        topic = data[i + 2 : t_end].decode()
                    except UnicodeDecodeError:
                        topic = None
                    if topic is not None:
                        props: dict[str, Any] = defaultdict(list) if mqtt5 else {}
                        props["dup"] = (cmd & 0x08) >> 3
                        props["retain"] = cmd & 0x01
                        try:
                            on_message(topic, data[body:end], 0, props)
                        except Exception:
                            logger.exception("[MqttPackageHandler] error handling package")
                        fast += 1
                        pos = end
                        continue
            elif cmd == 0x40:  # PUBACK: straight to the handler's own PUBACK method (ours wraps it)
                try:
                    handler._handle_puback_packet(cmd, data[i:end])
                except Exception:
                    logger.exception("[MqttPackageHandler] error handling package")
                fast += 1
                pos = end
                continue
            put(Package(cmd, data[i:end]))
            pos = end
        if acked:
            flush_acks()
        if got:
            flush_got()
        if fast:
            conn._last_data_in = handler._last_msg_in = time.monotonic()
        return pos

    proto._read_packet = read_packet
