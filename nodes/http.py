"""HTTP sources: ``http`` takes readings pushed to the console port, ``http_poll`` polls a remote URL.

Both decode JSON bodies (one object, an array of objects, or NDJSON) with the firmware JSON codec,
like the ``websocket`` source. Bad bodies are dead-lettered with the reason and counted; a remote
that fails is retried with capped, jittered backoff while ``health()`` says ``down``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from pydantic import Field, field_validator, model_validator

from firmware_bridges import DecodeError, JsonCodec, RawReading, make_decoder
from gateway.api import (
    Duration,
    Event,
    NodeOptions,
    SourceOutput,
    backoff,
    max_future_field,
    register,
    secret_field,
)
from nodes._decoding import DecodingSource, DeviceHealth, to_events

__all__ = ["HttpPollSource", "HttpPushSource"]

log = logging.getLogger(__name__)

_SHOWN_ERRORS = 5  # reasons returned to a pushing client; all of them are dead-lettered


def _json_codec(v: Any) -> Any:
    return {"type": v} if isinstance(v, str) else v


class _BodyDecoder:
    """One HTTP body (JSON object, array of objects, or NDJSON) to readings and errors."""

    def __init__(self, codec: JsonCodec):
        self._decoder = make_decoder(codec)

    def decode(self, body: bytes) -> tuple[list[RawReading], list[DecodeError]]:
        text = body.strip()
        if text[:1] in (b"[", b"{"):
            # A whole JSON document may span lines (pretty-printed); re-emit it as NDJSON.
            try:
                doc = json.loads(text)
            except (ValueError, RecursionError):  # not JSON, not UTF-8, an over-long integer, too deep
                doc = None  # maybe NDJSON: the line decoder tells which line is bad
            if isinstance(doc, list):
                text = b"\n".join(json.dumps(x).encode() for x in doc)
            elif isinstance(doc, dict):
                text = json.dumps(doc).encode()
        readings, errors = self._decoder.feed(text + b"\n")
        errors.extend(self._decoder.flush())
        return readings, errors


class _SourceBase(DecodingSource):
    def __init__(self, options: Any, ctx: Any):
        super().__init__(options, ctx)
        self._body = _BodyDecoder(options.codec)

    def _decode(self, where: str, body: bytes, empty_ok: bool = False) -> tuple[list[Event], list[str]]:
        readings, errors = self._body.decode(body)
        if not readings and not errors and not empty_ok:
            errors = [DecodeError("malformed", "empty body", b"")]
        reasons = []
        for e in errors:
            self._reject(where, e.kind, str(e), e.raw or body[:200])
            reasons.append(str(e))
        now = self.ctx.clock()
        self.n_in += len(readings)
        return to_events(readings, now, self.id), reasons


# --- push ------------------------------------------------------------------------------------


class HttpPushOptions(NodeOptions):
    type: Literal["http"]
    max_future: Duration | None = max_future_field()
    token: str = secret_field(
        min_length=16,
        description="Bearer token a client must send (Authorization: Bearer <token>); "
        "give it as ${ENV_VAR}. At least 16 characters.",
    )
    max_body: int = Field(1_048_576, ge=64, le=64 * 1_048_576, description="Largest body in bytes; larger is 413.")
    retry_after: Duration = Field(1.0, gt=0, description="Retry-After sent with 429 while the pipeline is full.")
    codec: JsonCodec = Field(
        default_factory=lambda: JsonCodec(type="json"),
        description="How the body becomes readings: a JSON object, an array of objects, or NDJSON.",
    )

    _codec_shorthand = field_validator("codec", mode="before")(_json_codec)


@register
class HttpPushSource(_SourceBase):
    """``POST /ingest/<id>`` on the console port: JSON, a JSON array or NDJSON, behind its own token.

    Answers 202 with counts once the readings are in the pipeline's queue (bad lines of a body
    that also had good ones are dead-lettered and listed), 400 when nothing in the body could be
    read (dead-lettered too), 401 without the token, 413 over ``max_body``, 429 with Retry-After
    while the pipeline's input queue is full, so the client keeps its data and sends it again.
    """

    Options = HttpPushOptions
    options: HttpPushOptions

    @classmethod
    def check(cls, options: NodeOptions, config: Any) -> list[tuple[str, str]]:
        issues: list[tuple[str, str]] = []
        if not isinstance(config, dict):
            return issues
        console = config.get("console") or {}
        if isinstance(console, dict) and console.get("enabled") is False:
            issues.append(("type", "an http source receives on the console port; console.enabled is false"))
        same = 0
        for p in config.get("pipelines") or []:
            for n in (p or {}).get("nodes") or [] if isinstance(p, dict) else []:
                if isinstance(n, dict) and n.get("type") == "http" and n.get("id") == options.id:
                    same += 1
        if same > 1:
            issues.append(
                ("id", f"another pipeline has an http source {options.id!r}: /ingest/{options.id} is one URL")
            )
        return issues

    def __init__(self, options: HttpPushOptions, ctx: Any):
        super().__init__(options, ctx)
        self._token = options.token.encode()
        self._out: SourceOutput | None = None
        self.n_requests = 0
        self.status: dict[str, int] = {}
        self.last_push: float | None = None

    def health(self) -> dict[str, Any]:
        h: dict[str, Any] = {
            "state": "up" if self._out is not None else "starting",
            "device": f"POST /ingest/{self.id}",
            "requests": self.n_requests,
            "last_push": self.last_push,
        }
        if self._out is not None and self._out.full:
            h["paused"] = True  # answering 429
        return h

    def counters(self) -> dict[str, int]:
        c = super().counters()
        for code, n in self.status.items():
            c[f"http_{code}"] = n
        return c

    async def run(self, output: SourceOutput) -> None:
        ingest: dict[str, Any] = self.ctx.services.ingest
        self._out = output
        ingest[self.id] = self.handle
        try:
            await asyncio.Future()  # serve until the pipeline stops
        finally:
            if ingest.get(self.id) == self.handle:
                del ingest[self.id]
            self._out = None

    def _answer(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
        self.status[str(status)] = self.status.get(str(status), 0) + 1
        return web.json_response(body, status=status, headers=headers)

    async def handle(self, request: web.Request) -> web.Response:
        self.n_requests += 1
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogatepass"), self._token
        ):
            return self._answer(
                401,
                {"error": "send Authorization: Bearer <the source's token>"},
                {"WWW-Authenticate": f'Bearer realm="ingest/{self.id}"'},
            )
        out = self._out
        if out is None:
            return self._answer(503, {"error": f"source {self.id} is not running"})
        limit = self.options.max_body
        if request.content_length is not None and request.content_length > limit:
            return self._answer(413, {"error": f"body of {request.content_length} bytes; at most {limit}"})
        if out.full:  # before reading: a paused client costs us no memory
            return self._too_busy()
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.read(65536):
            size += len(chunk)
            if size > limit:
                return self._answer(413, {"error": f"body over {limit} bytes"})
            chunks.append(chunk)
        events, reasons = self._decode(f"POST /ingest/{self.id} from {request.remote}", b"".join(chunks))
        if not events:
            return self._answer(400, {"error": "; ".join(reasons[:_SHOWN_ERRORS]), "rejected": len(reasons)})
        if self._out is not out:  # the pipeline stopped while the body arrived
            self.n_in -= len(events)
            return self._answer(503, {"error": f"source {self.id} stopped; send again"})
        # Room was checked before the body was read; it is taken even if other bodies filled the
        # queue meanwhile (put_nowait always accepts), so nothing answered 202 is lost.
        out.put_nowait(events)
        self.last_push = self.ctx.clock()
        body: dict[str, Any] = {"accepted": len(events), "rejected": len(reasons)}
        if reasons:
            body["errors"] = reasons[:_SHOWN_ERRORS]
        return self._answer(202, body)

    def _too_busy(self) -> web.Response:
        wait = self.options.retry_after
        return self._answer(
            429,
            {"error": "the pipeline is full; send again later", "retry_after": wait},
            {"Retry-After": str(max(1, round(wait)))},
        )


# --- poll ------------------------------------------------------------------------------------


class HttpPollOptions(NodeOptions):
    type: Literal["http_poll"]
    max_future: Duration | None = max_future_field()
    url: str = Field(pattern=r"^https?://", description="http:// or https:// URL that answers with JSON or NDJSON.")
    mode: Literal["poll", "long_poll"] = Field(
        "poll",
        description="poll: one request every `interval`; long_poll: ask again as soon as an answer arrives "
        "(the server holds the request until it has data).",
    )
    interval: Duration = Field(10.0, gt=0, description="Time between polls (mode poll).")
    timeout: Duration = Field(
        30.0, gt=0, description="Longest a request may take (long-poll: above the server's hold)."
    )
    headers: dict[str, str] = secret_field(default_factory=dict, description="Sent with every request (e.g. a token).")
    etag: bool = Field(True, description="Send If-None-Match with the last ETag; a 304 means nothing new.")
    max_body: int = Field(16 * 1_048_576, ge=64, description="Largest answer in bytes; larger is dead-lettered.")
    codec: JsonCodec = Field(
        default_factory=lambda: JsonCodec(type="json"),
        description="How the answer becomes readings: a JSON object, an array of objects, or NDJSON.",
    )
    reconnect_max: Duration = Field(30.0, gt=0, description="Longest wait between attempts after an error.")

    _codec_shorthand = field_validator("codec", mode="before")(_json_codec)

    @model_validator(mode="after")
    def _one_credential(self) -> HttpPollOptions:
        # aiohttp refuses a request with both, and the link would never send
        if urlsplit(self.url).username is not None and any(k.lower() == "authorization" for k in self.headers):
            raise ValueError("give credentials in the URL or in an Authorization header, not both")
        return self


class _Failed(Exception):
    pass


@register
class HttpPollSource(_SourceBase):
    """Poll (or long-poll) a URL with aiohttp; each 200 answer's JSON becomes readings.

    A connection error, timeout or error status marks the source down with the reason and retries
    with backoff; 204 and 304 (with ETag) mean nothing new. A full pipeline makes ``put`` wait,
    which simply delays the next request.
    """

    Options = HttpPollOptions
    options: HttpPollOptions

    def __init__(self, options: HttpPollOptions, ctx: Any):
        super().__init__(options, ctx)
        self._health = DeviceHealth(options.url)
        self._etag: str | None = None
        self.n_requests = 0
        self.n_not_modified = 0
        self.n_failures = 0

    def health(self) -> dict[str, Any]:
        h = self._health.as_dict()
        h["requests"] = self.n_requests
        return h

    def counters(self) -> dict[str, int]:
        c = super().counters()
        c["requests"] = self.n_requests
        c["failures"] = self.n_failures
        return c

    async def run(self, output: SourceOutput) -> None:
        o = self.options
        attempt = 0
        timeout = aiohttp.ClientTimeout(total=o.timeout)
        async with aiohttp.ClientSession(headers=o.headers, timeout=timeout) as session:
            while True:
                started = self.ctx.monotonic()
                try:
                    events = await self._fetch(session)
                except _Failed as exc:
                    delay = backoff(attempt, o.reconnect_max)
                    attempt += 1
                    self.n_failures += 1
                    if self._health.state != "down":
                        log.warning("http_poll %s/%s: %s; retrying with backoff", self.ctx.pipeline, self.id, exc)
                    self._health.down(self.ctx.clock(), str(exc), delay)
                    await asyncio.sleep(delay)
                    continue
                if self._health.state != "up":
                    log.info(
                        "http_poll %s/%s: %s %s",
                        self.ctx.pipeline,
                        self.id,
                        "answers again:" if self._health.state == "down" else "polling",
                        o.url,
                    )
                    self._health.up(self.ctx.clock())
                attempt = 0
                if events:
                    await output.put(events)
                if o.mode == "poll":
                    await self.ctx.sleep_until(started + o.interval)

    async def _fetch(self, session: aiohttp.ClientSession) -> list[Event]:
        o = self.options
        headers = {"If-None-Match": self._etag} if o.etag and self._etag else None
        self.n_requests += 1
        try:
            async with session.get(o.url, headers=headers) as resp:
                if resp.status == 304 or resp.status == 204:
                    self.n_not_modified += resp.status == 304
                    return []
                if resp.status != 200:
                    text = (await resp.content.read(200)).decode("utf-8", "replace").strip()
                    raise _Failed(f"HTTP {resp.status} {resp.reason or ''}".strip() + (f": {text}" if text else ""))
                chunks: list[bytes] = []
                size = 0
                while chunk := await resp.content.read(65536):
                    size += len(chunk)
                    if size > o.max_body:
                        self._reject(o.url, "overlong", f"answer over {o.max_body} bytes", b"".join(chunks)[:200])
                        return []
                    chunks.append(chunk)
                etag = resp.headers.get("ETag")
        except (aiohttp.ClientError, OSError) as exc:
            raise _Failed(f"cannot fetch: {exc or type(exc).__name__}") from None
        except TimeoutError:
            raise _Failed(f"no answer within {o.timeout:g}s") from None
        if etag:
            self._etag = etag
        events, _ = self._decode(o.url, b"".join(chunks), empty_ok=True)
        return events
