"""A real OpenAI-compatible HTTP server on loopback for the remote LLM tests, with scripted faults.

Each request takes the next behaviour from ``server.plan`` (or ``server.default`` when the plan is
empty): a normal stream, slow tokens, HTTP errors with Retry-After, a stream cut mid-way, no
``[DONE]``, SSE comments and keep-alives, a hang before the first token, invalid JSON in a chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["Behaviour", "FakeOpenAI"]


@dataclass
class Behaviour:
    kind: str = "ok"  # ok | status | cut | no_done | hang | bad_json | comments | raw
    tokens: list[str] = field(default_factory=lambda: ["The ", "boiler ", "is ", "hot", "."])
    delay: float = 0.0  # between tokens
    status: int = 200
    retry_after: str | None = None
    first_delay: float = 0.0  # before the first token
    raw: list[bytes] = field(default_factory=list)  # kind "raw": written as is, one write per item


class FakeOpenAI:
    def __init__(self) -> None:
        self.plan: list[Behaviour] = []
        self.default = Behaviour()
        self.requests: list[dict[str, Any]] = []
        self.request_times: list[float] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = asyncio.Event()  # set: every `hang` goes on (and close() ends any pause)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> FakeOpenAI:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeOpenAI:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @staticmethod
    def _chunk(text: str | None = None, finish: str | None = None) -> bytes:
        delta = {} if text is None else {"content": text}
        obj = {
            "id": "x",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    async def _pause(self, seconds: float) -> None:
        # a sleep that close() ends at once, so the server's shutdown does not wait for it
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release.wait(), seconds)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.request_times.append(time.monotonic())
        self.headers.append(dict(request.headers))
        b = self.plan.pop(0) if self.plan else self.default
        if b.kind == "status":
            headers = {"Retry-After": b.retry_after} if b.retry_after is not None else {}
            return web.json_response({"error": {"message": f"status {b.status}"}}, status=b.status, headers=headers)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            if b.kind == "hang":
                await self.release.wait()  # then answers normally, late
            if b.kind == "raw":
                for part in b.raw:
                    await resp.write(part)
                return resp
            if b.first_delay:
                await self._pause(b.first_delay)
            await resp.write(self._chunk(""))  # role-only first chunk, as OpenAI sends
            for i, tok in enumerate(b.tokens):
                if b.kind == "comments":
                    await resp.write(b": keep-alive\n\n")
                    await resp.write(b"event: message\nid: 1\n")
                if b.kind == "bad_json" and i == 2:
                    await resp.write(b"data: {not json\n\n")
                    return resp
                if b.kind == "cut" and i == 2:
                    # end the response mid-stream: the client sees EOF with no [DONE]
                    return resp
                await resp.write(self._chunk(tok))
                if b.delay:
                    await self._pause(b.delay)
            await resp.write(self._chunk(None, "stop"))
            if b.kind == "no_done":
                return resp
            await resp.write(b"data: [DONE]\n\n")
            return resp
        finally:
            self.in_flight -= 1
