"""The login page in Chromium goes where the console says after login: never to another origin."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from gateway.runtime import Gateway

from .conftest import PASSWORD, base_url, create_admin
from .test_browser import browser, page  # noqa: F401  (fixtures: Chromium and a page that fails on errors)


@pytest.mark.parametrize(
    ("given", "lands"),
    [
        ("/\\evil.example/page", "/"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("/#/alerts", "/#/alerts"),
    ],
)
async def test_login_next_lands_on_the_console(gw: Gateway, page: Any, given: str, lands: str) -> None:  # noqa: F811
    await create_admin(gw)
    base = base_url(gw)
    await page.goto(f"{base}/login?next={quote(given, safe='')}")
    await page.fill("#name", "admin")
    await page.fill("#password", PASSWORD)
    await page.click("#submit")
    await page.wait_for_url(base + lands)
    assert page.url == base + lands
