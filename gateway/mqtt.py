"""The one seam to the MQTT broker: a gmqtt client that reconnects by itself.

gmqtt was chosen for its receive cost (15–20 µs per message with ``json.loads`` against ~60 µs
for aiomqtt, measured on this project's benchmark machine). Everything gmqtt-specific lives here
so the client can be swapped: the rest of Sluice sees :class:`MqttLink` only; what reaches into
gmqtt's private insides is in :mod:`gateway._gmqtt_compat`.

Reconnects use capped exponential backoff with jitter and log once per state change. Reading can
be paused (backpressure): the client's read loop waits on a gate, the socket buffers fill, and the
broker holds further messages in the session queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import struct
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gmqtt
from gmqtt.mqtt.constants import MQTTv50, MQTTv311

from . import _gmqtt_compat as compat
from ._retry import backoff
from .config import MqttConnection
from .errors import LinkError

if TYPE_CHECKING:
    import ssl

__all__ = ["MqttLink", "PublishRefused", "status_topic", "topic_problem"]

log = logging.getLogger(__name__)

OnMessage = Callable[[str, bytes, int, dict[str, Any]], Any]


# A connection lost sooner than this after it was made counts as dropped by the broker: the next
# attempt waits with backoff instead of following at once.
STABLE_CONNECTION = 10.0


class PublishRefused(LinkError):
    """The broker answered a publish with an MQTT 5 failure reason (not authorised, quota …)."""

    refused = True

    def __init__(self, connection: str, reason: int):
        self.reason = reason
        super().__init__(connection, f"broker refused the message (reason code 0x{reason:02x})")


# U+0001..U+001F, U+007F..U+009F and the Unicode non-characters (U+FDD0..U+FDEF, U+xxFFFE/F)
_UNWELCOME = re.compile(
    "[\x01-\x1f\x7f-\x9f\ufdd0-\ufdef\ufffe\uffff"
    + "".join(chr(p << 16 | 0xFFFE) + chr(p << 16 | 0xFFFF) for p in range(1, 17))
    + "]"
)


def topic_problem(topic: str) -> str | None:
    """Why no broker takes a PUBLISH to ``topic`` (MQTT 4.7), or ``None``.

    A topic built from a reading's key can hold anything the key held; sent as it is, a broker
    answers a wildcard or U+0000 by dropping the connection, and the outbox would send the same
    message again after every reconnect. Such messages are refused (dead-lettered) instead.
    """
    if not topic:
        return "the topic is empty"
    if "+" in topic or "#" in topic:
        return f"the topic {topic[:80]!r} holds a wildcard (+ or #)"
    if "\x00" in topic:
        return f"the topic {topic[:80]!r} holds U+0000"
    if _UNWELCOME.search(topic):
        # MQTT 1.5.4: a receiver may drop the connection over these; Mosquitto does
        return f"the topic {topic[:80]!r} holds a control character or a Unicode non-character"
    try:
        size = len(topic.encode())
    except UnicodeEncodeError:
        return f"the topic {topic[:80]!r} is not Unicode text (a lone surrogate)"
    if size > 65535:
        return f"the topic is {size} bytes long; MQTT allows 65,535"
    return None


def status_topic(gateway_id: str) -> str:
    return f"sluice/{gateway_id}/status"


class MqttLink:
    """One broker connection. ``run()`` is its supervisor task; the owner cancels it to stop."""

    def __init__(
        self,
        name: str,
        conn: MqttConnection,
        client_id: str,
        *,
        on_message: OnMessage | None = None,
        clean_session: bool = True,
        session_expiry: int = 0,
        will: tuple[str, bytes, bool] | None = None,
        birth: Callable[[], tuple[str, bytes, bool]] | None = None,
        ack_after_processing: bool = False,
        on_publish_qos1: compat.OnPublishQos1 | None = None,
        on_messages: compat.OnMessages | None = None,
    ):
        self.name = name
        self._on_publish_qos1 = on_publish_qos1 if ack_after_processing else None
        self._on_messages = on_messages
        self.conn = conn
        self.client_id = client_id
        self.state = "connecting"
        self.since = time.time()
        self.last_error: str | None = None
        self.connects = 0
        self.quick_drops = 0  # connections the broker dropped soon after they were made
        self._closing = False
        self._subs: dict[str, int] = {}
        self._birth = birth
        self._connected = asyncio.Event()
        self._lost_evt = asyncio.Event()
        self._gate = asyncio.Event()
        self._gate.set()
        props: dict[str, Any] = {}
        if conn.version == "5" and session_expiry:
            props["session_expiry_interval"] = session_expiry
        will_msg = gmqtt.Message(will[0], will[1], qos=1, retain=will[2]) if will else None
        self._client = compat.Client(
            client_id,
            clean_session=clean_session,
            optimistic_acknowledgement=not ack_after_processing,
            will_message=will_msg,
            **props,
        )
        self._client.on_lost = self._lost
        self._client.on_acked = self._acked
        if self._on_publish_qos1 is not None:
            compat.route_qos1(self._client, self._on_publish_qos1)
        self.session_present = False  # the broker's CONNACK: it still had this client's session
        # packet id -> a future, or (settle, index, acked) (publish_acked_calls), until its PUBACK
        self._acks: dict[int, Any] = {}
        compat.on_refused_puback(self._client, self._refused)
        if conn.username:
            self._client.set_auth_credentials(conn.username, conn.password)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        if on_message is not None:
            self._client.on_message = on_message

    # --- state --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _set_state(self, state: str, error: str | None = None) -> None:
        if state != self.state:
            self.state = state
            self.since = time.time()
        self.last_error = error

    def health(self) -> dict[str, Any]:
        return {
            "connection": self.name,
            "state": self.state,
            "since": self.since,
            "error": self.last_error,
            "connects": self.connects,
            "reading": self._gate.is_set(),
        }

    def _on_connect(self, client: Any, flags: Any, rc: Any, properties: Any) -> None:
        self.session_present = bool(flags)
        for topic, qos in self._subs.items():
            client.subscribe(topic, qos=qos)
        if self._birth is not None:
            topic, payload, retain = self._birth()
            client.publish(topic, payload, qos=1, retain=retain)

    def _on_disconnect(self, client: Any, packet: Any, exc: Any = None) -> None:
        self._lost()

    def _lost(self) -> None:
        self._fail_acks("connection lost")
        if self._connected.is_set():
            self._connected.clear()
            self._lost_evt.set()

    def _settle(self, entry: Any, exc: BaseException | None) -> None:
        """Tell whoever waits for a message's PUBACK: a future, or ``(settle, index, acked)`` from
        :meth:`publish_acked_calls`."""
        if type(entry) is tuple:
            try:
                entry[0](entry[1], exc)
            except Exception:  # the caller's callback: its bug must not stop the other messages' acks
                log.exception("mqtt %s: acknowledging a message failed", self.name)
        elif not entry.done():
            if exc is None:
                entry.set_result(None)
            else:
                entry.set_exception(exc)

    def _refused(self, mid: int, reason: int) -> None:
        entry = self._acks.pop(mid, None)
        if entry is not None:
            self._settle(entry, PublishRefused(self.name, reason))

    def _acked(self, mid: int) -> None:
        entry = self._acks.pop(mid, None)
        if entry is not None:
            self._settle(entry, None)

    def _pubacks(self, mids: list[int]) -> None:
        """Successful PUBACKs read from the socket (the fast path of :mod:`gateway._gmqtt_compat`)."""
        acks = self._acks
        release = compat.id_releaser(self._client)
        settle = self._settle
        batches: dict[Any, list[int]] = {}  # acked(indices) -> its messages acknowledged in this read
        for mid in mids:
            entry = acks.pop(mid, None)
            if entry is None:  # not one of ours (the status message gmqtt sent): gmqtt's own bookkeeping
                compat.puback(self._client, mid)
                continue
            release(mid)  # sent as raw bytes, so gmqtt stored nothing else for it
            if type(entry) is tuple and entry[2] is not None:
                got = batches.get(entry[2])
                if got is None:
                    got = batches[entry[2]] = []
                got.append(entry[1])
            else:
                settle(entry, None)
        for acked, indices in batches.items():
            try:
                acked(indices)
            except Exception:  # the caller's callback: its bug must not stop the other messages' acks
                log.exception("mqtt %s: acknowledging messages failed", self.name)

    def _fail_acks(self, why: str) -> None:
        """Messages awaiting PUBACK on a lost connection will never get it: fail them, free their ids."""
        if not self._acks:
            return
        acks, self._acks = self._acks, {}
        for mid, entry in acks.items():
            compat.free_id(self._client, mid)
            self._settle(entry, LinkError(self.name, why))

    # --- supervisor -----------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, and reconnect whenever the connection is lost, until cancelled."""
        compat.check()
        attempt = 0
        drops = 0  # connections in a row the broker dropped soon after they were made
        version = MQTTv50 if self.conn.version == "5" else MQTTv311
        where = f"{self.conn.host}:{self.conn.port}"
        try:
            while True:
                self._lost_evt.clear()
                try:
                    ctx = _tls_context(self.conn) if self.conn.tls else False
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancel (the
                    # owner's stop) that meets the connect completing, and the link ran on
                    async with asyncio.timeout(max(10.0, self.conn.keepalive)):
                        await self._client.connect(
                            self.conn.host, self.conn.port, keepalive=self.conn.keepalive, version=version, ssl=ctx
                        )
                except (OSError, TimeoutError, gmqtt.mqtt.handler.MQTTConnectError) as exc:
                    err = _describe(exc)
                    delay = backoff(attempt, self.conn.reconnect_max)
                    if self.state != "disconnected" or attempt == 0:
                        log.warning(
                            "mqtt %s (%s): cannot connect to %s: %s; retrying with backoff "
                            "(next in %.1fs, at most %.0fs apart)",
                            self.name,
                            self.client_id,
                            where,
                            err,
                            delay,
                            self.conn.reconnect_max,
                        )
                    self._set_state("disconnected", err)
                    attempt += 1
                    await self._close_quietly()
                    await asyncio.sleep(delay)
                    continue
                self._install_gate()
                self.connects += 1
                self._connected.set()
                self._set_state("connected")
                log.info(
                    "mqtt %s (%s): connected to %s%s",
                    self.name,
                    self.client_id,
                    where,
                    f" after {attempt} failed attempts" if attempt else "",
                )
                attempt = 0
                up_since = time.monotonic()
                await self._lost_evt.wait()
                if self._closing:
                    return
                self._set_state("disconnected", "connection lost")
                await self._close_quietly()
                if time.monotonic() - up_since >= STABLE_CONNECTION:
                    drops = 0
                    log.warning("mqtt %s (%s): connection to %s lost; reconnecting", self.name, self.client_id, where)
                    continue
                # The broker takes the connection and drops it at once (it refuses something we
                # send, or a twin client id kicks us out): back off as for a refused connect, or
                # the link would reconnect as fast as the broker drops it, and log a line each time.
                delay = backoff(drops, self.conn.reconnect_max)
                if drops == 0:
                    log.warning(
                        "mqtt %s (%s): %s dropped the connection %.1fs after it was made; reconnecting with "
                        "backoff (next in %.1fs, at most %.0fs apart) while this goes on",
                        self.name,
                        self.client_id,
                        where,
                        time.monotonic() - up_since,
                        delay,
                        self.conn.reconnect_max,
                    )
                drops += 1
                self.quick_drops += 1
                await asyncio.sleep(delay)
        finally:
            self._connected.clear()
            self._fail_acks("link stopped")

    async def _close_quietly(self) -> None:
        conn = compat.connection_open(self._client)
        if conn is not None:
            try:
                await conn.close()
            except OSError:
                pass

    async def close(self, *, status: tuple[str, bytes] | None = None) -> None:
        """Say goodbye (optionally publish a retained status first) and disconnect."""
        self._closing = True
        # Ask the client, not ``connected``: an owner that cancelled ``run()`` first (a source
        # awaits it in its own task) has cleared that flag, yet the socket is still open.
        if compat.connection_open(self._client) is not None:
            if status is not None and self._client.is_connected:
                self._client.publish(status[0], status[1], qos=1, retain=True)
            try:
                await asyncio.wait_for(self._client.disconnect(), 5)
            except (OSError, TimeoutError):
                pass
        self._set_state("closed")

    async def wait_connected(self) -> None:
        await self._connected.wait()

    # --- traffic --------------------------------------------------------------------------

    def subscribe(self, topic: str, qos: int) -> None:
        self._subs[topic] = qos
        if self.connected:
            self._client.subscribe(topic, qos=qos)

    topic_problem = staticmethod(topic_problem)  # the outbox asks before it stores a message

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if not self.connected:
            raise LinkError(self.name, "not connected")
        why = topic_problem(topic)
        if why is not None:  # the broker would drop the connection
            raise ValueError(f"cannot publish: {why}")
        self._client.publish(topic, payload, qos=qos, retain=retain)

    def publish_acked(self, topic: str, payload: bytes, retain: bool = False) -> asyncio.Future[None]:
        """Send at QoS 1 now; the future resolves on the broker's PUBACK.

        It fails with :class:`LinkError` when the connection is lost first (the message may or
        may not have arrived), or with :class:`PublishRefused` when the broker refused it.
        Raises :class:`LinkError` at once when not connected or no packet id is free
        (wait for :attr:`in_flight` to fall under :attr:`send_window`).
        """
        if not self.connected or not self._client.is_connected:
            raise LinkError(self.name, "not connected")
        try:
            mid = compat.publish_qos1(self._client, gmqtt.Message(topic, payload, qos=1, retain=retain))
        except OverflowError:
            raise LinkError(self.name, "no free packet id (too many messages in flight)") from None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks[mid] = fut
        return fut

    def publish_acked_many(self, messages: list[tuple[str, bytes, bool]]) -> list[asyncio.Future[None]]:
        """:meth:`publish_acked` for several messages in one socket write (one syscall, not one each).

        Returns one future per message sent, in order; fewer than given when packet ids ran out
        (send the rest once acknowledgements free some).
        """
        create = asyncio.get_running_loop().create_future
        futs: list[asyncio.Future[None]] = [create() for _ in messages]
        return futs[: self._publish_many(messages, futs)]

    def publish_acked_calls(
        self,
        messages: list[tuple[str, bytes, bool]],
        settle: Callable[[int, BaseException | None], None],
        acked: Callable[[list[int]], None] | None = None,
    ) -> int:
        """:meth:`publish_acked_many` without a future per message: ``settle(i, exc)`` is called,
        from the read loop, once ``messages[i]`` is acknowledged (``exc`` is ``None``) or has
        failed with what its future would have held. Returns how many were sent (the first ones).

        With ``acked``, successful acknowledgements go to ``acked(indices)`` instead, once per
        socket read for all of these messages it acknowledged (in order); ``settle`` still gets
        each refusal and each loss."""
        return self._publish_many(messages, [(settle, i, acked) for i in range(len(messages))])

    def _publish_many(self, messages: list[tuple[str, bytes, bool]], waiters: list[Any]) -> int:
        if not self.connected or not self._client.is_connected:
            raise LinkError(self.name, "not connected")
        mqtt5, write = compat.write_raw(self._client)
        props = b"\x00" if mqtt5 else b""  # MQTT 5: an empty property list
        acks = self._acks
        parts: list[bytes] = []
        heads: dict[tuple[str, bool], tuple[bytes, int]] = {}  # (topic, retain) -> (its bytes, their length)
        mids = compat.next_ids(self._client, len(messages))
        for (topic, payload, retain), mid, waiter in zip(messages, mids, waiters, strict=False):
            # PUBLISH at QoS 1 built here: gmqtt's builder costs about twice as much per message
            head = heads.get((topic, retain))
            if head is None:
                t = topic.encode()
                head = heads[(topic, retain)] = (struct.pack("!H", len(t)) + t, 4 + len(t) + len(props))
            n = head[1] + len(payload)
            parts += (
                (b"\x33" if retain else b"\x32")
                # the remaining length: an alert's takes two bytes
                + (bytes((n & 0x7F | 0x80, n >> 7)) if 127 < n < 16384 else _varint(n))
                + head[0],
                mid.to_bytes(2, "big") + props,
                payload,
            )
            acks[mid] = waiter
        if parts:
            write(b"".join(parts))
        return len(mids)

    @property
    def in_flight(self) -> int:
        """Messages sent with :meth:`publish_acked` still waiting for their PUBACK."""
        return len(self._acks)

    @property
    def send_window(self) -> int:
        """How many acknowledged publishes may be in flight: the broker's receive maximum, less
        a few ids kept for subscriptions and the status message."""
        return max(1, compat.id_capacity(self._client) - 4)

    # --- backpressure ---------------------------------------------------------------------

    def pause_reading(self) -> None:
        self._gate.clear()

    def resume_reading(self) -> None:
        self._gate.set()

    @property
    def reading(self) -> bool:
        return self._gate.is_set()

    def _install_gate(self) -> None:
        compat.install_read_gate(self._client, self._gate, self.conn.keepalive)
        compat.install_fast_publish(self._client, self._on_publish_qos1, self._pubacks, self._on_messages)


def _tls_context(conn: MqttConnection) -> ssl.SSLContext:
    """Verification on by default; a file that cannot be read says which one."""
    import ssl  # here, not at the top: a gateway without TLS does not load OpenSSL (gateway._tls)

    ctx = ssl.create_default_context()
    for what, load in (
        ("ca_file", lambda: conn.ca_file and ctx.load_verify_locations(conn.ca_file)),
        ("cert_file", lambda: conn.cert_file and ctx.load_cert_chain(conn.cert_file, conn.key_file)),
    ):
        try:
            load()
        except (OSError, ssl.SSLError) as exc:
            raise OSError(f"TLS: cannot use {what} {getattr(conn, what)!r}: {exc.strerror or exc}") from None
    if conn.tls_insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _describe(exc: BaseException) -> str:
    ssl = sys.modules.get("ssl")  # not loaded: not a TLS error
    if ssl is not None and isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS: the broker's certificate is not trusted ({exc.verify_message}); check ca_file, "
            "and that the host name matches the certificate"
        )
    if ssl is not None and isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running?)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _varint(n: int) -> bytes:
    """MQTT's variable byte integer (remaining length)."""
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode()
