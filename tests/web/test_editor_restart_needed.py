"""A deploy from the editor that a gateway without OpenSSL cannot run live is saved, not lost.

`sluice run` with a plain config and SLUICE_TLS=auto keeps OpenSSL out of the process (gateway._tls). An admin then adds
an https webhook in the editor: the deploy answers 200 with ``deployed: false`` and
``restart_needed`` (why), the file holds the new node, the running pipelines are the old ones, and
the answer's revision is the saved file's. After a restart the gateway
loads OpenSSL and runs the saved pipeline.

(A real `sluice run` process: only a process started from a plain config is without OpenSSL. The
test's name keeps "tls", "ssl" and "cert" out of tmp_path, which the config holds.)"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests._util import free_port
from tests.gateway.test_tls_lazy import openssl_mapped

from .conftest import Browserish

# the console browser tests' fixtures: Chromium, and a page on which any page error fails the test
from .test_browser import browser, page, shot  # noqa: F401

expect = pytest.importorskip("playwright.async_api").expect

CONFIG = """\
gateway: {{id: gw-editor-restart, data_dir: "{data}"}}
pipelines:
  - name: plant
    nodes:
      - {{id: sim, type: simulate, interval: 200ms, sensors: [{{key: boiler, base: 20}}]}}
      - {{id: out, type: log, input: sim}}
console: {{host: 127.0.0.1, port: {port}, auth: false}}
"""


def _text(path: Path) -> str:
    return path.read_text()


async def _up(c: Browserish, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the console answers with the gateway running (a real process: polled, 60 s at most)."""
    for _ in range(600):
        assert proc.poll() is None, _text(log)
        try:
            status, body = await c.get("/api/pipelines")
            if status == 200 and body["state"] == "running":
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"the console did not answer: {_text(log)}")


async def test_editor_deploy_that_needs_a_restart_is_saved(tmp_path: Path, run_sluice: Any) -> None:
    port = free_port()
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(CONFIG.format(data=tmp_path / "data", port=port))
    proc = run_sluice(cfg)
    c = Browserish(f"http://127.0.0.1:{port}")
    try:
        await _up(c, proc, tmp_path / "run0.log")
        assert openssl_mapped(proc.pid) == []
        _, model = await c.get("/api/editor/model")
        draft = copy.deepcopy(model)
        plant = next(p for p in draft["pipelines"] if p["name"] == "plant")
        hook = {"id": "hook", "type": "webhook", "input": ["sim"], "options": {"url": "https://127.0.0.1:9/hook"}}
        plant["nodes"].append(hook)
        status, r = await c.post("/api/editor/deploy", {"revision": model["revision"], "model": draft})
        assert status == 200, r
        assert r["deployed"] is False and r["saved"] is True, r
        assert "restart" in r["restart_needed"] and "TLS" in r["restart_needed"], r
        assert "https://127.0.0.1:9/hook" in cfg.read_text()
        # the running gateway keeps its pipelines, and still has no OpenSSL
        _, running = await c.get("/api/pipelines")
        assert "hook" not in json.dumps(running["pipelines"])
        assert openssl_mapped(proc.pid) == []
        # the answer's revision is the saved file's: the next deploy is not refused as a stale one,
        # and, the file holding the draft while the running pipelines do not, it still says why
        status, again = await c.post("/api/editor/deploy", {"revision": r["revision"], "model": draft})
        assert status == 200 and again["changed"] == [] and again["revision"] == r["revision"], again
        assert again["deployed"] is False and again["saved"] is False and "restart" in again["restart_needed"], again
        # what needs OpenSSL says so instead of failing: /metrics answers 503, the palette leaves
        # out the types whose libraries need it, and nothing logs a traceback
        status, text = await c.get("/metrics")
        assert status == 503 and "SLUICE_TLS=auto" in text, text
        _, palette = await c.get("/api/editor/palette")
        usable = {t["type"] for f in palette["families"] if f["name"] != "needs restart" for t in f["types"]}
        assert "webhook" in usable and "kafka" not in usable
        log = _text(tmp_path / "run0.log")
        assert "they run after the next restart" in log
        assert "Traceback" not in log and "node type 'kafka' is not available" in log, log
    finally:
        await c.close()
    proc.terminate()
    assert proc.wait(timeout=60) == 0, (tmp_path / "run0.log").read_text()

    # the next start reads the saved file: OpenSSL loads and the webhook runs
    proc = run_sluice(cfg)
    c = Browserish(f"http://127.0.0.1:{port}")
    try:
        await _up(c, proc, tmp_path / "run1.log")
        _, running = await c.get("/api/pipelines")
        assert "hook" in json.dumps(running["pipelines"])
        assert openssl_mapped(proc.pid) != []
        status, _ = await c.get("/metrics")
        assert status == 200
    finally:
        await c.close()


async def test_the_palette_shows_the_types_that_need_a_restart(tmp_path: Path, run_sluice: Any, page: Any) -> None:  # noqa: F811
    """Node types whose library needs OpenSSL are not left out of the palette: they come last, greyed
    out, marked "needs restart (started without TLS)", and a draft using one is told the same."""
    port = free_port()
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(CONFIG.format(data=tmp_path / "data", port=port))
    proc = run_sluice(cfg)
    base = f"http://127.0.0.1:{port}"
    c = Browserish(base)
    try:
        await _up(c, proc, tmp_path / "run0.log")
        _, palette = await c.get("/api/editor/palette")
        assert palette["families"][-1]["name"] == "needs restart"
        off = {t["type"]: t["unavailable"] for t in palette["families"][-1]["types"]}
        assert {"kafka", "kafka_out", "modbus"} <= set(off), off
        assert all(why.startswith("needs restart (started without TLS)") for why in off.values())
        _, model = await c.get("/api/editor/model")
        draft = copy.deepcopy(model)
        plant = next(p for p in draft["pipelines"] if p["name"] == "plant")
        plant["nodes"].append({"id": "k", "type": "kafka_out", "input": ["sim"], "options": {"topic": "t"}})
        _, checked = await c.post("/api/editor/validate", {"revision": model["revision"], "model": draft})
        said = json.dumps(checked)
        assert "kafka_out" in said and "needs restart (started without TLS)" in said, checked
    finally:
        await c.close()

    await page.goto(base + "/#/editor")
    kafka = page.locator('.ed-palette .ed-type-off[data-type="kafka"]')
    await expect(kafka).to_contain_text("needs restart (started without TLS)")
    assert await kafka.get_attribute("aria-disabled") == "true"
    assert await kafka.get_attribute("draggable") is None
    await expect(page.locator('.ed-palette details[data-family="needs restart"] summary')).to_have_text("Needs restart")
    await expect(page.locator('.ed-palette .ed-type[data-type="webhook"]')).not_to_have_class(re.compile("ed-type-off"))
    await kafka.scroll_into_view_if_needed()
    await shot(page, "editor-needs-restart")
    nodes = await page.locator(".df-node").count()
    await kafka.click(force=True)  # adds nothing (aria-disabled: Playwright would wait for it to be enabled)
    await page.locator('.ed-palette .ed-type[data-type="log"]').click()  # a usable type is added
    await expect(page.locator(".df-node")).to_have_count(nodes + 1)
    await expect(page.locator('.df-node .df-type:text-is("kafka")')).to_have_count(0)
