"""The OpenAPI 3.1 document of the console's JSON endpoints, served at ``/api/openapi.json``.

Routes added to the console elsewhere can describe themselves with :func:`describe`; an
``/api/`` route nobody described still appears, marked undocumented, so the document never
hides an endpoint.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import __version__
from ..node import ID_PATTERN

__all__ = ["describe", "openapi_document"]

_EXTRA: dict[str, dict[str, Any]] = {}


def describe(path: str, method: str, operation: dict[str, Any]) -> None:
    """Add (or replace) the description of ``method`` on ``path`` (OpenAPI path syntax: ``/api/x/{id}``)."""
    _EXTRA.setdefault(path, {})[method.lower()] = operation


def _obj(props: dict[str, Any], required: list[str] | None = None, extra: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    if not extra:
        out["additionalProperties"] = False
    return out


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERR = {"$ref": "#/components/schemas/Error"}
_STR = {"type": "string"}
_NUM = {"type": "number"}
_INT = {"type": "integer"}
_ROLE = {"type": "string", "enum": ["viewer", "admin"]}
_ANY_OBJ = {"type": "object"}
# what /api/config/validate and /api/config/save share: the config text in, problems at their lines out
_CONFIG_ERRORS = {
    "type": "array",
    "items": _obj({"line": _INT, "path": _STR, "message": _STR}, ["line", "path", "message"]),
}
_CONFIG_BODY = {"text/yaml": {"schema": _STR}, "application/json": {"schema": _obj({"text": _STR}, ["text"])}}


def _op(
    summary: str,
    responses: dict[str, Any],
    *,
    tag: str,
    secured: bool = True,
    body: dict[str, Any] | None = None,
    params: list[dict[str, Any]] | None = None,
    change: bool = False,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if not secured:
        op["security"] = []
    else:
        responses.setdefault("401", _json(_ERR, "No session or API token"))
    if change:
        responses.setdefault("403", _json(_ERR, "Cross-origin, missing CSRF token, or not an admin"))
        op["description"] = (
            "With a session cookie: send the CSRF token from /api/session in X-CSRF-Token, "
            "from the console's own origin. With an API token: nothing else."
        )
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _STR}


_COUNTERS = _obj({k: _INT for k in ("in", "out", "errors", "dropped")})
_QUEUE = {
    "anyOf": [_obj({k: _INT for k in ("depth", "capacity", "high_water", "waiting_producers")}), {"type": "null"}]
}
_NODE = _obj(
    {
        "id": _STR,
        "type": _STR,
        "kind": {"type": "string", "enum": ["source", "operator", "sink"]},
        "inputs": {"type": "array", "items": _STR},
        "counters": _COUNTERS,
        "queue": _QUEUE,
        "health": _ANY_OBJ,
        "state": _STR,
    },
    ["id", "type", "kind", "inputs", "counters"],
)
_PIPELINE = _obj(
    {
        "name": _STR,
        "state": _STR,
        "started_at": {"type": ["number", "null"]},
        "nodes": {"type": "array", "items": _NODE},
    },
    ["name", "state", "nodes"],
)
_HEALTH = _obj(
    {
        "status": _STR,
        "gateway_id": _STR,
        "version": _STR,
        "state": _STR,
        "started_at": _NUM,
        "uptime": _NUM,
        "problems": {"type": "array", "items": _STR},
        "connections": _ANY_OBJ,
        "pipelines": _ANY_OBJ,
        "dead_letters": _INT,
    },
    ["status", "gateway_id", "state"],
)
_SYSTEM = _obj(
    {
        "cpu_percent": _NUM,
        "cpus": _INT,
        "memory": _ANY_OBJ,
        "disk": {"type": ["object", "null"]},
        "process": _ANY_OBJ,
        "load": {"type": "array", "items": _NUM},
    }
)
_CREDS = _obj(
    {"name": _STR, "password": _STR, "next": {**_STR, "description": "Where the page wants to go next"}},
    ["name", "password"],
)
_NAME = {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_\\-]{0,63}$"}
_PASSWORD = {"type": "string", "minLength": 10}
_SESSION = _obj({"user": _STR, "role": _ROLE, "csrf": _STR}, ["user", "role", "csrf"])


def _paths() -> dict[str, Any]:
    return {
        "/healthz": {
            "get": _op(
                "Gateway health; 200 while running, 503 while starting or stopping. Without a session or "
                "token only `status`; the details (redacted) need one",
                {"200": _json(_HEALTH), "503": _json(_HEALTH, "Not running")},
                tag="monitoring",
                secured=False,
            )
        },
        "/ingest/{source}": {
            "post": {
                **_op(
                    "Readings pushed to a running `http` source: a JSON object, an array of objects, or NDJSON",
                    {
                        "202": _json(
                            _obj(
                                {"accepted": _INT, "rejected": _INT, "errors": {"type": "array", "items": _STR}},
                                ["accepted", "rejected"],
                            ),
                            "Taken: every accepted reading is in the pipeline; bad lines are dead-lettered",
                        ),
                        "400": _json(_ERR, "Nothing readable in the body"),
                        "401": _json(_ERR, "No bearer token, or not the source's (also when no such source runs)"),
                        "413": _json(_ERR, "The body is over the source's max_body"),
                        "429": _json(_ERR, "The pipeline is full: send again after Retry-After seconds"),
                        "503": _json(_ERR, "The source is stopping"),
                    },
                    tag="ingest",
                    secured=False,
                    body={"application/json": {"schema": {}}, "application/x-ndjson": {"schema": _STR}},
                    params=[{**_path_param("source"), "schema": {**_STR, "pattern": ID_PATTERN}}],
                ),
                "description": "Authenticated by the source's own `token` (Authorization: Bearer), not by "
                "a console login. The answer comes before the body is read when the token is wrong or "
                "the pipeline is full, so a client keeps its data.",
            }
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics",
                {"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": _STR}}}},
                tag="monitoring",
                secured=False,
            )
        },
        "/api/pipelines": {
            "get": _op(
                "Every pipeline with its nodes, counters, queues and health",
                {
                    "200": _json(
                        _obj(
                            {"gateway_id": _STR, "state": _STR, "pipelines": {"type": "array", "items": _PIPELINE}},
                            ["gateway_id", "state", "pipelines"],
                        )
                    )
                },
                tag="pipelines",
            )
        },
        "/api/pipelines/{pipeline}/nodes/{node}": {
            "get": _op(
                "One node: counters, queue and its (redacted) options",
                {
                    "200": _json(_obj({"id": _STR, "options": _ANY_OBJ}, ["id", "options"])),
                    "404": _json(_ERR, "No such pipeline or node"),
                },
                tag="pipelines",
                params=[_path_param("pipeline"), _path_param("node")],
            )
        },
        "/api/overview": {
            "get": _op(
                "Gateway status, uptime, system resources, per-pipeline health",
                {
                    "200": _json(
                        _obj(
                            {
                                "gateway": _HEALTH,
                                "system": _SYSTEM,
                                "pipelines": {
                                    "type": "array",
                                    "items": _obj(
                                        {
                                            "name": _STR,
                                            "state": _STR,
                                            "health": _STR,
                                            "events_in": _INT,
                                            "events_out": _INT,
                                            "errors": _INT,
                                            "queue_depth": _INT,
                                            "dead_letters": _INT,
                                        }
                                    ),
                                },
                                "ts": _NUM,
                            },
                            ["gateway", "system", "pipelines"],
                        )
                    )
                },
                tag="pipelines",
            )
        },
        "/api/deadletters": {
            "get": _op(
                "Recent dead letters (newest first) and the total",
                {
                    "200": _json(
                        _obj({"total": _INT, "recent": {"type": "array", "items": _ANY_OBJ}}, ["total", "recent"])
                    ),
                    "400": {"description": "limit is not an integer"},
                },
                tag="pipelines",
                params=[{"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 200}}],
            )
        },
        "/api/logs": {
            "get": _op(
                "Recent log lines",
                {"200": _json(_obj({"lines": {"type": "array", "items": _ANY_OBJ}}))},
                tag="pipelines",
                params=[{"name": "level", "in": "query", "schema": _STR}],
            )
        },
        "/api/config": {
            "get": _op(
                "The running config's YAML text (admin)",
                {
                    "200": _json(_obj({"path": _STR, "text": _STR}, ["path", "text"])),
                    "403": _json(_ERR, "Not an admin"),
                },
                tag="config",
            )
        },
        "/api/config/validate": {
            "post": _op(
                "Validate YAML config text; every problem with its line (admin)",
                {
                    "200": _json(
                        _obj(
                            {
                                "valid": {"type": "boolean"},
                                "errors": _CONFIG_ERRORS,
                                "pipelines": _INT,
                                "nodes": _INT,
                            },
                            ["valid", "errors"],
                        )
                    ),
                    "400": _json(_ERR, "Not UTF-8 / not the expected JSON"),
                    "413": _json(_ERR, "Larger than 1 MiB"),
                },
                tag="config",
                change=True,
                body=_CONFIG_BODY,
            )
        },
        "/api/config/save": {
            "post": _op(
                "Validate, hot-reload the pipelines and save the config file (admin); other sections need a restart",
                {
                    "200": _json(
                        _obj(
                            {
                                "valid": {"type": "boolean"},
                                "errors": _CONFIG_ERRORS,
                                "reloaded": {"type": "boolean"},
                                "saved": {"type": "boolean"},
                                "note": {"type": ["string", "null"]},
                                **{
                                    k: {"type": "array", "items": _STR}
                                    for k in ("changed", "added", "removed", "unchanged")
                                },
                            },
                            ["valid", "errors"],
                        )
                    ),
                    "400": _json(_ERR, "Not UTF-8 / not the expected JSON"),
                    "413": _json(_ERR, "Larger than 1 MiB"),
                    "409": _json(
                        _obj({"error": _STR, "reloaded": {"type": "boolean"}}, ["error"]),
                        "Valid, but the running gateway cannot take it; nothing changed",
                    ),
                },
                tag="config",
                change=True,
                body=_CONFIG_BODY,
            )
        },
        "/api/session": {
            "get": _op(
                "Who is logged in, and the CSRF token for changes",
                {
                    "200": _json(
                        _obj(
                            {
                                "auth": {"type": "boolean"},
                                "user": {"type": ["string", "null"]},
                                "role": {"anyOf": [_ROLE, {"type": "null"}]},
                                "csrf": _STR,
                                "needs_setup": {"type": "boolean"},
                            },
                            ["auth", "csrf", "needs_setup"],
                        )
                    )
                },
                tag="auth",
                secured=False,
            )
        },
        "/api/login": {
            "post": _op(
                "Log in; starts a new session. `next` in the answer is the body's `next` if it is a path "
                "on this console, else /",
                {
                    "200": _json(_obj({**_SESSION["properties"], "next": _STR}, ["user", "role", "csrf", "next"])),
                    "400": _json(_ERR, "Not a JSON object"),
                    "401": _json(_ERR, "Wrong name or password"),
                    "429": _json(_ERR, "Slowed after failures from this address; see Retry-After"),
                },
                tag="auth",
                secured=False,
                change=True,
                body={"application/json": {"schema": _CREDS}},
            )
        },
        "/api/logout": {
            "post": _op(
                "End the session",
                {"200": _json(_obj({"ok": {"type": "boolean"}}))},
                tag="auth",
                secured=False,
                change=True,
            )
        },
        "/api/setup": {
            "post": _op(
                "First visit: create the admin with the setup code from the gateway's log",
                {
                    "201": _json(_SESSION),
                    "400": _json(_ERR, "Bad name or password"),
                    "403": _json(_ERR, "Wrong setup code"),
                    "409": _json(_ERR, "Accounts exist already"),
                    "429": _json(_ERR, "Too many wrong codes"),
                },
                tag="auth",
                secured=False,
                change=True,
                body={
                    "application/json": {
                        "schema": _obj(
                            {"name": _NAME, "password": _PASSWORD, "code": _STR}, ["name", "password", "code"]
                        )
                    }
                },
            )
        },
        "/api/users": {
            "get": _op(
                "Accounts (admin)",
                {
                    "200": _json(
                        _obj(
                            {
                                "users": {
                                    "type": "array",
                                    "items": _obj({"name": _STR, "role": _ROLE, "fixed": {"type": "boolean"}}),
                                }
                            }
                        )
                    ),
                    "403": _json(_ERR, "Not an admin"),
                },
                tag="auth",
            ),
            "post": _op(
                "Create an account (admin)",
                {
                    "201": _json(_obj({"name": _STR, "role": _ROLE})),
                    "400": _json(_ERR, "Bad name, password or role"),
                    "409": _json(_ERR, "Exists"),
                },
                tag="auth",
                change=True,
                body={
                    "application/json": {
                        "schema": _obj({"name": _NAME, "password": _PASSWORD, "role": _ROLE}, ["name", "password"])
                    }
                },
            ),
        },
        "/api/users/{name}": {
            "patch": _op(
                "Change an account's role or password (admin); every session of that user ends "
                "(your own: all but this one)",
                {
                    "200": _json(_obj({"name": _STR, "role": _ROLE, "csrf": _STR})),
                    "400": _json(_ERR, "Bad role or password, or neither given"),
                    "404": _json(_ERR, "No such user"),
                    "409": _json(_ERR, "From the config, or taking the admin role from yourself"),
                },
                tag="auth",
                change=True,
                params=[_path_param("name")],
                body={"application/json": {"schema": _obj({"role": _ROLE, "password": _PASSWORD})}},
            ),
            "delete": _op(
                "Delete an account (admin)",
                {
                    "200": _json(_obj({"ok": {"type": "boolean"}})),
                    "404": _json(_ERR, "No such user"),
                    "409": _json(_ERR, "From the config, or yourself"),
                },
                tag="auth",
                change=True,
                params=[_path_param("name")],
            ),
        },
        "/api/tokens": {
            "get": _op(
                "API tokens (admin; the tokens themselves are never shown again)",
                {
                    "200": _json(
                        _obj(
                            {
                                "tokens": {
                                    "type": "array",
                                    "items": _obj(
                                        {
                                            "id": _STR,
                                            "name": _STR,
                                            "role": _ROLE,
                                            "created": _NUM,
                                            "last_used": {"type": ["number", "null"]},
                                        }
                                    ),
                                }
                            }
                        )
                    ),
                    "403": _json(_ERR, "Not an admin"),
                },
                tag="auth",
            ),
            "post": _op(
                "Create an API token for scripts (admin); use it as 'Authorization: Bearer <token>'",
                {
                    "201": _json(_obj({"id": _STR, "name": _STR, "role": _ROLE, "token": _STR}, ["id", "token"])),
                    "400": _json(_ERR, "Bad role or body"),
                },
                tag="auth",
                change=True,
                body={"application/json": {"schema": _obj({"name": _STR, "role": _ROLE})}},
            ),
        },
        "/api/tokens/{id}": {
            "delete": _op(
                "Revoke an API token (admin)",
                {"200": _json(_obj({"ok": {"type": "boolean"}})), "404": _json(_ERR, "No such token")},
                tag="auth",
                change=True,
                params=[_path_param("id")],
            )
        },
        "/api/openapi.json": {"get": _op("This document", {"200": _json(_ANY_OBJ)}, tag="meta")},
    }


def openapi_document(app: web.Application) -> dict[str, Any]:
    paths = _paths()
    for path, ops in _EXTRA.items():
        paths.setdefault(path, {}).update(ops)
    for resource in app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter")
        if not path or not path.startswith("/api/"):
            continue
        for route in resource:
            method = route.method.lower()
            if method in ("head", "*") or method in paths.get(path, {}):
                continue
            paths.setdefault(path, {})[method] = {
                "summary": "undocumented",
                "tags": ["undocumented"],
                "parameters": [_path_param(n) for n in _path_names(path)],
                "responses": {"default": {"description": "Not described yet (see gateway.web.openapi.describe)"}},
            }
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
            "schemas": {"Error": _obj({"error": _STR}, ["error"])},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An API token from POST /api/tokens"},
                "session": {"type": "apiKey", "in": "cookie", "name": "sluice_session"},
            },
        },
        "security": [{"bearer": []}, {"session": []}],
    }


def _path_names(path: str) -> list[str]:
    import re

    return re.findall(r"\{([^}:]+)", path)
