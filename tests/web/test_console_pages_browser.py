"""The alerts, config, charts and logs pages as a new user meets them, in Chromium at desktop and
phone (390 px) width. Screenshots land next to the other console shots (``*-phone.png``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.runtime import Gateway
from tests._util import wait_for
from tests.gateway._harness import running_gateway

from .conftest import PASSWORD
from .test_browser import browser, logged_in, page, playwright_api, shot  # noqa: F401 -- fixtures

PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}

TWO_PIPELINES = """
gateway: {{id: web-pages, data_dir: "{data}"}}
pipelines:
  - name: boiler
    nodes:
      - {{id: sensors, type: simulate, interval: 100ms, seed: 2,
         sensors: [{{key: boiler/temp, base: 120.123456, noise: 0.1}}, {{key: boiler/ppm, base: 4000, noise: 50}},
                   {{key: boiler/flag, base: 0.5, noise: 0.01}}]}}
      - {{id: hist, type: history, input: sensors}}
      - {{id: temp, type: filter, input: sensors, where: 'key == "boiler/temp"'}}
      - {{id: hot, type: threshold, input: temp, above: 95, clear_below: 90, severity: critical}}
      - {{id: book, type: alert, input: hot, auto_resolve: false}}
  - name: field
    nodes:
      - {{id: meter, type: simulate, interval: 1s, sensors: [{{key: main/power, base: 1800}}]}}
      - {{id: overload, type: threshold, input: meter, above: 1700, clear_below: 1500}}
      - {{id: field_log, type: log, input: overload}}
console: {{host: 127.0.0.1, port: 0}}
"""


@pytest.fixture
async def gw2(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with running_gateway(TWO_PIPELINES.format(data=tmp_path / "data")) as gw:
        yield gw


async def _phone(browser: Any, base: str) -> Any:  # noqa: F811
    ctx = await browser.new_context(**PHONE, color_scheme="dark")
    pg = await ctx.new_page()
    await pg.goto(base + "/login")
    await pg.fill("#name", "admin")
    await pg.fill("#password", PASSWORD)
    return ctx, pg


def _luminance(rgb: list[float]) -> float:
    c = [x / 255 for x in rgb]
    c = [x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4 for x in c]
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]


def _contrast(a: list[float], b: list[float]) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


RGB = "c => getComputedStyle(c)[PROP].match(/[\\d.]+/g).slice(0, 3).map(Number)"


async def test_alerts_page_rounds_shows_condition_notes_and_says_what_it_cannot_list(
    gw2: Gateway,
    page: Any,  # noqa: F811
    browser: Any,  # noqa: F811
) -> None:
    base = await logged_in(gw2, page)
    await page.goto(base + "/#/alerts")
    row = page.locator("#alerts tr[data-alert]").first
    await playwright_api.expect(row.locator(".state")).to_have_text("open", timeout=10_000)
    reading = await row.locator("td.reading").text_content()
    assert reading and len(reading.split(".")[-1]) <= 2, reading  # not 120.12345600000001
    await playwright_api.expect(row.locator("td.condition")).to_have_text("active")
    # the field pipeline has a threshold but no alert node: the page says so
    await playwright_api.expect(page.locator("#alert-hint")).to_contain_text("field")
    await playwright_api.expect(page.locator("#alert-hint")).not_to_contain_text("boiler")
    await row.locator("button.ack").click()
    await page.fill("tr.act-form input.note", "burner checked, flue sensor suspect")
    await page.locator("tr.act-form button.confirm").click()
    await playwright_api.expect(row.locator(".state")).to_have_text("acknowledged")
    await playwright_api.expect(row.locator("td.by")).to_contain_text("acknowledged by admin")
    await playwright_api.expect(row.locator("td.by")).to_contain_text("burner checked, flue sensor suspect")
    await shot(page, "alerts-acked")

    ctx, pg = await _phone(browser, base)
    try:
        await pg.click("#submit")
        await pg.wait_for_url(base + "/")
        await pg.goto(base + "/#/alerts")
        resolve = pg.locator("#alerts tr[data-alert] button.resolve").first
        await playwright_api.expect(resolve).to_be_visible(timeout=10_000)
        box = await resolve.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, box  # on screen, no sideways scroll
        fg = await resolve.evaluate(RGB.replace("PROP", '"color"'))
        bg = await resolve.evaluate(RGB.replace("PROP", '"backgroundColor"'))
        assert _contrast(fg, bg) >= 4.5, (fg, bg)  # WCAG AA for the dark theme's buttons
        await shot(pg, "alerts-phone-dark")
    finally:
        await ctx.close()


async def test_config_error_link_scrolls_to_its_line(gw2: Gateway, page: Any) -> None:  # noqa: F811
    base = await logged_in(gw2, page)
    await page.goto(base + "/#/config")
    editor = page.locator("#config-text")
    await playwright_api.expect(editor).to_have_value(lambda_regex("name: field"))
    text = await editor.input_value()
    padded = "".join(f"# comment line {i}\n" for i in range(150)) + text.replace("above: 1700", "above: lots")
    line = padded.splitlines().index(next(x for x in padded.splitlines() if "above: lots" in x)) + 1
    await editor.fill(padded)
    await editor.evaluate("t => { t.scrollTop = 0; }")
    await page.click("#validate")
    await page.locator(f'#config-errors li[data-line="{line}"] a').click()
    # the selected line is inside the textarea's visible part, and the gutter follows
    top, height, lh, gutter = await editor.evaluate(
        "t => [t.scrollTop, t.clientHeight, parseFloat(getComputedStyle(t).lineHeight),"
        " document.querySelector('.gutter').scrollTop]"
    )
    assert top <= (line - 1) * lh <= top + height - lh, (top, height, lh, line)
    assert abs(gutter - top) <= 1, (gutter, top)
    await shot(page, "config-error-line")


def lambda_regex(pattern: str) -> Any:
    import re

    return re.compile(pattern)


async def test_charts_key_feedback_scales_and_stable_colours(gw2: Gateway, page: Any) -> None:  # noqa: F811
    base = await logged_in(gw2, page)
    await wait_for(lambda: gw2.history.query("boiler/ppm", 0.0, 1e12, 10)["points"], timeout=20)
    await page.goto(base + "/#/charts/boiler/sensors")
    await playwright_api.expect(page.locator("#chart-values canvas")).to_have_count(1, timeout=10_000)
    await page.fill("#chart-key", "boiler/nothing")
    await page.press("#chart-key", "Enter")
    await playwright_api.expect(page.locator("#chart-key-note")).to_contain_text(
        "No stored history for “boiler/nothing”"
    )
    await page.fill("#chart-key", "boiler/temp")
    await page.press("#chart-key", "Enter")
    await playwright_api.expect(page.locator("#chart-key-note")).to_have_text("")
    # a y scale per series by default: 4000 ppm and 0.5 do not share one axis
    legend = page.locator("#chart-values .u-legend")
    await playwright_api.expect(legend).to_contain_text("boiler/flag")
    await playwright_api.expect(page.locator("#chart-values .u-axis")).to_have_count(3)  # time, left, right
    await shot(page, "charts-scales")

    async def colours() -> dict[str, str]:
        return await page.eval_on_selector_all(
            "#chart-values .u-legend .u-series",
            "rows => Object.fromEntries(rows.map(r => [r.querySelector('.u-label').textContent,"
            " getComputedStyle(r.querySelector('.u-marker')).borderColor]).filter(([k]) => k.includes('/')))",
        )

    first = await colours()
    await page.select_option("#chart-scale", "shared")
    await playwright_api.expect(page.locator("#chart-values .u-axis")).to_have_count(2)
    await page.reload()
    await playwright_api.expect(page.locator("#chart-values .u-legend")).to_contain_text("boiler/ppm", timeout=10_000)
    again = await colours()
    common = set(first) & set(again)
    assert common and {k: first[k] for k in common} == {k: again[k] for k in common}, (first, again)


async def test_logs_update_live_and_wrap_on_a_phone(gw2: Gateway, page: Any, browser: Any) -> None:  # noqa: F811
    from gateway._log import RECENT

    root = logging.getLogger()
    root.addHandler(RECENT)
    try:
        base = await logged_in(gw2, page)
        await page.goto(base + "/#/logs")
        await playwright_api.expect(page.locator("#logs")).to_be_visible()
        logging.getLogger("sluice.boiler.hot").warning("probe %s came loose", "boiler/temp")
        # no click on Refresh: the page follows the log
        await playwright_api.expect(page.locator("#logs")).to_contain_text(
            "probe boiler/temp came loose", timeout=10_000
        )
        await shot(page, "logs-live")
        long_line = "alert_log: " + " ".join(["boiler/boiler_hot/boiler/temp raised 204.5"] * 12)
        logging.getLogger("sluice.boiler.log").warning(long_line)
        # a logger name or a token with no break in it must not widen a phone's page either
        logging.getLogger("sluice.plant_room_second_floor_boiler_house.temperature_threshold").warning(
            "alert_log: http://gateway.local:8080/api/pipelines/plant_room_second_floor/nodes/threshold_hot"
        )
        ctx, pg = await _phone(browser, base)
        try:
            await pg.click("#submit")
            await pg.wait_for_url(base + "/")
            await pg.goto(base + "/#/logs")
            msg = pg.locator("#logs td.msg", has_text="alert_log:").first
            await playwright_api.expect(msg).to_be_visible(timeout=10_000)
            box = await msg.bounding_box()
            assert box and box["x"] + box["width"] <= 390, box  # the whole message is on the screen
            width = await pg.evaluate("document.documentElement.scrollWidth")
            assert width <= 391, width
            await shot(pg, "logs-phone")
        finally:
            await ctx.close()
    finally:
        root.removeHandler(RECENT)


async def test_charts_and_config_fit_a_phone(gw2: Gateway, browser: Any) -> None:  # noqa: F811
    base = await logged_in(gw2, await (await browser.new_context()).new_page())
    ctx, pg = await _phone(browser, base)
    try:
        await pg.click("#submit")
        await pg.wait_for_url(base + "/")
        await pg.goto(base + "/#/charts/boiler/sensors")
        await playwright_api.expect(pg.locator("#chart-values canvas")).to_have_count(1, timeout=10_000)
        assert await pg.evaluate("document.documentElement.scrollWidth") <= 391
        await shot(pg, "charts-phone")
        await pg.goto(base + "/#/config")
        await playwright_api.expect(pg.locator("#config-text")).to_have_value(lambda_regex("name: field"))
        assert await pg.evaluate("document.documentElement.scrollWidth") <= 391
        await shot(pg, "config-phone")
    finally:
        await ctx.close()
