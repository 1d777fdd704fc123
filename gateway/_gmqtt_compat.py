"""Every use of gmqtt's private insides, in one place, for the versions they were tested with.

gmqtt has no public hook for what the gateway needs: seeing a PUBACK (and its MQTT 5 reason
code), owning reconnects, freeing packet ids a clean session forgot, writing many QoS 1 publishes
in one socket write, and pausing the socket reads (backpressure). Each is done here by one small
function over gmqtt's private attributes; :mod:`gateway.mqtt` uses only these. A gmqtt release
outside :data:`TESTED` may have moved any of them: tests/gateway/test_gmqtt_compat.py fails on
such a version, and :func:`check` logs a warning when the gateway runs on one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

import gmqtt
from gmqtt.mqtt.constants import MQTTv50

__all__ = [
    "PRIVATE_ATTRIBUTES",
    "TESTED",
    "Client",
    "check",
    "connection_open",
    "free_id",
    "id_capacity",
    "install_read_gate",
    "next_id",
    "on_refused_puback",
    "publish_qos1",
    "write_raw",
]

log = logging.getLogger(__name__)

TESTED = ("0.8.0",)
"""gmqtt versions whose private insides this module was written and tested against."""

PRIVATE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "gmqtt.Client": ("_remove_message_from_queue", "_clear_resend_qos_queue", "reconnect"),
    "client": ("_package_handler", "_persistent_storage", "_connection"),
    "package handler": ("id_generator", "_handle_puback_packet"),
    "id generator": ("free_id", "_mid_generate", "_max"),
    "connection": ("_protocol", "publish", "is_closing", "close", "_last_data_in"),
    "protocol": ("read", "write_data", "proto_ver", "_stream_reader"),
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


def free_id(client: gmqtt.Client, mid: int) -> None:
    client._package_handler.id_generator.free_id(mid)


def next_id(client: gmqtt.Client) -> int:
    """A free packet id; raises OverflowError when none is."""
    return client._package_handler.id_generator._mid_generate()


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
                await asyncio.wait_for(gate.wait(), keepalive / 2)
            except TimeoutError:
                # Paused on purpose: unread bytes prove the broker is alive, so do not let
                # the client's keepalive check drop the connection for missing data.
                if proto._stream_reader is not None and proto._stream_reader._buffer:
                    conn._last_data_in = time.monotonic()
        return await read(n)

    proto.read = gated_read
