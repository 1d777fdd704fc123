"""The demo (config/demo.yaml) keeps every detector's alerts in the alert book, so the console's
Alerts page lists the alerts of both its pipelines: a static check of the file, and the
plant_room pipeline's Modbus path run as the demo wires it, against a real pymodbus server."""

from __future__ import annotations

from pathlib import Path

import yaml

from firmware_bridges.modbus import load_profile
from firmware_bridges.simulators import ModbusSimulator
from tests._util import free_port, wait_for
from tests.gateway._harness import NO_AUTH, get, running_gateway

ROOT = Path(__file__).resolve().parents[2]


def _demo() -> dict:
    return yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())


def _inputs(n: dict) -> list[str]:
    ins = n.get("input", [])
    return ins if isinstance(ins, list) else [ins]


def test_every_demo_detector_feeds_an_alert_node() -> None:
    from gateway.node import get_node_type

    for p in _demo()["pipelines"]:
        booked = {i for n in p["nodes"] if n["type"] == "alert" for i in _inputs(n)}
        # the detectors: the node types the detectors module registers
        detectors = {n["id"] for n in p["nodes"] if get_node_type(n["type"]).__module__ == "nodes.detectors"}
        assert detectors, p["name"]
        assert detectors <= booked, (p["name"], detectors - booked)


async def test_the_demo_plant_room_power_alert_reaches_the_alert_book(tmp_path: Path) -> None:
    room = next(p for p in _demo()["pipelines"] if p["name"] == "plant_room")
    by_id = {n["id"]: n for n in room["nodes"]}
    keep = [by_id[i] for i in ("meters", "power", "overload", "field_alert_book")]
    assert [n["type"] for n in keep] == ["modbus", "filter", "threshold", "alert"]
    sim = ModbusSimulator({1: load_profile("sdm120"), 2: load_profile("xy-md02")}, seed=1)
    sim.set(1, "active_power", 1800.0)  # above the demo's 1700 W
    await sim.start_tcp(port=free_port())
    try:
        meters = {**by_id["meters"], "port": sim.port}
        keep[0] = meters
        nodes = "\n".join(f"      - {yaml.safe_dump(n, default_flow_style=True, width=10_000).strip()}" for n in keep)
        text = f"""\
gateway: {{id: demo, data_dir: "{tmp_path}/data"}}
pipelines:
  - name: plant_room
    nodes:
{nodes}
console: {{port: 0{NO_AUTH}}}
"""
        async with running_gateway(text) as gw:
            await wait_for(lambda: gw.alerts is not None and gw.alerts.book.counts["opened"] >= 1, timeout=20)
            status, listed = await get(gw, "/api/alerts?pipeline=plant_room")
    finally:
        await sim.stop()
    assert status == 200 and len(listed["alerts"]) == 1, listed
    alert = listed["alerts"][0]
    assert alert["pipeline"] == "plant_room" and alert["state"] == "open", alert
    assert alert["severity"] == "warning" and alert["rule"].startswith("pump circuit power (W)"), alert
    assert alert["key"] == "main.active_power", alert
