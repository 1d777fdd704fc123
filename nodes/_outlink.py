"""What the Kafka and Redis sinks share: a destination the outbox sends to, with its up/down state,
and the sink node that forwards to one (:class:`StreamOut`).

The outbox (:mod:`gateway.outbox`) commits every message before the sink returns and hands it to
a link with ``publish_acked_many``; a message is deleted only once its future resolves. A link
that fails a message goes "down" for a capped, jittered backoff, after which the outbox sends
again from the oldest unacknowledged row (``replayed: true``). Subclasses provide the client:
``_open()`` (connect), ``_close()``, and ``_send(row_topic, payload)`` returning when the peer
acknowledged the message.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, ClassVar

from gateway.api import TEMPLATE_FIELDS, Envelope, LinkError, NodeOptions, OutboxSink, backoff, check_topic_template

__all__ = ["OutboxLink", "Refused", "SinkLink", "StreamOut", "split_row_topic"]

log = logging.getLogger(__name__)


class Refused(LinkError):
    """The peer refused the message for what it is (too large, not allowed): sending again would not help."""

    refused = True


def split_row_topic(row_topic: str) -> tuple[str, str]:
    """An outbox row's topic for these sinks is ``<destination>\\0<message key>``."""
    dest, _, key = row_topic.partition("\x00")
    return dest, key


class OutboxLink:
    """Base of a destination registered with the outbox (the publisher interface it expects).

    Messages are sent in order by one pump task; ``send_window`` of them may wait for the
    peer's acknowledgement at once.
    """

    kind = "link"

    def __init__(self, name: str, gateway_id: str, *, send_window: int = 1000, reconnect_max: float = 30.0):
        self.name = name
        self.send_window = send_window
        self.reconnect_max = reconnect_max
        self.connected = False
        self.state = "connecting"
        self.last_error: str | None = None
        self.delivered = 0
        self._envelope = Envelope(gateway_id)
        self._up = asyncio.Event()
        self._down = asyncio.Event()
        self._work = asyncio.Event()
        self._queue: deque[tuple[str, bytes, asyncio.Future[None]]] = deque()
        self._in_flight = 0
        self._attempt = 0
        self._opened = False
        self._reopen = False

    # --- what the outbox uses ---------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def wait_connected(self) -> None:
        await self._up.wait()

    def health(self) -> dict[str, Any]:
        return {"state": self.state, "error": self.last_error, "delivered": self.delivered}

    def configure(self, other: OutboxLink) -> None:
        """A reloaded sink brought new settings: take them and reconnect with them."""
        self._take_settings(other)
        self._reopen = True
        self._down.set()

    def _take_settings(self, other: OutboxLink) -> None:
        self.reconnect_max = other.reconnect_max

    def publish_acked_many(self, messages: list[tuple[str, bytes, bool]]) -> list[asyncio.Future[None]]:
        if not self.connected:
            raise LinkError(self.name, self.last_error or "down")
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[None]] = []
        for row_topic, payload, _ in messages[: max(0, self.send_window - self._in_flight)]:
            fut: asyncio.Future[None] = loop.create_future()
            self._in_flight += 1
            fut.add_done_callback(self._settled)
            self._queue.append((row_topic, payload, fut))
            futs.append(fut)
        if futs:
            self._work.set()
        return futs

    def _settled(self, fut: asyncio.Future[None]) -> None:
        self._in_flight -= 1
        if not fut.cancelled() and fut.exception() is None:
            self.delivered += 1
            self._attempt = 0

    def envelope_headers(self, payload: bytes) -> tuple[bytes, bool]:
        """``seq`` and ``replayed`` read back from the start of an outbox payload (no JSON parse)."""
        return self._envelope.read_head(payload)

    # --- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, pump messages, and after a failure wait a capped jittered backoff before trying again."""
        pump = asyncio.create_task(self._pump(), name=f"outlink:{self.name}")
        try:
            while True:
                if not self._opened or self._reopen:
                    self._reopen = False
                    await self._safe_close()
                    try:
                        await self._open()
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # the client's own errors vary; all mean "not connected"
                        await self._safe_close()
                        self.mark_down(f"cannot connect: {type(exc).__name__}: {exc}".rstrip(": "))
                    else:
                        self._opened = True
                        if self.state != "connected":
                            log.info("%s: connected", self.name)
                        self._mark_up("connected")
                await self._down.wait()
                delay = backoff(self._attempt, self.reconnect_max)
                self._attempt += 1
                log.warning("%s: %s; retrying in %.1fs", self.name, self.last_error, delay)
                await asyncio.sleep(delay)
                self._down.clear()
                if self._opened and not self._reopen:
                    self._mark_up("retrying")
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    def _mark_up(self, state: str) -> None:
        self.connected = True
        self.state = state
        self._up.set()

    def mark_down(self, error: str) -> None:
        self.last_error = error
        if self.connected or not self._down.is_set():
            self.connected = False
            self.state = "down"
            self._up.clear()
            self._down.set()

    async def _pump(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            while self._queue:
                row_topic, payload, fut = self._queue.popleft()
                if fut.done():
                    continue
                if not self.connected:
                    fut.set_exception(LinkError(self.name, self.last_error or "down"))
                    continue
                try:
                    ack = await self._send(row_topic, payload)
                except Refused as exc:
                    fut.set_exception(exc)
                    continue
                except asyncio.CancelledError:
                    fut.cancel()
                    raise
                except Exception as exc:  # the client's errors: the message was not accepted
                    self._fail(fut, exc)
                    continue
                if ack is None:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    ack.add_done_callback(lambda a, f=fut: self._acked(f, a))

    def _acked(self, fut: asyncio.Future[None], ack: asyncio.Future[Any]) -> None:
        if fut.done():
            return
        if ack.cancelled():
            self._fail(fut, LinkError(self.name, "send cancelled"))
            return
        exc = ack.exception()
        if exc is None:
            fut.set_result(None)
        elif isinstance(exc, Refused) or self._refused(exc):
            fut.set_exception(exc if isinstance(exc, Refused) else Refused(self.name, f"{type(exc).__name__}: {exc}"))
        else:
            self._fail(fut, exc)

    def _fail(self, fut: asyncio.Future[None], exc: BaseException) -> None:
        if self._refused(exc):
            if not fut.done():
                fut.set_exception(Refused(self.name, f"{type(exc).__name__}: {exc}".rstrip(": ")))
            return
        err = exc if isinstance(exc, LinkError) else LinkError(self.name, f"{type(exc).__name__}: {exc}".rstrip(": "))
        if not fut.done():
            fut.set_exception(err)
        self.mark_down(str(err).split(": ", 1)[-1])

    async def _safe_close(self) -> None:
        try:
            await self._close()
        except Exception:  # closing a broken client must not stop the reconnect loop
            log.debug("%s: closing the client failed", self.name, exc_info=True)
        self._opened = False

    async def close(self) -> None:
        for _, _, fut in self._queue:
            fut.cancel()
        self._queue.clear()
        await self._safe_close()

    # --- what a subclass provides ---------------------------------------------------------------

    async def _open(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    async def _send(self, row_topic: str, payload: bytes) -> asyncio.Future[Any] | None:
        """Hand one message to the client; return a future of its acknowledgement (or None: already acked)."""
        raise NotImplementedError

    def _refused(self, exc: BaseException) -> bool:
        return False


class SinkLink(OutboxLink):
    """A link built from its sink's options (which carry ``reconnect_max``); a reloaded sink's
    options replace them."""

    def __init__(self, name: str, options: Any, gateway_id: str, pipeline: str):
        super().__init__(name, gateway_id, reconnect_max=options.reconnect_max)
        self.options = options
        self.gateway_id = gateway_id
        self.pipeline = pipeline

    def _take_settings(self, other: OutboxLink) -> None:
        super()._take_settings(other)
        assert isinstance(other, SinkLink)
        self.options = other.options


class StreamOut(OutboxSink):
    """A sink forwarding through the outbox to a link of its own, built from the sink's options
    as ``Link(link name, options, gateway id, pipeline)``. Its destination template (the options
    field ``destination_field``) is checked like an MQTT topic's: only the fields of
    :data:`~gateway.api.TEMPLATE_FIELDS`, no ``+`` or ``#``."""

    Link: ClassVar[type[SinkLink]]

    @classmethod
    def check(cls, options: NodeOptions, config: Any) -> list[tuple[str, str]]:
        field = cls.destination_field or "topic"
        return [(field, m) for _, m in check_topic_template(getattr(options, field), TEMPLATE_FIELDS)]

    def make_link(self) -> SinkLink:
        return self.Link(self.link_name, self.options, self.ctx.gateway_id, self.ctx.pipeline)
