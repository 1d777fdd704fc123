"""Every HTTP route of the console, in one table that both registers it and documents it.

:func:`add_routes` installs :data:`ROUTES` on the console's aiohttp app and
:func:`gateway.web.openapi.openapi_document` builds ``/api/openapi.json`` from the same rows, so
a route cannot be served without being described. A row names its handler as ``owner.method``
(owners: ``console``, ``auth``, ``views``, ``editor``, ``hub``, ``openapi``); request and answer
bodies are pydantic models or JSON Schema dicts from :mod:`gateway.web.models`.

``roles`` says who may call a route: ``public`` (no login), ``viewer`` (any login or API token),
``admin``, ``self`` (any logged-in user, about their own account: the one change a viewer may
make), or ``own`` (the route checks its own credentials, e.g. an ``http`` source's token).
The auth middleware enforces it; any other change (any method but GET) needs an admin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from ..alerts import SEVERITIES, STATES
from . import models as m

__all__ = ["ROUTES", "ROUTES_KEY", "Route", "add_routes", "registered"]

Roles = Literal["public", "viewer", "admin", "self", "own"]

# a response is a model/schema (200 with that JSON), or (model/schema, description), or a full
# OpenAPI response object (a dict with "description")
_HTML = {"description": "An HTML page", "content": {"text/html": {"schema": m.STR}}}
_YAML = {"text/yaml": {"schema": m.STR}}
_CONFIG_BODY = {"text/yaml": m.STR, "application/json": m.ConfigText}
_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": m.INT}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": schema}


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: str  # "owner.method"; "static" serves the shipped assets under the path's prefix
    summary: str
    tag: str
    roles: Roles
    responses: dict[str, Any]
    body: Any = None  # a model/schema (JSON), or {media type: model/schema}
    params: tuple[dict[str, Any], ...] = ()  # query parameters, and path parameters that are not plain strings
    description: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


R = Route
ROUTES: tuple[Route, ...] = (
    # --- monitoring and ingest (open, or their own credentials) ---
    R("GET", "/healthz", "console.healthz",
      "Gateway health; 200 while running, 503 while starting or stopping. Without a session or "
      "token only `status`; the details (redacted) need one",
      "monitoring", "public", {"200": m.HEALTH, "503": (m.HEALTH, "Not running")}),
    R("GET", "/metrics", "console.metrics", "Prometheus metrics", "monitoring", "public",
      {"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": m.STR}}}}),
    R("POST", "/ingest/{source}", "console.ingest",
      "Readings pushed to a running `http` source: a JSON object, an array of objects, or NDJSON",
      "ingest", "own",
      {
          "202": (m.IngestResult, "Taken: every accepted reading is in the pipeline; bad lines are dead-lettered"),
          "400": (m.Error, "Nothing readable in the body"),
          "401": (m.Error, "No bearer token, or not the source's (also when no such source runs)"),
          "413": (m.Error, "The body is over the source's max_body"),
          "429": (m.Error, "The pipeline is full: send again after Retry-After seconds"),
          "503": (m.Error, "The source is stopping"),
      },
      body={"application/json": {}, "application/x-ndjson": m.STR},
      params=({"name": "source", "in": "path", "required": True, "schema": m.SOURCE_ID},),
      description="Authenticated by the source's own `token` (Authorization: Bearer), not by "
      "a console login. The answer comes before the body is read when the token is wrong or "
      "the pipeline is full, so a client keeps its data."),
    # --- pipelines ---
    R("GET", "/api/pipelines", "console.api_pipelines", "Every pipeline with its nodes, counters, queues and health",
      "pipelines", "viewer", {"200": m.PIPELINES}),
    R("GET", "/api/deadletters", "console.api_deadletters", "Recent dead letters (newest first) and the total",
      "pipelines", "viewer", {"200": m.DEADLETTERS, "400": {"description": "limit is not an integer"}},
      params=({"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 200}},)),
    R("GET", "/api/logs", "console.api_logs", "Recent log lines", "pipelines", "viewer", {"200": m.LOGS},
      params=({"name": "level", "in": "query", "schema": m.STR},)),
    R("GET", "/api/overview", "views.api_overview", "Gateway status, uptime, system resources, per-pipeline health",
      "pipelines", "viewer", {"200": m.OVERVIEW}),
    R("GET", "/api/pipelines/{pipeline}/nodes/{node}", "views.api_node",
      "One node: counters, queue and its (redacted) options", "pipelines", "viewer",
      {"200": m.NODE_DETAIL, "404": (m.Error, "No such pipeline or node")}),
    # --- alerts ---
    R("GET", "/api/alerts", "console.api_alerts", "Open and recent alerts", "alerts", "viewer",
      {"200": m.ALERTS, "400": (m.Error, "A bad query parameter")},
      params=(_query("state", {"type": "string", "enum": list(STATES)}),
              _query("severity", {"type": "string", "enum": list(SEVERITIES)}),
              _query("pipeline", m.STR), _query("key", m.STR), _query("since", m.NUM), _query("until", m.NUM),
              _query("limit", m.INT))),
    R("GET", "/api/history", "console.api_history", "A key's downsampled history (epoch seconds)", "alerts",
      "viewer", {"200": m.ANY_OBJ, "400": (m.Error, "No key, or from not before to")},
      params=({"name": "key", "in": "query", "required": True, "schema": {"type": "string", "minLength": 1}},
              _query("from", m.NUM), _query("to", m.NUM), _query("points", m.INT))),
    R("POST", "/api/alerts/{id}/{action}", "console.api_alert_action",
      "Acknowledge or resolve an alert (admin), with an optional note", "alerts", "admin",
      {"200": m.ALERT, "400": (m.Error, "Bad alert id or body"), "404": (m.Error, "No such alert or action"),
       "409": (m.Error, "The alert cannot take that action now")},
      params=(_ID_PARAM, {"name": "action", "in": "path", "required": True,
                          "schema": {"type": "string", "enum": ["ack", "resolve"]}})),
    R("POST", "/api/alerts/suppress", "console.api_alert_suppress",
      "Suppress alert notifications for alert keys matching a glob until a time (admin)", "alerts", "admin",
      {"201": (m.Suppressed, "Created"), "400": m.Error, "409": m.Error}, body=m.SuppressRequest),
    R("GET", "/api/alerts/suppressions", "console.api_alert_suppressions", "Ad-hoc suppressions in force",
      "alerts", "viewer", {"200": m.Suppressions}),
    R("DELETE", "/api/alerts/suppressions/{id}", "console.api_alert_unsuppress",
      "End an ad-hoc suppression now (admin); its held alerts are published", "alerts", "admin",
      {"200": m.Unsuppressed, "400": m.Error, "404": m.Error}, params=(_ID_PARAM,)),
    # --- auth ---
    R("GET", "/api/session", "auth.api_session", "Who is logged in, and the CSRF token for changes", "auth",
      "public", {"200": m.SessionState}),
    R("POST", "/api/login", "auth.api_login",
      "Log in; starts a new session. `next` in the answer is the body's `next` if it is a path "
      "on this console, else /", "auth", "public",
      {"200": m.LoggedIn, "400": (m.Error, "Not a JSON object"), "401": (m.Error, "Wrong name or password"),
       "429": (m.Error, "Slowed after failures from this address; see Retry-After")},
      body=m.Credentials),
    R("POST", "/api/session/password", "auth.api_own_password",
      "Change your own password, giving the current one (any logged-in user); your other sessions end",
      "auth", "self",
      {"200": (m.Session, "Changed: this session goes on under a new CSRF token"),
       "400": (m.Error, "Not a JSON object, or the new password is too short"),
       "403": (m.Error, "Cross-origin, missing CSRF token, or the current password is wrong"),
       "409": (m.Error, "No password to change here: an API token, a console without login, or an account "
               "from console.users in the config"),
       "429": (m.Error, "Slowed after wrong current passwords; see Retry-After")},
      body=m.PasswordChange),
    R("POST", "/api/logout", "auth.api_logout", "End the session", "auth", "public", {"200": m.Ok}),
    R("POST", "/api/setup", "auth.api_setup",
      "First visit: create the admin with the setup code from the gateway's log", "auth", "public",
      {"201": m.Session, "400": (m.Error, "Bad name or password"), "403": (m.Error, "Wrong setup code"),
       "409": (m.Error, "Accounts exist already"), "429": (m.Error, "Too many wrong codes")},
      body=m.SetupRequest),
    R("GET", "/api/users", "auth.api_users", "Accounts (admin)", "auth", "admin", {"200": m.Users}),
    R("POST", "/api/users", "auth.api_user_create", "Create an account (admin)", "auth", "admin",
      {"201": m.UserInfo, "400": (m.Error, "Bad name, password or role"), "409": (m.Error, "Exists")},
      body=m.NewUser),
    R("DELETE", "/api/users/{name}", "auth.api_user_delete", "Delete an account (admin)", "auth", "admin",
      {"200": m.Ok, "404": (m.Error, "No such user"),
       "409": (m.Error, "From the config, yourself, or the last admin")}),
    R("PATCH", "/api/users/{name}", "auth.api_user_change",
      "Change an account's role or password (admin); every session of that user ends "
      "(your own: all but this one). Your own password is changed with POST /api/session/password, "
      "which asks for the current one; an admin API token sets any account's", "auth", "admin",
      {"200": m.UserChanged, "400": (m.Error, "Bad role or password, or neither given"),
       "404": (m.Error, "No such user"),
       "409": (m.Error, "From the config, your own password, or taking the admin role from yourself or "
               "from the last admin")},
      body=m.UserChange),
    R("GET", "/api/tokens", "auth.api_tokens", "API tokens (admin; the tokens themselves are never shown again)",
      "auth", "admin", {"200": m.Tokens}),
    R("POST", "/api/tokens", "auth.api_token_create",
      "Create an API token for scripts (admin); use it as 'Authorization: Bearer <token>'", "auth", "admin",
      {"201": m.TokenCreated, "400": (m.Error, "Bad role or body")}, body=m.NewToken),
    R("DELETE", "/api/tokens/{id}", "auth.api_token_delete", "Revoke an API token (admin)", "auth", "admin",
      {"200": m.Ok, "404": (m.Error, "No such token")}),
    # --- config ---
    R("GET", "/api/config", "views.api_config", "The running config's YAML text (admin)", "config", "admin",
      {"200": m.ConfigFile}),
    R("POST", "/api/config/validate", "views.api_validate",
      "Validate YAML config text; every problem with its line (admin)", "config", "admin",
      {"200": m.ConfigCheck, "400": (m.Error, "Not UTF-8 / not the expected JSON"),
       "413": (m.Error, "Larger than 1 MiB")}, body=_CONFIG_BODY),
    R("POST", "/api/config/save", "views.api_save",
      "Validate, hot-reload the pipelines and save the config file (admin); other sections need a restart",
      "config", "admin",
      {"200": m.ConfigSaved, "400": (m.Error, "Not UTF-8 / not the expected JSON"),
       "413": (m.Error, "Larger than 1 MiB"),
       "409": (m.ConfigRefused, "Valid, but the running gateway cannot take it; nothing changed")},
      body=_CONFIG_BODY),
    # --- editor ---
    R("GET", "/api/editor/palette", "editor.api_palette",
      "Every registered node type by family, with its description and options' JSON Schema", "editor", "viewer",
      {"200": m.ANY_OBJ}),
    R("GET", "/api/editor/model", "editor.api_model",
      "The config file as the editor's model, with its revision and canvas positions "
      "(secret options redacted for viewers)", "editor", "viewer", {"200": m.EDITOR_MODEL, "422": m.Error}),
    R("POST", "/api/editor/validate", "editor.api_validate",
      "Validate a draft {model} like `sluice validate`: errors by node and field; the YAML diff", "editor", "admin",
      {"200": m.EDITOR_CHECKED, "400": m.Error}, body=m.ANY_OBJ),
    R("POST", "/api/editor/deploy", "editor.api_deploy",
      "Deploy a draft {revision, model, positions}: validate, hot reload with rollback, save (admin)", "editor",
      "admin", {"200": m.ANY_OBJ, "400": m.Error, "409": m.Error, "422": (m.EDITOR_CHECKED, "The draft has errors")},
      body=m.ANY_OBJ),
    R("GET", "/api/editor/pipelines/{name}", "editor.api_export",
      "Export one pipeline as it is written in the YAML file (admin)", "editor", "admin",
      {"200": {"description": "YAML", "content": _YAML}, "404": m.Error, "422": m.Error}),
    R("GET", "/api/editor/connections", "editor.api_connections",
      "The connections section with its JSON Schema; secret options as *** (admin)", "editor", "admin",
      {"200": m.ANY_OBJ}),
    R("POST", "/api/editor/connections", "editor.api_save_connections",
      "Validate and save the connections section {revision, connections}; applied at the next restart (admin)",
      "editor", "admin", {"200": m.ANY_OBJ, "400": m.Error, "409": m.Error, "422": m.ANY_OBJ}, body=m.ANY_OBJ),
    R("POST", "/api/editor/import", "editor.api_import",
      'One pipeline as YAML {"yaml": ...} turned into the editor model (nothing saved; admin)', "editor", "admin",
      {"200": m.ANY_OBJ, "400": m.Error, "413": m.Error, "422": m.Error}, body=m.ANY_OBJ),
    # --- the document, the live socket, pages and assets ---
    R("GET", "/api/openapi.json", "openapi.serve", "This document", "meta", "viewer", {"200": m.ANY_OBJ}),
    R("GET", "/ws", "hub.handle",
      'Live updates: send {"op": "subscribe", "topic": T} with T one of stats, events (with pipeline and '
      "node), alerts or llm", "meta", "viewer",
      {"101": {"description": "Switching to the WebSocket"},
       "default": {"description": "Not a WebSocket handshake, or refused"}}),
    R("GET", "/", "views.page_app", "The console's page", "pages", "viewer",
      {"200": _HTML, "302": {"description": "Not logged in: to /login (or /setup before the first account)"}}),
    R("GET", "/login", "views.page_login", "The login page", "pages", "public", {"200": _HTML}),
    R("GET", "/setup", "views.page_setup", "The first-visit page that creates the admin", "pages", "public",
      {"200": _HTML}),
    R("GET", "/static/{filename}", "static", "The console's shipped assets (scripts, styles, icons)", "pages",
      "public", {"200": {"description": "The file"}, "default": {"description": "No such file"}}),
)  # fmt: skip

ROUTES_KEY = web.AppKey("sluice_routes", tuple)


def add_routes(app: web.Application, owners: dict[str, Any], static: Path, routes: tuple[Route, ...] = ROUTES) -> None:
    """Register ``routes`` on ``app``, their handlers looked up on ``owners`` by name."""
    for r in routes:
        if r.handler == "static":
            app.router.add_static(r.path.split("{", 1)[0], static, append_version=False)
            continue
        owner, _, attr = r.handler.partition(".")
        app.router.add_route(r.method, r.path, getattr(owners[owner], attr))
    app[ROUTES_KEY] = routes


def registered(app: web.Application) -> set[tuple[str, str]]:
    """``(method, path)`` of every route on ``app`` (HEAD, which aiohttp adds to GET, left out)."""
    out = set()
    for resource in app.router.resources():
        info = resource.get_info()
        if "directory" in info:  # a static resource: one route for every file under its prefix
            out.add(("GET", info["prefix"].rstrip("/") + "/{filename}"))
            continue
        path = info.get("path") or info.get("formatter")
        out |= {(route.method, path) for route in resource if route.method != "HEAD"}
    return out
