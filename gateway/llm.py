"""The LLM stage's machinery: providers behind one small seam, a circuit breaker per provider, the
fallback chain, and the admission queue that sheds by policy so a slow model never slows a pipeline.

A provider is anything with ``stream(request) -> async iterator of Chunk``; closing the iterator
(or cancelling the task consuming it) cancels the generation. :class:`LocalProvider` runs
llama-cpp-python in one dedicated thread per model; :class:`RemoteProvider` speaks the
OpenAI-compatible ``/v1/chat/completions`` streaming API. :class:`LlmHub` owns the configured
providers of a gateway (the top-level ``llm:`` section), each with its breaker, concurrency limit
and statistics; :class:`AdmissionQueue` is the bounded, prioritised, coalescing queue in front.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import heapq
import importlib
import importlib.util
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

from ._retry import backoff
from .errors import SluiceError
from .schema import LlmConfig, LocalProviderConfig, RemoteProviderConfig, gguf_problem

__all__ = [
    "SHED_REASONS",
    "AdmissionQueue",
    "Chunk",
    "CircuitBreaker",
    "LlmConfig",
    "LlmError",
    "LlmHub",
    "LlmRequest",
    "LocalProvider",
    "LocalProviderConfig",
    "ModelLoadError",
    "Outcome",
    "Provider",
    "ProviderError",
    "ProviderSlot",
    "RemoteProvider",
    "RemoteProviderConfig",
    "metric_families",
    "run_chain",
]

log = logging.getLogger(__name__)

SHED_REASONS = ("queue_full", "deadline", "coalesced", "breaker_open")


# --- errors --------------------------------------------------------------------------------


class LlmError(SluiceError):
    """Something in the LLM stage failed; ``provider`` names the provider when known."""

    def __init__(self, message: str, provider: str | None = None):
        self.provider = provider
        super().__init__(f"llm provider {provider!r}: {message}" if provider else message)


class ModelLoadError(LlmError):
    """A local model file is missing, unreadable or not a model llama.cpp can load."""


class ProviderError(LlmError):
    """A generation failed. ``retryable`` says whether trying again (or elsewhere) may help."""

    def __init__(
        self, message: str, provider: str | None = None, *, retryable: bool = True, retry_after: float | None = None
    ):
        super().__init__(message, provider)
        self.retryable = retryable
        self.retry_after = retry_after


# --- the seam ------------------------------------------------------------------------------


@dataclass(slots=True)
class LlmRequest:
    """One chat completion to run."""

    messages: list[dict[str, str]]
    max_tokens: int = 256
    temperature: float = 0.2
    stop: list[str] = field(default_factory=list)
    json_schema: dict[str, Any] | None = None


@dataclass(slots=True)
class Chunk:
    """A piece of generated text; the last one of a stream carries ``finish_reason``."""

    text: str
    finish_reason: str | None = None


class Provider(Protocol):
    """One model endpoint. Closing the returned iterator cancels the generation."""

    name: str

    def stream(self, request: LlmRequest) -> AsyncIterator[Chunk]: ...


# --- local: llama-cpp-python in one thread -------------------------------------------------


def _default_threads() -> int:
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass(slots=True, eq=False)
class _Job:
    request: LlmRequest
    loop: asyncio.AbstractEventLoop
    push: Callable[[Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


_DONE: Any = object()


class LocalProvider:
    """A GGUF model in a dedicated worker thread (a ``Llama`` object is not thread-safe).

    Jobs go to the thread through a queue; each generated chunk comes back with
    ``loop.call_soon_threadsafe``. Cancelling sets a flag the thread checks between tokens and,
    through llama.cpp's abort callback, between prompt-evaluation steps.
    """

    concurrency = 1

    def __init__(self, name: str, config: LocalProviderConfig):
        self.name = name
        self.config = config
        self.model_path: str | None = config.model
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loaded: asyncio.Future[None] | None = None
        self._current: _Job | None = None
        self._abort_cb: Any = None
        self.aborted = 0

    # thread side ---------------------------------------------------------------------------

    def _resolve_path(self) -> str:
        if self.model_path is None:
            pkg = importlib.import_module(self.config.package)  # type: ignore[arg-type]
            self.model_path = str(pkg.assemble())
        return self.model_path

    def _load(self) -> Any:
        path = self._resolve_path()
        problem = gguf_problem(path)
        if problem:
            raise ModelLoadError(problem, self.name)
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ModelLoadError(
                "llama-cpp-python is not installed (pip install 'sluice-gateway[llm]')", self.name
            ) from exc
        c = self.config
        threads = c.threads or _default_threads()
        try:
            # n_threads_batch too: left unset, prompt evaluation would use every core
            llm = Llama(
                path,
                n_ctx=c.n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_batch=c.n_batch,
                n_ubatch=c.n_batch,
                chat_format=c.chat_format,
                seed=c.seed,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp cannot load {path}: {exc}", self.name) from exc
        self._install_abort(llm)
        log.info(
            "llm provider %s: loaded %s (n_ctx=%d, threads=%d)",
            self.name,
            path,
            c.n_ctx,
            c.threads or _default_threads(),
        )
        return llm

    def _install_abort(self, llm: Any) -> None:
        # Lets a cancel stop prompt evaluation between batches, not only between tokens.
        try:
            import llama_cpp

            def abort(_data: Any) -> bool:
                job = self._current
                return job is not None and job.cancelled.is_set()

            self._abort_cb = llama_cpp.ggml_abort_callback(abort)
            llama_cpp.llama_set_abort_callback(llm._ctx.ctx, self._abort_cb, None)
        except (ImportError, AttributeError, TypeError):  # an older binding: token-level cancel only
            log.debug("llm provider %s: no abort callback; cancelling between tokens only", self.name)

    def _worker(self, ready: Callable[[BaseException | None], None]) -> None:
        if self.config.nice and hasattr(os, "setpriority"):
            # per thread on Linux, and inherited by the threads llama.cpp starts from this one
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.config.nice)
        llm: Any = None
        load_error: BaseException | None = None
        if self.config.load == "start":
            try:
                llm = self._load()
            except ModelLoadError as exc:
                load_error = exc
            ready(load_error)
        while True:
            job = self._jobs.get()
            if job is None:
                break
            if job.cancelled.is_set():
                continue
            if llm is None:
                try:
                    llm = self._load()
                except ModelLoadError as exc:
                    job.loop.call_soon_threadsafe(job.push, exc)
                    continue
            self._current = job
            try:
                self._generate(llm, job)
            finally:
                self._current = None
        del llm

    def _generate(self, llm: Any, job: _Job) -> None:
        r = job.request
        kw: dict[str, Any] = {"max_tokens": r.max_tokens, "temperature": r.temperature, "stream": True}
        if r.stop:
            kw["stop"] = r.stop
        if r.json_schema is not None:
            kw["response_format"] = {"type": "json_object", "schema": r.json_schema}
        push = job.push
        call = job.loop.call_soon_threadsafe
        try:
            it = llm.create_chat_completion(r.messages, **kw)
            for part in it:
                # Give the GIL away between tokens: llama-cpp-python does a lot of Python work per
                # token, and without this the event loop's thread waits for the GIL (the pipeline
                # ran at ~40 % speed in scripts/bench/llm_overload.py; with it, at full speed).
                time.sleep(0)
                if job.cancelled.is_set():
                    it.close()
                    return
                choice = part["choices"][0]
                text = choice.get("delta", {}).get("content") or ""
                reason = choice.get("finish_reason")
                if text or reason:
                    call(push, Chunk(text, reason))
            call(push, _DONE)
        except Exception as exc:  # the model boundary: hand the failure to the waiting coroutine
            if job.cancelled.is_set():
                self.aborted += 1  # llama.cpp stopped mid-evaluation through the abort callback
                return
            call(push, ProviderError(f"generation failed: {type(exc).__name__}: {exc}", self.name))

    # loop side -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker thread; with ``load: start`` wait for the model and raise if it fails."""
        if self._thread is not None:
            return
        loop = asyncio.get_running_loop()
        loaded: asyncio.Future[None] = loop.create_future()
        self._loaded = loaded

        def ready(exc: BaseException | None) -> None:
            def settle() -> None:
                if not loaded.done():
                    if exc is None:
                        loaded.set_result(None)
                    else:
                        loaded.set_exception(exc)

            loop.call_soon_threadsafe(settle)

        self._thread = threading.Thread(target=self._worker, args=(ready,), name=f"llm:{self.name}", daemon=True)
        self._thread.start()
        if self.config.load == "start":
            await loaded

    async def close(self) -> None:
        t = self._thread
        if t is None:
            return
        if self._current is not None:
            self._current.cancelled.set()
        self._jobs.put(None)
        await asyncio.to_thread(t.join)
        self._thread = None

    async def stream(self, request: LlmRequest) -> AsyncIterator[Chunk]:
        if self._thread is None:
            await self.start()
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        job = _Job(request, asyncio.get_running_loop(), inbox.put_nowait)
        self._jobs.put(job)
        try:
            while True:
                item = await inbox.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancelled.set()


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


# --- circuit breaker -----------------------------------------------------------------------


class CircuitBreaker:
    """Closed → (``failures`` in a row) → open → (after ``reset`` s) half-open: one probe decides."""

    def __init__(
        self, failures: int = 3, reset: float = 30.0, clock: Callable[[], float] = time.monotonic, name: str = ""
    ):
        self.failures = failures
        self.reset = reset
        self.clock = clock
        self.name = name
        self.state: Literal["closed", "open", "half_open"] = "closed"
        self.consecutive = 0
        self.opened_at = 0.0
        self.opened = 0
        self._probing = False

    def allow(self) -> bool:
        if self.state == "closed":
            return True
        if self.state == "open":
            if self.clock() - self.opened_at < self.reset:
                return False
            self.state = "half_open"
            log.info("llm provider %s: breaker half-open, probing", self.name)
        if self._probing:
            return False
        self._probing = True
        return True

    def is_open(self) -> bool:
        """Open and not yet due for a probe; unlike :meth:`allow`, changes nothing."""
        return self.state == "open" and self.clock() - self.opened_at < self.reset

    def success(self) -> None:
        if self.state != "closed":
            log.info("llm provider %s: breaker closed", self.name)
        self.state = "closed"
        self.consecutive = 0
        self._probing = False

    def failure(self) -> None:
        self.consecutive += 1
        self._probing = False
        if self.state == "half_open" or (self.state == "closed" and self.consecutive >= self.failures):
            self.state = "open"
            self.opened_at = self.clock()
            self.opened += 1
            log.warning(
                "llm provider %s: breaker open for %.0fs after %d failures", self.name, self.reset, self.consecutive
            )

    def release(self) -> None:
        """A probe that ended without a verdict (cancelled): let another one through."""
        self._probing = False


# --- the hub: a gateway's providers --------------------------------------------------------


@dataclass(slots=True)
class ProviderStats:
    requests: int = 0
    errors: int = 0
    in_flight: int = 0
    tokens: int = 0
    first_token_s: float = 0.0  # last observed
    tokens_per_s: float = 0.0  # last observed
    last_error: str | None = None


class ProviderSlot:
    """A provider with what the gateway keeps around it: breaker, concurrency limit, statistics."""

    def __init__(self, provider: Any, breaker: CircuitBreaker, concurrency: int):
        self.provider = provider
        self.name: str = provider.name
        self.breaker = breaker
        self.concurrency = concurrency
        self.semaphore = asyncio.Semaphore(concurrency)
        self.stats = ProviderStats()

    def describe(self) -> dict[str, Any]:
        s = self.stats
        return {
            "name": self.name,
            "breaker": self.breaker.state,
            "concurrency": self.concurrency,
            "requests": s.requests,
            "errors": s.errors,
            "in_flight": s.in_flight,
            "tokens": s.tokens,
            "first_token_s": s.first_token_s,
            "tokens_per_s": s.tokens_per_s,
            "last_error": s.last_error,
        }


class LlmHub:
    """The providers of one gateway, built from the ``llm:`` section; shared by all ``llm`` nodes."""

    def __init__(self, config: LlmConfig | None, clock: Callable[[], float] = time.monotonic):
        self.config = config or LlmConfig()
        self.slots: dict[str, ProviderSlot] = {}
        for name, pc in self.config.providers.items():
            provider: Any = LocalProvider(name, pc) if isinstance(pc, LocalProviderConfig) else RemoteProvider(name, pc)
            self.add(provider, CircuitBreaker(pc.breaker_failures, pc.breaker_reset, clock, name))

    def add(self, provider: Any, breaker: CircuitBreaker | None = None, concurrency: int | None = None) -> ProviderSlot:
        """Register a provider (any object with ``name`` and ``stream``)."""
        slot = ProviderSlot(
            provider, breaker or CircuitBreaker(name=provider.name), concurrency or getattr(provider, "concurrency", 1)
        )
        self.slots[provider.name] = slot
        return slot

    def slot(self, name: str) -> ProviderSlot:
        try:
            return self.slots[name]
        except KeyError:
            raise LlmError(f"unknown llm provider {name!r}; known: {', '.join(self.slots) or 'none'}") from None

    async def start(self) -> None:
        """Start every provider; a local model that cannot load raises :class:`ModelLoadError` here."""
        for slot in self.slots.values():
            start = getattr(slot.provider, "start", None)
            if start is not None:
                await start()

    async def close(self) -> None:
        for slot in self.slots.values():
            close = getattr(slot.provider, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:  # closing one provider must not keep the others open
                    log.exception("llm provider %s failed to close", slot.name)

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self.slots.values()]

    def problems(self) -> list[str]:
        """One line per provider that is known down, for /healthz."""
        out = []
        for s in self.slots.values():
            if s.breaker.state != "closed":
                why = f": {s.stats.last_error}" if s.stats.last_error else ""
                out.append(f"llm provider {s.name}: breaker {s.breaker.state.replace('_', '-')}{why}")
        return out


# --- fallback chain ------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """How a request through a fallback chain ended."""

    status: Literal["ok", "error", "breaker_open"] = "ok"
    provider: str | None = None
    text: str = ""
    tokens: int = 0
    first_token_s: float | None = None
    total_s: float = 0.0
    error: str | None = None
    finish_reason: str | None = None
    attempts: list[str] = field(default_factory=list)


async def run_chain(
    slots: list[ProviderSlot],
    request: LlmRequest,
    on_chunk: Callable[[str, Chunk], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Outcome:
    """Try each provider in order, skipping those whose breaker is open.

    A provider that fails before its first token hands over to the next; once tokens went out
    (``on_chunk``), a failure ends the request as an error with the partial text.
    """
    out = Outcome()
    start = clock()
    skipped = 0
    for slot in slots:
        if not slot.breaker.allow():
            skipped += 1
            out.attempts.append(f"{slot.name}: breaker open")
            continue
        async with slot.semaphore:
            st = slot.stats
            st.requests += 1
            st.in_flight += 1
            t0 = clock()
            first: float | None = None
            tokens = 0
            parts: list[str] = []
            reason: str | None = None
            verdict = False  # whether the breaker heard how this attempt went
            try:
                agen = slot.provider.stream(request)
                try:
                    async for chunk in agen:
                        if chunk.text:
                            if first is None:
                                first = clock() - t0
                            tokens += 1
                            parts.append(chunk.text)
                        if chunk.finish_reason:
                            reason = chunk.finish_reason
                        if on_chunk is not None:
                            on_chunk(slot.name, chunk)
                finally:
                    await agen.aclose()
            except (LlmError, OSError) as exc:
                st.errors += 1
                st.last_error = str(exc)
                slot.breaker.failure()
                verdict = True
                out.attempts.append(f"{slot.name}: {exc}")
                if tokens:
                    out.status, out.provider, out.text, out.tokens = "error", slot.name, "".join(parts), tokens
                    out.first_token_s, out.error = first, str(exc)
                    out.total_s = clock() - start
                    return out
                continue
            else:
                slot.breaker.success()
                verdict = True
            finally:
                st.in_flight -= 1
                if not verdict:  # cancelled: no verdict on the provider
                    slot.breaker.release()
            elapsed = clock() - t0
            st.tokens += tokens
            if first is not None:
                st.first_token_s = first
            if tokens and elapsed > 0:
                st.tokens_per_s = tokens / elapsed
            out.status, out.provider, out.text, out.tokens = "ok", slot.name, "".join(parts), tokens
            out.first_token_s, out.finish_reason = first, reason
            out.total_s = clock() - start
            return out
    out.total_s = clock() - start
    if skipped == len(slots):
        out.status = "breaker_open"
        out.error = "every provider's breaker is open"
    else:
        out.status = "error"
        out.error = "; ".join(out.attempts)
    return out


# --- admission queue -----------------------------------------------------------------------

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class _Entry(Generic[T]):
    item: T
    key: str | None
    priority: int
    enqueued: float
    seq: int
    live: bool = True


class AdmissionQueue(Generic[T]):
    """A bounded queue that sheds by policy instead of making its producer wait.

    - **priority**: higher first; within a priority, oldest first;
    - **coalesce**: a new item with the key of a queued one replaces it (the old one is shed);
    - **max_depth**: when full, a new item evicts the oldest lowest-priority item if that one
      ranks below it, else the new item itself is shed;
    - **deadline**: an item that waited longer is shed instead of being handed out.

    Shed items go to ``on_shed(item, reason)``; counts by reason are in ``shed``.
    """

    def __init__(
        self,
        max_depth: int,
        deadline: float | None,
        on_shed: Callable[[T, str], None],
        clock: Callable[[], float] = time.monotonic,
        coalesce: bool = True,
    ):
        self.max_depth = max_depth
        self.deadline = deadline
        self.on_shed = on_shed
        self.clock = clock
        self.coalesce = coalesce
        self.shed: dict[str, int] = dict.fromkeys(SHED_REASONS, 0)
        self.admitted = 0
        self.high_water = 0
        self._heap: list[tuple[int, int, _Entry[T]]] = []
        self._by_key: dict[str, _Entry[T]] = {}
        self._depth = 0
        self._seq = itertools.count()
        self._waiters: list[asyncio.Future[None]] = []
        self.wait_s: list[float] = []  # recent queue waits of handed-out items, bounded

    def __len__(self) -> int:
        return self._depth

    def _shed(self, e: _Entry[T], reason: str) -> None:
        e.live = False
        self._depth -= 1
        if e.key is not None and self._by_key.get(e.key) is e:
            del self._by_key[e.key]
        self.shed[reason] += 1
        self.on_shed(e.item, reason)

    def count_shed(self, item: T, reason: str) -> None:
        """Shed an item that never entered the queue (e.g. every breaker open)."""
        self.shed[reason] += 1
        self.on_shed(item, reason)

    def put(self, item: T, key: str | None = None, priority: int = 0) -> bool:
        """Offer an item; returns False if it was shed at once."""
        now = self.clock()
        if self.coalesce and key is not None:
            old = self._by_key.get(key)
            if old is not None and old.live:
                self._shed(old, "coalesced")
        if self._depth >= self.max_depth:
            victim = self._lowest()
            if victim is None or victim.priority >= priority:
                self.shed["queue_full"] += 1
                self.on_shed(item, "queue_full")
                return False
            self._shed(victim, "queue_full")
        e = _Entry(item, key, priority, now, next(self._seq))
        heapq.heappush(self._heap, (-priority, e.seq, e))
        if key is not None:
            self._by_key[key] = e
        self._depth += 1
        self.admitted += 1
        self.high_water = max(self.high_water, self._depth)
        while self._waiters:
            w = self._waiters.pop(0)
            if not w.done():
                w.set_result(None)
                break
        return True

    def _lowest(self) -> _Entry[T] | None:
        live = [e for _, _, e in self._heap if e.live]
        if not live:
            return None
        return min(live, key=lambda e: (e.priority, e.seq))

    def expire(self) -> int:
        """Shed every item past its deadline now (called periodically, so they go out on time)."""
        if self.deadline is None:
            return 0
        limit = self.clock() - self.deadline
        n = 0
        for _, _, e in self._heap:
            if e.live and e.enqueued < limit:
                self._shed(e, "deadline")
                n += 1
        if n:
            self._heap = [t for t in self._heap if t[2].live]
            heapq.heapify(self._heap)
        return n

    def get_nowait(self) -> tuple[T, float] | None:
        """The next item and how long it waited, or None; expired items are shed on the way."""
        while self._heap:
            _, _, e = heapq.heappop(self._heap)
            if not e.live:
                continue
            waited = self.clock() - e.enqueued
            if self.deadline is not None and waited > self.deadline:
                self._shed(e, "deadline")
                continue
            e.live = False
            self._depth -= 1
            if e.key is not None and self._by_key.get(e.key) is e:
                del self._by_key[e.key]
            self.wait_s.append(waited)
            if len(self.wait_s) > 1000:
                del self.wait_s[:500]
            return e.item, waited
        return None

    async def get(self) -> tuple[T, float]:
        while True:
            got = self.get_nowait()
            if got is not None:
                return got
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)

    def drain(self) -> Iterable[T]:
        """Take every queued item out (at shutdown), oldest first within priority."""
        while True:
            got = self.get_nowait() if self.deadline is None else self._pop_any()
            if got is None:
                return
            yield got[0]

    def _pop_any(self) -> tuple[T, float] | None:
        while self._heap:
            _, _, e = heapq.heappop(self._heap)
            if e.live:
                e.live = False
                self._depth -= 1
                if e.key is not None and self._by_key.get(e.key) is e:
                    del self._by_key[e.key]
                return e.item, 0.0
        return None

    def stats(self) -> dict[str, Any]:
        return {
            "depth": self._depth,
            "max_depth": self.max_depth,
            "high_water": self.high_water,
            "admitted": self.admitted,
            "shed": dict(self.shed),
        }


# --- metrics -------------------------------------------------------------------------------


def metric_families(gw: Any) -> Iterable[Any]:
    """Prometheus families for the LLM providers of a running gateway (read at scrape time);
    each llm node reports its own admission queue through its ``metrics()`` hook."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    hub = getattr(gw, "llm", None)
    if not isinstance(hub, LlmHub):
        return
    pl = ["provider"]
    req = CounterMetricFamily("sluice_llm_provider_requests", "Requests sent to a provider", labels=pl)
    err = CounterMetricFamily("sluice_llm_provider_errors", "Provider requests that failed", labels=pl)
    pin = GaugeMetricFamily("sluice_llm_provider_in_flight", "Requests a provider is working on", labels=pl)
    tok = CounterMetricFamily("sluice_llm_provider_tokens", "Tokens a provider generated", labels=pl)
    brk = GaugeMetricFamily("sluice_llm_breaker_open", "Circuit breaker: 0 closed, 1 half-open, 2 open", labels=pl)
    level = {"closed": 0, "half_open": 1, "open": 2}
    for slot in hub.slots.values():
        req.add_metric([slot.name], slot.stats.requests)
        err.add_metric([slot.name], slot.stats.errors)
        pin.add_metric([slot.name], slot.stats.in_flight)
        tok.add_metric([slot.name], slot.stats.tokens)
        brk.add_metric([slot.name], level[slot.breaker.state])
    yield from (req, err, pin, tok, brk)
