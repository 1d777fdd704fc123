"""The demo (config/demo.yaml) keeps a history of its readings, so the console's Charts page has
something to show from the first minute: its history nodes, run as the demo wires them."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests._util import wait_for
from tests.gateway._harness import NO_AUTH, get, running_gateway

ROOT = Path(__file__).resolve().parents[2]


def _demo() -> dict:
    return yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())


def test_every_demo_pipeline_stores_its_readings() -> None:
    for p in _demo()["pipelines"]:
        nodes = {n["id"]: n for n in p["nodes"]}
        sources = {n["id"] for n in p["nodes"] if "input" not in n}
        fed = set()
        for n in p["nodes"]:
            if n["type"] == "history":
                ins = n["input"] if isinstance(n["input"], list) else [n["input"]]
                for i in ins:  # follow filters back to their source
                    while "input" in nodes[i]:
                        i = nodes[i]["input"]
                    fed.add(i)
        assert fed == sources, (p["name"], fed, sources)


async def test_the_demo_boiler_readings_reach_the_history(tmp_path: Path) -> None:
    boiler = next(p for p in _demo()["pipelines"] if p["name"] == "boiler")
    keep = [n for n in boiler["nodes"] if n["id"] in ("sensors", "plausible", "history")]
    assert [n["type"] for n in keep] == ["simulate", "filter", "history"]
    for n in keep:
        if n["id"] == "sensors":
            n["interval"] = "100ms"
    nodes = "\n".join(f"      - {yaml.safe_dump(n, default_flow_style=True, width=10_000).strip()}" for n in keep)
    text = f"""\
gateway: {{id: demo, data_dir: "{tmp_path}/data"}}
pipelines:
  - name: boiler
    nodes:
{nodes}
console: {{port: 0{NO_AUTH}}}
"""
    async with running_gateway(text) as gw:
        # the console's Charts page asks for exactly this: the last hour of a key
        await wait_for(lambda: gw.history.query("boiler/temp", 0.0, 1e12, 100)["points"], timeout=20)
        status, temp = await get(gw, "/api/history?key=boiler/temp")
        _, pump = await get(gw, "/api/history?key=pump/vibration")
    assert status == 200 and temp["points"], temp
    assert pump["points"], pump
