"""Managing console accounts over HTTP against a running gateway: the last admin stays an admin
whoever asks (a session, an admin API token), and every user changes their own password with the
current one (``POST /api/session/password``), CSRF and Origin checked like every change."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp

from gateway.runtime import Gateway

from .conftest import PASSWORD, Browserish, base_url, web_of

NEW = "a brand new passphrase"


async def _token_client(admin: Browserish, role: str = "admin") -> tuple[aiohttp.ClientSession, dict[str, str]]:
    status, data = await admin.post("/api/tokens", {"name": "provisioning", "role": role})
    assert status == 201, data
    return aiohttp.ClientSession(), {"Authorization": f"Bearer {data['token']}"}


async def _users(c: Browserish) -> dict[str, dict]:
    status, data = await c.get("/api/users")
    assert status == 200, data
    return {u["name"]: u for u in data["users"]}


async def test_the_last_admin_can_be_neither_removed_nor_demoted(gw: Gateway, admin: Browserish) -> None:
    """An admin API token is no account: it must not remove or demote the only admin account, which
    would leave a console nobody can log in to manage."""
    base = base_url(gw)
    assert (await _users(admin))["admin"]["last_admin"] is True
    http, bearer = await _token_client(admin)
    try:
        async with http.delete(base + "/api/users/admin", headers=bearer) as r:
            assert r.status == 409, await r.text()
            assert "last admin" in (await r.json())["error"]
        async with http.patch(base + "/api/users/admin", json={"role": "viewer"}, headers=bearer) as r:
            assert r.status == 409
            assert "last admin" in (await r.json())["error"]
        assert web_of(gw).auth.store.users["admin"].role == "admin"

        # with a second admin, either may go; then the one left is the last again
        status, _ = await admin.post("/api/users", {"name": "op", "password": PASSWORD, "role": "admin"})
        assert status == 201
        listed = await _users(admin)
        assert not listed["admin"]["last_admin"] and not listed["op"]["last_admin"]
        async with http.patch(base + "/api/users/op", json={"role": "viewer"}, headers=bearer) as r:
            assert r.status == 200, await r.text()
        async with http.patch(base + "/api/users/op", json={"role": "admin"}, headers=bearer) as r:
            assert r.status == 200
        async with http.patch(base + "/api/users/admin", json={"role": "viewer"}, headers=bearer) as r:
            assert r.status == 200, await r.text()
        assert (await admin.get("/api/users"))[0] == 401  # demoted: that session ended
        async with http.delete(base + "/api/users/op", headers=bearer) as r:
            assert r.status == 409 and "last admin" in (await r.json())["error"]
        async with http.get(base + "/api/users", headers=bearer) as r:
            listed = {u["name"]: u for u in (await r.json())["users"]}
        assert listed["op"]["last_admin"] is True and listed["admin"]["role"] == "viewer"
        # a viewer is never the last admin: it can be removed
        async with http.delete(base + "/api/users/admin", headers=bearer) as r:
            assert r.status == 200
    finally:
        await http.close()


async def test_a_viewer_changes_their_own_password_with_the_current_one(
    gw: Gateway, admin: Browserish, client_factory: Callable[[], Browserish]
) -> None:
    assert (await admin.post("/api/users", {"name": "viewer1", "password": PASSWORD}))[0] == 201
    me, elsewhere = client_factory(), client_factory()
    assert (await me.login("viewer1"))[0] == 200
    assert (await elsewhere.login("viewer1"))[0] == 200
    path = "/api/session/password"

    # refused: no CSRF token, another origin, a wrong current password, a short new one
    status, data = await me.post(path, {"current": PASSWORD, "password": NEW}, csrf=False)
    assert status == 403 and "CSRF" in data["error"]
    status, data = await me.post(path, {"current": PASSWORD, "password": NEW}, origin="http://evil.example")
    assert status == 403 and "cross-origin" in data["error"]
    status, data = await me.post(path, {"current": "not my password", "password": NEW})
    assert status == 403 and data["error"] == "the current password is wrong"
    status, data = await me.post(path, {"current": PASSWORD, "password": "short"})
    assert status == 400 and "at least 10" in data["error"]
    status, data = await me.post(path, {"password": NEW})
    assert status == 400 and '"current"' in data["error"]
    assert (await elsewhere.get("/api/pipelines"))[0] == 200  # nothing changed yet

    status, data = await me.post(path, {"current": PASSWORD, "password": NEW})
    assert status == 200, data
    assert data["user"] == "viewer1" and data["role"] == "viewer" and data["csrf"] != me.csrf
    me.csrf = data["csrf"]
    assert (await me.get("/api/pipelines"))[0] == 200  # this session goes on
    assert (await elsewhere.get("/api/pipelines"))[0] == 401  # every other one ended
    assert (await elsewhere.login("viewer1"))[0] == 401
    assert (await elsewhere.login("viewer1", NEW))[0] == 200
    # still a viewer: the one change it may make is its own password
    assert (await me.post("/api/users", {"name": "x1", "password": PASSWORD}))[0] == 403


async def test_wrong_current_passwords_are_slowed_like_failed_logins(
    gw: Gateway, admin: Browserish, client_factory: Callable[[], Browserish]
) -> None:
    """A session left open in a browser must not become a way to guess the account's password."""
    statuses = []
    for _ in range(8):
        status, _ = await admin.post("/api/session/password", {"current": "guess", "password": NEW})
        statuses.append(status)
        if status == 429:
            break
    assert statuses[-1] == 429 and set(statuses[:-1]) == {403}, statuses
    # the right password is slowed too, from this address, while the wait lasts
    status, data = await admin.post("/api/session/password", {"current": PASSWORD, "password": NEW})
    assert status == 429 and "try again" in data["error"]


async def test_no_password_to_change_for_an_api_token(gw: Gateway, admin: Browserish) -> None:
    http, bearer = await _token_client(admin, role="viewer")
    try:
        async with http.post(
            base_url(gw) + "/api/session/password", json={"current": PASSWORD, "password": NEW}, headers=bearer
        ) as r:
            assert r.status == 409 and "API token" in (await r.json())["error"]
    finally:
        await http.close()
    assert (await admin.get("/api/pipelines"))[0] == 200


async def test_an_account_from_the_config_changes_its_password_in_the_config(make_gateway: Callable) -> None:
    from gateway.web import hash_password

    users = f'[{{name: ops, role: viewer, password_hash: "{hash_password(PASSWORD)}"}}]'
    async with make_gateway(console=f"{{host: 127.0.0.1, port: 0, users: {users}}}") as gw:
        c = Browserish(base_url(gw))
        try:
            assert (await c.login("ops"))[0] == 200
            status, data = await c.post("/api/session/password", {"current": PASSWORD, "password": NEW})
            assert status == 409 and "console.users" in data["error"]
            assert (await c.get("/api/pipelines"))[0] == 200
        finally:
            await c.close()


async def test_the_self_rows_are_the_only_changes_a_viewer_may_make() -> None:
    from gateway.web.routes import ROUTES

    assert [(r.method, r.path) for r in ROUTES if r.roles == "self"] == [("POST", "/api/session/password")]


async def test_an_admin_changes_their_own_password_only_with_the_current_one(
    gw: Gateway, admin: Browserish, client_factory: Callable[[], Browserish]
) -> None:
    """``PATCH /api/users/<own name>`` with a password would let a session left open in a browser
    take the account without the current password; it is refused and points to the route that asks
    for it. An admin still sets another user's password, and an admin API token (no account, no
    password of its own) sets any account's, including one that shares the token's name."""
    other = client_factory()
    assert (await other.login("admin"))[0] == 200
    status, data = await admin.patch("/api/users/admin", {"password": NEW})
    assert status == 409, data
    assert "/api/session/password" in data["error"] and "current" in data["error"]
    status, data = await admin.patch("/api/users/admin", {"role": "admin", "password": NEW})
    assert status == 409, data
    assert (await other.get("/api/pipelines"))[0] == 200  # nothing changed: no session ended
    assert (await client_factory().login("admin", NEW))[0] == 401
    assert (await client_factory().login("admin"))[0] == 200

    # another user's password: still the admin's to set, without theirs
    assert (await admin.post("/api/users", {"name": "op", "password": PASSWORD, "role": "admin"}))[0] == 201
    status, data = await admin.patch("/api/users/op", {"password": NEW})
    assert status == 200, data
    assert (await client_factory().login("op", NEW))[0] == 200

    # an admin token named like an account is not that account's session
    status, data = await admin.post("/api/tokens", {"name": "op", "role": "admin"})
    assert status == 201, data
    bearer = {"Authorization": f"Bearer {data['token']}"}
    async with aiohttp.ClientSession() as http:
        async with http.patch(base_url(gw) + "/api/users/op", json={"password": PASSWORD}, headers=bearer) as r:
            assert r.status == 200, await r.text()
        async with http.patch(base_url(gw) + "/api/users/op", json={"role": "viewer"}, headers=bearer) as r:
            assert r.status == 200, await r.text()
    assert (await client_factory().login("op"))[0] == 200
    assert (await _users(admin))["op"]["role"] == "viewer"
