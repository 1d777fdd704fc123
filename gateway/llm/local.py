"""A GGUF model run in-process by llama-cpp-python, in one dedicated thread."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import importlib
import importlib.util
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..schema import LocalProviderConfig, gguf_problem, package_gguf
from .provider import Chunk, LlmRequest, ModelLoadError, ProviderError

log = logging.getLogger(__name__)
# llama.cpp's own log lines (model loading, context warnings, a decode stopped by a cancel)
llama_log = logging.getLogger("gateway.llm.llama_cpp")


# --- llama.cpp's log, into ours ---------------------------------------------------------------

# ggml_log_level today: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (llama-cpp-python's own
# callback still has the older order, so it prints llama.cpp's warnings and hides its errors)
_GGML_ERROR = 4
_GGML_CONT = 5
_log_route: Any = None  # the ctypes callback handed to llama.cpp: kept alive while it may be called
_providers: weakref.WeakSet[LocalProvider] = weakref.WeakSet()


def _aborting() -> bool:
    """Whether a generation is being stopped through the abort callback (llama.cpp then logs
    the decode it gave up as an error, which is expected)."""
    return any(p._current is not None and p._current.cancelled.is_set() for p in list(_providers))


class _LlamaLog:
    """llama.cpp's log callback: whole lines to :data:`llama_log`, at debug level (errors as
    warnings, unless a cancel asked for them), instead of llama-cpp-python's, which prints them
    to stderr. A line may come in pieces (``GGML_LOG_LEVEL_CONT``): they are joined until the
    newline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._level = logging.DEBUG

    def __call__(self, level: int, text: bytes | None, _user: Any) -> None:
        # called from llama.cpp's C code: whatever happens must not escape into it
        try:
            piece = (text or b"").decode("utf-8", "replace")
            with self._lock:
                if level != _GGML_CONT:
                    error = level == _GGML_ERROR and not _aborting()
                    self._level = logging.WARNING if error else logging.DEBUG
                self._pending.append(piece)
                if not piece.endswith("\n"):
                    return
                line, self._pending = "".join(self._pending).strip(), []
                at = self._level
            if line.strip(".") and llama_log.isEnabledFor(at):  # not the dots of a loading bar
                llama_log.log(at, "llama.cpp: %s", line)
        except Exception:  # nothing may be raised into C: a lost log line is all it costs
            pass


def _route_llama_log(llama_cpp: Any) -> None:
    """Once per process: llama.cpp logs through :class:`_LlamaLog`; and the two files of /dev/null
    that llama-cpp-python opens at import (``llama_cpp._utils``, used to silence model loading)
    are closed at exit, where it would leave them to a ResourceWarning."""
    global _log_route
    if _log_route is not None:
        return
    try:
        route = llama_cpp.llama_log_callback(_LlamaLog())
        llama_cpp.llama_log_set(route, ctypes.c_void_p(0))
    except (AttributeError, TypeError) as exc:  # a binding without it: llama.cpp keeps its own log
        log.debug("llama.cpp's log stays on stderr: %s", exc)
        return
    _log_route = route
    utils = sys.modules.get("llama_cpp._utils")
    files = [getattr(utils, name, None) for name in ("outnull_file", "errnull_file")]
    atexit.register(_close_files, [f for f in files if callable(getattr(f, "close", None))])


def _close_files(files: list[Any]) -> None:
    for f in files:
        with contextlib.suppress(OSError):
            f.close()


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
        _providers.add(self)

    # thread side ---------------------------------------------------------------------------

    def _resolve_path(self) -> str:
        if self.model_path is None:
            found = package_gguf(self.config.package)  # type: ignore[arg-type]
            if found is not None:
                self.model_path = str(found)
            else:
                pkg = importlib.import_module(self.config.package)  # type: ignore[arg-type]
                self.model_path = str(pkg.assemble())
        return self.model_path

    def _load(self) -> Any:
        path = self._resolve_path()
        problem = gguf_problem(path)
        if problem:
            raise ModelLoadError(problem, self.name)
        try:
            import llama_cpp
            from llama_cpp import Llama
        except ImportError as exc:
            raise ModelLoadError(
                "llama-cpp-python is not installed (pip install 'sluice-gateway[llm]')", self.name
            ) from exc
        _route_llama_log(llama_cpp)
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
