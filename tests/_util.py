"""Helpers shared by the test suites: free ports, polling for a condition, a small MQTT client.

Tests synchronise on conditions (`await wait_for(lambda: ...)`), never on bare sleeps.
"""

from __future__ import annotations

import asyncio
import getpass
import inspect
import itertools
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

__all__ = [
    "MosquittoBroker",
    "MqttTestClient",
    "ReceivedMessage",
    "find_mosquitto",
    "free_port",
    "mqtt_client",
    "wait_for",
    "wait_for_sync",
]

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that nothing listens on right now.

    Another process may take it before the caller binds it; callers that start a server on it
    should retry with a fresh port if binding fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _describe(predicate: Callable[[], object]) -> str:
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return repr(predicate)


def _check_not_async(result: object, predicate: Callable[[], object]) -> None:
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # no "never awaited" warning on top of this error
        raise TypeError(f"wait_for needs a plain (sync) predicate, got an awaitable from {predicate!r}")


async def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,  # noqa: ASYNC109 -- a deadline for polling is this helper's job
    interval: float = 0.02,
    message: str | None = None,
) -> T:
    """Poll `predicate()` until it returns something truthy, and return that value.

    Raises AssertionError naming the condition (or `message`) when `timeout` seconds pass first.
    The predicate is evaluated one last time at the deadline, so a slow loop cannot miss it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        _check_not_async(result, predicate)
        if result:
            return result
        if loop.time() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for: {message or _describe(predicate)} (last value: {result!r})"
            )
        await asyncio.sleep(interval)


def wait_for_sync(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str | None = None,
) -> T:
    """`wait_for` for plain (non-async) tests and helper threads."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        _check_not_async(result, predicate)
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for: {message or _describe(predicate)} (last value: {result!r})"
            )
        time.sleep(interval)


class _HasAddress(Protocol):
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool

    def text(self) -> str:
        return self.payload.decode()


_client_ids = itertools.count(1)


class MqttTestClient:
    """A paho-mqtt 2.x client for tests: blocking calls that wait for the broker's answer.

    Every message on a subscribed topic is appended to `messages` (a snapshot list; the
    collection is thread-safe, paho delivers on its own network thread). Use
    `await wait_for(lambda: client.received("topic"))` to wait for traffic.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str | None = None,
        clean_session: bool = True,
        protocol: paho.MQTTProtocolVersion = paho.MQTTv311,
        keepalive: int = 30,
        reconnect_delay: tuple[float, float] = (0.05, 1.0),
    ) -> None:
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.client_id = client_id or f"sluice-test-{next(_client_ids)}"
        self._lock = threading.Lock()
        self._messages: list[ReceivedMessage] = []
        self._connected = threading.Event()
        self._connack: paho.ReasonCode | None = None
        self._subacks: dict[int, list[paho.ReasonCode]] = {}
        self._suback_event = threading.Condition(self._lock)
        self._loop_started = False
        self._subscriptions: dict[str, int] = {}
        self._client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=clean_session if protocol != paho.MQTTv5 else None,
            protocol=protocol,
        )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        # Fast reconnects, so outage tests do not wait on paho's default 1-120 s backoff.
        self._client.reconnect_delay_set(*reconnect_delay)  # type: ignore[arg-type]

    @property
    def paho(self) -> paho.Client:
        """The underlying paho client, for what this wrapper does not cover (will, TLS ...)."""
        return self._client

    # paho callbacks (network thread)
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connack = reason
        if not reason.is_failure and not flags.session_present:
            # After a reconnect (say the broker restarted) a clean session has no subscriptions.
            for topic, qos in self._subscriptions.items():
                client.subscribe(topic, qos)
        self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected.clear()

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        received = ReceivedMessage(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain))
        with self._lock:
            self._messages.append(received)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self._suback_event:
            self._subacks[mid] = list(reasons)
            self._suback_event.notify_all()

    # API
    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def connect(self, timeout: float = 10.0) -> MqttTestClient:
        """Connect and wait for a successful CONNACK; raise AssertionError otherwise."""
        self._client.connect(self.host, self.port, keepalive=self.keepalive)
        if not self._loop_started:
            self._client.loop_start()
            self._loop_started = True
        return self.wait_connected(timeout)

    def wait_connected(self, timeout: float = 10.0) -> MqttTestClient:
        """Wait for a successful CONNACK (also after paho reconnected by itself)."""
        if not self._connected.wait(timeout):
            raise AssertionError(f"no CONNACK from {self.host}:{self.port} within {timeout:g}s")
        if self._connack is not None and self._connack.is_failure:
            raise AssertionError(f"broker refused connection: {self._connack}")
        return self

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribe and wait for the SUBACK; raise AssertionError if the broker refused.

        The subscription is renewed whenever the client reconnects without a session.
        """
        self._subscriptions[topic] = qos
        rc, mid = self._client.subscribe(topic, qos)
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise AssertionError(f"subscribe({topic!r}) failed: {paho.error_string(rc)}")
        with self._suback_event:
            if not self._suback_event.wait_for(lambda: mid in self._subacks, timeout):
                raise AssertionError(f"no SUBACK for {topic!r} within {timeout:g}s")
            reasons = self._subacks.pop(mid)
        if any(r.is_failure for r in reasons):
            raise AssertionError(f"broker refused subscription to {topic!r}: {reasons}")

    def publish(
        self,
        topic: str,
        payload: bytes | str | None = None,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 10.0,
    ) -> None:
        """Publish and wait until it left (QoS 0) or was acknowledged (QoS 1/2)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise AssertionError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise AssertionError(f"publish to {topic!r} not acknowledged within {timeout:g}s")

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Everything received so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._messages)

    def received(self, topic: str | None = None) -> list[ReceivedMessage]:
        """Messages received so far, only those on exactly `topic` if given."""
        return [m for m in self.messages if topic is None or m.topic == topic]

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [m.payload for m in self.received(topic)]

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()

    def disconnect(self, timeout: float = 10.0) -> None:
        """Wait for in-flight publishes, disconnect cleanly and stop the network thread."""
        deadline = time.monotonic() + timeout
        while self._connected.is_set() and self._client.want_write():
            if time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        if self._connected.is_set():
            self._client.disconnect()
        if self._loop_started:
            self._client.loop_stop()
            self._loop_started = False
        # Close the socket and loop_start's wake-up socket pair now rather than at garbage
        # collection, so no file descriptor outlives the test.
        self._client._reset_sockets()

    def __enter__(self) -> MqttTestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()


@contextmanager
def mqtt_client(
    broker: _HasAddress | str,
    port: int | None = None,
    *,
    subscribe: str | list[str] | None = None,
    qos: int = 1,
    **kwargs: Any,
) -> Iterator[MqttTestClient]:
    """A connected `MqttTestClient` for the block, optionally subscribed, disconnected afterwards.

    `broker` is a broker fixture (anything with `.host` and `.port`) or a host name with `port`.

        with mqtt_client(mosquitto, subscribe="sluice/#") as client:
            ...
    """
    if isinstance(broker, str):
        if port is None:
            raise TypeError("mqtt_client(host, port): port is required with a host name")
        host = broker
    else:
        host, port = broker.host, broker.port if port is None else port
    client = MqttTestClient(host, port, **kwargs)
    try:
        client.connect()
        topics = [subscribe] if isinstance(subscribe, str) else (subscribe or [])
        for topic in topics:
            client.subscribe(topic, qos)
        yield client
    finally:
        client.disconnect()


# --- a real Mosquitto broker ---------------------------------------------------------------------


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (it lives in /usr/sbin, often not on PATH), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class BrokerStartError(RuntimeError):
    """Mosquitto exited or did not listen in time; the message carries its log."""


class MosquittoBroker:
    """One mosquitto process on a loopback port, with its config and log in `workdir`.

    `stop()` ends it gracefully (it saves persistence), `kill()` is a power cut (SIGKILL), and
    `start()` brings it back on the same port, so tests can play outages against one address.
    """

    def __init__(
        self,
        binary: str,
        workdir: Path,
        port: int,
        *,
        host: str = "127.0.0.1",
        extra: str = "",
        persistence: bool = False,
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.host = host
        self.port = port
        self.extra = extra
        self.persistence = persistence
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.stderr_path = workdir / "mosquitto.stderr"
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = f"pid {self._proc.pid}" if self.running else "stopped"
        return f"<MosquittoBroker {self.host}:{self.port} {state}>"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def write_config(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "max_queued_messages 1000000",
            "max_inflight_messages 0",
            "sys_interval 1",
            f"log_dest file {self.log_path}",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            # As root, mosquitto would switch to the 'mosquitto' user, who cannot write here.
            f"user {getpass.getuser()}",
        ]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/"]
        else:
            lines.append("persistence false")
        if self.extra:
            lines += ["", "# extra", self.extra.strip()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        """Start (or restart) the broker on `self.port` and wait until it accepts connections."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        with self.stderr_path.open("ab") as err:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )
        deadline = time.monotonic() + timeout
        while not _port_accepts(self.host, self.port):
            if self._proc.poll() is not None:
                self._proc.wait()
                raise BrokerStartError(
                    f"mosquitto exited with {self._proc.returncode} on port {self.port}:\n" + self.log_text(tail=30)
                )
            if time.monotonic() >= deadline:
                self._end(signal.SIGKILL)
                raise BrokerStartError(
                    f"mosquitto did not listen on {self.host}:{self.port} within {timeout:g}s:\n"
                    + self.log_text(tail=30)
                )
            time.sleep(0.02)
        return self

    def _end(self, sig: signal.Signals, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        else:
            proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM): clients see the connection close, persistence is saved."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Abrupt end (SIGKILL), like a crash or power cut: nothing is saved."""
        self._end(signal.SIGKILL)

    def log_text(self, tail: int | None = None) -> str:
        """The broker's log (and anything it wrote to stderr), optionally only the last lines."""
        parts = []
        for path in (self.log_path, self.stderr_path):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        text = "".join(parts)
        if tail is not None:
            text = "\n".join(text.splitlines()[-tail:])
        return text
