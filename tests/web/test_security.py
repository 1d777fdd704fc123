"""The console's guards against the outside review's attacks, through HTTP against a running gateway:
exact Host matching, the login's ``next``, odd CSRF tokens, ``${VAR}`` in drafts, ``/ingest`` probing
and the local model path check."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.runtime import Gateway
from tests.gateway._harness import running_gateway

from .conftest import PASSWORD, Browserish, base_url, config_text, web_of

ATTACKER_HOSTS = [
    "127.evil.example",
    "127.0.0.1.nip.io",
    "127.0.0.1.nip.io:{port}",
    "localhost.evil.example",
    "localhost.",
    "127.1",
    "evil.example:{port}",
    "[::1].evil.example",
    "127.0.0.1:{port}@evil.example",
]


async def test_host_guard_matches_whole_names_on_every_route(gw: Gateway, client_factory: Callable) -> None:
    """A name that only starts like a loopback address is an attacker's DNS name (rebinding)."""
    port = gw.console.port  # type: ignore[union-attr]
    c = client_factory()
    await c.session()
    body = {"code": web_of(gw).auth.setup_code, "name": "admin", "password": PASSWORD}
    for pattern in ATTACKER_HOSTS:
        host = pattern.format(port=port)
        headers = {"Host": host}
        status, data = await c.post("/api/setup", body, headers=headers)
        assert status == 421 and "localhost only" in data["error"], (host, status, data)
        status, _ = await c.post("/api/login", {"name": "admin", "password": PASSWORD}, headers=headers)
        assert status == 421, host
        assert (await c.get("/login", headers=headers))[0] == 421, host
        assert (await c.get("/healthz", headers=headers))[0] == 421, host
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await c.http.ws_connect(f"{c.base}/ws?csrf={c.csrf}", headers={**headers, "Origin": c.base})
        assert exc.value.status == 421, host
    assert web_of(gw).auth.store.needs_setup  # no setup went through
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", "127.0.0.2", f"[::1]:{port}"):
        assert (await c.get("/healthz", headers={"Host": host}))[0] == 200, host


async def test_allowed_hosts_names_the_console_exactly(make_gateway: Callable) -> None:
    async with make_gateway(console="{host: 127.0.0.1, port: 0, allowed_hosts: [gw1.plant.example]}") as gw:
        base = base_url(gw)
        async with aiohttp.ClientSession() as s:
            for host, want in (
                ("gw1.plant.example", 200),
                (f"GW1.plant.example:{gw.console.port}", 200),
                ("gw1.plant.example.evil.example", 421),
                ("x.gw1.plant.example", 421),
            ):
                async with s.get(base + "/healthz", headers={"Host": host}) as r:
                    assert r.status == want, host


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("/\\evil.example/page", "/"),
        ("/\\/evil.example", "/"),
        ("//evil.example/page", "/"),
        ("///evil.example", "/"),
        ("https://evil.example/", "/"),
        ("http://127.0.0.1/", "/"),
        ("/\t/evil.example", "/"),
        ("/\n/evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("/..//evil.example", "/evil.example"),  # a path on the console, never a host
        ("/../..//evil.example/x", "/evil.example/x"),
        ("evil", "/"),
        ("", "/"),
        (None, "/"),
        (42, "/"),
        ("/#/alerts?x=1", "/#/alerts?x=1"),
        ("/?view=logs", "/?view=logs"),
        ("/a/../b", "/b"),
    ],
)
async def test_login_next_stays_on_the_console(
    gw: Gateway, admin: Browserish, client_factory: Callable, given: Any, expected: str
) -> None:
    c = client_factory()
    status, data = await c.post("/api/login", {"name": "admin", "password": PASSWORD, "next": given})
    assert status == 200, data
    assert data["next"] == expected
    assert data["next"].startswith("/") and not data["next"].startswith("//")


async def test_login_page_goes_where_the_console_says() -> None:
    """The page follows the console's answer, never the raw query parameter."""
    from gateway.web.views import STATIC

    js = (STATIC / "js" / "login.js").read_text()
    assert "location.replace(data.next" in js
    assert "location.replace(next" not in js


@pytest.mark.parametrize("token", ["é", "\u00ff" * 43, "☃", "токен"])
async def test_non_ascii_csrf_token_is_refused_with_403(gw: Gateway, admin: Browserish, token: str) -> None:
    status, data = await admin.post(
        "/api/users",
        {"name": "op", "password": PASSWORD, "role": "viewer"},
        csrf=False,
        headers={"X-CSRF-Token": token},
    )
    assert status == 403 and "CSRF" in data["error"]
    assert "op" not in web_of(gw).auth.store.users


async def test_non_ascii_setup_code_is_a_wrong_code(gw: Gateway, client_factory: Callable) -> None:
    c = client_factory()
    status, data = await c.post("/api/setup", {"code": "ünïcödé", "name": "admin", "password": PASSWORD})
    assert status == 403 and "wrong setup code" in data["error"]


async def test_non_ascii_bearer_token_is_a_401(gw: Gateway, admin: Browserish) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(base_url(gw) + "/api/pipelines", headers={"Authorization": "Bearer ключ"}) as r:
            assert r.status == 401


DRAFT = """
gateway: {{id: draft, data_dir: "{data}"}}
connections:
  plant: {{type: mqtt, host: localhost, port: "${{SLUICE_TEST_PORT}}", password: "${{SLUICE_TEST_SECRET}}"}}
pipelines:
  - name: p
    nodes:
      - {{id: s, type: simulate, sensors: [{{key: a}}]}}
      - {{id: out, type: mqtt_out, input: s, connection: "${{SLUICE_TEST_SECRET}}"}}
"""


async def test_draft_validation_reads_no_environment_variable(
    gw: Gateway, admin: Browserish, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_TEST_SECRET", "hunter2-process-secret")
    monkeypatch.delenv("SLUICE_TEST_PORT", raising=False)
    text = DRAFT.format(data=tmp_path / "d")
    status, data = await admin.post("/api/config/validate", {"text": text})
    assert status == 200
    assert "hunter2" not in str(data)
    # references are left for the load: neither the unset port nor the connection name is judged
    assert data["valid"] is True, data
    # a draft with a real mistake still gets it reported, without any variable's value
    status, data = await admin.post("/api/config/validate", {"text": text.replace("type: mqtt_out", "type: mqt_out")})
    assert data["valid"] is False and "hunter2" not in str(data)
    assert any("unknown node type 'mqt_out'" in e["message"] for e in data["errors"])


async def test_saving_names_the_variable_not_its_value(
    gw: Gateway, admin: Browserish, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saving loads the config to run it, so variables are read; an error shows the reference only."""
    monkeypatch.setenv("SLUICE_TEST_SECRET", "hunter2-process-secret")
    monkeypatch.setenv("SLUICE_TEST_PORT", "1883")
    status, data = await admin.post("/api/config/save", {"text": DRAFT.format(data=tmp_path / "d")})
    assert status == 200 and data["valid"] is False
    assert "hunter2" not in str(data)
    assert any("${SLUICE_TEST_SECRET}" in e["message"] for e in data["errors"]), data


INGEST = """
gateway: {{id: ingest-test, data_dir: "{data}"}}
pipelines:
  - name: p
    nodes:
      - {{id: push, type: http, token: "{token}"}}
      - {{id: out, type: log, input: push}}
console: {{host: 127.0.0.1, port: 0}}
"""


@pytest.fixture
async def ingest_gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with running_gateway(INGEST.format(data=tmp_path / "data", token="t" * 24)) as g:
        yield g


async def test_ingest_unknown_and_known_sources_answer_alike(ingest_gw: Gateway) -> None:
    from tests._util import wait_for

    await wait_for(lambda: "push" in ingest_gw.links.ingest, timeout=10)
    base = base_url(ingest_gw)
    answers = {}
    async with aiohttp.ClientSession() as s:
        for source in ("push", "nope"):
            for auth in (None, "Bearer wrong-token-but-long-enough", "Basic dXNlcjpwYXNz"):
                headers = {"Authorization": auth} if auth else {}
                async with s.post(f"{base}/ingest/{source}", json={"key": "a", "value": 1}, headers=headers) as r:
                    realm = r.headers.get("WWW-Authenticate", "").replace(f"ingest/{source}", "ingest/<id>")
                    answers[(source, auth)] = (r.status, await r.json(), realm)
    for auth in (None, "Bearer wrong-token-but-long-enough", "Basic dXNlcjpwYXNz"):
        assert answers[("push", auth)] == answers[("nope", auth)], auth
        assert answers[("nope", auth)][0] == 401


async def test_model_path_from_the_console_is_not_looked_up_outside_its_dirs(
    gw: Gateway, admin: Browserish, tmp_path: Path
) -> None:
    data = Path(gw.loaded.config.gateway.data_dir)
    inside = data / "models" / "junk.gguf"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_bytes(b"not a model")

    def text(model: str) -> str:
        return config_text(data) + f"llm:\n  providers:\n    m: {{type: local, model: '{model}'}}\n"

    answers = {}
    for model in ("/etc/passwd", "/no/such/file.gguf", str(data / ".." / ".." / "etc" / "hostname"), str(inside)):
        status, body = await admin.post("/api/config/validate", {"text": text(model)})
        assert status == 200 and body["valid"] is False
        answers[model] = [e["message"] for e in body["errors"] if e["path"].startswith("llm.")]
    outside = [
        answers["/etc/passwd"],
        answers["/no/such/file.gguf"],
        answers[str(data / ".." / ".." / "etc" / "hostname")],
    ]
    assert outside[0] == outside[1] == outside[2], answers  # an existing file and a missing one look alike
    assert "data dir" in outside[0][0] and "llm.model_dirs" in outside[0][0]
    assert "not a GGUF file" in answers[str(inside)][0]  # inside the data dir it is checked


# --- sessions end on the server -------------------------------------------------------------


def _cookie(c: Browserish) -> str:
    return next(m.value for m in c.http.cookie_jar if m.key == "sluice_session")


async def _with_cookie(gw: Gateway, cookie: str, path: str = "/api/pipelines") -> int:
    async with aiohttp.ClientSession() as s:
        async with s.get(base_url(gw) + path, headers={"Cookie": f"sluice_session={cookie}"}) as r:
            return r.status


async def _ws_with_cookie(gw: Gateway, cookie: str, csrf: str) -> int:
    base = base_url(gw)
    async with aiohttp.ClientSession() as s:
        try:
            ws = await s.ws_connect(
                f"{base}/ws?csrf={csrf}", headers={"Cookie": f"sluice_session={cookie}", "Origin": base}
            )
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


async def test_a_cookie_saved_before_logout_is_refused(
    gw: Gateway, admin: Browserish, client_factory: Callable
) -> None:
    other = client_factory()  # the same user on a second browser
    assert (await other.login("admin"))[0] == 200
    saved, csrf = _cookie(admin), admin.csrf or ""
    assert await _with_cookie(gw, saved) == 200
    assert await _ws_with_cookie(gw, saved, csrf) == 101
    assert (await admin.post("/api/logout", {}))[0] == 200
    assert await _with_cookie(gw, saved) == 401
    assert await _ws_with_cookie(gw, saved, csrf) == 401
    assert (await other.get("/api/pipelines"))[0] == 401  # logout ends every session of that user
    admin.csrf = None  # the page fetches a new CSRF token after logout
    assert (await admin.login("admin"))[0] == 200  # a new login works
    assert (await admin.get("/api/pipelines"))[0] == 200


async def test_an_open_websocket_closes_when_its_session_ends(gw: Gateway, admin: Browserish) -> None:
    base = base_url(gw)
    ws = await admin.http.ws_connect(f"{base}/ws?csrf={admin.csrf}", headers={"Origin": base})
    try:
        hello = await ws.receive_json(timeout=10)
        assert hello["type"] == "hello"
        assert (await admin.post("/api/logout", {}))[0] == 200
        msg = await ws.receive(timeout=10)
        while msg.type == aiohttp.WSMsgType.TEXT:  # what was queued before the close
            msg = await ws.receive(timeout=10)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
        assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    finally:
        await ws.close()


async def test_sessions_end_at_password_and_role_change_and_removal(
    gw: Gateway, admin: Browserish, client_factory: Callable
) -> None:
    status, _ = await admin.post("/api/users", {"name": "op", "password": PASSWORD, "role": "admin"})
    assert status == 201
    op = client_factory()
    assert (await op.login("op"))[0] == 200
    cookie = _cookie(op)

    status, data = await admin.patch("/api/users/op", {"role": "viewer"})
    assert status == 200 and data["role"] == "viewer"
    assert await _with_cookie(gw, cookie) == 401
    assert (await op.login("op"))[0] == 200
    cookie = _cookie(op)
    status, data = await op.get("/api/session")
    assert data["role"] == "viewer"

    status, _ = await admin.patch("/api/users/op", {"password": "another long password"})
    assert status == 200
    assert await _with_cookie(gw, cookie) == 401
    assert (await op.login("op"))[0] == 401  # the old password is gone
    assert (await op.login("op", "another long password"))[0] == 200
    cookie = _cookie(op)

    assert (await admin.delete("/api/users/op"))[0] == 200
    assert await _with_cookie(gw, cookie) == 401
    # an account made again under the same name does not revive the old cookie
    assert (await admin.post("/api/users", {"name": "op", "password": PASSWORD, "role": "admin"}))[0] == 201
    assert await _with_cookie(gw, cookie) == 401


async def test_changing_your_own_password_keeps_only_this_session(
    gw: Gateway, admin: Browserish, client_factory: Callable
) -> None:
    other = client_factory()
    assert (await other.login("admin"))[0] == 200
    status, data = await admin.post("/api/session/password", {"current": PASSWORD, "password": "a new long password"})
    assert status == 200, data
    admin.csrf = data["csrf"]
    assert (await admin.get("/api/pipelines"))[0] == 200
    assert (await other.get("/api/pipelines"))[0] == 401
    status, data = await admin.patch("/api/users/admin", {"role": "viewer"})
    assert status == 409
    status, data = await admin.patch("/api/users/admin", {})
    assert status == 400  # nothing to change: no session ends for it
    assert (await admin.get("/api/pipelines"))[0] == 200


async def test_revocation_survives_a_restart(make_gateway: Callable, tmp_path: Path) -> None:
    data = tmp_path / "keep"
    async with make_gateway(data_dir=data) as gw:
        c = Browserish(base_url(gw))
        await c.setup_admin(gw)
        saved = _cookie(c)
        assert (await c.post("/api/logout", {}))[0] == 200
        await c.close()
    async with make_gateway(data_dir=data) as gw:
        assert await _with_cookie(gw, saved) == 401


# --- throttling: slow the attacker, never lock out the owner --------------------------------


async def _from(gw: Gateway, address: str) -> Browserish:
    """A client whose connections come from ``address`` (any 127.x.y.z is this machine on Linux)."""
    c = Browserish(base_url(gw))
    await c.http.close()
    c.http = aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), connector=aiohttp.TCPConnector(local_addr=(address, 0))
    )
    return c


@pytest.fixture
async def attacker(gw: Gateway) -> AsyncIterator[Browserish]:
    c = await _from(gw, "127.0.0.2")
    yield c
    await c.close()


async def test_failed_logins_slow_the_attacker_not_the_owner(
    gw: Gateway, admin: Browserish, attacker: Browserish, client_factory: Callable
) -> None:
    auth = web_of(gw).auth
    now = [1000.0]
    auth.throttle.clock = lambda: now[0]
    waits = []
    for _ in range(40):
        async with attacker.http.post(
            attacker.base + "/api/login",
            json={"name": "admin", "password": "guess guess guess"},
            headers={"Origin": attacker.base, "X-CSRF-Token": attacker.csrf or ""},
        ) as r:
            if r.status == 429:
                waits.append(int(r.headers["Retry-After"]))
                now[0] += waits[-1]  # the attacker waits as told, then guesses again
            else:
                assert r.status in (401, 403), r.status
                if attacker.csrf is None:
                    await attacker.session()
    assert len(waits) >= 5 and waits == sorted(waits) and waits[-1] > waits[0]  # the waits grow
    if (await attacker.login("admin", "guess guess guess"))[0] == 429:
        now[0] += auth.throttle.max_wait
        assert (await attacker.login("admin", "guess guess guess"))[0] == 401
    # right after a failure, the right password from the attacker's address waits too
    status, _ = await attacker.login("admin")
    assert status == 429
    # the owner, on an address that has not failed, gets in at once
    owner = client_factory()
    status, data = await owner.login("admin")
    assert status == 200, data
    # and a third address that has never failed, as well
    third = await _from(gw, "127.0.0.3")
    try:
        assert (await third.login("admin"))[0] == 200
    finally:
        await third.close()


async def test_wrong_setup_codes_slow_that_address_only(
    gw: Gateway, attacker: Browserish, client_factory: Callable
) -> None:
    auth = web_of(gw).auth
    auth.throttle.clock = lambda: 1000.0
    body = {"code": "0000-0000", "name": "admin", "password": PASSWORD}
    statuses = [(await attacker.post("/api/setup", body))[0] for _ in range(auth.throttle.free["ip"] + 2)]
    assert statuses[0] == 403 and statuses[-1] == 429
    owner = client_factory()
    status, data = await owner.post("/api/setup", {**body, "code": auth.setup_code})
    assert status == 201, data


async def test_modbus_profile_is_a_name_never_a_path(gw: Gateway, admin: Browserish, tmp_path: Path) -> None:
    """A profile name that climbs out of config/devices/ would tell whether a .yaml file exists (and
    echo its contents in validation errors): it is refused by its shape, whatever is on disk."""
    (tmp_path / "there.yaml").write_text("points: [{name: x, address: 1, type: u16}]\n")

    def text(profile: str) -> str:
        return f"""
gateway: {{id: g, data_dir: "{tmp_path}/d"}}
pipelines:
  - name: p
    nodes:
      - {{id: bus, type: modbus, host: 127.0.0.1, port: 502, slaves: [{{unit: 1, profile: "{profile}"}}]}}
      - {{id: out, type: log, input: bus}}
"""

    climb = "../" * 12 + str(tmp_path).lstrip("/")
    answers = []
    for profile in (f"{climb}/there", f"{climb}/absent"):
        status, data = await admin.post("/api/config/validate", {"text": text(profile)})
        assert status == 200 and data["valid"] is False
        answers.append([e["message"] for e in data["errors"]])
    assert answers[0] == answers[1], answers


@pytest.mark.parametrize("text", ["\x1a", "gateway: {id: a}\n\x00", "\ufffe"])
async def test_config_text_yaml_cannot_read_is_a_config_error(gw: Gateway, admin: Browserish, text: str) -> None:
    """YAML's reader refuses control characters before parsing: an answer at line 1, not a 500."""
    for path in ("/api/config/validate", "/api/config/save"):
        status, data = await admin.post(path, {"text": text})
        assert status == 200 and data["valid"] is False, (path, status, data)
        assert data["errors"][0]["line"] >= 1 and "YAML" in data["errors"][0]["message"]
