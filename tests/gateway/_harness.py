"""Running a whole gateway in-process for a test, and talking to its console."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from gateway.config import load_config, parse_config
from gateway.runtime import Gateway
from tests._util import wait_for

# These tests read /api/* without logging in: console options that switch auth off.
NO_AUTH = ", auth: false"


@asynccontextmanager
async def running_gateway(text: str, env: dict[str, str] | None = None) -> AsyncIterator[Gateway]:
    """Start ``Gateway(parse_config(text)).run()`` as a task; stop it gracefully at the end.

    A config without a ``console`` section gets its console on a free port rather than the
    default 8080, which a gateway started by ``make run`` (or another test run) may hold.
    """
    cfg = parse_config(text, "test.yaml", env or {})
    if "console" not in cfg.config.model_fields_set:
        cfg.config.console.port = 0
    async with _running(Gateway(cfg)) as gw:
        yield gw


@asynccontextmanager
async def gateway_from_file(path: Path, env: dict[str, str] | None = None) -> AsyncIterator[Gateway]:
    """Like :func:`running_gateway`, from a config file: for tests that change the file through
    the console (save, deploy) and read it back."""
    async with _running(Gateway(load_config(path, env=env or {}))) as gw:
        yield gw


@asynccontextmanager
async def _running(gw: Gateway) -> AsyncIterator[Gateway]:
    task = asyncio.create_task(gw.run(install_signals=False), name="test-gateway")
    try:
        # generous: starting takes seconds on a loaded machine; a start that fails ends the wait at once
        await wait_for(lambda: gw.state == "running" or task.done(), timeout=60)
        if task.done():
            task.result()  # raises what stopped it
        yield gw
    finally:
        gw.stop()
        await asyncio.wait_for(task, 30)


def node(gw: Gateway, pipeline: str, node_id: str) -> Any:
    p = gw.pipelines[pipeline]
    return p.nodes[p.index[node_id]]


async def get(gw: Gateway, path: str) -> tuple[int, Any]:
    """GET a console path; JSON bodies are decoded, others returned as text."""
    assert gw.console is not None, "the console is not enabled"
    url = f"http://127.0.0.1:{gw.console.port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()
