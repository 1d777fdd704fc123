"""The console in a real browser: Playwright driving Debian's Chromium against a running gateway.

Screenshots of each main page land in ``.cache/artifacts/console/`` (override with
``SLUICE_ARTIFACTS``). Every test also fails on any page error, console error or
Content-Security-Policy violation.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.runtime import Gateway
from tests._util import wait_for

from .conftest import PASSWORD, Browserish, base_url, create_admin, web_of

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = os.environ.get("SLUICE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("SLUICE_ARTIFACTS", Path(__file__).resolve().parents[2] / ".cache" / "artifacts"))

if not os.path.exists(CHROMIUM):
    pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install chromium (or set SLUICE_CHROMIUM)", pytrace=False)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    ctx = await browser.new_context(viewport={"width": 1100, "height": 800})
    pg = await ctx.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    pg.problems = problems
    yield pg
    await ctx.close()
    # 401s while logged out are the login flow working, not a page problem
    real = [p for p in problems if "401" not in p]
    assert not real, real


async def shot(page: Any, name: str) -> None:
    out = ARTIFACTS / "console"
    out.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(out / f"{name}.png"), full_page=True)


async def test_first_visit_creates_admin_then_overview(gw: Gateway, page: Any) -> None:
    base = base_url(gw)
    await page.goto(base + "/")
    await page.wait_for_url(base + "/setup")
    await shot(page, "setup")
    await page.fill("#code", "0000-0001" if web_of(gw).auth.setup_code != "0000-0001" else "0000-0002")
    await page.fill("#name", "admin")
    await page.fill("#password", PASSWORD)
    await page.fill("#password2", PASSWORD)
    await page.click("#submit")
    await playwright_api.expect(page.locator("#error")).to_contain_text("wrong setup code")
    page.problems.clear()  # the 403 above is expected
    await page.fill("#code", web_of(gw).auth.setup_code or "")
    await page.click("#submit")
    await page.wait_for_url(base + "/")
    row = page.locator('#pipelines tr[data-pipeline="plant"]')
    await playwright_api.expect(row).to_contain_text("ok")
    await playwright_api.expect(page.locator("#user")).to_have_text("admin (admin)")
    assert "admin" in web_of(gw).auth.store.users


async def test_login_and_live_counters(gw: Gateway, page: Any) -> None:
    await create_admin(gw)
    base = base_url(gw)
    await page.goto(base + "/")
    await page.wait_for_url(base + "/login")
    await page.fill("#name", "admin")
    await page.fill("#password", "not the password")
    await page.click("#submit")
    await playwright_api.expect(page.locator("#error")).to_have_text("wrong user name or password")
    await shot(page, "login")
    await page.fill("#password", PASSWORD)
    await page.click("#submit")
    await page.wait_for_url(base + "/")
    cell = page.locator('#pipelines tr[data-pipeline="plant"] .events-in')
    await playwright_api.expect(cell).to_have_text(lambda_regex(r"^\d+$"))
    first = int(await cell.inner_text())
    await page.wait_for_function(
        "n => Number(document.querySelector('#pipelines tr[data-pipeline=\"plant\"] .events-in').textContent) > n",
        arg=first,
        timeout=10_000,
    )
    await playwright_api.expect(page.locator("#link")).to_have_text("live")
    await playwright_api.expect(page.locator("#view")).to_contain_text("Outbox")
    text = await page.inner_text("#view")
    assert "null" not in text and "undefined" not in text and "NaN" not in text
    await shot(page, "overview")


def lambda_regex(pattern: str) -> Any:
    import re

    return re.compile(pattern)


async def logged_in(gw: Gateway, page: Any) -> str:
    await create_admin(gw)
    base = base_url(gw)
    await page.goto(base + "/login")
    await page.fill("#name", "admin")
    await page.fill("#password", PASSWORD)
    await page.click("#submit")
    await page.wait_for_url(base + "/")
    return base


async def test_graph_renders_nodes_edges_and_node_config(gw: Gateway, page: Any) -> None:
    base = await logged_in(gw, page)
    await page.goto(base + "/#/graph")
    nodes = page.locator('section[data-pipeline="plant"] g.node')
    await playwright_api.expect(nodes).to_have_count(4)
    assert await page.locator('section[data-pipeline="plant"] path.edge').count() == 3
    for nid in ("sensors", "hot", "alarm", "out"):
        await playwright_api.expect(page.locator(f'g.node[data-node="{nid}"]')).to_be_visible()
    counters = page.locator('g.node[data-node="sensors"] text.counters')
    before = await counters.text_content()
    await page.wait_for_function(
        "t => document.querySelector('g.node[data-node=\"sensors\"] text.counters').textContent !== t",
        arg=before,
        timeout=10_000,
    )
    await playwright_api.expect(counters).to_contain_text(lambda_regex(r"^[\d.]+/s · out \d+"))
    await page.click('g.node[data-node="alarm"]')
    panel = page.locator("#node-panel")
    await playwright_api.expect(panel).to_contain_text('"above": 95')
    await playwright_api.expect(panel).to_contain_text("threshold")
    await shot(page, "graph")


async def test_config_validation_shows_errors_at_their_lines(gw: Gateway, page: Any) -> None:
    base = await logged_in(gw, page)
    await page.goto(base + "/#/config")
    editor = page.locator("#config-text")
    await playwright_api.expect(editor).to_have_value(lambda_regex("name: plant"))
    await page.click("#validate")
    await playwright_api.expect(page.locator("#config-valid")).to_contain_text("Valid: 1 pipelines, 4 nodes")
    text = await editor.input_value()
    broken = text.replace("above: 95", "above: lots")
    line = broken.splitlines().index(next(ln for ln in broken.splitlines() if "above: lots" in ln)) + 1
    await editor.fill(broken)
    await page.click("#validate")
    item = page.locator(f'#config-errors li[data-line="{line}"]')
    await playwright_api.expect(item).to_contain_text(f"line {line}")
    await playwright_api.expect(item).to_contain_text("above")
    await playwright_api.expect(page.locator(".gutter span.bad")).to_have_text(f"{line}\n")
    await shot(page, "config")


async def test_live_events_and_dead_letters_pages(gw: Gateway, page: Any) -> None:
    base = await logged_in(gw, page)
    await page.goto(base + "/#/events/plant/hot")
    rows = page.locator("#tap-rows tr")
    await playwright_api.expect(rows.first).to_contain_text("boiler/temp", timeout=10_000)
    await page.click("#tap-pause")
    await playwright_api.expect(page.locator("#tap-pause")).to_have_text("Resume")
    await shot(page, "events")
    # another node from the picker: the address follows, and only the node shown is tapped
    hub = web_of(gw).hub
    await page.select_option("#tap-node", '["plant","sensors"]')
    await playwright_api.expect(page).to_have_url(re.compile(r"#/events/plant/sensors$"))
    await wait_for(lambda: set(hub._taps) == {("plant", "sensors")}, timeout=5)
    await playwright_api.expect(page.locator("#tap-rows")).to_contain_text("pump/vibration", timeout=10_000)
    gw.dead_letters.record("plant", "hot", "value is not a number", None, b'{"v": "x"}')
    await page.goto(base + "/#/deadletters")
    await playwright_api.expect(page.locator("#deadletters")).to_contain_text("value is not a number")
    await shot(page, "deadletters")


async def test_viewer_sees_no_config_and_phone_layout(gw: Gateway, browser: Any) -> None:
    c = Browserish(base_url(gw))
    try:
        await c.setup_admin(gw)
        status, _ = await c.post("/api/users", {"name": "operator", "password": PASSWORD, "role": "viewer"})
        assert status == 201
    finally:
        await c.close()
    base = base_url(gw)
    ctx = await browser.new_context(viewport={"width": 390, "height": 800}, is_mobile=True, has_touch=True)
    try:
        pg = await ctx.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        await pg.goto(base + "/login")
        await pg.fill("#name", "operator")
        await pg.fill("#password", PASSWORD)
        await pg.click("#submit")
        await pg.wait_for_url(base + "/")
        await playwright_api.expect(pg.locator("#user")).to_have_text("operator (viewer)")
        await playwright_api.expect(pg.locator('#pipelines tr[data-pipeline="plant"]')).to_be_visible()
        await playwright_api.expect(pg.locator('#nav a[data-view="config"]')).to_be_hidden()
        await shot(pg, "overview-phone")
        await pg.goto(base + "/#/config")
        await playwright_api.expect(pg.locator("#view")).to_contain_text("needs the admin role")
        # nothing wider than the phone's screen but the graph's own scroller
        await pg.goto(base + "/#/overview")
        await playwright_api.expect(pg.locator('#pipelines tr[data-pipeline="plant"]')).to_be_visible()
        width = await pg.evaluate("document.documentElement.scrollWidth")
        assert width <= 390 + 1, width
        assert not errors, errors
    finally:
        await ctx.close()


async def test_charts_draw_rates_and_values_without_csp_violations(gw: Gateway, page: Any) -> None:
    base = await logged_in(gw, page)
    await page.goto(base + "/#/charts/plant/sensors")
    await playwright_api.expect(page.locator("#chart-rates canvas")).to_have_count(1, timeout=10_000)
    await playwright_api.expect(page.locator("#chart-values canvas")).to_have_count(1, timeout=10_000)
    await playwright_api.expect(page.locator("#chart-note")).to_contain_text("2 series")
    legend = page.locator("#chart-values .u-legend")
    await playwright_api.expect(legend).to_contain_text("boiler/temp")
    await playwright_api.expect(legend).to_contain_text("pump/vibration")
    await shot(page, "charts")
    # leaving the page removes the tap
    await page.goto(base + "/#/overview")
    await playwright_api.expect(page.locator('#pipelines tr[data-pipeline="plant"]')).to_be_visible()
    hub = web_of(gw).hub
    await wait_for(lambda: not hub._taps, timeout=5)


ALERTS_CONFIG = """
gateway: {{id: web-alerts, data_dir: "{data}"}}
pipelines:
  - name: boiler
    nodes:
      - {{id: sensors, type: simulate, interval: 100ms, seed: 2,
         sensors: [{{key: boiler/temp, base: 120, noise: 0.1}}]}}
      - {{id: hot, type: threshold, input: sensors, above: 95, clear_below: 90, severity: critical}}
      - {{id: book, type: alert, input: hot, auto_resolve: false}}
console: {{host: 127.0.0.1, port: 0}}
"""


async def test_alert_appears_and_is_acknowledged_then_resolved(page: Any, tmp_path: Path) -> None:
    from tests.gateway._harness import running_gateway

    async with running_gateway(ALERTS_CONFIG.format(data=tmp_path / "data")) as gw:
        base = await logged_in(gw, page)
        await page.goto(base + "/#/alerts")
        row = page.locator("#alerts tr[data-alert]").first
        await playwright_api.expect(row).to_contain_text("critical", timeout=10_000)
        await playwright_api.expect(row.locator(".state")).to_have_text("open")
        await playwright_api.expect(row).to_contain_text("boiler/temp")
        await shot(page, "alerts")
        await page.goto(base + "/#/overview")
        await playwright_api.expect(page.locator("#open-alerts")).to_contain_text("boiler/temp")
        await page.goto(base + "/#/alerts")
        await row.locator("button.ack").click()
        await page.locator("tr.act-form button.confirm").click()  # the note is optional
        await playwright_api.expect(row.locator(".state")).to_have_text("acknowledged")
        await playwright_api.expect(row).to_contain_text("admin")  # who acknowledged it
        await row.locator("button.resolve").click()
        await page.locator("tr.act-form button.confirm").click()
        await playwright_api.expect(row.locator(".state")).to_have_text("resolved")
        await playwright_api.expect(row.locator("button")).to_have_count(0)
        await page.select_option("#alert-state", "open")
        await playwright_api.expect(page.locator("#alerts tr[data-alert]")).to_have_count(0)
        # leave the console before its gateway stops: the page would log its reconnects as errors
        await page.goto("about:blank")


async def test_users_page_creates_and_revokes_a_token(gw: Gateway, page: Any) -> None:
    """API tokens for scripts are on the Users page (once called Access: its address still leads
    there); accounts are tested in test_users_browser.py."""
    import aiohttp

    base = await logged_in(gw, page)
    await page.goto(base + "/#/access")
    await playwright_api.expect(page.locator('#users tr[data-user="admin"]')).to_be_visible()
    await playwright_api.expect(page.locator('#nav a[data-view="users"]')).to_have_class(re.compile(r"\bactive\b"))
    await page.fill("#new-token-name", "backup script")
    await page.select_option("#new-token-role", "viewer")
    await page.click("#add-token button")
    token = await page.locator("#new-token").text_content()
    assert token and token.startswith("slt_")
    await playwright_api.expect(page.locator("#tokens")).to_contain_text("backup script")
    await shot(page, "access")
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/api/pipelines", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
    await page.locator("#tokens tr[data-token] button").click()
    await playwright_api.expect(page.locator("#tokens")).to_have_count(0)
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/api/pipelines", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 401


async def test_logs_page(gw: Gateway, page: Any) -> None:
    import logging

    from gateway._log import RECENT

    root = logging.getLogger()
    root.addHandler(RECENT)
    try:
        base = await logged_in(gw, page)
        logging.getLogger("sluice.plant.hot").warning("probe %s is loose", "boiler/temp")
        await page.goto(base + "/#/logs")
        await playwright_api.expect(page.locator("#logs")).to_contain_text("probe boiler/temp is loose")
        # a log node's line is one long JSON word: it wraps inside the page instead of widening the table
        long_line = '{"state":"raised","alert_key":"boiler/boiler_hot/boiler/temp","reading":204.5,"rule":"' + "x" * 300
        logging.getLogger("sluice.plant.log").warning("alert_log: boiler/temp %s", long_line)
        await page.click("#log-refresh")
        await playwright_api.expect(page.locator("#logs")).to_contain_text("x" * 300)
        widths = await page.eval_on_selector("#logs", "t => [t.parentElement.scrollWidth, t.parentElement.clientWidth]")
        assert widths[0] <= widths[1], widths
        await shot(page, "logs")
        await page.select_option("#log-level", "error")
        await playwright_api.expect(page.locator("#view")).not_to_contain_text("probe boiler/temp is loose")
    finally:
        root.removeHandler(RECENT)


async def test_config_edit_saved_and_hot_reloaded(page: Any, tmp_path: Path) -> None:
    from tests.gateway._harness import gateway_from_file

    from .test_reload import TEXT

    path = tmp_path / "gateway.yaml"
    path.write_text(TEXT.format(data=tmp_path / "data").replace(", auth: false", ""))
    async with gateway_from_file(path) as gw:
        other = gw.pipelines["other"]
        base = await logged_in(gw, page)
        await page.goto(base + "/#/config")
        editor = page.locator("#config-text")
        await playwright_api.expect(editor).to_have_value(lambda_regex("above: 95"))
        text = await editor.input_value()
        await editor.fill(text.replace("above: 95", "above: lots"))
        await page.click("#save")
        await playwright_api.expect(page.locator('#config-errors li[data-line="6"]')).to_contain_text("above")
        assert path.read_text() == text
        await editor.fill(text.replace("above: 95", "above: 96"))
        await page.click("#save")
        saved = page.locator("#config-saved")
        await playwright_api.expect(saved).to_contain_text("changed: plant; unchanged: other")
        await playwright_api.expect(saved).to_contain_text("Saved.")
        assert "above: 96" in path.read_text()
        assert gw.pipelines["other"] is other
        await wait_for(lambda: gw.pipelines["plant"].state == "running", timeout=10)
        await shot(page, "config-saved")
        await editor.fill(text.replace("id: reload-test", "id: renamed"))
        await page.click("#save")
        await playwright_api.expect(saved).to_contain_text("needs a restart")
        page.problems.clear()  # the 409 above is the expected answer
        # leave the console before its gateway stops: the page would log its reconnects as errors
        await page.goto("about:blank")
