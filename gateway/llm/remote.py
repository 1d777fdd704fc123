"""Any OpenAI-compatible ``/v1/chat/completions`` endpoint, streamed over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from .._retry import backoff
from ..schema import RemoteProviderConfig
from .provider import Chunk, LlmRequest, ProviderError

log = logging.getLogger(__name__)


# --- remote: OpenAI-compatible streaming over HTTP -----------------------------------------


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class RemoteProvider:
    """An OpenAI-compatible chat endpoint with ``stream: true``, read as server-sent events.

    Retries (with backoff, or after Retry-After on 429/503) happen only before the first token:
    once text went downstream a retry would duplicate it, so a later failure is an error.
    """

    def __init__(self, name: str, config: RemoteProviderConfig):
        self.name = name
        self.config = config
        self.concurrency = config.concurrency
        self._session: Any = None

    async def start(self) -> None:
        import aiohttp

        if self._session is None:
            c = self.config
            timeout = aiohttp.ClientTimeout(total=None, connect=c.connect_timeout, sock_connect=c.connect_timeout)
            headers = {"Accept": "text/event-stream"}
            if c.api_key:
                headers["Authorization"] = f"Bearer {c.api_key}"
            self._session = aiohttp.ClientSession(timeout=timeout, headers=headers)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _body(self, r: LlmRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": r.messages,
            "stream": True,
            "max_tokens": r.max_tokens,
            "temperature": r.temperature,
        }
        if r.stop:
            body["stop"] = r.stop
        if r.json_schema is not None:
            if self.config.json_mode == "json_schema":
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": r.json_schema},
                }
            else:
                body["response_format"] = {"type": "json_object", "schema": r.json_schema}
        return body

    async def stream(self, request: LlmRequest) -> AsyncIterator[Chunk]:
        import aiohttp

        await self.start()
        c = self.config
        url = c.url.rstrip("/") + "/chat/completions"
        body = self._body(request)
        attempt = 0
        while True:
            started = False
            try:
                async for chunk in self._attempt(url, body):
                    started = True
                    yield chunk
                return
            except ProviderError as exc:
                if started or not exc.retryable or attempt >= c.retries:
                    raise
                delay = exc.retry_after if exc.retry_after is not None else backoff(attempt, 10.0)
                if delay > c.retry_after_max:
                    raise ProviderError(
                        f"asked to retry after {delay:.0f}s (more than retry_after_max)",
                        self.name,
                        retryable=True,
                        retry_after=delay,
                    ) from exc
            except (aiohttp.ClientError, OSError) as exc:
                if started:
                    raise ProviderError(f"stream broke: {type(exc).__name__}: {exc}", self.name) from exc
                if attempt >= c.retries:
                    raise ProviderError(f"cannot reach {url}: {type(exc).__name__}: {exc}", self.name) from exc
                delay = backoff(attempt, 10.0)
            log.debug("llm provider %s: retry %d in %.2fs", self.name, attempt + 1, delay)
            attempt += 1
            await asyncio.sleep(delay)

    async def _attempt(self, url: str, body: dict[str, Any]) -> AsyncIterator[Chunk]:
        c = self.config
        got_first = False
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout(c.first_token_timeout):
                    resp = await stack.enter_async_context(self._session.post(url, json=body))
            except TimeoutError:
                raise ProviderError(f"no response within {c.first_token_timeout:g}s", self.name) from None
            if resp.status != 200:
                text = (await resp.text())[:200]
                retryable = resp.status in (408, 409, 425, 429) or resp.status >= 500
                ra = _retry_after(resp.headers.get("Retry-After")) if resp.status in (429, 503) else None
                raise ProviderError(
                    f"HTTP {resp.status}: {text.strip()}", self.name, retryable=retryable, retry_after=ra
                )
            data: list[str] = []
            finished = False
            while True:
                limit = c.idle_timeout if got_first else c.first_token_timeout
                try:
                    async with asyncio.timeout(limit):
                        raw = await resp.content.readline()
                except TimeoutError:
                    what = "no token" if not got_first else "no data"
                    raise ProviderError(f"{what} for {limit:g}s", self.name) from None
                if not raw:
                    if finished:
                        return
                    raise ProviderError("stream ended before [DONE] (cut mid-way?)", self.name)
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith(":"):
                    continue  # an SSE comment, often a keep-alive
                if line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                    continue
                if line or not data:
                    continue  # other fields (event:, id:, retry:) carry nothing for us
                payload, data = "\n".join(data), []
                if payload.strip() == "[DONE]":
                    return
                try:
                    obj = json.loads(payload)
                    choice = obj["choices"][0] if obj.get("choices") else {}
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    raise ProviderError(f"invalid JSON in stream chunk: {payload[:80]!r}", self.name) from exc
                if "error" in obj and not choice:
                    raise ProviderError(f"error in stream: {str(obj['error'])[:200]}", self.name)
                delta = choice.get("delta") or {}
                text = delta.get("content") or ""
                reason = choice.get("finish_reason")
                if reason:
                    finished = True
                if text or reason:
                    got_first = True
                    yield Chunk(text, reason)
