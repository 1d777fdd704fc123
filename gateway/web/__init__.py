"""The web console: pages, live WebSocket, OpenAPI and the security around them.

:func:`setup` installs it all on the console's aiohttp app (see :mod:`gateway.console`):
security headers on every response, sessions and the auth middleware (pages and ``/api/*`` need
a login or an API token unless ``console.auth: false``; ``/healthz`` and ``/metrics`` stay open
for monitoring), the pages and their static assets (all shipped in the package, no CDN), the pipeline editor's API,
``/ws`` and ``/api/openapi.json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from ..config import ConsoleConfig
from . import openapi
from .auth import Auth, Identity, hash_password
from .editor import Editor
from .gateway_api import GatewayApi
from .routes import add_routes
from .views import STATIC, Views, security_headers
from .ws import Hub

if TYPE_CHECKING:
    from ..runtime import Gateway

__all__ = ["WEB", "Auth", "Hub", "Identity", "Web", "hash_password", "setup"]


class Web:
    """What :func:`setup` installed, kept on the app under :data:`WEB` (for tests and other routes)."""

    def __init__(self, gw: Gateway, cfg: ConsoleConfig):
        self.auth = Auth(cfg, gw.data_dir)
        self.views = Views(gw)
        self.hub = Hub(gw, self.auth, self.views.stats)
        self.auth.sessions_ended.append(self.hub.end_user)  # a live socket ends with its session
        self.editor = Editor(gw)
        self._gw = gw
        gw.reload_hooks.append(self.hub.retap)  # live taps move to the pipelines a reload started
        gw.links.console = self.hub  # where `console` sink nodes send what they show

    def detach(self) -> None:
        """The console is going away: reloads no longer need to move its taps."""
        if self.hub.retap in self._gw.reload_hooks:
            self._gw.reload_hooks.remove(self.hub.retap)
        if self._gw.links.console is self.hub:
            self._gw.links.console = None


WEB = web.AppKey("sluice_web", Web)


def setup(app: web.Application, gw: Gateway, cfg: ConsoleConfig) -> Web:
    """Install the console's security and every route of :data:`gateway.web.routes.ROUTES` on ``app``."""
    w = Web(gw, cfg)
    app[WEB] = w
    app.on_response_prepare.append(security_headers)
    w.auth.install(app)
    owners = {
        "console": GatewayApi(gw),
        "auth": w.auth,
        "views": w.views,
        "editor": w.editor,
        "hub": w.hub,
        "openapi": openapi,
    }
    add_routes(app, owners, STATIC)
    app.cleanup_ctx.append(w.hub.lifespan)
    app.on_shutdown.append(w.hub.close_all)

    async def detach(app: web.Application) -> None:
        w.detach()

    app.on_cleanup.append(detach)
    return w
