"""RemoteProvider against a real OpenAI-compatible server: llama_cpp.server over the tiny GGUF."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from gateway.llm import LlmHub, LlmRequest, RemoteProvider, RemoteProviderConfig, run_chain
from tests._tiny_gguf import write_tiny_llama
from tests._util import free_port

pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] (test extra) is not installed")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("server")
    model = write_tiny_llama(d / "tiny.gguf")
    port = free_port()
    log = (d / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "512",
            "--chat_format",
            "gemma",
            "--n_threads",
            "1",
            "--interrupt_requests",
            "False",
            "--verbose",
            "False",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
async def server(llama_server: str) -> AsyncIterator[str]:
    async def up() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(llama_server + "/models") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    ok = False
    for _ in range(300):  # the server imports and loads for a few seconds
        if await up():
            ok = True
            break
        await asyncio.sleep(0.05)
    assert ok, "llama_cpp.server did not come up"
    yield llama_server


def _provider(url: str) -> RemoteProvider:
    return RemoteProvider("llamacpp", RemoteProviderConfig(type="remote", url=url, model="tiny", retries=0))


def _req(**kw: object) -> LlmRequest:
    return LlmRequest([{"role": "user", "content": "boiler 1 is at 93 C"}], temperature=0.0, **kw)  # type: ignore[arg-type]


async def test_streams_from_a_real_server(server: str) -> None:
    p = _provider(server)
    try:
        chunks = [c async for c in p.stream(_req(max_tokens=10))]
        again = [c async for c in p.stream(_req(max_tokens=10))]
    finally:
        await p.close()
    assert chunks[-1].finish_reason == "length"
    assert sum(1 for c in chunks if c.text) >= 3
    assert "".join(c.text for c in chunks) == "".join(c.text for c in again)  # greedy: deterministic


async def test_joined_and_json_through_the_chain(server: str) -> None:
    hub = LlmHub(None)
    slot = hub.add(_provider(server))
    schema = {"type": "object", "properties": {"cause": {"type": "string", "maxLength": 8}}, "required": ["cause"]}
    try:
        plain = await run_chain([slot], _req(max_tokens=8))
        js = await run_chain([slot], _req(max_tokens=60, json_schema=schema))
    finally:
        await hub.close()
    assert plain.status == "ok" and plain.tokens >= 1 and plain.first_token_s is not None
    assert js.status == "ok", js.error
    assert set(json.loads(js.text, strict=False)) == {"cause"}  # the server applied the schema grammar
    assert slot.stats.requests == 2 and slot.stats.errors == 0
