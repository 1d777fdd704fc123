"""Console security against a running gateway: no default credentials, sessions, CSRF/Origin, lockout, roles, tokens."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from gateway.runtime import Gateway
from gateway.web import hash_password

from .conftest import PASSWORD, Browserish, base_url, web_of

PROTECTED_GETS = [
    "/",
    "/api/pipelines",
    "/api/deadletters",
    "/api/logs",
    "/api/overview",
    "/api/config",
    "/api/openapi.json",
    "/api/users",
    "/api/tokens",
    "/api/pipelines/plant/nodes/sensors",
]


async def test_monitoring_open_everything_else_refused_without_login(gw: Gateway, client_factory: Callable) -> None:
    c = client_factory()
    assert (await c.get("/healthz"))[0] == 200
    status, metrics = await c.get("/metrics")
    assert status == 200 and "sluice_node_in" in metrics
    for path in PROTECTED_GETS:
        status, body = await c.get(path)
        if path == "/":
            assert status == 302, path
        else:
            assert status == 401, (path, status, body)
            assert "error" in body
    status, body = await c.post("/api/config/validate", "gateway: {id: x}")
    assert status == 401
    # the first visit is sent to account creation, not to a login nobody can pass
    async with c.http.get(c.base + "/", allow_redirects=False) as r:
        assert r.headers["Location"] == "/setup"
    s = await c.session()
    assert s == {"auth": True, "user": None, "role": None, "csrf": s["csrf"], "needs_setup": True}


async def test_first_visit_creates_admin_with_setup_code(gw: Gateway, client_factory: Callable) -> None:
    auth = web_of(gw).auth
    code = auth.setup_code
    assert code is not None
    c = client_factory()
    status, body = await c.post(
        "/api/setup",
        {"code": "0000-0000" if code != "0000-0000" else "1111-1111", "name": "admin", "password": PASSWORD},
    )
    assert status == 403 and "setup code" in body["error"]
    status, body = await c.post("/api/setup", {"code": code, "name": "admin", "password": "short"})
    assert status == 400 and "password" in body["error"]
    status, body = await c.post("/api/setup", {"code": code, "name": "admin", "password": PASSWORD})
    assert status == 201 and body["role"] == "admin"
    c.csrf = body["csrf"]
    assert auth.setup_code is None
    # logged in straight away
    status, pipes = await c.get("/api/pipelines")
    assert status == 200 and pipes["pipelines"][0]["name"] == "plant"
    status, page = await c.get("/")
    assert status == 200 and "<title>Sluice console</title>" in page
    # a second admin cannot be created through setup by anyone
    other = client_factory()
    status, body = await other.post("/api/setup", {"code": code, "name": "evil", "password": PASSWORD})
    assert status == 409
    # the account file is private and holds an argon2 hash, never the password
    path = gw.data_dir / "console" / "users.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    assert PASSWORD not in text and "$argon2id$" in text
    assert stat.S_IMODE(os.stat(gw.data_dir / "console" / "secret.key").st_mode) == 0o600


async def test_session_cookie_flags_and_logout(gw: Gateway, client_factory: Callable) -> None:
    c = client_factory()
    await c.session()
    async with c.http.post(
        c.base + "/api/setup",
        json={"code": web_of(gw).auth.setup_code, "name": "admin", "password": PASSWORD},
        headers={"Origin": c.base, "X-CSRF-Token": c.csrf or ""},
    ) as r:
        assert r.status == 201
        cookie = r.headers["Set-Cookie"]
        c.csrf = (await r.json())["csrf"]
    assert "sluice_session=" in cookie
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Secure" not in cookie  # plain HTTP on localhost; Secure is set when the console serves TLS
    assert (await c.get("/api/pipelines"))[0] == 200
    status, _ = await c.post("/api/logout", {})
    assert status == 200
    assert (await c.get("/api/pipelines"))[0] == 401


async def test_csrf_token_and_origin_required_for_changes(gw: Gateway, admin: Browserish) -> None:
    body = {"name": "op", "password": PASSWORD, "role": "viewer"}
    status, data = await admin.post("/api/users", body, csrf=False)
    assert status == 403 and "CSRF" in data["error"]
    status, data = await admin.post("/api/users", body, headers={"X-CSRF-Token": "forged"}, csrf=False)
    assert status == 403 and "CSRF" in data["error"]
    status, data = await admin.post("/api/users", body, origin="http://evil.example")
    assert status == 403 and "cross-origin" in data["error"]
    status, data = await admin.post("/api/users", body, origin="null")
    assert status == 403
    status, data = await admin.post("/api/users", body, origin=None, headers={"Referer": "http://evil.example/page"})
    assert status == 403
    assert "op" not in web_of(gw).auth.store.users
    status, data = await admin.post("/api/users", body)
    assert status == 201, data
    assert web_of(gw).auth.store.users["op"].role == "viewer"


async def test_login_wrong_password_then_backoff(gw: Gateway, admin: Browserish, client_factory: Callable) -> None:
    auth = web_of(gw).auth
    now = [1000.0]
    auth.throttle.clock = lambda: now[0]
    c = client_factory()
    status, data = await c.login("admin", "wrong password!")
    assert status == 401 and data["error"] == "wrong user name or password"
    status, data = await c.login("nobody", PASSWORD)
    assert status == 401 and data["error"] == "wrong user name or password"  # no probing for names
    for _ in range(auth.throttle.free["user@"]):
        status, _ = await c.login("admin", "wrong password!")
        assert status == 401
    # slowed: from this address even the right password waits, and the answer says how long
    async with c.http.post(
        c.base + "/api/login",
        json={"name": "admin", "password": PASSWORD},
        headers={"Origin": c.base, "X-CSRF-Token": c.csrf or ""},
    ) as r:
        assert r.status == 429
        assert int(r.headers["Retry-After"]) > 0
        assert "too many failed logins" in (await r.json())["error"]
    now[0] += auth.throttle.max_wait
    status, data = await c.login("admin", PASSWORD)
    assert status == 200 and data["user"] == "admin"


async def test_viewer_reads_but_cannot_change(gw: Gateway, admin: Browserish, client_factory: Callable) -> None:
    assert (await admin.post("/api/users", {"name": "viewer1", "password": PASSWORD}))[0] == 201
    v = client_factory()
    status, data = await v.login("viewer1")
    assert status == 200 and data["role"] == "viewer"
    for path in ("/api/pipelines", "/api/overview", "/api/deadletters", "/api/pipelines/plant/nodes/hot", "/"):
        assert (await v.get(path))[0] == 200, path
    for path in ("/api/config", "/api/users", "/api/tokens"):
        assert (await v.get(path))[0] == 403, path
    changes = (
        ("/api/config/validate", "gateway: {id: x}"),
        ("/api/users", {"name": "x", "password": PASSWORD}),
        ("/api/tokens", {"role": "admin"}),
    )
    for path, body in changes:
        status, data = await v.post(path, body)
        assert status == 403 and "admin" in data["error"], path
    assert (await v.delete("/api/users/admin"))[0] == 403
    assert set(web_of(gw).auth.store.users) == {"admin", "viewer1"}
    assert not web_of(gw).auth.store.tokens


async def test_api_tokens_for_scripts(gw: Gateway, admin: Browserish) -> None:
    status, tok = await admin.post("/api/tokens", {"name": "bench", "role": "viewer"})
    assert status == 201 and tok["token"].startswith("slt_")
    status, atok = await admin.post("/api/tokens", {"name": "deploy", "role": "admin"})
    assert status == 201
    base = base_url(gw)
    async with aiohttp.ClientSession() as s:  # no cookies: a script
        async with s.get(base + "/api/pipelines", headers={"Authorization": f"Bearer {tok['token']}"}) as r:
            assert r.status == 200
        async with s.post(
            base + "/api/config/validate", data="gateway: {id: x}", headers={"Authorization": f"Bearer {tok['token']}"}
        ) as r:
            assert r.status == 403  # a viewer token reads only
        async with s.post(
            base + "/api/config/validate", data="gateway: {id: x}", headers={"Authorization": f"Bearer {atok['token']}"}
        ) as r:
            assert r.status == 200 and (await r.json())["valid"] is True  # no CSRF needed without cookies
        async with s.get(base + "/api/pipelines", headers={"Authorization": "Bearer slt_wrong"}) as r:
            assert r.status == 401
        async with s.get(base + "/api/pipelines", headers={"Authorization": "Basic YWRtaW46eA=="}) as r:
            assert r.status == 401
    # stored hashed; listed without the secret; revoked tokens stop working
    text = (gw.data_dir / "console" / "users.json").read_text()
    assert tok["token"] not in text
    status, listed = await admin.get("/api/tokens")
    assert {t["name"] for t in listed["tokens"]} == {"bench", "deploy"}
    assert "token" not in json.dumps(listed["tokens"]).replace('"tokens"', "")
    assert (await admin.delete(f"/api/tokens/{tok['id']}"))[0] == 200
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/api/pipelines", headers={"Authorization": f"Bearer {tok['token']}"}) as r:
            assert r.status == 401


async def test_security_headers_everywhere(gw: Gateway, admin: Browserish) -> None:
    for path in ("/", "/login", "/setup", "/api/pipelines", "/static/js/app.js", "/healthz", "/api/nope"):
        async with admin.http.get(admin.base + path, allow_redirects=False) as r:
            h = r.headers
            csp = h["Content-Security-Policy"]
            assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp, path
            assert h["X-Content-Type-Options"] == "nosniff", path
            assert h["X-Frame-Options"] == "DENY", path
    async with aiohttp.ClientSession() as anon, anon.get(admin.base + "/api/pipelines") as r:
        assert r.status == 401 and "Content-Security-Policy" in r.headers


async def test_pages_have_no_inline_script_and_no_secret(gw: Gateway, admin: Browserish) -> None:
    code = "unused"
    for page in ("/", "/login", "/setup"):
        status, html = await admin.get(page)
        assert status == 200
        assert "<script>" not in html and "onclick=" not in html and "style=" not in html
        assert "http://" not in html and "https://" not in html  # no CDN
        assert code not in html and PASSWORD not in html


def test_hash_password_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "hash-password", "--stdin"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    h = out.stdout.strip()
    assert h.startswith("$argon2id$") and PASSWORD not in h
    import argon2

    assert argon2.PasswordHasher().verify(h, PASSWORD)
    short = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "hash-password", "--stdin"],
        input="short\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert short.returncode == 1 and "at least 10 characters" in short.stderr


async def test_users_from_config_no_first_visit(make_gateway: Callable, tmp_path: Any) -> None:
    h = hash_password(PASSWORD)
    console = f'{{host: 127.0.0.1, port: 0, users: [{{name: ops, role: admin, password_hash: "{h}"}}]}}'
    async with make_gateway(console=console) as gw:
        assert web_of(gw).auth.setup_code is None
        c = Browserish(base_url(gw))
        try:
            assert (await c.session())["needs_setup"] is False
            async with c.http.get(c.base + "/", allow_redirects=False) as r:
                assert r.status == 302 and r.headers["Location"] == "/login"
            status, _ = await c.post("/api/setup", {"code": "x", "name": "evil", "password": PASSWORD})
            assert status == 409
            status, data = await c.login("ops")
            assert status == 200 and data["role"] == "admin"
            status, data = await c.delete("/api/users/ops")
            assert status == 409  # config users are managed in the config
        finally:
            await c.close()


async def test_config_rejects_plain_password(tmp_path: Any) -> None:
    from gateway.config import parse_config
    from gateway.errors import ConfigError

    text = "gateway: {id: g}\nconsole:\n  users:\n    - {name: ops, password_hash: hunter2}\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "c.yaml", {})
    assert any(i.path == "console.users.0.password_hash" and i.line == 4 for i in err.value.issues)


async def test_auth_off_opens_api_but_not_cross_origin_changes(make_gateway: Callable) -> None:
    async with make_gateway(console="{host: 127.0.0.1, port: 0, auth: false}") as gw:
        assert web_of(gw).auth.setup_code is None
        c = Browserish(base_url(gw))
        try:
            assert (await c.get("/api/pipelines"))[0] == 200
            assert (await c.get("/"))[0] == 200
            status, data = await c.post("/api/config/validate", "gateway: {id: x}", origin="http://evil.example")
            assert status == 403
            status, data = await c.post("/api/config/validate", "gateway: {id: x}")
            assert status == 200 and data["valid"] is True
        finally:
            await c.close()


async def test_sessions_survive_a_restart(make_gateway: Callable, tmp_path: Any) -> None:
    data = tmp_path / "keep"
    async with make_gateway(data_dir=data) as gw:
        c = Browserish(base_url(gw))
        await c.setup_admin(gw)
        cookies = c.http.cookie_jar
    async with make_gateway(data_dir=data) as gw2:
        assert web_of(gw2).auth.setup_code is None  # the account is still there
        c2 = Browserish(base_url(gw2))
        try:
            for cookie in cookies:
                c2.http.cookie_jar.update_cookies({cookie.key: cookie.value})
            assert (await c2.get("/api/pipelines"))[0] == 200
        finally:
            await c2.close()
            await c.close()


def _self_signed(tmp_path: Any) -> tuple[str, str]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "console.crt", tmp_path / "console.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


async def test_tls_console_sets_secure_cookie_and_hsts(make_gateway: Callable, tmp_path: Any) -> None:
    import ssl

    cert, key = _self_signed(tmp_path)
    async with make_gateway(console=f'{{host: 127.0.0.1, port: 0, tls_cert: "{cert}", tls_key: "{key}"}}') as gw:
        assert gw.console is not None and gw.console.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=cert)
        base = f"https://127.0.0.1:{gw.console.port}"
        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), connector=aiohttp.TCPConnector(ssl=ctx)
        ) as s:
            async with s.get(base + "/api/session") as r:
                assert r.headers["Strict-Transport-Security"].startswith("max-age=")
                csrf = (await r.json())["csrf"]
                assert "Secure" in r.headers["Set-Cookie"]
            async with s.post(
                base + "/api/setup",
                json={"code": web_of(gw).auth.setup_code, "name": "admin", "password": PASSWORD},
                headers={"Origin": base, "X-CSRF-Token": csrf},
            ) as r:
                assert r.status == 201
                assert "Secure" in r.headers["Set-Cookie"] and "HttpOnly" in r.headers["Set-Cookie"]
            async with s.get(base + "/api/pipelines") as r:
                assert r.status == 200
        # plain HTTP to a TLS console gets nothing
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientError):
                async with s.get(f"http://127.0.0.1:{gw.console.port}/api/session") as r:
                    await r.read()


async def test_dns_rebinding_refused_on_a_loopback_console(make_gateway: Callable) -> None:
    async with make_gateway(console="{host: 127.0.0.1, port: 0, auth: false}") as gw:
        base = base_url(gw)
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/api/pipelines", headers={"Host": "evil.example"}) as r:
                assert r.status == 421 and "localhost only" in (await r.json())["error"]
            async with s.get(base + "/", headers={"Host": f"evil.example:{gw.console.port}"}) as r:
                assert r.status == 421
            for host in (f"localhost:{gw.console.port}", f"127.0.0.1:{gw.console.port}", "localhost"):
                async with s.get(base + "/api/pipelines", headers={"Host": host}) as r:
                    assert r.status == 200, host


async def test_damaged_account_file_stops_the_start_with_one_clear_error(tmp_path: Any) -> None:
    from gateway.config import parse_config
    from gateway.errors import SluiceError
    from gateway.runtime import Gateway as Gw

    from .conftest import config_text

    data = tmp_path / "data"
    (data / "console").mkdir(parents=True)
    (data / "console" / "users.json").write_text("{not json")
    gw = Gw(parse_config(config_text(data), "t.yaml", {}))
    with pytest.raises(SluiceError, match=r"console account file .* is unreadable"):
        await gw.run(install_signals=False)
    assert gw.state == "stopped"


async def test_every_route_refuses_without_login(gw: Gateway, client_factory: Callable) -> None:
    """Whatever any part of Sluice adds to the console, only the open list answers a stranger."""
    import re

    from gateway.web.auth import _OPEN_EXACT, _OPEN_PREFIX

    assert gw.console is not None
    c = client_factory()
    await c.session()
    checked = 0
    for resource in gw.console.app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        if not path or path in _OPEN_EXACT or path.startswith(_OPEN_PREFIX):
            continue
        url = re.sub(r"\{[^}]+\}", "x1", path)
        for route in resource:
            method = route.method
            if method in ("HEAD", "*"):
                continue
            async with c.http.request(
                method, c.base + url, allow_redirects=False, headers={"Origin": c.base, "X-CSRF-Token": c.csrf or ""}
            ) as r:
                if url.startswith("/api/") or url == "/ws" or method != "GET":
                    assert r.status == 401, (method, url, r.status)
                else:
                    assert r.status == 302 and r.headers["Location"] in ("/setup", "/login"), (method, url)
            checked += 1
    assert checked >= 20
