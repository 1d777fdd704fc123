"""The Users page and the account page in Chromium: an admin adds a user, changes its role, sets its
password and deletes it; the last admin's role and account are locked on the page as the API locks
them; a viewer does not see the page and changes their own password with the current one.
Screenshots (desktop and 390 px) land next to the other console shots."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from gateway.runtime import Gateway

from .conftest import PASSWORD, Browserish, base_url, web_of
from .test_browser import browser, logged_in, page, playwright_api, shot  # noqa: F401 -- fixtures

expect = playwright_api.expect
NEW = "a brand new passphrase"


def _row(pg: Any, name: str) -> Any:
    return pg.locator(f'#users tr[data-user="{name}"]')


async def _fits_a_phone(pg: Any, name: str) -> None:
    await pg.set_viewport_size({"width": 390, "height": 844})
    assert await pg.evaluate("document.documentElement.scrollWidth") <= 391
    await shot(pg, name)


async def test_users_page_adds_a_user_changes_role_and_password_and_deletes_it(
    gw: Gateway,
    page: Any,  # noqa: F811
) -> None:
    base = await logged_in(gw, page)
    store = web_of(gw).auth.store
    await page.click('#nav a[data-view="users"]')
    me = _row(page, "admin")
    await expect(me).to_contain_text("(you)")
    # your own role is not yours to change, nor your account to delete; your password is on your account page
    await expect(me.locator("select.role")).to_be_disabled()
    await expect(me.locator(".why")).to_contain_text("another admin changes your role")
    await expect(me.locator("button")).to_have_count(0)
    await expect(me.locator("a.own")).to_have_attribute("href", "#/account")

    # add: the gateway's own error first, then a user
    await page.fill("#new-user", "operator")
    await page.fill("#new-password", "short")
    await page.click("#add-user button")
    await expect(page.locator("#access-msg")).to_have_text("password: at least 10 characters")
    await expect(page.locator("#access-msg")).to_have_class("error")
    page.problems.clear()  # the 400 above is expected
    await page.fill("#new-password", PASSWORD)
    await page.click("#add-user button")
    op = _row(page, "operator")
    await expect(op.locator("select.role")).to_have_value("viewer")
    await expect(op.locator("select.role")).to_be_enabled()

    # role: viewer -> admin, from the select
    await op.locator("select.role").select_option("admin")
    await expect(page.locator("#access-msg")).to_have_text("operator is now an admin; their sessions have ended.")
    assert store.users["operator"].role == "admin"
    await expect(_row(page, "operator").locator("select.role")).to_have_value("admin")

    # password: too short is the gateway's error, then a new one that logs in
    await _row(page, "operator").locator("button.set-password").click()
    form = page.locator("tr.pass-form")
    await form.locator("input.new-pass").fill("short")
    await form.locator("button.confirm").click()
    await expect(page.locator("#access-msg")).to_have_text("password: at least 10 characters")
    page.problems.clear()
    await form.locator("input.new-pass").fill(NEW)
    await form.locator("button.confirm").click()
    await expect(page.locator("#access-msg")).to_have_text("New password set for operator; their sessions have ended.")
    await expect(form).to_have_count(0)
    c = Browserish(base)
    try:
        assert (await c.login("operator", PASSWORD))[0] == 401
        assert (await c.login("operator", NEW))[0] == 200
    finally:
        await c.close()
    await shot(page, "users")
    await _fits_a_phone(page, "users-phone")
    await page.set_viewport_size({"width": 1100, "height": 800})

    # delete: asked once more, then gone
    await _row(page, "operator").locator("button.delete").click()
    await expect(page.locator("tr.delete-form")).to_contain_text("Delete operator?")
    await page.locator("tr.delete-form button.confirm").click()
    await expect(_row(page, "operator")).to_have_count(0)
    await expect(page.locator("#access-msg")).to_have_text("User operator deleted.")
    assert set(store.users) == {"admin"}


async def test_the_last_admin_is_locked_on_the_page_as_in_the_api(make_gateway: Callable, page: Any) -> None:  # noqa: F811
    """With the login off (anyone on the gateway is an admin) the page lists every account: the
    only admin account cannot be demoted or deleted there, and the API refuses it too."""
    async with make_gateway(console="{host: 127.0.0.1, port: 0, auth: false}") as gw:
        base = base_url(gw)
        c = Browserish(base)
        try:
            for name, role in (("chief", "admin"), ("operator", "viewer")):
                assert (await c.post("/api/users", {"name": name, "password": PASSWORD, "role": role}))[0] == 201
            await page.goto(base + "/#/users")
            chief = _row(page, "chief")
            await expect(chief.locator("select.role")).to_be_disabled()
            await expect(chief.locator(".why")).to_have_text("the last admin: make another user admin first")
            await expect(chief.locator("button.delete")).to_have_count(0)
            await expect(chief.locator("button.set-password")).to_have_count(1)
            status, data = await c.patch("/api/users/chief", {"role": "viewer"})
            assert status == 409 and "last admin" in data["error"]
            status, data = await c.delete("/api/users/chief")
            assert status == 409 and "last admin" in data["error"]
            # a second admin frees the first
            await _row(page, "operator").locator("select.role").select_option("admin")
            await expect(page.locator("#access-msg")).to_contain_text("operator is now an admin")
            await expect(_row(page, "chief").locator("select.role")).to_be_enabled()
            await expect(_row(page, "chief").locator("button.delete")).to_have_count(1)
            await shot(page, "users-last-admin")
        finally:
            await c.close()
        # leave the console before its gateway stops: the page would log its reconnects as errors
        await page.goto("about:blank")


async def test_a_viewer_has_no_users_page_and_changes_their_own_password(
    gw: Gateway,
    page: Any,  # noqa: F811
) -> None:
    base = base_url(gw)
    c = Browserish(base)
    try:
        await c.setup_admin(gw)
        assert (await c.post("/api/users", {"name": "viewer1", "password": PASSWORD}))[0] == 201
    finally:
        await c.close()
    elsewhere = Browserish(base)
    try:
        assert (await elsewhere.login("viewer1"))[0] == 200
        await page.goto(base + "/login")
        await page.fill("#name", "viewer1")
        await page.fill("#password", PASSWORD)
        await page.click("#submit")
        await page.wait_for_url(base + "/")
        await expect(page.locator('#nav a[data-view="users"]')).to_be_hidden()
        await page.goto(base + "/#/users")
        await expect(page.locator("#view")).to_contain_text("Managing users needs the admin role.")
        assert await page.locator("#users").count() == 0

        # the name in the header leads to the account page
        await page.click("#user")
        await expect(page.locator("#view h1")).to_have_text("Your account")
        await page.fill("#own-current", "not my password")
        await page.fill("#own-new", NEW)
        await page.fill("#own-again", NEW + "!")
        await page.click("#own-password button")
        await expect(page.locator("#own-password-msg")).to_have_text("The two new passwords differ.")
        await page.fill("#own-again", NEW)
        await page.click("#own-password button")
        await expect(page.locator("#own-password-msg")).to_have_text("the current password is wrong")
        page.problems.clear()  # the 403 above is expected
        await page.fill("#own-current", PASSWORD)
        await page.click("#own-password button")
        await expect(page.locator("#own-password-msg")).to_have_text(re.compile("^Password changed"))
        await expect(page.locator("#own-current")).to_have_value("")
        await shot(page, "account")

        # the other session ended; this page goes on (live socket again, under the new session)
        assert (await elsewhere.get("/api/pipelines"))[0] == 401
        assert (await elsewhere.login("viewer1", NEW))[0] == 200
        await page.click('#nav a[data-view="overview"]')
        await expect(page.locator('#pipelines tr[data-pipeline="plant"]')).to_be_visible()
        await expect(page.locator("#link")).to_have_text("live")
        await page.click("#user")
        await _fits_a_phone(page, "account-phone")
    finally:
        await elsewhere.close()


# Whether a text field shows its whole placeholder: the text's width in the field's own font
# against the width inside its padding (an input's scrollWidth does not count the placeholder).
PLACEHOLDER_FITS = """(el) => {
  const cs = getComputedStyle(el);
  const ctx = document.createElement('canvas').getContext('2d');
  ctx.font = cs.font;
  const text = ctx.measureText(el.placeholder).width;
  const room = el.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
  return {text, room, scroll: el.scrollWidth, client: el.clientWidth};
}"""


async def test_the_password_placeholders_fit_their_fields(
    gw: Gateway,
    page: Any,  # noqa: F811
) -> None:
    """The Users page's password fields say how long a password must be; at desktop width that
    hint was cut off ("password (10+ charac"). Also at a phone's width."""
    await logged_in(gw, page)
    for width, height in ((1280, 800), (1366, 900), (390, 844)):
        await page.set_viewport_size({"width": width, "height": height})
        await page.click('#nav a[data-view="users"]')
        await expect(_row(page, "admin")).to_be_visible()
        for sel in ("#new-user", "#new-password", "#new-token-name"):
            seen = await page.locator(sel).evaluate(PLACEHOLDER_FITS)
            assert seen["text"] <= seen["room"] and seen["scroll"] <= seen["client"], (width, sel, seen)
        await _row(page, "admin").wait_for()
        if not await page.locator('#users tr[data-user="viewer1"]').count():
            await page.fill("#new-user", "viewer1")
            await page.fill("#new-password", PASSWORD)
            await page.click("#add-user button")
        await _row(page, "viewer1").locator("button.set-password").click()
        seen = await page.locator("tr.pass-form input.new-pass").evaluate(PLACEHOLDER_FITS)
        assert seen["text"] <= seen["room"], (width, "set password", seen)
        await shot(page, f"users-placeholders-{width}")
