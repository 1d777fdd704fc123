#!/usr/bin/env python3
"""Console clients benchmark: what live browsers cost the pipeline, and what the console weighs.

One `sluice run` (pinned to core 1) runs a simulated source as fast as the pipeline takes it
(`realtime: false`) through filter -> map -> threshold. Its ingest rate (events/s out of the
source, from /api/pipelines) is measured in three windows of the same run:

  none     no console client
  clients  C WebSocket clients (default 10, in this process, on core 0), each subscribed to the
           stats tick and to the events of the map node (the live tail/chart feed)

alternating none, clients, none, clients, ... (so drift on a shared machine hits both alike);
ratio = median(clients) / median(none); the goal is >= 0.9. Also: what the clients received and
the server's dropped-message count, the overview page weight (HTML + every stylesheet, script
and module it loads, as served) and, when Playwright and Chromium are installed, the browser's
CPU use for the Charts page drawing 10 live series.

  .venv/bin/python scripts/bench/console_clients.py [--window 8] [--clients 10] [--quick]

Ends with one JSON line of every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _common import free_port, log, pinned

ROOT = Path(__file__).resolve().parents[2]
SLUICE_BIN = Path(os.environ.get("SLUICE_BENCH_BIN") or ROOT / ".venv" / "bin" / "sluice")
CHROMIUM = os.environ.get("SLUICE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FOUND = os.path.exists(CHROMIUM)
GOAL_RATIO = 0.9
SERIES = 10
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def config_text(data_dir: Path, port: int) -> str:
    sensors = ", ".join(
        f"{{key: k{i:02d}/temp, base: {40 + i}, amplitude: 5, period: 60s, noise: 0.5}}" for i in range(SERIES)
    )
    return f"""
gateway: {{id: bench-console, data_dir: "{data_dir}", log_level: warning}}
pipelines:
  - name: plant
    nodes:
      - {{id: sensors, type: simulate, realtime: false, interval: 1s, seed: 7, sensors: [{sensors}]}}
      - {{id: valid, type: filter, input: sensors, where: "value > -40.0 && value < 200.0"}}
      - {{id: fahrenheit, type: map, input: valid, value: "value * 1.8 + 32.0"}}
      - {{id: hot, type: threshold, input: fahrenheit, above: 170, clear_below: 160}}
      - {{id: out, type: log, input: hot}}
console: {{host: 127.0.0.1, port: {port}, auth: false}}
"""


class Gateway:
    def __init__(self, workdir: Path, core: int | None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cfg = workdir / "gateway.yaml"
        cfg.write_text(config_text(workdir / "data", self.port))
        self.log_path = workdir / "gateway.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            pinned(core, [str(SLUICE_BIN), "run", str(cfg)]), stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise SystemExit("sluice exited:\n" + self.log_path.read_text()[-3000:])
            try:
                if get_json(self.base + "/healthz")["state"] == "running":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("sluice did not start within 30 s")
            time.sleep(0.1)

    def events(self) -> int:
        for p in get_json(self.base + "/api/pipelines")["pipelines"]:
            for n in p["nodes"]:
                if n["id"] == "sensors":
                    return int(n["counters"]["out"])
        raise RuntimeError("no sensors node")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


async def rate(gw: Gateway, seconds: float) -> tuple[float, float]:
    """Events per second out of the source, and the gateway's CPU µs per event, over one window."""
    loop = asyncio.get_running_loop()
    n0 = await loop.run_in_executor(None, gw.events)
    c0, t0 = proc_cpu_seconds(gw.proc.pid), time.monotonic()
    await asyncio.sleep(seconds)
    n1 = await loop.run_in_executor(None, gw.events)
    c1, t1 = proc_cpu_seconds(gw.proc.pid), time.monotonic()
    return (n1 - n0) / (t1 - t0), 1e6 * (c1 - c0) / max(1, n1 - n0)


async def client(base: str, received: list[int], idx: int, stop: asyncio.Event) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.ws_connect(base.replace("http", "ws") + "/ws") as ws:
        await ws.send_json({"op": "subscribe", "topic": "stats"})
        await ws.send_json({"op": "subscribe", "topic": "events", "pipeline": "plant", "node": "fahrenheit"})
        while not stop.is_set():
            try:
                msg = await asyncio.wait_for(ws.receive(), 0.5)
            except TimeoutError:
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            received[idx] += 1


def page_weight(base: str) -> dict[str, Any]:
    """Bytes of the overview: its HTML and everything it loads (stylesheets, scripts, ES module imports)."""
    seen: dict[str, int] = {}

    def fetch(path: str) -> str:
        with urllib.request.urlopen(base + path, timeout=5) as r:
            body = r.read()
        seen[path] = len(body)
        return body.decode("utf-8", "replace")

    html = fetch("/")
    todo = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        text = fetch(path)
        if path.endswith(".js"):
            folder = path.rsplit("/", 1)[0]
            for rel in re.findall(r'^import .*? from "(\.{1,2}/[^"]+)";', text, re.M):
                todo.append(os.path.normpath(f"{folder}/{rel}"))
    return {"files": len(seen), "kib": round(sum(seen.values()) / 1024, 1)}


async def browser_cpu(base: str, seconds: float) -> dict[str, Any] | None:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        return None
    if not CHROMIUM_FOUND:
        return None
    import psutil

    async with async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        try:
            page = await b.new_page(viewport={"width": 1100, "height": 800})
            await page.goto(base + "/#/charts/plant/fahrenheit")
            await page.wait_for_selector("#chart-values canvas", timeout=20_000)
            procs = [pr for pr in psutil.Process().children(recursive=True) if "chrom" in pr.name().lower()]

            def cpu() -> float:
                total = 0.0
                for pr in procs:
                    with contextlib.suppress(psutil.Error):
                        t = pr.cpu_times()
                        total += t.user + t.system
                return total

            c0, t0 = cpu(), time.monotonic()
            await asyncio.sleep(seconds)
            used = cpu() - c0
            series = await page.locator("#chart-values .u-legend .u-series").count() - 1
            return {"cpu_percent": round(100 * used / (time.monotonic() - t0), 1), "series": series, "seconds": seconds}
        finally:
            await b.close()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    two_cores = (os.cpu_count() or 1) >= 2
    with tempfile.TemporaryDirectory(prefix="sluice-bench-console-") as tmp:
        gw = Gateway(Path(tmp), 1 if two_cores else None)
        if two_cores and shutil.which("taskset"):
            os.sched_setaffinity(0, {0})
        try:
            await asyncio.sleep(1.0)  # warm-up: first batches, caches, allocator
            cpu0 = proc_cpu_seconds(gw.proc.pid)
            # Alternate windows without and with clients, so drift on a shared machine hits both alike.
            without: list[tuple[float, float]] = [await rate(gw, args.window)]
            with_clients: list[tuple[float, float]] = []
            received = [0] * args.clients
            for _ in range(args.rounds):
                stop = asyncio.Event()
                tasks = [asyncio.create_task(client(gw.base, received, i, stop)) for i in range(args.clients)]
                await asyncio.sleep(0.5)
                with_clients.append(await rate(gw, args.window))
                stop.set()
                await asyncio.gather(*tasks)
                without.append(await rate(gw, args.window))
            hub = get_json(gw.base + "/healthz")
            weight = page_weight(gw.base)
            chart = None if args.skip_browser else await browser_cpu(gw.base, min(args.window, 5.0))
            cpu = proc_cpu_seconds(gw.proc.pid) - cpu0
        finally:
            gw.stop()
    none_med = statistics.median(r for r, _ in without)
    with_med = statistics.median(r for r, _ in with_clients)
    none_cpu = statistics.median(c for _, c in without)
    with_cpu = statistics.median(c for _, c in with_clients)
    return {
        "events_per_s_without": round(none_med),
        "events_per_s_clients": round(with_med),
        "windows_without": [round(r) for r, _ in without],
        "windows_clients": [round(r) for r, _ in with_clients],
        "ratio": round(with_med / none_med, 3) if none_med else None,
        "goal_ratio": GOAL_RATIO,
        "cpu_us_per_event_without": round(none_cpu, 2),
        "cpu_us_per_event_clients": round(with_cpu, 2),
        "cpu_ratio": round(none_cpu / with_cpu, 3) if with_cpu else None,
        "clients": args.clients,
        "messages_per_client_s": round(sum(received) / max(1, args.clients) / (args.window * args.rounds), 1),
        "console_state": hub.get("state"),
        "gateway_cpu_seconds": round(cpu, 2),
        "overview_files": weight["files"],
        "overview_kib": weight["kib"],
        "chart_browser_cpu_percent": chart["cpu_percent"] if chart else None,
        "chart_series": chart["series"] if chart else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=float, default=8.0, help="seconds per measuring window")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="windows with clients (alternating with none)")
    ap.add_argument("--quick", action="store_true", help="3 s windows (what make bench runs)")
    ap.add_argument("--skip-browser", action="store_true", help="no Chromium measurement")
    args = ap.parse_args()
    if args.quick:
        args.window, args.rounds = 2.5, 2
    if not SLUICE_BIN.exists():
        log(f"no sluice executable at {SLUICE_BIN}: run `make deps` first")
        return 1
    r = asyncio.run(main_async(args))
    print(
        f"ingest, events/s       no client {r['events_per_s_without']:>9,}   {r['clients']} clients "
        f"{r['events_per_s_clients']:>9,}   (medians of {args.rounds + 1} and {args.rounds} windows "
        f"of {args.window:g} s)"
    )
    print(f"ratio (clients/none)   {r['ratio']}   (goal >= {GOAL_RATIO})")
    print(
        f"CPU µs per event       no client {r['cpu_us_per_event_without']}   clients {r['cpu_us_per_event_clients']}"
        f"   -> throughput ratio at equal CPU {r['cpu_ratio']} (less sensitive to other load on the machine)"
    )
    print(f"messages per client    {r['messages_per_client_s']} per second (stats + live events)")
    print(f"overview page weight   {r['overview_kib']} KiB in {r['overview_files']} files (uncompressed)")
    if r["chart_browser_cpu_percent"] is not None:
        print(f"charts page, browser   {r['chart_browser_cpu_percent']} % CPU with {r['chart_series']} live series")
    else:
        print("charts page, browser   skipped (no Playwright/Chromium, or --skip-browser)")
    print(json.dumps({"bench": "console_clients", **r}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
