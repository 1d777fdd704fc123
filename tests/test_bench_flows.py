"""The ingest benchmark's realistic flow, run for real: Mosquitto in, `window` -> `threshold` ->
`mqtt_out`, and the alerts that come back equal the benchmark's own oracle (per state)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

from tests._util import MosquittoBroker, mqtt_client, wait_for
from tests.gateway._harness import node, running_gateway

ROOT = Path(__file__).resolve().parents[1]


def bench_module() -> ModuleType:
    bench_dir = str(ROOT / "scripts" / "bench")
    if bench_dir not in sys.path:  # as when it runs as a script: its helpers come from _common
        sys.path.insert(0, bench_dir)
    spec = importlib.util.spec_from_file_location("bench_mqtt_ingest", ROOT / "scripts" / "bench" / "mqtt_ingest.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_oracles_agree_on_the_default_sizes() -> None:
    """The Node-RED function closes a key's window on that key's next reading, Sluice on the
    watermark: on the benchmark's sizes both must publish the same alerts."""
    m = bench_module()
    for n in (20_000, 200_000):
        raised, cleared, nodered = m.expected_for("realistic", n, 100)
        assert nodered is None
        assert raised > 0 and cleared > 0
    raised, cleared, _ = m.expected_for("realistic", 200_000, 100)
    assert 30_000 < raised + cleared < 40_000  # the alert volume the flow is meant to have


async def test_realistic_flow_alerts_equal_the_oracle(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    m = bench_module()
    n, keys = 4_000, 20
    base = m.realistic_base(n, keys)
    readings = m.gen_realistic(n, keys, base)
    raised, cleared = m.expected_realistic(readings)
    assert raised > 50 and cleared > 50
    text = m.sluice_config("realistic", mosquitto.port, tmp_path / "data", qos=1)
    with mqtt_client(mosquitto, subscribe=[m.ALERT_TOPIC]) as sub, mqtt_client(mosquitto) as pub:
        async with running_gateway(text) as gw:
            src = node(gw, "bench", "temp")

            def subscribed() -> bool:
                if src.n_in:
                    return True
                # before the first reading, so the window's watermark stays behind them
                pub.publish(m.PROBE_TOPIC, json.dumps({"ts": base - 20.0, "value": 20.0}), qos=0)
                return False

            await wait_for(subscribed, timeout=15, interval=0.1)
            probes = src.n_in
            for k, ts, v in readings:
                pub.publish(f"bench/{m.key_name(k)}/temp", b'{"ts": %.3f, "value": %r}' % (ts, v))
            await wait_for(lambda: src.n_in >= probes + n, timeout=60)
            await wait_for(lambda: len(sub.payloads(m.ALERT_TOPIC)) >= raised + cleared, timeout=60)
            window = node(gw, "bench", "mean")
            assert window.n_late == 0
        states = [json.loads(p)["value"]["state"] for p in sub.payloads(m.ALERT_TOPIC)]
    assert states.count("raised") == raised
    assert states.count("cleared") == cleared
