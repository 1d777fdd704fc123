"""MQTT end to end against a real Mosquitto: readings in, alerts out, bad input, outages, sessions."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from gateway import node as node_mod
from gateway.config import parse_config
from gateway.engine import _STOP, _SinkMark
from gateway.events import Event
from gateway.node import NodeOptions, Sink, register
from gateway.runtime import Gateway
from tests._util import MosquittoBroker, MqttTestClient, free_port, mqtt_client, wait_for
from tests.gateway._harness import NO_AUTH, get, node, running_gateway

ALERTS = "sluice/gw1/alerts/boiler"
STATUS = "sluice/gw1/status"


def config(tmp_path: Path, port: int, *, qos: int = 0, source: str | None = None) -> str:
    src = source or f'{{id: temp, type: mqtt, connection: plant, topic: "sensors/+/temp", key: "topic[1]", qos: {qos}}}'
    return f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data"}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {port}, reconnect_max: 1s}}
pipelines:
  - name: boiler
    nodes:
      - {src}
      - {{id: plausible, type: filter, input: temp, where: "value > -40.0 && value < 200.0"}}
      - {{id: fahrenheit, type: map, input: plausible, value: "value * 1.8 + 32.0"}}
      - {{id: hot, type: threshold, input: fahrenheit, above: 194.0, clear_below: 185.0, severity: critical}}
      - {{id: out, type: mqtt_out, input: hot, connection: plant}}
console: {{port: 0{NO_AUTH}}}
"""


def reading(value: Any, **extra: Any) -> str:
    return json.dumps({"value": value, **extra})


def alerts(client: MqttTestClient) -> list[dict[str, Any]]:
    return [json.loads(p) for p in client.payloads(ALERTS)]


async def until_subscribed(
    gw: Gateway,
    pub: MqttTestClient,
    topic: str = "sensors/probe/temp",
    source: str = "temp",
    payload: str | None = None,
) -> None:
    """Publish a harmless reading until the source has it: its subscription is then in place."""
    src = node(gw, "boiler", source)
    start = src.n_in

    def arrived() -> bool:
        if src.n_in > start:
            return True
        pub.publish(topic, payload or reading(20.0), qos=0)
        return False

    await wait_for(arrived, timeout=15, interval=0.1)


async def test_readings_in_alerts_out(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    with mqtt_client(mosquitto, subscribe=["sluice/gw1/#"]) as sub, mqtt_client(mosquitto) as pub:
        async with running_gateway(config(tmp_path, mosquitto.port)) as gw:
            await wait_for(lambda: [m for m in sub.received(STATUS) if b'"online"' in m.payload])
            await until_subscribed(gw, pub)
            for v in (50.0, 91.0, 92.0, 80.0):  # 91 °C = 195.8 °F raises, 80 °C = 176 °F clears
                pub.publish("sensors/s1/temp", reading(v))
            pub.publish("sensors/s2/temp", reading(95))  # ints are readings too
            await wait_for(lambda: len(alerts(sub)) >= 3)
            status, health = await get(gw, "/healthz")
            assert status == 200 and health["status"] == "ok", health

        got = alerts(sub)
        assert len(got) == 3
        by_key: dict[str, list[dict[str, Any]]] = {}
        for a in got:
            by_key.setdefault(a["key"], []).append(a)
        assert [a["value"]["state"] for a in by_key["s1"]] == ["raised", "cleared"]
        assert [a["value"]["state"] for a in by_key["s2"]] == ["raised"]
        raised = by_key["s1"][0]
        assert raised["gateway_id"] == "gw1" and raised["replayed"] is False and raised["pipeline"] == "boiler"
        assert raised["source"] == "hot"
        assert raised["value"]["reading"] == 91.0 * 1.8 + 32.0
        assert raised["value"]["severity"] == "critical"
        assert raised["value"]["alert_key"] == "boiler/hot/s1"
        assert raised["value"]["rule"] == "s1 above 194 (clears below 185)"
        assert by_key["s1"][1]["value"]["reading"] == 176.0
        seqs = [a["seq"] for a in got]
        assert seqs == sorted(seqs) and len(set(seqs)) == 3

        # the gateway said goodbye: the retained status is now offline
        states = [json.loads(m.payload)["state"] for m in sub.received(STATUS)]
        await wait_for(lambda: json.loads(sub.received(STATUS)[-1].payload)["state"] == "offline")
        assert states[0] == "online"
        # every link said goodbye with a DISCONNECT (a socket left open would only close at exit)
        await wait_for(
            lambda: (
                "Client gw1-boiler-temp disconnected." in mosquitto.log_text()
                and "Client gw1-pub disconnected." in mosquitto.log_text()
            )
        )
    with mqtt_client(mosquitto, subscribe=STATUS) as late:
        retained = await wait_for(lambda: late.received(STATUS))
        assert retained[0].retain and json.loads(retained[0].payload)["state"] == "offline"
        assert json.loads(retained[0].payload)["gateway_id"] == "gw1"

    # seq survives a restart: the next gateway run continues above the last number
    with mqtt_client(mosquitto, subscribe=ALERTS) as sub2, mqtt_client(mosquitto) as pub:
        async with running_gateway(config(tmp_path, mosquitto.port)) as gw:
            await until_subscribed(gw, pub)
            pub.publish("sensors/s3/temp", reading(99.0))
            await wait_for(lambda: [a for a in alerts(sub2) if a["key"] == "s3"])
        got2 = alerts(sub2)
        (new,) = [a for a in got2 if a["key"] == "s3"]
        assert new["seq"] > max(seqs) and new["replayed"] is False
        # anything else is an earlier alert the outbox could not see acknowledged before the stop:
        # sent again, marked as a replay, with its original seq (consumers de-duplicate on it)
        assert all(a["replayed"] is True and a["seq"] in seqs for a in got2 if a["key"] != "s3"), got2


async def test_topic_filters_and_keys(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    text = f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data"}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {mosquitto.port}}}
pipelines:
  - name: boiler
    nodes:
      - {{id: temp, type: mqtt, connection: plant, topics: ["a/+/temp", "b/#"], key: "topic[-1]"}}
      - {{id: named, type: mqtt, connection: plant, topic: "c/+", key: 'payload.sensor + "@" + topic[1]',
          value_field: reading, ts_field: when}}
      - {{id: out, type: mqtt_out, input: [temp, named], connection: plant, topic: "fwd/{{key}}"}}
console: {{enabled: false}}
"""
    with mqtt_client(mosquitto, subscribe="fwd/#") as sub, mqtt_client(mosquitto) as pub:
        async with running_gateway(text) as gw:
            await until_subscribed(gw, pub, "a/x/temp")
            await until_subscribed(gw, pub, "c/probe", "named", json.dumps({"sensor": "p", "reading": 1}))
            pub.publish("a/1/temp", reading(1.0))
            pub.publish("a/1/2/temp", reading(2.0))  # + is one level: not matched
            pub.publish("b/x/y/z", reading(3.0, ts=1_700_000_000_000))  # epoch ms
            pub.publish("b", reading(4.0))  # b/# matches the parent level too
            pub.publish("c/7", json.dumps({"sensor": "boiler", "reading": {"t": 5}, "when": "2024-01-02T03:04:05Z"}))

            def forwarded() -> dict[str, Any]:
                """What came out, less the probes (a slow broker can forward a probe twice, and late)."""
                out = {}
                for m in sub.messages:
                    body = json.loads(m.payload)
                    if m.topic != "fwd/p@probe" and not (m.topic == "fwd/temp" and body["value"] == 20.0):
                        out[m.topic] = body
                return out

            await wait_for(lambda: len(forwarded()) >= 4)
            await wait_for(lambda: node(gw, "boiler", "out").n_out >= 6)
        got = forwarded()
        assert set(got) == {"fwd/temp", "fwd/z", "fwd/b", "fwd/boiler@7"}
        assert got["fwd/temp"]["value"] == 1.0
        assert got["fwd/z"]["value"] == 3.0 and got["fwd/z"]["ts"] == 1_700_000_000.0
        assert got["fwd/b"]["value"] == 4.0
        assert got["fwd/boiler@7"]["value"] == {"t": 5.0}
        assert got["fwd/boiler@7"]["ts"] == 1704164645.0
        assert got["fwd/boiler@7"]["source"] == "named"


async def test_malformed_payloads_are_dead_lettered(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    with mqtt_client(mosquitto, subscribe=ALERTS) as sub, mqtt_client(mosquitto) as pub:
        async with running_gateway(config(tmp_path, mosquitto.port)) as gw:
            await until_subscribed(gw, pub)
            bad = {
                "sensors/nojson/temp": b"{not json",
                "sensors/nofield/temp": json.dumps({"temperature": 99.0}).encode(),
                "sensors/string/temp": reading("hot").encode(),
                "sensors/badts/temp": reading(99.0, ts="yesterday").encode(),
                "sensors/naive/temp": reading(99.0, ts="2024-01-02T03:04:05").encode(),
                "sensors/list/temp": reading([1, 2]).encode(),
                "sensors/binary/temp": b"\xff\xfe\x00",
            }
            for topic, payload in bad.items():
                pub.publish(topic, payload)
            pub.publish("sensors/good/temp", reading(99.0))  # still flows after all that
            await wait_for(lambda: alerts(sub))
            src = node(gw, "boiler", "temp")
            await wait_for(lambda: src.counters()["malformed"] == len(bad))
            assert src.counters()["errors"] == len(bad)
            rows = await wait_for(lambda: len(gw.dead_letters.read()) == len(bad) and gw.dead_letters.read())
            status, api = await get(gw, "/api/deadletters")
            assert status == 200 and api["total"] == len(bad)
            status, metrics = await get(gw, "/metrics")
            assert 'sluice_node_malformed_total{node="temp",pipeline="boiler",type="mqtt"} 7.0' in metrics
            assert 'sluice_dead_letters_total{node="temp",pipeline="boiler"} 7.0' in metrics
            status, health = await get(gw, "/healthz")
            assert status == 200 and health["status"] == "ok" and health["dead_letters"] == len(bad)
        assert [a["key"] for a in alerts(sub)] == ["good"]

    reasons = {r["reason"].split(":")[0]: r for r in rows}
    assert all(r["node"] == "temp" and r["pipeline"] == "boiler" for r in rows)
    by_topic = {r["reason"].split(": ", 1)[0].removeprefix("malformed payload on "): r for r in rows}
    assert set(by_topic) == set(bad), reasons
    assert by_topic["sensors/nojson/temp"]["reason"] == (
        "malformed payload on sensors/nojson/temp: not JSON (Expecting property name enclosed in double quotes "
        "at char 1)"
    )
    assert by_topic["sensors/nojson/temp"]["payload"] == "{not json"
    assert by_topic["sensors/nofield/temp"]["reason"].endswith("payload has no field 'value'")
    assert by_topic["sensors/string/temp"]["reason"].endswith("reading 'hot' is not a number or an object")
    assert by_topic["sensors/badts/temp"]["reason"].endswith(
        "timestamp 'yesterday' is neither epoch seconds/ms nor ISO 8601"
    )
    assert by_topic["sensors/naive/temp"]["reason"].endswith("has no time zone; add Z or +00:00")
    assert by_topic["sensors/list/temp"]["reason"].endswith("reading [1, 2] is not a number or an object")
    assert by_topic["sensors/binary/temp"]["payload"] == "\\xff\\xfe\x00"
    recent = {r["reason"] for r in api["recent"]}
    assert recent == {r["reason"] for r in rows}


async def test_broker_down_at_start_then_up(tmp_path: Path, mosquitto_factory: Any) -> None:
    port = free_port()
    async with running_gateway(config(tmp_path, port)) as gw:
        link = gw.links.publishers["plant"]
        await wait_for(lambda: link.last_error, timeout=10)  # the first attempt failed
        status, health = await get(gw, "/healthz")
        assert status == 200 and health["status"] == "degraded"
        assert health["problems"] == ["connection plant: disconnected (connection refused (is the broker running?))"]
        assert health["connections"]["plant"]["state"] == "disconnected"
        assert gw.pipelines["boiler"].state == "running"

        broker = mosquitto_factory(port=port)
        with mqtt_client(broker, subscribe=ALERTS) as sub, mqtt_client(broker) as pub:
            await until_subscribed(gw, pub)
            pub.publish("sensors/s1/temp", reading(99.0))
            await wait_for(lambda: alerts(sub), timeout=15)
            _, health = await get(gw, "/healthz")
            assert health["status"] == "ok" and health["problems"] == []


async def test_broker_killed_and_restarted(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    with mqtt_client(mosquitto, subscribe=ALERTS) as sub, mqtt_client(mosquitto) as pub:
        async with running_gateway(config(tmp_path, mosquitto.port)) as gw:
            await until_subscribed(gw, pub)
            pub.publish("sensors/s1/temp", reading(99.0))
            await wait_for(lambda: len(alerts(sub)) == 1)

            link = gw.links.publishers["plant"]
            src_link = node(gw, "boiler", "temp")._link
            mosquitto.kill()
            await wait_for(lambda: not link.connected and not src_link.connected, timeout=15)
            status, health = await get(gw, "/healthz")
            assert status == 200 and health["status"] == "degraded"
            # the loss itself, or (once the first reconnect failed) why the broker cannot be reached
            plant = [p for p in health["problems"] if p.startswith("connection plant:")]
            assert plant in (
                ["connection plant: disconnected (connection lost)"],
                ["connection plant: disconnected (connection refused (is the broker running?))"],
            ), health["problems"]
            mosquitto.start()
            await wait_for(lambda: link.connected and src_link.connected, timeout=15)
            sub.wait_connected()
            pub.wait_connected()
            assert link.connects == 2
            await until_subscribed(gw, pub)
            pub.publish("sensors/s2/temp", reading(99.0))
            await wait_for(lambda: len(alerts(sub)) == 2, timeout=15)
            assert [a["key"] for a in alerts(sub)] == ["s1", "s2"]
            status, health = await get(gw, "/healthz")
            assert status == 200 and health["status"] == "ok"


async def test_qos1_session_keeps_messages_while_stopped(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    text = config(tmp_path, mosquitto.port, qos=1)
    with mqtt_client(mosquitto, subscribe=ALERTS) as sub, mqtt_client(mosquitto) as pub:
        async with running_gateway(text) as gw:
            await until_subscribed(gw, pub)
            pub.publish("sensors/s1/temp", reading(99.0))
            await wait_for(lambda: len(alerts(sub)) == 1)
        # the gateway is away; the broker keeps its session and queues these
        for i in range(20):
            pub.publish(f"sensors/k{i}/temp", reading(99.0), qos=1)
        async with running_gateway(text) as gw:
            await wait_for(lambda: len(alerts(sub)) == 21, timeout=15)
            assert node(gw, "boiler", "temp").n_in >= 20
        assert sorted(a["key"] for a in alerts(sub)[1:]) == sorted(f"k{i}" for i in range(20))


class _GateOptions(NodeOptions):
    type: Literal["t_mqtt_gate"]


class _Gate(Sink):
    """Finishes its first `allow` writes, then is stuck until `gate` opens; records what it got and finished."""

    Options = _GateOptions
    gate: asyncio.Event
    allow: int
    seen: list[Event]
    finished: list[Event]

    async def write(self, batch: list[Event]) -> None:
        self.seen.extend(batch)
        if all(ev.key == "probe" for ev in batch):
            pass  # until_subscribed's readings always go through
        elif type(self).allow > 0:
            type(self).allow -= 1
        else:
            await self.gate.wait()
        self.finished.extend(batch)


@pytest.fixture
def gate_sink() -> Iterator[type[_Gate]]:
    _Gate.gate = asyncio.Event()
    _Gate.allow = 0
    _Gate.seen = []
    _Gate.finished = []
    register(_Gate)
    yield _Gate
    node_mod._REGISTRY.pop("t_mqtt_gate", None)


def gated_config(tmp_path: Path, port: int) -> str:
    return f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data", queue_size: 10, sink_queue_size: 10}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {port}, reconnect_max: 1s}}
pipelines:
  - name: boiler
    nodes:
      - {{id: temp, type: mqtt, connection: plant, topic: "sensors/+/temp", key: "topic[1]", qos: 1}}
      - {{id: out, type: t_mqtt_gate, input: temp}}
console: {{enabled: false}}
"""


async def test_qos1_pauses_reading_and_acks_only_written_messages(
    tmp_path: Path, mosquitto: MosquittoBroker, gate_sink: type[_Gate]
) -> None:
    text = gated_config(tmp_path, mosquitto.port)
    n = 4000  # ~170 kB of PUBLISH packets: more than the client reads from its socket at once (64 kB)
    with mqtt_client(mosquitto) as pub:
        gw = Gateway(parse_config(text, env={}))
        task = asyncio.create_task(gw.run(install_signals=False))
        try:
            await wait_for(lambda: gw.state == "running")
            src = node(gw, "boiler", "temp")
            await until_subscribed(gw, pub, "sensors/probe/temp", payload=reading(0.0))
            gate_sink.allow = 5  # the sink finishes five writes (batches of readings), then gets stuck
            # publish without blocking the loop (paho sends from its own thread)
            infos = [pub.paho.publish(f"sensors/k{i}/temp", reading(float(i)), qos=1) for i in range(n)]
            await wait_for(lambda: all(i.is_published() for i in infos), timeout=30)
            # the sink is stuck: the queues fill, and the source stops reading the socket
            await wait_for(lambda: not src._link.reading, timeout=10)
            p = gw.pipelines["boiler"]
            read_when_paused = src.n_in
            assert 0 < node(gw, "boiler", "out").n_in < read_when_paused < n
        finally:
            task.cancel()  # a crash: no drain; what is unacknowledged stays with the broker
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert src.n_in == read_when_paused  # it stayed paused
        written = {ev.key for ev in gate_sink.finished if ev.key != "probe"}
        assert written and len(written) < read_when_paused  # five batches, read in order
        assert written == {f"k{i}" for i in range(len(written))}
        # release the handlers still waiting on the dead pipeline (their connection is closed)
        for item, _ in p.queue._items:
            if item is not _STOP and item.done is not None:
                item.done()
        for item, _ in p.sink_queues[p.index["out"]]._items:
            if type(item) is _SinkMark:
                item.on_passed()

        gate_sink.seen = []
        gate_sink.gate.set()
        want = {f"k{i}" for i in range(n)}
        async with running_gateway(text) as gw2:
            await wait_for(lambda: written | {ev.key for ev in gate_sink.seen} >= want, timeout=30)
            assert node(gw2, "boiler", "temp")._link.reading
        # what the sink had written was acknowledged and did not come back; everything else did,
        # including what had passed the chain but was still waiting in the sink's queue
        assert not written & {ev.key for ev in gate_sink.seen}
        assert node(gw2, "boiler", "out").n_in == len(gate_sink.seen)


class _SlowOptions(NodeOptions):
    type: Literal["t_mqtt_slow"]


class _Slow(Sink):
    """A sink slower than the broker: a short pause per batch."""

    Options = _SlowOptions
    keys: list[str]

    async def write(self, batch: list[Event]) -> None:
        await asyncio.sleep(0.002)
        self.keys.extend(ev.key for ev in batch)


async def test_qos0_flood_pauses_the_socket_and_loses_nothing(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    _Slow.keys = []
    register(_Slow)
    try:
        text = gated_config(tmp_path, mosquitto.port).replace("qos: 1", "qos: 0").replace("t_mqtt_gate", "t_mqtt_slow")
        gw = Gateway(parse_config(text, env={}))
    finally:
        node_mod._REGISTRY.pop("t_mqtt_slow", None)
    n = 20_000
    task = asyncio.create_task(gw.run(install_signals=False))
    try:
        with mqtt_client(mosquitto) as pub:
            await wait_for(lambda: gw.state == "running")
            src = node(gw, "boiler", "temp")
            await until_subscribed(gw, pub, "sensors/probe/temp", payload=reading(0.0))
            paused = []
            infos = [pub.paho.publish(f"sensors/k{i}/temp", reading(float(i)), qos=0) for i in range(n)]

            def all_in() -> bool:
                if src._link is not None and not src._link.reading:
                    paused.append(True)
                return len(_Slow.keys) >= n + 1

            await wait_for(all_in, timeout=60, interval=0.002)
            assert all(i.is_published() for i in infos)
        assert paused, "the source never paused although the sink was slower"
        assert [k for k in _Slow.keys if k != "probe"] == [f"k{i}" for i in range(n)]  # all, in order
        assert src.counters()["malformed"] == 0
        # the input queue held at most its capacity plus what one socket read brought in
        # (64 kB of ~32-40 byte PUBLISH packets), far from the 20k that were sent
        assert gw.pipelines["boiler"].queue.high_water <= 10 + 65536 // 30
    finally:
        gw.stop()
        await asyncio.wait_for(task, 20)


class _ThrottledOptions(NodeOptions):
    type: Literal["t_mqtt_throttled"]


class _Throttled(Sink):
    """Stuck until `gate` opens, then slower than the broker (a short sleep per batch)."""

    Options = _ThrottledOptions
    gate: asyncio.Event
    keys: list[str]

    async def write(self, batch: list[Event]) -> None:
        await self.gate.wait()
        await asyncio.sleep(0.002)
        self.keys.extend(ev.key for ev in batch)


def _source_samples(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        s.name: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name.startswith("sluice_source_") and s.labels == {"pipeline": "boiler", "node": "temp"}
    }


async def _source_entry(gw: Gateway) -> dict[str, Any]:
    _status, body = await get(gw, "/api/pipelines")
    (entry,) = [n for p in body["pipelines"] for n in p["nodes"] if n["id"] == "temp"]
    return entry  # type: ignore[no-any-return]


async def test_qos1_burst_behind_a_slow_sink_pauses_resumes_and_loses_nothing(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """End to end: a burst far larger than the pipeline's queue into a QoS 1 source whose sink is
    slow. The engine pauses the source's socket (the broker keeps the rest), /metrics and
    /api/pipelines say so, reading resumes once the sink catches up, and every message arrives."""
    _Throttled.gate, _Throttled.keys = asyncio.Event(), []
    register(_Throttled)
    try:
        text = gated_config(tmp_path, mosquitto.port).replace("t_mqtt_gate", "t_mqtt_throttled")
        text = text.replace("queue_size: 10, sink_queue_size: 10", "queue_size: 50, sink_queue_size: 10")
        text = text.replace("console: {enabled: false}", f"console: {{port: 0{NO_AUTH}}}")
        n = 3000
        with mqtt_client(mosquitto) as pub:
            async with running_gateway(text) as gw:
                src = node(gw, "boiler", "temp")
                await until_subscribed(gw, pub, "sensors/probe/temp", payload=reading(0.0))
                infos = [pub.paho.publish(f"sensors/k{i}/temp", reading(float(i)), qos=1) for i in range(n)]
                await wait_for(lambda: all(i.is_published() for i in infos), timeout=30)
                # the sink holds everything: the queues fill and the engine pauses the socket
                await wait_for(lambda: src.paused, timeout=15)
                _status, metrics = await get(gw, "/metrics")
                m = _source_samples(metrics)
                assert m["sluice_source_paused"] == 1 and m["sluice_source_pauses_total"] >= 1, m
                entry = await _source_entry(gw)
                assert entry["health"]["reading"] is False and entry["counters"]["pauses"] >= 1
                assert src.n_in < n  # the broker keeps what the paused socket did not read

                _Throttled.gate.set()
                want = {f"k{i}" for i in range(n)}
                await wait_for(lambda: want <= set(_Throttled.keys), timeout=60)
                _status, metrics = await get(gw, "/metrics")
                m = _source_samples(metrics)
                assert m["sluice_source_paused"] == 0 and m["sluice_source_pauses_total"] >= 1, m
                entry = await _source_entry(gw)
                assert entry["health"]["reading"] is True
                assert entry["counters"]["pauses"] == m["sluice_source_pauses_total"]
        got = [k for k in _Throttled.keys if k != "probe"]
        assert sorted(got) == sorted(want)  # each exactly once: nothing lost, nothing twice
    finally:
        node_mod._REGISTRY.pop("t_mqtt_throttled", None)
