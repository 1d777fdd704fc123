"""gateway.llm: the local provider over a tiny real GGUF, the admission queue, breaker and fallback chain."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.llm import (
    AdmissionQueue,
    Chunk,
    CircuitBreaker,
    LlmConfig,
    LlmHub,
    LlmRequest,
    LocalProvider,
    LocalProviderConfig,
    ModelLoadError,
    ProviderError,
    run_chain,
)
from gateway.llm.local import _Job
from tests._tiny_gguf import write_tiny_llama


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("model") / "tiny.gguf")


def _local(path: Path | str, **kw: Any) -> LocalProvider:
    cfg = LocalProviderConfig(type="local", model=str(path), chat_format="gemma", n_ctx=512, threads=1, **kw)
    return LocalProvider("tiny", cfg)


def _req(**kw: Any) -> LlmRequest:
    kw.setdefault("temperature", 0.0)
    return LlmRequest([{"role": "user", "content": "boiler 1 is at 93 C"}], **kw)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- local provider --------------------------------------------------------------------------

_QUIET_PROBE = """
import asyncio, logging, sys
logging.basicConfig(level=logging.DEBUG, format="LOG %(levelname)s %(name)s %(message)s", stream=sys.stderr)
logging.getLogger("asyncio").setLevel(logging.WARNING)
from gateway.llm import LlmRequest, LocalProvider, LocalProviderConfig

async def main():
    # n_ctx above the model's 512: llama.cpp warns about it while the context is made
    cfg = LocalProviderConfig(type="local", model=sys.argv[1], chat_format="gemma", n_ctx=1024, threads=1)
    p = LocalProvider("tiny", cfg)
    await p.start()
    try:
        req = LlmRequest([{"role": "user", "content": "boiler 1 is at 93 C"}], max_tokens=4, temperature=0.0)
        print("".join([c.text async for c in p.stream(req)]))
    finally:
        await p.close()

asyncio.run(main())
"""


def test_llama_cpp_logs_into_ours_and_leaves_nothing_at_exit(tiny_model: Path) -> None:
    """llama.cpp's lines (here: its warning that n_ctx exceeds what the model was trained on) go to
    the gateway's log at debug level, never straight to the terminal; and the process exits
    without llama-cpp-python's /dev/null files left to a ResourceWarning (shown with -X dev)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-X", "dev", "-c", _QUIET_PROBE, str(tiny_model)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith("LOG ")] == []  # no stray lines, no warning
    assert any(
        line.startswith("LOG DEBUG gateway.llm.llama_cpp llama.cpp: llama_context: n_ctx_seq (1024) > n_ctx_train")
        for line in lines
    ), lines[:20]


async def test_llama_cpp_errors_are_warnings_unless_a_cancel_asked_for_them(tiny_model: Path) -> None:
    """llama.cpp logs a decode stopped by the abort callback as an error: that one is expected."""
    import logging
    import threading as th

    from gateway.llm.local import _Job, _LlamaLog

    seen: list[tuple[int, str]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.levelno, record.getMessage()))

    logger = logging.getLogger("gateway.llm.llama_cpp")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        route = _LlamaLog()
        route(4, b"llama_decode: failed to decode, ret = -3\n", None)  # ERROR
        route(3, b"llama_context: n_ctx_seq (1024) > n_ctx_train (512)\n", None)  # WARN
        route(2, b"print_info: file type = ", None)  # INFO, then the rest of the line
        route(5, b"F32\n", None)
        route(5, b".", None)  # a loading bar's dots
        route(5, b"\n", None)
        p = _local(tiny_model)  # not started: only its current job matters here
        p._current = _Job(_req(), asyncio.get_running_loop(), lambda item: None, th.Event())
        p._current.cancelled.set()
        route(4, b"llama_decode: failed to decode, ret = 2\n", None)  # the cancel's own
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen == [
        (logging.WARNING, "llama.cpp: llama_decode: failed to decode, ret = -3"),
        (logging.DEBUG, "llama.cpp: llama_context: n_ctx_seq (1024) > n_ctx_train (512)"),
        (logging.DEBUG, "llama.cpp: print_info: file type = F32"),
        (logging.DEBUG, "llama.cpp: llama_decode: failed to decode, ret = 2"),
    ]


async def test_local_streams_deterministic_chunks(tiny_model: Path) -> None:
    p = _local(tiny_model)
    await p.start()
    try:
        a = [c async for c in p.stream(_req(max_tokens=12))]
        b = [c async for c in p.stream(_req(max_tokens=12))]
    finally:
        await p.close()
    assert a == b  # temperature 0 on fixed weights: the same text twice
    assert a[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in a[:-1])
    assert sum(1 for c in a if c.text) >= 3
    assert p._thread is None


async def test_local_runs_in_its_own_thread_and_lazily(tiny_model: Path) -> None:
    p = _local(tiny_model, load="lazy")
    seen: set[str] = set()

    def where(frame: Any, event: str, arg: Any) -> None:
        # llama-cpp-python's public entry point: which thread does the model work run in?
        if event == "call" and frame.f_code.co_name == "create_chat_completion":
            seen.add(threading.current_thread().name)

    threading.setprofile(where)  # threads started from now on: the provider's
    try:
        await p.start()  # lazy: returns before loading anything
        text = "".join([c.text async for c in p.stream(_req(max_tokens=5))])
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
        await p.close()
    assert seen == {"llm:tiny"}
    assert text


async def test_local_json_schema_output_parses(tiny_model: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"cause": {"type": "string", "maxLength": 12}, "level": {"type": "integer"}},
        "required": ["cause", "level"],
    }
    p = _local(tiny_model)
    try:
        text = "".join([c.text async for c in p.stream(_req(max_tokens=80, json_schema=schema))])
    finally:
        await p.close()
    obj = json.loads(text, strict=False)  # a random model may put control characters in strings
    assert set(obj) == {"cause", "level"}
    assert isinstance(obj["level"], int)


async def test_local_cancel_between_tokens_frees_the_model(tiny_model: Path) -> None:
    p = _local(tiny_model)
    await p.start()
    try:
        agen = p.stream(_req(max_tokens=60))
        got = []
        async for c in agen:
            got.append(c)
            if len(got) == 2:
                break
        await agen.aclose()
        # the thread stopped that generation: the next request is answered, and from scratch
        after = [c async for c in p.stream(_req(max_tokens=4))]
        # cancelling the consuming task works the same way
        task = asyncio.create_task(_consume(p.stream(_req(max_tokens=60))))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        again = [c async for c in p.stream(_req(max_tokens=4))]
    finally:
        await p.close()
    assert all(c.finish_reason is None for c in got)
    assert after[-1].finish_reason == "length"
    assert again == after


async def _consume(it: AsyncIterator[Chunk]) -> list[Chunk]:
    return [c async for c in it]


class _CancelAfter:
    """A job's cancel flag that turns itself on after `n` looks (from inside the model thread)."""

    def __init__(self, n: int):
        self.n = n
        self.looks = 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks > self.n

    def set(self) -> None:
        self.n = 0


async def test_local_cancel_during_prompt_evaluation(tiny_model: Path) -> None:
    # a long prompt evaluated 8 tokens a step: cancelled after a few steps, llama.cpp aborts the
    # evaluation through the abort callback instead of finishing it
    p = _local(tiny_model, n_batch=8)
    await p.start()
    pushed: list[Any] = []
    loop = asyncio.get_running_loop()
    long = LlmRequest([{"role": "user", "content": "the boiler is hot " * 20}], max_tokens=5, temperature=0.0)
    flag = _CancelAfter(3)
    job = _Job(long, loop, pushed.append, flag)  # type: ignore[arg-type]
    try:
        p._jobs.put(job)
        # jobs run in order: once this one is answered, the cancelled one is over
        after = [c async for c in p.stream(_req(max_tokens=3))]
    finally:
        await p.close()
    assert p.aborted == 1
    assert pushed == []
    assert 3 < flag.looks < 100  # stopped within a few steps, not after the whole prompt
    assert after[-1].finish_reason == "length"


async def test_missing_and_corrupt_model_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="does not exist"):
        LocalProviderConfig(type="local", model=str(tmp_path / "nope.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ValidationError, match="not a GGUF file"):
        LocalProviderConfig(type="local", model=str(junk))
    with pytest.raises(ValidationError, match="exactly one of"):
        LocalProviderConfig(type="local")
    with pytest.raises(ValidationError, match="not installed"):
        LocalProviderConfig(type="local", package="no_such_model_package_xyz")
    # right magic, broken body: only llama.cpp can tell, at start
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    p = _local(broken)
    with pytest.raises(ModelLoadError, match="cannot load"):
        await p.start()
    # a later request says the same, rather than hanging
    with pytest.raises(ModelLoadError, match="cannot load"):
        [c async for c in p.stream(_req(max_tokens=3))]
    await p.close()


async def test_hub_builds_providers_and_fails_start_on_a_bad_model(tiny_model: Path, tmp_path: Path) -> None:
    cfg = LlmConfig.model_validate(
        {
            "providers": {
                "tiny": {"type": "local", "model": str(tiny_model), "n_ctx": 512, "threads": 1},
                "cloud": {"type": "remote", "url": "http://127.0.0.1:9/v1", "concurrency": 3},
            }
        }
    )
    hub = LlmHub(cfg)
    assert hub.slot("cloud").concurrency == 3 and hub.slot("tiny").concurrency == 1
    with pytest.raises(Exception, match="unknown llm provider 'x'"):
        hub.slot("x")
    await hub.start()
    await hub.close()
    assert [d["breaker"] for d in hub.describe()] == ["closed", "closed"]


# --- circuit breaker and fallback chain ------------------------------------------------------


def test_breaker_opens_after_failures_and_probes_after_reset() -> None:
    clock = FakeClock()
    b = CircuitBreaker(failures=2, reset=10, clock=clock)
    assert b.allow()
    b.failure()
    assert b.state == "closed" and b.allow()
    b.failure()
    assert b.state == "open" and not b.allow()
    clock.now += 9
    assert not b.allow()
    clock.now += 2
    assert b.allow() and b.state == "half_open"
    assert not b.allow()  # one probe at a time
    b.failure()
    assert b.state == "open" and not b.allow()
    clock.now += 11
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()


class ScriptedProvider:
    """A provider seam stand-in for chain logic: yields `tokens` or raises before/after them."""

    def __init__(self, name: str, tokens: list[str], fail_after: int | None = None):
        self.name = name
        self.tokens = tokens
        self.fail_after = fail_after
        self.calls = 0

    async def stream(self, request: LlmRequest) -> AsyncIterator[Chunk]:
        self.calls += 1
        for i, t in enumerate(self.tokens):
            if self.fail_after is not None and i == self.fail_after:
                raise ProviderError("boom", self.name)
            yield Chunk(t)
        if self.fail_after is not None and self.fail_after >= len(self.tokens):
            raise ProviderError("boom", self.name)
        yield Chunk("", "stop")


async def test_chain_falls_back_before_first_token_and_skips_open_breakers(tiny_model: Path) -> None:
    hub = LlmHub(None)
    down = hub.add(ScriptedProvider("down", ["x"], fail_after=0), CircuitBreaker(failures=2, reset=60))
    local = hub.add(_local(tiny_model))
    try:
        outs = [await run_chain([down, local], _req(max_tokens=4)) for _ in range(4)]
    finally:
        await hub.close()
    assert [o.status for o in outs] == ["ok"] * 4
    assert {o.provider for o in outs} == {"tiny"}
    assert down.provider.calls == 2  # then the breaker is open: no more cost per event
    assert down.breaker.state == "open"
    assert "breaker open" in outs[-1].attempts[0]
    assert outs[0].first_token_s is not None and outs[0].tokens >= 1


async def test_chain_reports_breaker_open_and_partial_errors() -> None:
    hub = LlmHub(None)
    a = hub.add(ScriptedProvider("a", ["x"], fail_after=0), CircuitBreaker(failures=1, reset=60))
    first = await run_chain([a], _req())
    assert first.status == "error" and "boom" in (first.error or "")
    second = await run_chain([a], _req())
    assert second.status == "breaker_open"
    mid = hub.add(ScriptedProvider("mid", ["one ", "two ", "three"], fail_after=2))
    other = hub.add(ScriptedProvider("other", ["never"]))
    out = await run_chain([mid, other], _req())
    # tokens already went out: no fallback (it would duplicate text), an error with the partial text
    assert out.status == "error" and out.text == "one two " and out.provider == "mid"
    assert other.provider.calls == 0


# --- admission queue ---------------------------------------------------------------------------


def test_admission_sheds_by_reason() -> None:
    clock = FakeClock()
    shed: list[tuple[str, str]] = []
    q: AdmissionQueue[str] = AdmissionQueue(3, deadline=5.0, on_shed=lambda i, r: shed.append((i, r)), clock=clock)
    assert q.put("a1", key="a", priority=0)
    assert q.put("b1", key="b", priority=0)
    assert q.put("a2", key="a", priority=0)  # replaces a1
    assert shed == [("a1", "coalesced")]
    assert q.put("c1", key="c", priority=0)
    assert len(q) == 3
    assert not q.put("d1", key="d", priority=0)  # full, and nothing ranks below it
    assert shed[-1] == ("d1", "queue_full")
    assert q.put("crit", key="e", priority=2)  # full, but evicts the oldest lowest-priority item
    assert shed[-1] == ("b1", "queue_full")
    assert len(q) == 3 and q.high_water == 3
    got = q.get_nowait()
    assert got is not None and got[0] == "crit"
    clock.now += 6
    assert q.expire() == 2
    assert shed[-2:] == [("a2", "deadline"), ("c1", "deadline")]
    assert q.get_nowait() is None and len(q) == 0
    assert q.stats()["shed"] == {"queue_full": 2, "deadline": 2, "coalesced": 1, "breaker_open": 0}


def test_admission_never_exceeds_its_bound_and_keeps_critical() -> None:
    clock = FakeClock()
    shed: list[tuple[int, str]] = []
    q: AdmissionQueue[int] = AdmissionQueue(8, deadline=None, on_shed=lambda i, r: shed.append((i, r)), clock=clock)
    for i in range(1000):
        q.put(i, key=f"k{i}", priority=2 if i % 50 == 0 else 0)
        assert len(q) <= 8
        if i % 10 == 0:
            q.get_nowait()
    assert not [i for i, _ in shed if i % 50 == 0]
    assert q.high_water == 8


async def test_admission_get_waits_then_hands_out_by_priority() -> None:
    q: AdmissionQueue[str] = AdmissionQueue(10, deadline=None, on_shed=lambda i, r: None)
    task = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    assert not task.done()
    q.put("low", priority=0)
    assert (await task)[0] == "low"
    q.put("low2", priority=0)
    q.put("high", priority=5)
    assert [(await q.get())[0], (await q.get())[0]] == ["high", "low2"]
