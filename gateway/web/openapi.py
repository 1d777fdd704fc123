"""The OpenAPI 3.1 document of the console, served at ``/api/openapi.json``.

It is generated from the route table that registers the routes (:data:`gateway.web.routes.ROUTES`)
and the pydantic models of the bodies (:mod:`gateway.web.models`), so every route is described and
nothing is described that is not served.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .. import __version__
from .models import Error
from .routes import ROUTES, ROUTES_KEY, Route

__all__ = ["openapi_document", "serve"]

_REF = "#/components/schemas/{model}"
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})


# the document's JSON text by route table (a table is an immutable tuple; the entry holds it, so
# its id is not reused): building it takes milliseconds, too long to repeat on the loop per request
_TEXT: dict[int, tuple[tuple[Route, ...], str]] = {}


async def serve(request: web.Request) -> web.Response:
    return web.Response(text=_text(request.app.get(ROUTES_KEY, ROUTES)), content_type="application/json")


def openapi_document(app: web.Application | None = None) -> dict[str, Any]:
    """The document for the routes installed on ``app`` (the whole table without one)."""
    return json.loads(_text(app.get(ROUTES_KEY, ROUTES) if app is not None else ROUTES))


def _text(routes: tuple[Route, ...]) -> str:
    hit = _TEXT.get(id(routes))
    if hit is None or hit[0] is not routes:
        hit = _TEXT[id(routes)] = (routes, json.dumps(_build(routes)))
    return hit[1]


def _build(routes: tuple[Route, ...]) -> dict[str, Any]:
    used: set[type[BaseModel]] = set()
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r, used)
    ordered = sorted(used, key=lambda c: c.__name__)
    _, defs = models_json_schema([(c, "validation") for c in ordered], ref_template=_REF)
    schemas = defs.get("$defs", {})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Sluice console API",
            "version": __version__,
            "description": "JSON endpoints of the Sluice gateway console. Pages and /api/* need a session "
            "(log in through /api/login) or an API token; /healthz and /metrics are open "
            "for monitoring. Live updates: WebSocket /ws, send "
            '{"op": "subscribe", "topic": T} with T one of stats, events (with pipeline and node), '
            "alerts (every lifecycle step) or llm (every streamed chunk, and llm_stats once a second).",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An API token from POST /api/tokens"},
                "session": {"type": "apiKey", "in": "cookie", "name": "sluice_session"},
            },
        },
        "security": [{"bearer": []}, {"session": []}],
    }


def _schema(x: Any, used: set[type[BaseModel]]) -> dict[str, Any]:
    if isinstance(x, type) and issubclass(x, BaseModel):
        used.add(x)
        return {"$ref": _REF.format(model=x.__name__)}
    return x


def _response(x: Any, used: set[type[BaseModel]]) -> dict[str, Any]:
    if isinstance(x, tuple):
        schema, description = x
    elif isinstance(x, dict) and "description" in x:  # a whole response object
        if "content" not in x:
            return x
        return {**x, "content": {k: {"schema": _schema(v["schema"], used)} for k, v in x["content"].items()}}
    else:
        schema, description = x, "OK"
    return {"description": description, "content": {"application/json": {"schema": _schema(schema, used)}}}


def _operation(r: Route, used: set[type[BaseModel]]) -> dict[str, Any]:
    responses = {code: _response(x, used) for code, x in r.responses.items()}
    op: dict[str, Any] = {"summary": r.summary, "tags": [r.tag], "x-roles": r.roles}
    if r.roles in ("public", "own"):
        op["security"] = []
    else:
        responses.setdefault("401", _response((Error, "No session or API token"), used))
    if r.method not in _SAFE and r.roles != "own":
        responses.setdefault("403", _response((Error, "Cross-origin, missing CSRF token, or not an admin"), used))
        op["description"] = (
            "With a session cookie: send the CSRF token from /api/session in X-CSRF-Token, "
            "from the console's own origin. With an API token: nothing else."
        )
    elif r.roles == "admin":
        responses.setdefault("403", _response((Error, "Not an admin"), used))
    if r.description:
        op["description"] = r.description
    op["responses"] = responses
    if r.body is not None:
        content = r.body if isinstance(r.body, dict) and not _is_schema(r.body) else {"application/json": r.body}
        op["requestBody"] = {"required": True, "content": {k: {"schema": _schema(v, used)} for k, v in content.items()}}
    given = {p["name"] for p in r.params if p["in"] == "path"}
    params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in _path_names(r.path)]
    params = [p for p in params if p["name"] not in given] + list(r.params)
    if params:
        op["parameters"] = params
    return op


def _is_schema(d: dict[str, Any]) -> bool:
    """A JSON Schema dict, not a {media type: schema} map."""
    return not d or any(k in d for k in ("type", "$ref", "anyOf", "oneOf", "properties"))


def _path_names(path: str) -> list[str]:
    return re.findall(r"\{([^}:]+)", path)
