"""gateway.llm RemoteProvider against a real aiohttp server speaking OpenAI-style SSE, with faults."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.llm import (
    Chunk,
    CircuitBreaker,
    LlmHub,
    LlmRequest,
    ProviderError,
    RemoteProvider,
    RemoteProviderConfig,
    run_chain,
)
from tests._fake_openai import Behaviour, FakeOpenAI
from tests._util import free_port


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as s:
        yield s


def _remote(url: str, **kw: Any) -> RemoteProvider:
    kw.setdefault("retries", 2)
    return RemoteProvider("cloud", RemoteProviderConfig(type="remote", url=url, model="m", **kw))


def _req(**kw: Any) -> LlmRequest:
    return LlmRequest([{"role": "system", "content": "be brief"}, {"role": "user", "content": "why hot?"}], **kw)


async def _text(p: RemoteProvider, req: LlmRequest | None = None) -> tuple[str, list[Chunk]]:
    chunks = [c async for c in p.stream(req or _req())]
    return "".join(c.text for c in chunks), chunks


async def test_streams_chunks_and_sends_the_request(server: FakeOpenAI) -> None:
    p = _remote(server.url, api_key="sk-test")
    try:
        text, chunks = await _text(p, _req(max_tokens=50, temperature=0.1, stop=["\n"]))
    finally:
        await p.close()
    assert text == "The boiler is hot."
    assert [c.text for c in chunks[:-1]] == ["The ", "boiler ", "is ", "hot", "."]
    assert chunks[-1].finish_reason == "stop"
    body = server.requests[0]
    assert body["stream"] is True and body["model"] == "m" and body["max_tokens"] == 50
    assert body["stop"] == ["\n"] and body["messages"][0] == {"role": "system", "content": "be brief"}
    assert server.headers[0]["Authorization"] == "Bearer sk-test"


async def test_json_schema_is_sent_in_the_chosen_mode(server: FakeOpenAI) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    named = {"name": "output", "schema": schema}
    for mode, expected in (
        ("json_object", {"type": "json_object", "schema": schema}),
        ("json_schema", {"type": "json_schema", "json_schema": named}),
    ):
        p = _remote(server.url, json_mode=mode)
        try:
            await _text(p, _req(json_schema=schema))
        finally:
            await p.close()
        assert server.requests[-1]["response_format"] == expected


async def test_comments_keepalives_and_other_fields_are_ignored(server: FakeOpenAI) -> None:
    server.plan = [Behaviour("comments")]
    p = _remote(server.url)
    try:
        text, _ = await _text(p)
    finally:
        await p.close()
    assert text == "The boiler is hot."


async def test_429_retry_after_is_honoured_then_succeeds(server: FakeOpenAI) -> None:
    server.plan = [Behaviour("status", status=429, retry_after="1"), Behaviour("status", status=503, retry_after="0")]
    p = _remote(server.url)
    try:
        text, _ = await _text(p)
    finally:
        await p.close()
    assert text == "The boiler is hot."
    assert len(server.requests) == 3
    # the client waited as long as the server asked before its second try
    assert server.request_times[1] - server.request_times[0] >= 0.95


async def test_retry_after_longer_than_allowed_fails_at_once(server: FakeOpenAI) -> None:
    server.plan = [Behaviour("status", status=429, retry_after="3600")]
    p = _remote(server.url, retry_after_max=5)
    try:
        with pytest.raises(ProviderError, match="retry after 3600s") as info:
            await _text(p)
    finally:
        await p.close()
    assert info.value.retry_after == pytest.approx(3600)
    assert len(server.requests) == 1


async def test_500_is_retried_and_401_is_not(server: FakeOpenAI) -> None:
    server.plan = [Behaviour("status", status=500), Behaviour("status", status=500)]
    p = _remote(server.url, retries=2)
    try:
        text, _ = await _text(p)
        assert text == "The boiler is hot." and len(server.requests) == 3
        server.plan = [Behaviour("status", status=401)]
        with pytest.raises(ProviderError, match="HTTP 401") as info:
            await _text(p)
        assert not info.value.retryable and len(server.requests) == 4
        server.plan = [Behaviour("status", status=500)] * 3
        with pytest.raises(ProviderError, match="HTTP 500"):
            await _text(p)
        assert len(server.requests) == 7
    finally:
        await p.close()


async def test_stream_cut_midway_is_an_error_without_retry(server: FakeOpenAI) -> None:
    server.plan = [Behaviour("cut")]
    p = _remote(server.url)
    got: list[Chunk] = []
    try:
        with pytest.raises(ProviderError, match="before \\[DONE\\]"):
            async for c in p.stream(_req()):
                got.append(c)
    finally:
        await p.close()
    assert [c.text for c in got] == ["The ", "boiler "]
    assert len(server.requests) == 1  # tokens went out: a retry would repeat them


async def test_no_done_after_a_finish_reason_is_accepted(server: FakeOpenAI) -> None:
    server.plan = [Behaviour("no_done")]
    p = _remote(server.url)
    try:
        text, chunks = await _text(p)
    finally:
        await p.close()
    assert text == "The boiler is hot." and chunks[-1].finish_reason == "stop"


async def test_invalid_json_in_a_chunk_is_an_error(server: FakeOpenAI) -> None:
    server.plan = [Behaviour("bad_json")]
    p = _remote(server.url)
    try:
        with pytest.raises(ProviderError, match="invalid JSON in stream chunk"):
            await _text(p)
    finally:
        await p.close()


async def test_hang_before_first_token_times_out_and_is_retried(server: FakeOpenAI) -> None:
    server.plan = [Behaviour("hang")]
    p = _remote(server.url, first_token_timeout=0.3, retries=1)
    try:
        text, _ = await _text(p)
    finally:
        await p.close()
    assert text == "The boiler is hot." and len(server.requests) == 2


async def test_silence_mid_stream_hits_the_idle_timeout(server: FakeOpenAI) -> None:
    server.plan = [Behaviour("ok", tokens=["a ", "b ", "c"], delay=5.0)]
    p = _remote(server.url, idle_timeout=0.3)
    try:
        with pytest.raises(ProviderError, match=r"no data for 0\.3s"):
            await _text(p)
    finally:
        await p.close()
    assert len(server.requests) == 1


async def test_unreachable_server_opens_the_breaker_and_falls_back(server: FakeOpenAI) -> None:
    hub = LlmHub(None)
    down = hub.add(
        _remote(f"http://127.0.0.1:{free_port()}/v1", retries=0), CircuitBreaker(failures=2, reset=60, name="down")
    )
    up = hub.add(RemoteProvider("backup", RemoteProviderConfig(type="remote", url=server.url)))
    try:
        outs = [await run_chain([down, up], _req()) for _ in range(5)]
    finally:
        await hub.close()
    assert all(o.status == "ok" and o.provider == "backup" for o in outs)
    assert down.stats.requests == 2 and down.stats.errors == 2
    assert down.breaker.state == "open"
    assert "cannot reach" in outs[0].attempts[0]
    assert outs[0].text == "The boiler is hot."


async def test_concurrency_per_provider_is_bounded(server: FakeOpenAI) -> None:
    server.default = Behaviour("ok", delay=0.05)
    hub = LlmHub(None)
    slot = hub.add(_remote(server.url, concurrency=2))
    try:
        outs = await asyncio.gather(*(run_chain([slot], _req()) for _ in range(6)))
    finally:
        await hub.close()
    assert all(o.status == "ok" for o in outs)
    assert server.max_in_flight == 2


_token = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


@st.composite
def _sse_stream(draw: st.DrawFn) -> tuple[list[str], list[bytes]]:
    """Tokens, and an SSE byte stream carrying them with the noise real servers add, cut anywhere."""
    tokens = draw(st.lists(_token, min_size=1, max_size=8))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    out = []
    for tok in [None, *tokens]:
        if draw(st.booleans()):
            out.append(": keep-alive" + eol + eol)
        if draw(st.booleans()):
            out.append("event: message" + eol + "id: 7" + eol)
        chunk = {"choices": [{"index": 0, "delta": {} if tok is None else {"content": tok}, "finish_reason": None}]}
        space = draw(st.sampled_from(["", " "]))
        out.append(f"data:{space}{json.dumps(chunk, ensure_ascii=draw(st.booleans()))}{eol}{eol}")
    out.append("data: " + json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + eol + eol)
    out.append("data: [DONE]" + eol + eol)
    data = "".join(out).encode()
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if b > a]
    return tokens, parts


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_sse_stream())
async def test_any_sse_framing_yields_the_tokens(server: FakeOpenAI, case: tuple[list[str], list[bytes]]) -> None:
    tokens, parts = case
    server.plan = [Behaviour("raw", raw=parts)]
    p = _remote(server.url, retries=0)
    try:
        _, chunks = await _text(p)
    finally:
        await p.close()
    assert [c.text for c in chunks if c.text] == tokens
    assert chunks[-1].finish_reason == "stop"
