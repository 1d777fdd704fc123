"""A running gateway with simulated sensors and its console on a free port, for the console's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.runtime import Gateway
from gateway.web import WEB, Web
from tests.gateway._harness import running_gateway

PASSWORD = "correct horse battery"


@pytest.fixture(autouse=True, scope="session")
def _generous_browser_waits() -> None:
    """Playwright's expect() gives up after 5 s: a validation round trip or a live update can take
    longer on a loaded machine. Each expect() still ends as soon as its condition holds."""
    try:
        from playwright.async_api import expect
    except ImportError:  # the browser tests skip themselves without Playwright
        return
    expect.set_options(timeout=30_000)


def config_text(data_dir: Path, console: str = "{host: 127.0.0.1, port: 0}", interval: str = "50ms") -> str:
    return f"""
gateway: {{id: web-test, data_dir: "{data_dir}"}}
pipelines:
  - name: plant
    nodes:
      - id: sensors
        type: simulate
        interval: {interval}
        seed: 1
        sensors:
          - {{key: boiler/temp, base: 80, amplitude: 2, period: 60s, noise: 0.1}}
          - {{key: pump/vibration, base: 2.5, amplitude: 0.3, period: 30s, noise: 0.1}}
      - id: hot
        type: filter
        input: sensors
        where: 'key == "boiler/temp"'
      - id: alarm
        type: threshold
        input: hot
        above: 95
        clear_below: 90
      - id: out
        type: log
        input: alarm
console: {console}
"""


def web_of(gw: Gateway) -> Web:
    assert gw.console is not None
    return gw.console.app[WEB]


def base_url(gw: Gateway) -> str:
    assert gw.console is not None
    return f"http://127.0.0.1:{gw.console.port}"


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``async with make_gateway(console="{...}") as gw``: a gateway on its own data dir."""
    from contextlib import asynccontextmanager

    n = 0

    @asynccontextmanager
    async def make(console: str = "{host: 127.0.0.1, port: 0}", data_dir: Path | None = None) -> Any:
        nonlocal n
        n += 1
        async with running_gateway(config_text(data_dir or tmp_path / f"data{n}", console)) as gw:
            yield gw

    yield make


@pytest.fixture
async def gw(make_gateway: Callable[..., Any]) -> AsyncIterator[Gateway]:
    async with make_gateway() as g:
        yield g


class Browserish:
    """An aiohttp client that behaves like the console's own pages: same Origin, CSRF token from /api/session."""

    def __init__(self, base: str):
        self.base = base
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf: str | None = None

    async def close(self) -> None:
        await self.http.close()

    async def session(self) -> dict[str, Any]:
        async with self.http.get(self.base + "/api/session") as r:
            assert r.status == 200
            data = await r.json()
        self.csrf = data["csrf"]
        return data

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.http.get(self.base + path, allow_redirects=False, **kw) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, body

    async def post(
        self, path: str, body: Any = None, *, origin: str | None = "same", csrf: bool = True, **kw: Any
    ) -> tuple[int, Any]:
        if self.csrf is None and csrf:
            await self.session()
        headers = dict(kw.pop("headers", {}))
        if origin == "same":
            headers["Origin"] = self.base
        elif origin is not None:
            headers["Origin"] = origin
        if csrf and self.csrf:
            headers["X-CSRF-Token"] = self.csrf
        kwargs: dict[str, Any] = {"json": body} if isinstance(body, dict | list | None) else {"data": body}
        async with self.http.post(self.base + path, headers=headers, allow_redirects=False, **kwargs, **kw) as r:
            data = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, data

    async def delete(self, path: str) -> tuple[int, Any]:
        headers = {"Origin": self.base, "X-CSRF-Token": self.csrf or ""}
        async with self.http.delete(self.base + path, headers=headers) as r:
            return r.status, await r.json()

    async def patch(self, path: str, body: Any) -> tuple[int, Any]:
        headers = {"Origin": self.base, "X-CSRF-Token": self.csrf or ""}
        async with self.http.patch(self.base + path, json=body, headers=headers) as r:
            return r.status, await r.json()

    async def setup_admin(self, gw: Gateway, name: str = "admin", password: str = PASSWORD) -> dict[str, Any]:
        status, data = await self.post(
            "/api/setup", {"code": web_of(gw).auth.setup_code, "name": name, "password": password}
        )
        assert status == 201, data
        self.csrf = data["csrf"]
        return data

    async def login(self, name: str, password: str = PASSWORD) -> tuple[int, Any]:
        status, data = await self.post("/api/login", {"name": name, "password": password})
        if status == 200:
            self.csrf = data["csrf"]
        return status, data


@pytest.fixture
async def client_factory(gw: Gateway) -> AsyncIterator[Callable[[], Browserish]]:
    made: list[Browserish] = []

    def make() -> Browserish:
        c = Browserish(base_url(gw))
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


@pytest.fixture
async def admin(gw: Gateway, client_factory: Callable[[], Browserish]) -> Browserish:
    c = client_factory()
    await c.setup_admin(gw)
    return c


async def create_admin(gw: Gateway, name: str = "admin") -> None:
    """The console's first user (``name``, password ``PASSWORD``), made through ``/api/setup``
    the way the setup page makes it."""
    c = Browserish(base_url(gw))
    try:
        await c.setup_admin(gw, name)
    finally:
        await c.close()
