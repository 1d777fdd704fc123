"""A :class:`~gateway.api.Link` that POSTs outbox messages as JSON to one URL (the ``webhook`` sink's)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ._retry import backoff
from .errors import LinkError

__all__ = ["WebhookLink", "WebhookRefused"]

log = logging.getLogger(__name__)


class WebhookRefused(LinkError):
    """The server answered 4xx (other than 408/429): sending it again would not help."""

    refused = True


class WebhookLink:
    """POSTs outbox messages as JSON to one URL, with the publisher interface the outbox uses.

    2xx acknowledges a message; 408, 429, 5xx or a network error fail it and take the link
    "down" for a capped, jittered backoff, after which the outbox sends again from the oldest
    unacknowledged message (``replayed: true``); any other 4xx dead-letters it. With the
    default ``concurrency: 1``, messages arrive in order.
    """

    def __init__(
        self,
        name: str,
        url: str,
        headers: dict[str, str] | None = None,
        *,
        timeout: float = 10.0,
        concurrency: int = 1,
        reconnect_max: float = 30.0,
    ):
        self.name = name
        self.url = url
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.timeout = timeout
        self.send_window = concurrency
        self.reconnect_max = reconnect_max
        self.connected = True
        self.state = "connected"
        self.last_error: str | None = None
        self.delivered = 0
        self._up = asyncio.Event()
        self._up.set()
        self._down = asyncio.Event()
        self._session: Any = None
        self._posts: set[asyncio.Task[None]] = set()
        self._attempt = 0

    def configure(self, other: WebhookLink) -> None:
        """Take another link's settings (the sink was rebuilt by a reload); messages keep flowing."""
        self.url, self.headers, self.timeout = other.url, other.headers, other.timeout
        self.send_window, self.reconnect_max = other.send_window, other.reconnect_max

    @property
    def in_flight(self) -> int:
        return len(self._posts)

    async def wait_connected(self) -> None:
        await self._up.wait()

    def health(self) -> dict[str, Any]:
        return {"url": self.url, "state": self.state, "error": self.last_error, "delivered": self.delivered}

    def publish_acked_many(self, messages: list[tuple[str, bytes, bool]]) -> list[asyncio.Future[None]]:
        if not self.connected:
            raise LinkError(self.name, "down")
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession()
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[None]] = []
        for _, payload, _ in messages[: max(0, self.send_window - len(self._posts))]:
            fut: asyncio.Future[None] = loop.create_future()
            task = loop.create_task(self._post(payload, fut), name=f"webhook:{self.name}")
            self._posts.add(task)
            task.add_done_callback(self._posts.discard)
            futs.append(fut)
        return futs

    async def _post(self, payload: bytes, fut: asyncio.Future[None]) -> None:
        import aiohttp

        try:
            async with self._session.post(
                self.url, data=payload, headers=self.headers, timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as resp:
                body = (await resp.read())[:200].decode("utf-8", "replace")
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._failed(fut, LinkError(self.name, f"POST {self.url}: {type(exc).__name__}: {exc}".rstrip(": ")))
            return
        if 200 <= status < 300:
            self.delivered += 1
            self._attempt = 0
            if not fut.done():
                fut.set_result(None)
        elif status in (408, 429) or status >= 500:
            self._failed(fut, LinkError(self.name, f"POST {self.url}: HTTP {status} {body}".strip()))
        elif not fut.done():
            fut.set_exception(WebhookRefused(self.name, f"POST {self.url}: HTTP {status} {body}".strip()))

    def _failed(self, fut: asyncio.Future[None], exc: LinkError) -> None:
        if not fut.done():
            fut.set_exception(exc)
        if self.connected:
            self.connected = False
            self.state = "down"
            self.last_error = str(exc).split(": ", 1)[-1]
            self._up.clear()
            self._down.set()

    async def run(self) -> None:
        """After a failure, wait a capped jittered backoff, then let the outbox try again."""
        while True:
            await self._down.wait()
            delay = backoff(self._attempt, self.reconnect_max)
            self._attempt += 1
            log.warning("webhook %s: %s; retrying in %.1fs", self.name, self.last_error, delay)
            await asyncio.sleep(delay)
            self._down.clear()
            self.connected = True
            self.state = "retrying"
            self._up.set()

    async def close(self) -> None:
        for t in list(self._posts):
            t.cancel()
        await asyncio.gather(*self._posts, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
