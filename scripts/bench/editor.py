#!/usr/bin/env python3
"""Pipeline editor benchmark: opening, validating and deploying pipelines of 20 and 200 nodes.

A gateway runs in this process from a config file with one pipeline of N nodes (a simulator, a
chain of N-2 filters, a log sink), its console on a free port without login. Measured:

  open       Chromium (Playwright) from navigating to #/editor until the canvas shows every node
             and the editor says it is ready (skipped without Playwright or Chromium)
  validate   POST /api/editor/validate of the model with one field changed (what every edit sends)
  deploy     the same one-field change deployed through POST /api/editor/deploy, and through
             POST /api/config/save with the changed YAML text (the config page's path), alternating,
             each followed by a change back; time until the answer (the reload is done by then)

ratio = median(save) / median(editor deploy) for the 200-node pipeline (the editor's overhead;
the aim is >= 0.8).

  .venv/bin/python scripts/bench/editor.py [--quick] [--repeat R]

Ends with one JSON line of every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CHROMIUM = os.environ.get("SLUICE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FOUND = os.path.exists(CHROMIUM)
GOAL_RATIO = 0.8


def config_text(data_dir: Path, n: int) -> str:
    lines = [
        "# editor benchmark",
        f'gateway: {{id: editor-bench, data_dir: "{data_dir}", log_level: warning}}',
        "pipelines:",
        "  - name: chain",
        "    nodes:",
        "      - {id: src, type: simulate, interval: 100ms, sensors: [{key: t, base: 50}]}",
    ]
    prev = "src"
    for i in range(n - 2):
        lines.append(f'      - {{id: f{i:03d}, type: filter, input: {prev}, where: "value > -{1000 + i}"}}')
        prev = f"f{i:03d}"
    lines.append(f"      - {{id: out, type: log, input: {prev}, level: debug}}")
    lines.append("console: {host: 127.0.0.1, port: 0, auth: false}")
    return "\n".join(lines) + "\n"


def ms(xs: list[float]) -> float | None:
    return round(statistics.median(xs) * 1000, 1) if xs else None


async def bench_size(n: int, repeat: int, browser: Any) -> dict[str, Any]:
    import aiohttp

    from gateway.config import load_config
    from gateway.runtime import Gateway

    with tempfile.TemporaryDirectory(prefix="sluice-editor-bench-") as tmp:
        path = Path(tmp) / "gateway.yaml"
        path.write_text(config_text(Path(tmp) / "data", n))
        gw = Gateway(load_config(path, env={}))
        task = asyncio.create_task(gw.run(install_signals=False))
        try:
            while gw.state != "running":
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
            base = f"http://127.0.0.1:{gw.console.port}"
            headers = {"Origin": base}
            out: dict[str, Any] = {"nodes": n}
            async with aiohttp.ClientSession(headers=headers) as http:

                async def call(method: str, url: str, **kw: Any) -> tuple[int, Any]:
                    async with http.request(method, base + url, **kw) as r:
                        body = await r.json() if r.content_type == "application/json" else await r.text()
                        return r.status, body

                _, model = await call("GET", "/api/editor/model")
                last = model["pipelines"][0]["nodes"][-2]

                def draft(value: int) -> dict[str, Any]:
                    d = copy.deepcopy(model)
                    d["pipelines"][0]["nodes"][-2]["options"]["where"] = f"value > -{value}"
                    return d

                original = last["options"]["where"]
                v_times = []
                for i in range(repeat):
                    t0 = time.perf_counter()
                    status, r = await call("POST", "/api/editor/validate", json={"model": draft(5000 + i)})
                    v_times.append(time.perf_counter() - t0)
                    assert status == 200 and r["valid"], r
                out["validate_ms"] = ms(v_times)

                ed_times, save_times = [], []
                for i in range(repeat):
                    for how in ("editor", "save"):
                        text = path.read_text()
                        changed = text.replace(f'"{original}"', f'"value > -{7000 + i}"', 1)
                        _, cur = await call("GET", "/api/editor/model")
                        t0 = time.perf_counter()
                        if how == "editor":
                            d = copy.deepcopy(cur)
                            d["pipelines"][0]["nodes"][-2]["options"]["where"] = f"value > -{7000 + i}"
                            status, r = await call(
                                "POST", "/api/editor/deploy", json={"revision": cur["revision"], "model": d}
                            )
                        else:
                            status, r = await call("POST", "/api/config/save", json={"text": changed})
                        (ed_times if how == "editor" else save_times).append(time.perf_counter() - t0)
                        assert status == 200, r
                        assert path.read_text() == changed, "both paths write the same file"
                        # and back, so the next round changes the same line again
                        status, r = await call("POST", "/api/config/save", json={"text": text})
                        assert status == 200, r
                out["deploy_editor_ms"] = ms(ed_times)
                out["deploy_save_ms"] = ms(save_times)
                out["ratio"] = round(statistics.median(save_times) / statistics.median(ed_times), 3)

            if browser is not None:
                opens = []
                for _ in range(max(1, repeat // 2)):
                    page = await browser.new_page(viewport={"width": 1366, "height": 900})
                    t0 = time.perf_counter()
                    await page.goto(base + "/#/editor")
                    await page.wait_for_function(
                        "n => document.querySelectorAll('.drawflow-node').length === n"
                        " && document.querySelector('#ed-status')?.textContent === 'ready'",
                        arg=n,
                        timeout=60_000,
                    )
                    opens.append(time.perf_counter() - t0)
                    await page.close()
                out["open_ms"] = ms(opens)
            else:
                out["open_ms"] = None
            return out
        finally:
            gw.stop()
            await asyncio.wait_for(task, 60)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--repeat", type=int, default=None)
    args = ap.parse_args()
    repeat = args.repeat or (3 if args.quick else 10)
    browser = pw = None
    skipped = None
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        skipped = "playwright is not installed"
    else:
        if CHROMIUM_FOUND:
            pw = await async_playwright().start()
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        else:
            skipped = f"no Chromium at {CHROMIUM}"
    if skipped:
        print(f"open time skipped: {skipped}", file=sys.stderr)
    results = []
    try:
        for n in (20, 200):
            results.append(await bench_size(n, repeat, browser))
    finally:
        if browser is not None:
            await browser.close()
        if pw is not None:
            await pw.stop()
    print(
        f"{'nodes':>6} {'open ms':>9} {'validate ms':>12} "
        f"{'deploy (editor) ms':>19} {'deploy (save) ms':>17} {'ratio':>6}"
    )
    for r in results:
        print(
            f"{r['nodes']:>6} {r['open_ms'] if r['open_ms'] is not None else '-':>9} {r['validate_ms']:>12} "
            f"{r['deploy_editor_ms']:>19} {r['deploy_save_ms']:>17} {r['ratio']:>6}"
        )
    big = results[-1]
    print(f"ratio = save / editor deploy at 200 nodes: {big['ratio']} (aim >= {GOAL_RATIO})")
    summary = {"bench": "editor", "ratio": big["ratio"], "goal": GOAL_RATIO, "repeat": repeat}
    for r in results:
        for k in ("open_ms", "validate_ms", "deploy_editor_ms", "deploy_save_ms"):
            summary[f"{k[:-3]}_{r['nodes']}_ms"] = r[k]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
