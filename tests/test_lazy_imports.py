"""A gateway imports only what its config uses: an MQTT -> window -> alert flow with the console's
auth off loads no argon2, no serial or Modbus stack, no LLM stack, no firmware codecs, and no web
stack while nobody has opened the console.

Checked in a fresh interpreter that runs such a gateway (its config parsed, its pipelines and
console built and started against a real Mosquitto), because a module imported anywhere at
start-up costs every gateway its memory and start time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests._util import MosquittoBroker

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import asyncio, faulthandler, json, sys
# a run that never ends prints where each thread is and exits, before the test gives up on it
faulthandler.dump_traceback_later({dump}, exit=True)
sys.path.insert(0, {bench!r})
from mqtt_ingest import sluice_config
from gateway.config import parse_config
from gateway.runtime import Gateway

async def main():
    gw = Gateway(parse_config(sluice_config("realistic", {port}, {data!r}), "t.yaml", {{}}))
    task = asyncio.create_task(gw.run(install_signals=False))
    for _ in range(600):
        if gw.state == "running" or task.done():
            break
        await asyncio.sleep(0.05)
    state = gw.state
    gw.stop()
    await task
    print(json.dumps({{"state": state, "modules": sorted(sys.modules)}}))

asyncio.run(main())
"""


# The bounds below only catch a hang (a few seconds is usual, ~20 s at load average 20): they sit
# above each other, and below pytest's timeout, so that the innermost says what hung.
def test_an_mqtt_window_alert_gateway_loads_only_what_it_uses(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    code = SCRIPT.format(
        bench=str(ROOT / "scripts" / "bench"), port=mosquitto.port, data=str(tmp_path / "data"), dump=300
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=360, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["state"] == "running"
    loaded = set(result["modules"])
    for unused in (
        "argon2",
        "llama_cpp",
        "pymodbus",
        "serial",
        "serial_asyncio_fast",
        "firmware_bridges.codecs",
        "aiohttp",  # the console's web stack loads at its first connection
        "gateway.web",
        "difflib",  # the config's "did you mean" hints, only for a config with mistakes
        "gateway.llm.local",  # the LLM providers, only with an `llm:` provider
        "gateway.llm.remote",
    ):
        assert unused not in loaded, f"{unused} is imported by a gateway that does not use it"


def test_sluice_run_with_a_plain_config_reads_no_package_metadata(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """The real command, its imports listed by `python -X importtime`: importlib.metadata with
    zipfile and email (~1.5 MiB; the node registry's built-in table and no pydantic plug-in
    look-up, gateway.cli) stay out of a running gateway whose config needs none. (OpenSSL: its
    libraries are not mapped, tests/gateway/test_tls_lazy.py; importtime also lists the imports
    refused while asyncio and pydantic load.)"""
    import os
    import signal

    from tests._util import wait_for_sync
    from tests.gateway.test_tls_lazy import Alerts, config

    cfg = tmp_path / "plain.yaml"
    cfg.write_text(config(tmp_path, mosquitto.port))
    env = {k: v for k, v in os.environ.items() if k not in ("SLUICE_TLS", "PYDANTIC_DISABLE_PLUGINS")}
    alerts = Alerts(mosquitto.port)
    log = tmp_path / "run.log"
    try:
        with log.open("wb") as f:
            proc = subprocess.Popen(
                [sys.executable, "-X", "importtime", "-m", "gateway.cli", "run", str(cfg)],
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=f,
                # SIGABRT (below, for a stop that hangs) then prints each thread's stack into the log
                env={**env, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"},
            )
        try:
            wait_for_sync(lambda: len(alerts.got) == 20 or proc.poll() is not None, timeout=180)
            assert proc.poll() is None, log.read_text()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGABRT)
                proc.wait(timeout=60)
                raise AssertionError(f"`sluice run` did not stop on SIGTERM:\n{log.read_text()[-6000:]}") from None
    finally:
        alerts.close()
    imported = {line.rsplit("|", 1)[-1].strip() for line in log.read_text().splitlines() if "import time:" in line}
    assert "gateway.runtime" in imported and "asyncio" in imported and "pydantic" in imported
    for unused in ("importlib.metadata", "zipfile", "email", "tomllib"):
        assert unused not in imported, f"{unused} is imported by `sluice run` with a plain config"
