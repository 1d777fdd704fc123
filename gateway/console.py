"""The console's server: its port is bound when the gateway starts, its web stack loads at the first
connection.

aiohttp and :mod:`gateway.web` (pages, API, ``/ws``, auth) cost a gateway about 16 MiB resident,
which a gateway nobody looks at should not carry. So :meth:`Console.start` binds the port (a port
in use or a bad TLS file is still an error at start) with a small protocol that holds each early
connection unread; the first one imports the web stack, builds the app (:mod:`gateway.web`) and
hands every held connection, and all later ones, to aiohttp. The routes themselves are in
:mod:`gateway.web.gateway_api` and the other :mod:`gateway.web` modules.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._heap import trim_heap
from .config import ConsoleConfig

if TYPE_CHECKING:
    from aiohttp import web

    from .runtime import Gateway
    from .web import Web

__all__ = ["Console"]

log = logging.getLogger(__name__)


class _Held(asyncio.Protocol):
    """A connection that arrived before the web stack was loaded: not read until aiohttp takes it."""

    def __init__(self, console: Console):
        self._console = console
        self._transport: asyncio.Transport | None = None
        self._early: list[bytes] = []  # only if the transport delivered data despite the pause
        self._eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._transport.pause_reading()  # type: ignore[union-attr]
        self._console._adopt(self)

    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def eof_received(self) -> bool:
        self._eof = True
        return True  # keep the transport open: aiohttp answers, then closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._console._held.discard(self)

    def hand_over(self, factory: Any) -> None:
        """Give the connection to the protocol ``factory()`` makes, with anything read so far."""
        transport, self._transport = self._transport, None
        if transport is None or transport.is_closing():
            return
        proto = factory()
        transport.set_protocol(proto)
        proto.connection_made(transport)
        for data in self._early:
            proto.data_received(data)
        if self._eof:
            proto.eof_received()
        else:
            transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class Console:
    """The console web server, started and stopped by the gateway; its app is built on first use."""

    def __init__(self, gw: Gateway, cfg: ConsoleConfig):
        self.gw = gw
        self.cfg = cfg
        self.port = cfg.port
        self.web: Web | None = None  # gateway.web.Web once loaded
        self._app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._loading: asyncio.Task[None] | None = None
        self._held: set[_Held] = set()

    @property
    def url(self) -> str:
        host = self.cfg.host if self.cfg.host not in ("0.0.0.0", "::") else "localhost"
        return f"{'https' if self.cfg.tls_cert else 'http'}://{host}:{self.port}/"

    @property
    def loaded(self) -> bool:
        """Whether the web stack is loaded (the first connection, or an account still to create)."""
        return self._app is not None

    @property
    def app(self) -> web.Application:
        """The console's aiohttp app, built (not yet served) if it was not."""
        if self._app is None:
            from aiohttp import web

            from .web import setup

            app = web.Application()
            self.web = setup(app, self.gw, self.cfg)
            self._app = app
        return self._app

    async def start(self) -> None:
        ssl_context = None
        if self.cfg.tls_cert:
            import ssl

            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(self.cfg.tls_cert, self.cfg.tls_key)
        if self._needs_account():
            # The first visit creates the admin with a setup code from the log: load now to say it.
            await self._load()
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(self._protocol, self.cfg.host, self.cfg.port, ssl=ssl_context)
        except OSError as exc:
            await self.stop()
            raise OSError(
                exc.errno,
                f"console cannot listen on {self.cfg.host}:{self.cfg.port}: "
                f"{exc.strerror} (set console.port, or console.enabled: false)",
            ) from None
        if self._server.sockets:
            self.port = self._server.sockets[0].getsockname()[1]
        if self.web is not None:
            self.web.auth.announce(self.url)
        if not self.cfg.auth:
            log.warning("console: auth is off (console.auth: false): anyone who can reach %s may use it", self.url)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()  # no new connections
            self._server = None
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            await asyncio.gather(self._loading, return_exceptions=True)
        for held in list(self._held):
            held.close()
        self._held.clear()
        if self._runner is not None:
            await self._runner.cleanup()  # on_cleanup detaches the console from the gateway
            self._runner = None
        elif self.web is not None:  # built, never served
            self.web.detach()

    def _needs_account(self) -> bool:
        """Whether auth is on and no account exists yet (or the account file cannot be read, which
        loading the console then reports at start)."""
        if not self.cfg.auth or self.cfg.users:
            return False
        # gateway.web.auth.UserStore's file: only whether it names a user is looked at here.
        try:
            data = json.loads((Path(self.gw.data_dir) / "console" / "users.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return True
        return not (isinstance(data, dict) and data.get("users"))

    def _protocol(self) -> asyncio.Protocol:
        if self._runner is not None and self._runner.server is not None:
            proto: asyncio.Protocol = self._runner.server()
            return proto
        return _Held(self)

    def _adopt(self, held: _Held) -> None:
        if self._runner is not None:  # loaded since this connection was accepted
            held.hand_over(self._runner.server)
            return
        self._held.add(held)
        if self._loading is None:
            self._loading = asyncio.create_task(self._serve_held(), name="console:load")

    async def _serve_held(self) -> None:
        try:
            await self._load()
        except Exception:
            log.exception("console: loading the web console failed; the next connection tries again")
            for held in list(self._held):
                held.close()
            self._loading = None
            return
        assert self._runner is not None
        for held in list(self._held):
            held.hand_over(self._runner.server)
        self._held.clear()

    async def _load(self) -> None:
        """Import the web stack, build the app and set up its runner (its startup hooks run now)."""
        if self._runner is not None:
            return
        started = time.monotonic()
        from aiohttp import web

        app = self.app
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runner = runner
        trim_heap()
        log.info("console: web console loaded in %.2f s", time.monotonic() - started)
