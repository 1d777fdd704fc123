"""The console's live pages in a real browser: the LLM page streaming a real (tiny) model's tokens,
alerts pushed over /ws, and charts that start from the stored history."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.runtime import Gateway
from tests._tiny_gguf import write_tiny_llama
from tests._util import wait_for
from tests.gateway._harness import running_gateway

from .conftest import PASSWORD, Browserish, base_url, web_of
from .test_browser import browser, logged_in, page, playwright_api, shot

__all__ = ["browser", "page"]  # fixtures, used by name

LLM_CONFIG = """
gateway: {{id: web-llm, data_dir: "{data}"}}
llm:
  providers:
    tiny: {{type: local, model: "{model}", chat_format: gemma, n_ctx: 512, threads: 1}}
pipelines:
  - name: boiler
    nodes:
      - {{id: sensors, type: simulate, interval: 300ms, seed: 3,
         sensors: [{{key: boiler/temp, base: 97, noise: 0.1}}]}}
      - {{id: explain, type: llm, input: sensors, provider: tiny, output: stream, max_tokens: 24,
         temperature: 0, max_queue: 2, prompt: "why is {{{{ key }}}} at {{{{ value }}}}?"}}
      - {{id: out, type: log, input: explain}}
      - {{id: hot, type: threshold, input: sensors, above: 95, clear_below: 90}}
      - {{id: book, type: alert, input: hot, auto_resolve: false}}
console: {{host: 127.0.0.1, port: 0}}
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture
async def llm_gw(tmp_path: Path, tiny_model: Path) -> AsyncIterator[Gateway]:
    async with running_gateway(LLM_CONFIG.format(data=tmp_path / "data", model=tiny_model)) as g:
        yield g


async def test_llm_page_streams_tokens_with_queue_sheds_and_rate(llm_gw: Gateway, page: Any) -> None:
    base = await logged_in(llm_gw, page)
    await page.click('#nav a[data-view="llm"]')
    answer = page.locator("#llm-stream .llm-answer").first
    await playwright_api.expect(answer).to_contain_text("boiler/temp", timeout=15_000)
    # the text grows chunk by chunk, and the answer ends with its token count and rate
    await playwright_api.expect(page.locator(".llm-status.ok").first).to_contain_text("tok/s", timeout=15_000)
    done = page.locator(".llm-answer", has=page.locator(".llm-status.ok")).first
    assert (await done.locator("pre").text_content() or "").strip()
    row = page.locator('#llm-table tr[data-node="boiler/explain"]')
    await playwright_api.expect(row.locator(".llm-depth")).to_contain_text("/ 2", timeout=10_000)
    await playwright_api.expect(row.locator(".llm-tps")).not_to_have_text("–", timeout=10_000)
    for reason in ("queue_full", "deadline", "coalesced", "breaker_open"):
        await playwright_api.expect(row.locator(f'td[data-reason="{reason}"]')).to_have_count(1)
    await playwright_api.expect(page.locator("#llm-providers")).to_contain_text("tiny: breaker closed")
    await shot(page, "llm")
    # every chunk the page got is one the model streamed: nothing dropped for a browser that keeps up
    await playwright_api.expect(page.locator("#llm-dropped")).to_have_text("")
    # leaving the page unhooks the llm node
    hub = web_of(llm_gw).hub
    await page.goto(base + "/#/overview")
    await wait_for(lambda: not hub._llm_taps, timeout=5)


async def test_alerts_page_follows_pushed_steps(llm_gw: Gateway, page: Any) -> None:
    base = await logged_in(llm_gw, page)
    await page.goto(base + "/#/alerts")
    row = page.locator("#alerts tr[data-alert]").first
    await playwright_api.expect(row.locator(".state")).to_have_text("open", timeout=10_000)
    hub = web_of(llm_gw).hub
    await wait_for(lambda: any(c.alerts for c in hub.clients), timeout=5)
    # a step taken elsewhere (here: the API, as MQTT or another operator would) shows up on its own
    api = Browserish(base)
    try:
        await api.login("admin")
        alert_id = await row.get_attribute("data-alert")
        status, body = await api.post(f"/api/alerts/{alert_id}/ack", {})
        assert status == 200, body
    finally:
        await api.close()
    await playwright_api.expect(row.locator(".state")).to_have_text("acknowledged")


async def test_charts_start_from_the_stored_history(gw: Gateway, page: Any) -> None:
    now = time.time()
    assert gw.history is not None
    for i in range(120):
        gw.history.add("cellar/humidity", now - 120 + i, 50.0 + i % 7)
    gw.history.flush()

    base = base_url(gw)
    c = Browserish(base)
    try:
        await c.setup_admin(gw)
        q = f"/api/history?key=cellar/humidity&from={now + 1 - 600}&to={now + 1}&points=600"  # as the page asks
        for _ in range(250):  # the store commits in groups: wait until the rows are readable
            status, body = await c.get(q)
            assert status == 200, body
            if len(body["points"]) == 120:
                break
            await asyncio.sleep(0.02)
        assert len(body["points"]) == 120
    finally:
        await c.close()
    await page.goto(base + "/login")
    await page.fill("#name", "admin")
    await page.fill("#password", PASSWORD)
    await page.click("#submit")
    await page.wait_for_url(base + "/")
    await page.goto(base + "/#/charts")
    await page.fill("#chart-key", "cellar/humidity")
    await page.press("#chart-key", "Enter")
    await playwright_api.expect(page.locator("#chart-values canvas")).to_have_count(1, timeout=10_000)
    await playwright_api.expect(page.locator("#chart-note")).to_contain_text("1 series")
    await playwright_api.expect(page.locator("#chart-values .u-legend")).to_contain_text("cellar/humidity")
    n = int((await page.locator("#chart-note").text_content() or "0 0").split(", ")[1].split()[0])
    assert n >= 100  # the stored minutes, not just a live point or two
