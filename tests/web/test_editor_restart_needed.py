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
import subprocess
from pathlib import Path
from typing import Any

from tests._util import free_port
from tests.gateway.test_tls_lazy import openssl_mapped

from .conftest import Browserish

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
        # the answer's revision is the saved file's: the next deploy is not refused as a stale one
        status, again = await c.post("/api/editor/deploy", {"revision": r["revision"], "model": draft})
        assert status == 200 and again["changed"] == [] and again["revision"] == r["revision"], again
        # what needs OpenSSL says so instead of failing: /metrics answers 503, the palette leaves
        # out the types whose libraries need it, and nothing logs a traceback
        status, text = await c.get("/metrics")
        assert status == 503 and "SLUICE_TLS=auto" in text, text
        _, palette = await c.get("/api/editor/palette")
        types = {t["type"] for f in palette["families"] for t in f["types"]}
        assert "webhook" in types and "kafka" not in types
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
