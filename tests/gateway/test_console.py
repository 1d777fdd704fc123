"""The console's HTTP side on a running gateway: /healthz, /metrics, /api/pipelines, /api/deadletters."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.config import ConsoleConfig, parse_config
from gateway.console import Console
from gateway.runtime import Gateway
from tests._util import wait_for
from tests.gateway._harness import NO_AUTH, get, node, running_gateway


def config(tmp_path: Path) -> str:
    return f"""\
gateway: {{id: gw-c, data_dir: "{tmp_path}/data", queue_size: 500}}
pipelines:
  - name: plant
    nodes:
      - {{id: sim, type: simulate, interval: 20ms, seed: 3, sensors: [{{key: t, base: 20.0}}, {{key: h, base: 50.0}}]}}
      - {{id: warm, type: filter, input: sim, where: "value > 30.0"}}
      - {{id: half, type: map, input: warm, value: "value / 2.0"}}
      - {{id: shown, type: log, input: [half, sim]}}
console: {{host: 127.0.0.1, port: 0{NO_AUTH}}}
"""


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


async def test_healthz(tmp_path: Path) -> None:
    async with running_gateway(config(tmp_path)) as gw:
        status, body = await get(gw, "/healthz")
        assert status == 200
        assert body["status"] == "ok" and body["state"] == "running" and body["problems"] == []
        assert body["gateway_id"] == "gw-c"
        assert body["pipelines"] == {"plant": "running"}
        assert body["connections"] == {}
        assert body["uptime"] >= 0 and body["dead_letters"] == 0
        assert isinstance(body["version"], str)


async def test_healthz_is_503_unless_running(tmp_path: Path) -> None:
    gw = Gateway(parse_config(config(tmp_path), env={}))
    console = Console(gw, ConsoleConfig(port=0))
    gw.console = console
    await console.start()
    try:
        status, body = await get(gw, "/healthz")
        assert status == 503 and body["status"] == "created"
    finally:
        await console.stop()


async def test_metrics(tmp_path: Path) -> None:
    async with running_gateway(config(tmp_path)) as gw:
        await wait_for(lambda: node(gw, "plant", "warm").n_in >= 20 and node(gw, "plant", "shown").n_out >= 20)
        status, text = await get(gw, "/metrics")
        assert status == 200
        m = samples(text)
        node_in = {(lb["pipeline"], lb["node"], lb["type"]): v for lb, v in m["sluice_node_in_total"]}
        assert set(node_in) == {
            ("plant", "sim", "simulate"),
            ("plant", "warm", "filter"),
            ("plant", "half", "map"),
            ("plant", "shown", "log"),
        }
        assert node_in[("plant", "warm", "filter")] >= 20
        assert node_in[("plant", "shown", "log")] >= 20
        dropped = {lb["node"]: v for lb, v in m["sluice_node_dropped_total"]}
        assert dropped["warm"] > 0  # the t sensor (~20) is filtered out
        assert {lb["node"] for lb, _ in m["sluice_node_out_total"]} == {"sim", "warm", "half", "shown"}
        assert {lb["node"] for lb, _ in m["sluice_node_errors_total"]} == {"sim", "warm", "half", "shown"}
        depth = {(lb["pipeline"], lb["queue"]): v for lb, v in m["sluice_queue_depth"]}
        assert set(depth) == {("plant", "input"), ("plant", "shown")}
        assert all(0 <= v <= 500 + 2 for v in depth.values())
        cap = {lb["queue"]: v for lb, v in m["sluice_queue_capacity"]}
        assert cap == {"input": 500.0, "shown": 10_000.0}
        rss = m["sluice_process_resident_memory_bytes"][0][1]
        assert 10 * 2**20 < rss < 2**32
        assert m["sluice_uptime_seconds"][0][1] >= 0
        # counters only go up between scrapes
        await wait_for(lambda: node(gw, "plant", "shown").n_in > node_in[("plant", "shown", "log")])
        _, text2 = await get(gw, "/metrics")
        later = {lb["node"]: v for lb, v in samples(text2)["sluice_node_in_total"]}
        assert later["shown"] > node_in[("plant", "shown", "log")]


async def test_api_pipelines_shape(tmp_path: Path) -> None:
    async with running_gateway(config(tmp_path)) as gw:
        await wait_for(lambda: node(gw, "plant", "shown").n_out >= 4)
        status, body = await get(gw, "/api/pipelines")
    assert status == 200
    assert body["gateway_id"] == "gw-c" and body["state"] == "running"
    (pipe,) = body["pipelines"]
    assert pipe["name"] == "plant" and pipe["state"] == "running" and pipe["started_at"] > 0
    nodes = {n["id"]: n for n in pipe["nodes"]}
    assert list(nodes) == ["sim", "warm", "half", "shown"]  # topological order
    for n in nodes.values():
        assert set(n) >= {"id", "type", "kind", "inputs", "counters", "queue"}
        assert set(n["counters"]) >= {"in", "out", "errors", "dropped"}
    assert nodes["sim"]["kind"] == "source" and nodes["sim"]["state"] == "running"
    assert nodes["sim"]["health"] == {"state": "running", "rounds": nodes["sim"]["health"]["rounds"]}
    assert nodes["warm"] | {"counters": None} == {
        "id": "warm",
        "type": "filter",
        "kind": "operator",
        "inputs": ["sim"],
        "counters": None,
        "queue": None,
    }
    assert nodes["shown"]["kind"] == "sink" and nodes["shown"]["inputs"] == ["half", "sim"]
    assert set(nodes["shown"]["queue"]) == {"depth", "capacity", "high_water", "waiting_producers"}
    assert nodes["sim"]["queue"]["capacity"] == 500
    assert nodes["shown"]["counters"]["in"] >= 4


async def test_api_deadletters(tmp_path: Path) -> None:
    async with running_gateway(config(tmp_path)) as gw:
        gw.dead_letters.record("plant", "warm", "something odd", None, b"raw bytes")
        status, body = await get(gw, "/api/deadletters?limit=5")
        assert status == 200 and body["total"] == 1
        assert body["recent"][0]["reason"] == "something odd" and body["recent"][0]["payload"] == "raw bytes"
        status, text = await get(gw, "/api/deadletters?limit=lots")
        assert status == 400 and "limit must be an integer" in text
