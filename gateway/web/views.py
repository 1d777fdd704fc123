"""The console's pages and the JSON the pages read: overview, node config, config text and validation."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from aiohttp import web

from ..config import LoadedConfig, parse_config
from ..errors import ConfigError, ReloadError
from ..redact import redact, redact_options, redact_text
from .auth import IDENTITY

if TYPE_CHECKING:
    from ..runtime import Gateway

__all__ = ["STATIC", "Views"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MAX_CONFIG = 1024 * 1024

# Content-Security-Policy: our own scripts, styles and sockets only; nothing inline, no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Sent on every response, errors included (an ``on_response_prepare`` signal)."""
    h = response.headers
    h.setdefault("Content-Security-Policy", CSP)
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("X-Frame-Options", "DENY")
    h.setdefault("Referrer-Policy", "same-origin")
    h.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    h.setdefault("Permissions-Policy", "camera=(), microphone=(), geolocation=()")
    if request.secure:
        h.setdefault("Strict-Transport-Security", "max-age=31536000")
    if request.path.startswith("/api/") or request.path in ("/", "/login", "/setup"):
        h.setdefault("Cache-Control", "no-store")


class Views:
    def __init__(self, gw: Gateway):
        self.gw = gw
        self._proc = psutil.Process()
        psutil.cpu_percent(interval=None)  # the first call only starts the measurement
        self._proc.cpu_percent(interval=None)
        # the pages (routes in gateway.web.routes)
        self.page_app = self._page("app.html")
        self.page_login = self._page("login.html")
        self.page_setup = self._page("setup.html")

    @staticmethod
    def _page(name: str) -> Any:
        path = STATIC / name

        async def handler(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(path, headers={"Content-Type": "text/html; charset=utf-8"})

        return handler

    # --- data ---------------------------------------------------------------------------------

    def system(self) -> dict[str, Any]:
        vm = psutil.virtual_memory()
        try:
            disk = psutil.disk_usage(str(self.gw.data_dir))
            disk_info = {"total": disk.total, "used": disk.used, "percent": disk.percent}
        except OSError:
            disk_info = None
        with self._proc.oneshot():
            rss = self._proc.memory_info().rss
            pcpu = self._proc.cpu_percent(interval=None)
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "cpus": psutil.cpu_count() or 1,
            "memory": {"total": vm.total, "available": vm.available, "percent": vm.percent},
            "disk": disk_info,
            "process": {"rss": rss, "cpu_percent": pcpu},
            "load": list(psutil.getloadavg()),
        }

    def overview(self) -> dict[str, Any]:
        gw = self.gw
        health = gw.health()
        pipes = []
        for p in gw.pipelines.values():
            errors = sum(n.n_errors for n in p.nodes)
            sources = [n for n in p.nodes if n.kind == "source"]
            sinks = [n for n in p.nodes if n.kind == "sink"]
            depth = p.queue.depth + sum(q.depth for q in p.sink_queues.values())
            problems = [f"source {sid}: {st}" for sid, st in p.source_state.items() if st.startswith("failed")]
            pipes.append(
                {
                    "name": p.name,
                    "state": p.state,
                    "nodes": len(p.nodes),
                    "events_in": sum(n.n_out for n in sources),
                    "events_out": sum(n.n_out for n in sinks),
                    "errors": errors,
                    "queue_depth": depth,
                    "dead_letters": sum(c for (pn, _), c in gw.dead_letters.counts.items() if pn == p.name),
                    "health": "ok"
                    if p.state == "running" and not problems
                    else ("degraded" if p.state == "running" else p.state),
                    "problems": problems,
                }
            )
        return redact({"gateway": health, "system": self.system(), "pipelines": pipes, "ts": time.time()})

    def stats(self) -> dict[str, Any]:
        """What the WebSocket sends every second: the overview plus every node's counters."""
        out = self.overview()
        out["detail"] = redact([p.describe() for p in self.gw.pipelines.values()])
        return out

    # --- handlers -----------------------------------------------------------------------------

    async def api_overview(self, request: web.Request) -> web.Response:
        return web.json_response(self.overview())

    async def api_node(self, request: web.Request) -> web.Response:
        p = self.gw.pipelines.get(request.match_info["pipeline"])
        nid = request.match_info["node"]
        if p is None or nid not in p.index:
            return web.json_response({"error": "no such pipeline or node"}, status=404)
        node = p.nodes[p.index[nid]]
        desc = next(d for d in p.describe()["nodes"] if d["id"] == nid)
        desc["options"] = redact_options(node.options)
        return web.json_response(redact(desc))

    def _admin(self, request: web.Request) -> None:
        ident = request.get(IDENTITY)
        if ident is None or not ident.is_admin:
            raise web.HTTPForbidden(
                text='{"error": "the config needs the admin role"}', content_type="application/json"
            )

    async def api_config(self, request: web.Request) -> web.Response:
        self._admin(request)  # the text may hold inline secrets: admins only
        loaded = self.gw.loaded
        return web.json_response({"path": loaded.path, "text": loaded.text})

    async def _text(self, request: web.Request) -> str | web.Response:
        if request.content_length is not None and request.content_length > MAX_CONFIG:
            return web.json_response({"error": "config larger than 1 MiB"}, status=413)
        if request.content_type == "application/json":
            try:
                body = await request.json()
                text = body["text"]
                if not isinstance(text, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                return web.json_response({"error": 'expected {"text": "<yaml>"}'}, status=400)
        else:
            raw = await request.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                return web.json_response({"error": "config is not UTF-8 text"}, status=400)
        return text

    async def _parse(self, text: str, path: str, run: bool) -> LoadedConfig | web.Response:
        """Check config text from the console; ``run``: it is about to run, so ``${VAR}`` is substituted."""
        # Validation compiles expressions and builds models: off the loop.
        try:
            return await asyncio.to_thread(
                functools.partial(parse_config, substitute=run, model_paths=model_paths(self.gw)), text, path
            )
        except ConfigError as err:
            return web.json_response(
                {"valid": False, "errors": [{"line": i.line, "path": i.path, "message": i.message} for i in err.issues]}
            )

    async def api_validate(self, request: web.Request) -> web.Response:
        """Validate YAML config text (the body, or ``{"text": ...}``): every problem with its line."""
        self._admin(request)
        text = await self._text(request)
        if isinstance(text, web.Response):
            return text
        loaded = await self._parse(text, "config.yaml", run=False)
        if isinstance(loaded, web.Response):
            return loaded
        n_nodes = sum(len(v) for v in loaded.nodes.values())
        return web.json_response({"valid": True, "errors": [], "pipelines": len(loaded.nodes), "nodes": n_nodes})

    async def api_save(self, request: web.Request) -> web.Response:
        """Validate, hot-reload the pipelines, then write the file (the previous one kept as ``.bak``)."""

        self._admin(request)
        text = await self._text(request)
        if isinstance(text, web.Response):
            return text
        path = self.gw.loaded.path
        loaded = await self._parse(text, path, run=True)
        if isinstance(loaded, web.Response):
            return loaded
        try:
            summary = await self.gw.reload(loaded)
        except ReloadError as exc:
            return web.json_response(
                {"valid": True, "errors": [], "reloaded": False, "saved": False, "error": redact_text(str(exc))},
                status=409,
            )
        saved, note = False, None
        try:
            if not await asyncio.to_thread(_save, Path(path), text):
                note = "the file already holds this text: not rewritten"
            saved = True
        except FileNotFoundError:
            note = "running, but not saved: the gateway was not started from a config file"
        except OSError as exc:
            note = f"running, but not saved to {path}: {exc.strerror or exc}"
        ident = request.get(IDENTITY)
        log.warning(
            "config reloaded from the console by %s: %s%s",
            ident.name if ident else "?",
            ", ".join(f"{k} {v}" for k, v in summary.items() if v and k != "unchanged") or "no change",
            "" if saved else f" ({note})",
        )
        return web.json_response(
            {"valid": True, "errors": [], "reloaded": True, "saved": saved, "note": note, **summary}
        )


def model_paths(gw: Gateway) -> list[str]:
    """Where a config from the console may find local model files: the running config's data dir,
    its ``llm.model_dirs`` and the model files it already uses."""
    cfg = gw.loaded.config
    files = [p.model for p in cfg.llm.providers.values() if p.type == "local" and p.model]
    return [cfg.gateway.data_dir, *cfg.llm.model_dirs, *files]


def _save(path: Path, text: str) -> bool:
    """Write the config next to itself and swap it in; the previous text stays as ``<name>.bak``.

    False when the file already holds ``text``: neither it nor its ``.bak`` is rewritten.
    """
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        if path.read_bytes() == text.encode("utf-8"):
            return False
    except OSError:
        pass  # unreadable: the write below says why
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    # keep the file's mode (0640 when installed: group sluice reads it, others do not)
    os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    shutil.copy2(path, path.with_name(path.name + ".bak"))
    os.replace(tmp, path)
    return True
