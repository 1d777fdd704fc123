"""The console's JSON for its pages: overview, node config, config validation, OpenAPI."""

from __future__ import annotations

import io
from collections.abc import Callable

from gateway.runtime import Gateway
from gateway.web.openapi import openapi_document
from tests._util import wait_for

from .conftest import Browserish


async def test_overview(gw: Gateway, admin: Browserish) -> None:
    await wait_for(lambda: gw.pipelines["plant"].nodes[0].n_out > 0, timeout=10)
    status, d = await admin.get("/api/overview")
    assert status == 200
    assert d["gateway"]["status"] == "ok" and d["gateway"]["uptime"] >= 0
    assert 0 <= d["system"]["memory"]["percent"] <= 100 and d["system"]["disk"]["total"] > 0
    assert d["system"]["process"]["rss"] > 0
    (p,) = d["pipelines"]
    assert p["name"] == "plant" and p["health"] == "ok" and p["nodes"] == 4 and p["events_in"] > 0


async def test_node_config(gw: Gateway, admin: Browserish) -> None:
    status, d = await admin.get("/api/pipelines/plant/nodes/alarm")
    assert status == 200
    assert d["kind"] == "operator" and d["options"]["above"] == 95 and d["options"]["input"] == ["hot"]
    assert (await admin.get("/api/pipelines/plant/nodes/nope"))[0] == 404
    assert (await admin.get("/api/pipelines/nope/nodes/alarm"))[0] == 404


def test_redaction_of_secret_looking_options() -> None:
    from gateway.redact import redact

    out = redact(
        {
            "password": "hunter2",
            "api_token": "x",
            "nested": [{"secret": "s"}],
            "key": "boiler/temp",
            "host": "h",
            "private_key": "k",
        }
    )
    assert out == {
        "password": "***",
        "api_token": "***",
        "nested": [{"secret": "***"}],
        "key": "boiler/temp",
        "host": "h",
        "private_key": "***",
    }


async def test_config_text_and_validation_with_lines(gw: Gateway, admin: Browserish) -> None:
    status, d = await admin.get("/api/config")
    assert status == 200 and "name: plant" in d["text"]
    status, r = await admin.post("/api/config/validate", d["text"], headers={"Content-Type": "text/yaml"})
    assert status == 200 and r == {"valid": True, "errors": [], "pipelines": 1, "nodes": 4}
    broken = d["text"].replace("above: 95", "above: hot").replace("input: alarm", "input: alarn")
    lines = broken.splitlines()
    status, r = await admin.post("/api/config/validate", {"text": broken})
    assert status == 200 and r["valid"] is False
    by_path = {e["path"]: e for e in r["errors"]}
    above = by_path["pipelines.0.nodes.2.above"]
    assert "above: hot" in lines[above["line"] - 1]
    inp = by_path["pipelines.0.nodes.3.input"]
    assert "alarn" in lines[inp["line"] - 1] and "unknown input 'alarn'" in inp["message"]
    status, r = await admin.post("/api/config/validate", "gateway: [unclosed")
    assert status == 200 and r["valid"] is False and r["errors"][0]["message"].startswith("YAML syntax")
    status, r = await admin.post("/api/config/validate", b"\xff\xfe", headers={"Content-Type": "text/yaml"})
    assert status == 400
    status, r = await admin.post("/api/config/validate", {"txt": "x"})
    assert status == 400
    status, r = await admin.post("/api/config/validate", io.BytesIO(b"#" * (1024 * 1024 + 1)))
    assert status == 413


async def test_openapi_describes_every_api_route(gw: Gateway, admin: Browserish) -> None:
    status, doc = await admin.get("/api/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    routes = set()
    assert gw.console is not None
    for resource in gw.console.app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter")
        if path and path.startswith("/api/"):
            routes |= {(path, r.method.lower()) for r in resource if r.method != "HEAD"}
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert routes <= documented
    mine = {
        ("/api/session", "get"),
        ("/api/login", "post"),
        ("/api/setup", "post"),
        ("/api/overview", "get"),
        ("/api/config/validate", "post"),
        ("/api/tokens", "post"),
        ("/api/pipelines", "get"),
        ("/api/deadletters", "get"),
    }
    for path, method in mine:
        op = doc["paths"][path][method]
        assert op["summary"] != "undocumented" and ({"200", "201"} & set(op["responses"])), path
    # every $ref resolves
    refs = {v for v in _walk(doc) if isinstance(v, str) and v.startswith("#/")}
    for ref in refs:
        node = doc
        for part in ref[2:].split("/"):
            node = node[part]
    assert openapi_document(gw.console.app) == doc


def _walk(x: object) -> list[object]:
    if isinstance(x, dict):
        return [v for k, val in x.items() for v in ([val] if k == "$ref" else _walk(val))]
    if isinstance(x, list):
        return [v for item in x for v in _walk(item)]
    return []


async def test_static_assets_are_shipped(gw: Gateway, admin: Browserish) -> None:
    for path in ("/static/js/app.js", "/static/js/views/graph.js", "/static/style.css", "/static/favicon.svg"):
        async with admin.http.get(admin.base + path) as r:
            assert r.status == 200, path
    async with admin.http.get(admin.base + "/static/../auth.py") as r:
        assert r.status in (403, 404)


async def test_every_served_route_is_in_the_document_and_nothing_else(gw: Gateway, admin: Browserish) -> None:
    """The console serves exactly the routes the OpenAPI document describes, one table being both."""
    from gateway.web.routes import ROUTES, registered

    assert gw.console is not None
    _, doc = await admin.get("/api/openapi.json")
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    served = registered(gw.console.app)
    assert served == documented
    assert {"/", "/ws", "/healthz", "/ingest/{source}", "/api/openapi.json"} <= {p for _, p in served}
    assert all(op["summary"] and op["responses"] for ops in doc["paths"].values() for op in ops.values())
    # a change always needs an admin (the middleware's rule), so no row may promise one to a viewer
    assert [r.path for r in ROUTES if r.roles == "viewer" and r.method != "GET"] == []


async def test_the_route_table_roles_are_what_the_console_enforces(
    gw: Gateway, admin: Browserish, client_factory: Callable[[], Browserish]
) -> None:
    """Without a login, a `public` row answers and every other row is refused (401, or to the login page)."""
    from gateway.web.routes import ROUTES

    anonymous = client_factory()
    for r in ROUTES:
        if r.method != "GET" or "{" in r.path:
            continue
        status, _ = await anonymous.get(r.path)
        if r.roles == "public":
            assert status == 200, r.path
        elif r.path.startswith("/api/") or r.path == "/ws":
            assert status == 401, r.path
        else:
            assert status == 302, r.path
    assert (await anonymous.get("/static/style.css"))[0] == 200


def test_a_route_without_a_table_row_is_not_served(tmp_path: object) -> None:
    """Registering goes through the table only: a table with one row less serves one route less."""
    from aiohttp import web

    from gateway.web.openapi import openapi_document
    from gateway.web.routes import ROUTES, add_routes, registered

    class Owner:
        def __getattr__(self, name: str) -> object:
            async def handler(request: web.Request) -> web.Response:
                return web.Response()

            return handler

    owners = {k: Owner() for k in ("console", "auth", "views", "editor", "hub", "openapi")}
    app = web.Application()
    fewer = tuple(r for r in ROUTES if r.path != "/api/logs")
    add_routes(app, owners, tmp_path, fewer)  # type: ignore[arg-type]
    assert ("GET", "/api/logs") not in registered(app)
    assert "/api/logs" not in openapi_document(app)["paths"]
    assert "/api/logs" in openapi_document()["paths"]
