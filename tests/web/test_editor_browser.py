"""The pipeline editor in a real browser: Playwright driving Debian's Chromium against a gateway
started from a real config file with no pipelines.

Builds simulate → window → console from the palette by drag and drop, fills the forms, sees a
validation error on its field, deploys, watches results arrive in the console panel, undoes a
change, and checks the YAML on disk kept its comment. Screenshots (desktop and phone width) land
in ``.cache/artifacts/console/``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.runtime import Gateway
from tests._util import mqtt_client, wait_for
from tests.gateway._harness import gateway_from_file

from .conftest import PASSWORD, Browserish, base_url, create_admin

# the console browser tests' fixtures: Chromium, and a page on which any page error fails the test
from .test_browser import browser, page, shot  # noqa: F401

playwright_api = pytest.importorskip("playwright.async_api")
expect = playwright_api.expect

TEXT = """\
# Plant gateway: pipelines are built in the console's editor.
gateway: {{id: editor-browser, data_dir: "{data}"}}
pipelines: []
# The console listens on a free port for the test.
console: {{host: 127.0.0.1, port: 0}}
"""


PLANT = """\
gateway: {{id: editor-browser, data_dir: "{data}"}}
pipelines:
  - name: plant
    nodes:
      - {{id: sensors, type: simulate, interval: 50ms, sensors: [{{key: boiler/temp, base: 80}}]}}
      # the alarm point
      - {{id: hot, type: threshold, input: sensors, above: 95, clear_below: 90}}
      - {{id: push, type: http, token: "s3cret-push-token"}}
      - {{id: out, type: log, input: [hot, push]}}
console: {{host: 127.0.0.1, port: 0}}
"""


WITH_BROKER = """\
gateway: {{id: editor-browser, data_dir: "{data}"}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {port}}}
pipelines: []
console: {{host: 127.0.0.1, port: 0}}
"""


@pytest.fixture
async def started(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Gateway, Path]]:
    path = tmp_path / "gateway.yaml"
    text = getattr(request, "param", TEXT)
    port = request.getfixturevalue("mosquitto").port if "{port}" in text else 0
    path.write_text(text.format(data=tmp_path / "data", port=port))
    async with gateway_from_file(path) as gw:
        c = Browserish(base_url(gw))
        try:
            await c.setup_admin(gw)
            status, _ = await c.post("/api/users", {"name": "viewer1", "password": PASSWORD})
            assert status == 201
        finally:
            await c.close()
        yield gw, path


async def login(pg: Any, base: str, name: str = "admin") -> None:
    await pg.goto(base + "/login")
    await pg.fill("#name", name)
    await pg.fill("#password", PASSWORD)
    await pg.click("#submit")
    await pg.wait_for_url(base + "/")


def node(pg: Any, nid: str) -> Any:
    return pg.locator(f'.drawflow-node:has(.df-node[data-node="{nid}"])')


async def drop(pg: Any, type_name: str, x: int, y: int) -> None:
    await pg.drag_and_drop(f'.ed-type[data-type="{type_name}"]', "#drawflow", target_position={"x": x, "y": y})
    await expect(node(pg, type_name)).to_be_visible()


async def connect(pg: Any, a: str, b: str) -> None:
    out = node(pg, a).locator(".output_1")
    inp = node(pg, b).locator(".input_1")
    await out.hover()
    await pg.mouse.down()
    await inp.hover()
    await pg.mouse.up()


async def test_build_deploy_watch_undo(started: tuple[Gateway, Path], page: Any) -> None:  # noqa: F811
    gw, path = started
    base = base_url(gw)
    await page.set_viewport_size({"width": 1366, "height": 900})
    await login(page, base)
    await page.goto(base + "/#/editor")
    await expect(page.locator("#ed-status")).to_have_text("ready")
    await page.fill("#ed-new-name", "flow")
    await page.click("#ed-new-pipeline")
    await expect(page.locator("#ed-pipeline")).to_have_value("flow")

    # palette → canvas, by drag and drop
    await drop(page, "simulate", 30, 60)
    await drop(page, "window", 260, 160)
    await drop(page, "console", 490, 60)
    await connect(page, "simulate", "window")
    # the second wire from the console node's form (the keyboard and touch way)
    await node(page, "console").click()
    await page.select_option("#ed-field-input", ["window"])
    await expect(page.locator("#drawflow .connection")).to_have_count(2)

    # forms generated from the schema
    await node(page, "simulate").click()
    await page.fill("#ed-field-interval", "50ms")
    await page.press("#ed-field-interval", "Tab")
    await page.click('button[data-add="sensors"]')
    await page.fill("#ed-field-sensors-0-key", "boiler/temp")
    await page.press("#ed-field-sensors-0-key", "Tab")
    await page.fill("#ed-field-sensors-0-base", "80")
    await page.press("#ed-field-sensors-0-base", "Tab")

    await node(page, "window").click()
    await page.select_option("#ed-field-kind", label="tumbling")
    await page.fill("#ed-field-size", "soon")
    await page.press("#ed-field-size", "Tab")
    # a mistake is shown on its field and on its node
    await expect(page.locator('.field-error[data-path="size"]')).to_contain_text("duration")
    await expect(node(page, "window")).to_have_class(re.compile("df-has-error"))
    await shot(page, "editor-error")
    await page.fill("#ed-field-size", "200ms")
    await page.press("#ed-field-size", "Tab")
    await expect(page.locator('.field-error[data-path="size"]')).to_have_text("")

    await node(page, "console").click()
    await page.fill("#ed-field-label", "averages")
    await page.press("#ed-field-label", "Tab")
    await expect(page.locator("#ed-status")).to_have_text("valid — not deployed yet")
    await shot(page, "editor-draft")

    # deploy: the diff first, then the gateway runs it
    await page.click("#ed-deploy")
    await expect(page.locator("#ed-diff")).to_contain_text("type: console")
    await page.click("#ed-confirm")
    await expect(page.locator("#ed-status")).to_contain_text("deployed: added flow")
    await wait_for(lambda: "flow" in gw.pipelines, timeout=10)
    text = path.read_text()
    assert text.startswith("# Plant gateway: pipelines are built in the console's editor.\n")
    assert "# The console listens on a free port for the test.\n" in text
    loaded = load_config(path, env={})
    assert [n.type for n in loaded.nodes["flow"]] == ["simulate", "window", "console"]

    # results arrive in the console panel
    await expect(page.locator("#ed-console-body .ed-line").first).to_be_visible(timeout=15_000)
    await expect(page.locator("#ed-console .tab").first).to_contain_text("averages (flow)")
    await expect(node(page, "simulate").locator(".df-rate")).to_contain_text("/s")
    await shot(page, "editor-running")

    # undo: the label change goes back (in the form and the model), redo brings it again
    await page.click("#ed-undo")
    await node(page, "console").click()
    await expect(page.locator("#ed-field-label")).to_have_value("")
    await page.click("#ed-redo")
    await node(page, "console").click()
    await expect(page.locator("#ed-field-label")).to_have_value("averages")

    # the phone width: the canvas and the console panel still there
    await page.set_viewport_size({"width": 390, "height": 844})
    await expect(page.locator("#drawflow")).to_be_visible()
    # the pipeline is fitted again into the narrower canvas: as much of it as stays readable, from
    # its source (the rest is a pan away: tests/web/test_editor_canvas_browser.py); nothing is
    # wider than the screen
    await page.wait_for_function(
        """() => {
          const c = document.querySelector('#drawflow').getBoundingClientRect();
          const n = document.querySelector('.drawflow-node:has(.df-node[data-node="simulate"])');
          const r = n.getBoundingClientRect();
          return c.width < 390 && r.left >= c.left - 1 && r.right <= c.right + 1 && r.width / n.offsetWidth >= 0.7
            && /^2 of 3 nodes in view/.test(document.querySelector('#ed-hint:not([hidden])')?.textContent);
        }"""
    )
    assert await page.evaluate("document.documentElement.scrollWidth") <= 391
    await expect(page.locator("#ed-console-body .ed-line").first).to_be_visible()
    await shot(page, "editor-phone")


@pytest.mark.parametrize("started", [PLANT], indirect=True)
async def test_viewer_sees_the_canvas_read_only(started: tuple[Gateway, Path], page: Any) -> None:  # noqa: F811
    gw, _ = started
    base = base_url(gw)
    await page.set_viewport_size({"width": 1366, "height": 900})
    await login(page, base, "viewer1")
    await page.click('#nav a[data-view="editor"]')  # the Pipelines page is the editor's view mode
    await expect(page.locator("#ed-status")).to_have_text("view only")
    await expect(page.locator(".ed")).to_have_class(re.compile("ed-view"))
    await expect(page.locator("#ed-deploy")).to_be_hidden()
    await expect(page.locator(".ed-palette")).to_be_hidden()
    await expect(node(page, "out").locator(".df-rate")).to_contain_text("/s")
    await node(page, "push").click()
    await expect(page.locator("#ed-field-token")).to_be_disabled()
    await expect(page.locator("#ed-field-token")).to_have_value("***")
    await node(page, "sensors").click()
    await expect(page.locator("#ed-live")).to_contain_text(re.compile(r"running: in \d+ · out \d+"))
    await expect(page.locator("#ed-live")).to_contain_text("health: state running")
    assert "s3cret" not in await page.content()
    await shot(page, "editor-viewer")


@pytest.mark.parametrize("started", [PLANT], indirect=True)
async def test_a_change_on_disk_meanwhile_is_shown_not_overwritten(
    started: tuple[Gateway, Path],
    browser: Any,  # noqa: F811
) -> None:
    gw, path = started
    base = base_url(gw)
    ctx = await browser.new_context(viewport={"width": 1366, "height": 900})
    pg = await ctx.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    pg.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    try:
        await login(pg, base)
        await pg.goto(base + "/#/editor")
        await expect(pg.locator("#ed-status")).to_have_text("ready")
        await node(pg, "hot").click()
        await pg.fill("#ed-field-above", "97")
        await pg.press("#ed-field-above", "Tab")
        await expect(pg.locator("#ed-status")).to_have_text("valid — not deployed yet")
        # someone else changes the file
        path.write_text(path.read_text().replace("clear_below: 90", "clear_below: 88"))
        await pg.click("#ed-deploy")
        await pg.click("#ed-confirm")
        await expect(pg.locator("#ed-dialog h2")).to_have_text("The config file changed")
        await expect(pg.locator("#ed-diff")).to_contain_text("clear_below: 88")
        assert "above: 97" not in path.read_text()
        await shot(pg, "editor-conflict")
        await pg.click("#ed-reload")
        await expect(pg.locator("#ed-status")).to_have_text("ready")
        await node(pg, "hot").click()
        await expect(pg.locator("#ed-field-clear_below")).to_have_value("88")
        await expect(pg.locator("#ed-field-above")).to_have_value("95")
        # export this pipeline, import it again under another name
        await pg.click("#ed-export")
        exported = await pg.locator("#ed-export-text").input_value()
        assert exported.startswith("- name: plant\n") and "# the alarm point" in exported
        await pg.click("#ed-dialog button.link")
        await pg.click("#ed-import")
        await pg.fill("#ed-import-text", exported.replace("name: plant", "name: copy").replace("push", "push2"))
        await pg.click("#ed-import-go")
        await expect(pg.locator("#ed-pipeline")).to_have_value("copy")
        await expect(node(pg, "hot")).to_be_visible()
        await expect(pg.locator("#ed-status")).to_have_text("valid — not deployed yet")
    finally:
        await ctx.close()
    # the 409 answer is the conflict being reported, not a page problem
    assert [p for p in problems if "409" not in p] == []


@pytest.mark.parametrize("started", [WITH_BROKER], indirect=True)
async def test_alerts_to_a_real_broker_through_a_connection_select(
    started: tuple[Gateway, Path],
    page: Any,  # noqa: F811
) -> None:
    gw, path = started
    base = base_url(gw)
    broker = gw.loaded.config.connections["plant"]
    await page.set_viewport_size({"width": 1366, "height": 900})
    await login(page, base)
    await page.goto(base + "/#/editor")
    await expect(page.locator("#ed-status")).to_have_text("ready")
    await page.fill("#ed-new-name", "boiler")
    await page.click("#ed-new-pipeline")
    await drop(page, "simulate", 30, 60)
    await drop(page, "threshold", 260, 60)
    await drop(page, "mqtt_out", 490, 20)
    await drop(page, "console", 490, 200)
    await connect(page, "simulate", "threshold")
    await connect(page, "threshold", "mqtt_out")
    await connect(page, "threshold", "console")
    await node(page, "simulate").click()
    await page.click('button[data-add="sensors"]')
    await page.fill("#ed-field-sensors-0-key", "boiler/temp")
    await page.press("#ed-field-sensors-0-key", "Tab")
    await page.fill("#ed-field-sensors-0-base", "120")
    await page.press("#ed-field-sensors-0-base", "Tab")
    await node(page, "threshold").click()
    await page.fill("#ed-field-above", "95")
    await page.press("#ed-field-above", "Tab")
    await page.fill("#ed-field-clear_below", "90")
    await page.press("#ed-field-clear_below", "Tab")
    await node(page, "mqtt_out").click()
    # a required connection left empty is an error on that field
    await expect(page.locator('.field-error[data-path="connection"]')).not_to_be_empty()
    await page.select_option("#ed-field-connection", "plant")
    await expect(page.locator("#ed-status")).to_have_text("valid — not deployed yet")
    with mqtt_client(broker.host, broker.port, subscribe="sluice/editor-browser/alerts/#") as sub:
        await page.click("#ed-deploy")
        await page.click("#ed-confirm")
        await expect(page.locator("#ed-status")).to_contain_text("deployed: added boiler")
        await wait_for(lambda: sub.received(), timeout=15)
        alert = json.loads(sub.received()[0].payload)
        assert alert["key"] == "boiler/temp" and alert["gateway_id"] == "editor-browser"
    await expect(page.locator("#ed-console .tab").first).to_contain_text("console (boiler)")
    assert "connection: plant" in path.read_text()


FULL = """\
# Plant gateway: the whole flow is built in the editor.
gateway: {{id: editor-full, data_dir: "{data}"}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {port}}}
llm:
  providers:
    tiny: {{type: local, model: "{model}", chat_format: gemma, n_ctx: 512, threads: 1}}
pipelines: []
console: {{host: 127.0.0.1, port: 0}}
"""


class Feed:
    """A WebSocket server (the device) sending one JSON reading to each client every 100 ms."""

    def __init__(self) -> None:
        from aiohttp import web

        self.web = web
        self.runner: Any = None
        self.port = 0
        self.sent = 0

    async def handler(self, request: Any) -> Any:
        ws = self.web.WebSocketResponse()
        await ws.prepare(request)
        while not ws.closed:
            await ws.send_str(json.dumps({"temp": 120.0 + (self.sent % 3)}))
            self.sent += 1
            await asyncio.sleep(0.1)
        return ws

    async def __aenter__(self) -> Feed:
        app = self.web.Application()
        app.router.add_get("/feed", self.handler)
        self.runner = self.web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = self.web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the port the OS chose
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


async def fill(pg: Any, field: str, value: str) -> None:
    await pg.fill(f"#ed-field-{field}", value)
    await pg.press(f"#ed-field-{field}", "Tab")


async def test_websocket_window_threshold_llm_to_console_and_mqtt(
    tmp_path: Path,
    mosquitto: Any,
    page: Any,  # noqa: F811
) -> None:
    """The flow of the editor's purpose: a WebSocket device → a 5 s tumbling mean → a threshold → a
    (tiny, random-weight) local model streaming its explanation → the console panel, and the alert
    to a real Mosquitto. Built from an empty config by drag and drop and forms only."""
    from tests._tiny_gguf import write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny.gguf")
    path = tmp_path / "gateway.yaml"
    path.write_text(FULL.format(data=tmp_path / "data", port=mosquitto.port, model=model))
    async with Feed() as feed, gateway_from_file(path) as gw:
        await create_admin(gw)
        await build_and_deploy(gw, path, page, feed, mosquitto)
        # leave the console before its gateway stops: the page would log its reconnects as errors
        await page.goto("about:blank")


async def build_and_deploy(gw: Gateway, path: Path, pg: Any, feed: Feed, broker: Any) -> None:
    base = base_url(gw)
    await pg.set_viewport_size({"width": 1366, "height": 900})
    await login(pg, base)
    await pg.goto(base + "/#/editor")
    await expect(pg.locator("#ed-status")).to_have_text("ready")
    await pg.fill("#ed-new-name", "boiler")
    await pg.click("#ed-new-pipeline")
    await drop(pg, "websocket", 20, 40)
    await drop(pg, "window", 250, 40)
    await drop(pg, "threshold", 480, 40)
    await drop(pg, "llm", 20, 260)
    await drop(pg, "console", 250, 260)
    await drop(pg, "mqtt_out", 480, 260)
    await connect(pg, "websocket", "window")
    await connect(pg, "window", "threshold")
    await connect(pg, "threshold", "llm")
    await connect(pg, "threshold", "mqtt_out")
    await connect(pg, "llm", "console")
    await expect(pg.locator("#drawflow .connection")).to_have_count(5)

    await node(pg, "websocket").click()
    await fill(pg, "url", f"ws://127.0.0.1:{feed.port}/feed")
    await node(pg, "window").click()
    await pg.select_option("#ed-field-kind", label="tumbling")
    await fill(pg, "size", "5s")
    await fill(pg, "aggregate", "mean")
    await node(pg, "threshold").click()
    await fill(pg, "above", "95")
    await fill(pg, "clear_below", "90")
    await node(pg, "llm").click()
    await fill(pg, "provider", "tiny")
    await pg.select_option("#ed-field-output", label="stream")
    await fill(pg, "max_tokens", "12")
    await fill(pg, "temperature", "0")
    await node(pg, "mqtt_out").click()
    await pg.select_option("#ed-field-connection", "plant")
    await node(pg, "console").click()
    # the console shows the readings (the window's means) as well as the model's chunks
    await pg.select_option("#ed-field-input", ["window", "llm"])
    await fill(pg, "label", "plant")
    await expect(pg.locator("#ed-status")).to_have_text("valid — not deployed yet")

    with mqtt_client(broker.host, broker.port, subscribe="sluice/editor-full/alerts/#") as sub:
        await pg.click("#ed-deploy")
        await expect(pg.locator("#ed-diff")).to_contain_text("type: websocket")
        await pg.click("#ed-confirm")
        await expect(pg.locator("#ed-status")).to_contain_text("deployed: added boiler")
        # readings (the 5 s means) in the console panel
        body = pg.locator("#ed-console-body")
        await expect(body).to_contain_text("temp", timeout=30_000)
        # the alert at a real MQTT subscriber
        await wait_for(lambda: sub.received(), timeout=30)
        alert = json.loads(sub.received()[0].payload)
        assert alert["gateway_id"] == "editor-full" and "temp" in alert["key"], alert
    # the model's chunks as they stream, then its whole answer
    await expect(body).to_contain_text('"llm": "chunk"', timeout=60_000)
    await expect(body).to_contain_text('"llm": "ok"', timeout=60_000)
    await shot(pg, "editor-full-flow")
    text = await asyncio.to_thread(path.read_text)
    assert text.startswith("# Plant gateway: the whole flow is built in the editor.\n")
    loaded = load_config(path, env={})
    types = ["websocket", "window", "threshold", "llm", "console", "mqtt_out"]
    assert [n.type for n in loaded.nodes["boiler"]] == types

    # two changes, the second undone; the redeploy writes only the first
    await node(pg, "console").click()
    await fill(pg, "label", "boiler plant")
    await node(pg, "threshold").click()
    await fill(pg, "above", "99")
    await expect(pg.locator("#ed-status")).to_have_text("valid — not deployed yet")
    await pg.click("#ed-undo")
    await node(pg, "threshold").click()
    await expect(pg.locator("#ed-field-above")).to_have_value("95")
    await pg.click("#ed-deploy")
    await expect(pg.locator("#ed-diff")).to_contain_text("boiler plant")
    await expect(pg.locator("#ed-diff")).not_to_contain_text("above: 99")
    await pg.click("#ed-confirm")
    # "valid — not deployed yet" contains "deployed" too: wait for the deploy's own answer
    await expect(pg.locator("#ed-status")).to_have_text(re.compile(r"^deployed: changed boiler"))
    text = await asyncio.to_thread(path.read_text)
    assert "label: boiler plant" in text and "above: 95" in text and "above: 99" not in text
    assert text.startswith("# Plant gateway: the whole flow is built in the editor.\n")


@pytest.mark.parametrize("started", [PLANT], indirect=True)
async def test_phone_view_mode_disables_and_enables_a_pipeline(
    started: tuple[Gateway, Path],
    page: Any,  # noqa: F811
) -> None:
    """At 390 px the Pipelines page is the view mode (editing is for tablet and desktop), and an
    admin can still switch a pipeline off and on: `enabled: false` in the YAML, after its diff."""
    gw, path = started
    base = base_url(gw)
    await page.set_viewport_size({"width": 390, "height": 844})
    await login(page, base)
    await page.goto(base + "/#/editor")
    await expect(page.locator("#ed-status")).to_have_text("view only")
    await expect(page.locator("#ed-deploy")).to_be_hidden()
    await expect(page.locator("#ed-toggle")).to_have_text("Disable")
    await page.click("#ed-toggle")
    await expect(page.locator("#ed-diff")).to_contain_text("enabled: false")
    await shot(page, "editor-phone-disable")
    await page.click("#ed-confirm")
    await expect(page.locator("#ed-status")).to_have_text("plant disabled: stopped, kept in the file")
    assert "plant" not in gw.pipelines
    assert "    enabled: false\n" in await asyncio.to_thread(path.read_text)
    await expect(page.locator("#ed-pipeline option")).to_have_text("plant (disabled)")
    await expect(page.locator("#ed-toggle")).to_have_text("Enable")
    assert await page.evaluate("document.documentElement.scrollWidth") <= 391
    await shot(page, "editor-phone-disabled")
    # cancelling the dialog takes the switch back
    await page.click("#ed-toggle")
    await page.click("#ed-dialog button.link")
    await expect(page.locator("#ed-toggle")).to_have_text("Enable")
    await page.click("#ed-toggle")
    await page.click("#ed-confirm")
    await expect(page.locator("#ed-status")).to_have_text("plant enabled: running")
    await wait_for(lambda: "plant" in gw.pipelines, timeout=10)
    assert "enabled" not in await asyncio.to_thread(path.read_text)


@pytest.mark.parametrize("started", [WITH_BROKER], indirect=True)
async def test_connections_panel_from_the_schema(
    started: tuple[Gateway, Path],
    browser: Any,  # noqa: F811
) -> None:
    """The connections get their own panel, its form from the connection model's JSON Schema; a
    mistake is shown on its field; saving says plainly that a restart applies it."""
    gw, path = started
    ctx = await browser.new_context(viewport={"width": 1366, "height": 900})
    pg = await ctx.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"pg error: {exc}"))
    pg.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    try:
        base = base_url(gw)
        await pg.set_viewport_size({"width": 1366, "height": 900})
        await login(pg, base)
        await pg.goto(base + "/#/editor")
        await expect(pg.locator("#ed-status")).to_have_text("ready")
        await pg.click("#ed-connections")
        await expect(pg.locator("#ed-conn-msg")).to_contain_text("restart the gateway")
        port = gw.loaded.config.connections["plant"].port
        await expect(pg.locator("#ed-conn-plant-port")).to_have_value(str(port))
        await pg.fill("#ed-conn-plant-port", "70000")
        await pg.press("#ed-conn-plant-port", "Tab")
        await pg.click("#ed-conn-save")
        await expect(pg.locator('.field-error[data-path="connections.plant.port"]')).to_contain_text("65535")
        await pg.fill("#ed-conn-plant-port", "1884")
        await pg.press("#ed-conn-plant-port", "Tab")
        await pg.select_option("#ed-conn-plant-version", label="3.1.1")
        await pg.fill("#ed-conn-new", "cloud")
        await pg.click("#ed-conn-add")
        await pg.fill("#ed-conn-cloud-host", "broker.example")
        await pg.press("#ed-conn-cloud-host", "Tab")
        await shot(pg, "editor-connections")
        await pg.click("#ed-conn-save")
        await expect(pg.locator("#ed-conn-msg")).to_contain_text("Saved. Restart the gateway")
        text = await asyncio.to_thread(path.read_text)
        saved = load_config(path, env={}).config.connections
        assert saved["plant"].port == 1884 and saved["plant"].version == "3.1.1"
        assert saved["cloud"].host == "broker.example"
        assert "pipelines: []" in text
        assert gw.loaded.config.connections["plant"].port == port  # running on the old ones until a restart
        await expect(pg.locator("#ed-status")).to_have_text("connections saved: restart the gateway to apply them")
    finally:
        await ctx.close()
    # the 422 answer is the invalid port being reported, not a pg problem
    assert [p for p in problems if "422" not in p] == []


@pytest.mark.parametrize("started", [PLANT], indirect=True)
async def test_multi_select_copy_paste_move_delete(started: tuple[Gateway, Path], page: Any) -> None:  # noqa: F811
    gw, _ = started
    base = base_url(gw)
    await page.set_viewport_size({"width": 1366, "height": 900})
    await login(page, base)
    await page.goto(base + "/#/editor")
    await expect(page.locator("#ed-status")).to_have_text("ready")
    nodes = page.locator("#drawflow .drawflow-node")
    await expect(nodes).to_have_count(4)
    # Shift-click and Ctrl-click add to the selection
    await node(page, "sensors").click()
    await node(page, "hot").click(modifiers=["Shift"])
    await expect(page.locator(".drawflow-node.ed-multi")).to_have_count(2)
    # copy/paste of the two: the wire between them comes along, ids are new
    await page.click("#ed-copy")
    await page.click("#ed-paste")
    await expect(nodes).to_have_count(6)
    await expect(node(page, "sensors_2")).to_be_visible()
    await expect(node(page, "hot_2")).to_be_visible()
    await expect(page.locator("#drawflow .connection")).to_have_count(4)
    await expect(page.locator(".drawflow-node.ed-multi")).to_have_count(2)  # the pasted ones
    # moving one node of the selection moves the others by as much
    other = node(page, "sensors_2")
    before = await other.bounding_box()
    box = await node(page, "hot_2").bounding_box()
    await page.mouse.move(box["x"] + 20, box["y"] + 10)
    await page.mouse.down()
    await page.mouse.move(box["x"] + 80, box["y"] + 110, steps=5)
    await page.mouse.up()
    await page.wait_for_function(
        "y => document.querySelector('.drawflow-node:has(.df-node[data-node=\"sensors_2\"])')"
        ".getBoundingClientRect().y > y + 50",
        arg=before["y"],
    )
    # delete removes the whole selection
    await page.click("#ed-delete")
    await expect(nodes).to_have_count(4)
    # a Shift-drag on the background is a rubber band: it selects what it touches
    canvas = await page.locator("#drawflow").bounding_box()
    await page.keyboard.down("Shift")
    await page.mouse.move(canvas["x"] + 2, canvas["y"] + 2)
    await page.mouse.down()
    await page.mouse.move(canvas["x"] + canvas["width"] - 2, canvas["y"] + canvas["height"] - 2, steps=5)
    await page.mouse.up()
    await page.keyboard.up("Shift")
    await expect(page.locator(".drawflow-node.ed-multi")).to_have_count(4)
    await shot(page, "editor-multi-select")
    await page.keyboard.press("Delete")
    await expect(nodes).to_have_count(0)
    await page.click("#ed-undo")
    await expect(nodes).to_have_count(4)
