"""Alert lifecycle: the book (SQLite), the alert sink end to end with Mosquitto, the console API and
acknowledgement over the MQTT command topic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.alerts import AlertBook, AlertError
from gateway.runtime import Gateway
from tests._util import MosquittoBroker, MqttTestClient, mqtt_client, wait_for
from tests.gateway._harness import get, node, running_gateway


def raised(key: str = "p/hot/s1", reading: float = 95.0, severity: str = "critical") -> dict[str, Any]:
    return {
        "pipeline": "p",
        "node": "sink",
        "key": key.rsplit("/", 1)[-1],
        "ts": 1.0,
        "value": {"state": "raised", "alert_key": key, "severity": severity, "reading": reading, "rule": "s1 above 90"},
    }


def cleared(key: str = "p/hot/s1", reading: float = 80.0) -> dict[str, Any]:
    it = raised(key, reading)
    it["value"]["state"] = "cleared"
    return it


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_book_dedupes_by_key_and_resolves(tmp_path: Path) -> None:
    book = AlertBook(tmp_path / "alerts.db")
    await book.open()
    try:
        steps = await book.apply([raised(), raised(reading=97), raised(reading=99), raised("p/hot/s2")])
        assert [a for a, _ in steps] == ["opened", "updated", "updated", "opened"]
        first = steps[0][1]
        assert steps[2][1]["id"] == first["id"] and steps[2][1]["count"] == 3 and steps[2][1]["reading"] == 99
        steps = await book.apply([cleared()])
        assert steps[0][0] == "resolved" and steps[0][1]["resolved_by"] == "auto"
        assert await book.apply([cleared()]) == []  # nothing open: a stray clear changes nothing
        steps = await book.apply([raised()])
        assert steps[0][0] == "opened" and steps[0][1]["id"] != first["id"]  # no cooldown: a new alert
        assert [a["state"] for a in await book.list(key="p/hot/s1")] == ["open", "resolved"]
        assert len(await book.list(state="open")) == 2
        assert await book.list(severity="info") == []
    finally:
        await book.close()


async def test_book_ack_resolve_and_errors_persist(tmp_path: Path) -> None:
    book = AlertBook(tmp_path / "alerts.db")
    await book.open()
    ((_, alert),) = await book.apply([raised()])
    a = await book.ack(alert["id"], by="ann", note="on it")
    assert (a["state"], a["acked_by"], a["note"]) == ("acknowledged", "ann", "on it")
    with pytest.raises(AlertError, match="already acknowledged by ann") as err:
        await book.ack(alert["id"])
    assert err.value.status == 409
    ((action, upd),) = await book.apply([raised(reading=120)])
    assert action == "updated" and upd["state"] == "acknowledged" and upd["count"] == 2  # stays acknowledged
    await book.close()

    book = AlertBook(tmp_path / "alerts.db")  # what was decided survives a restart
    await book.open()
    try:
        r = await book.resolve(alert_key="p/hot/s1", by="bob")
        assert (r["state"], r["resolved_by"], r["note"]) == ("resolved", "bob", "on it")
        with pytest.raises(AlertError, match="already resolved"):
            await book.resolve(alert["id"])
        with pytest.raises(AlertError, match="no alert 999") as err:
            await book.ack(999)
        assert err.value.status == 404
    finally:
        await book.close()


async def test_cooldown_makes_a_flapping_sensor_one_alert(tmp_path: Path) -> None:
    clock = Clock()
    book = AlertBook(tmp_path / "alerts.db", clock)
    await book.open()
    try:
        flaps = [raised(), cleared(), raised(), cleared(), raised(), cleared()]
        steps = await book.apply(flaps, cooldown=60)
        assert [a for a, _ in steps] == ["opened", "cleared", "updated", "cleared", "updated", "cleared"]
        assert {s[1]["id"] for s in steps} == {steps[0][1]["id"]} and steps[-1][1]["count"] == 3
        clock.now += 59
        assert await book.resolve_cooled({("p", "sink"): 60}) == []
        clock.now += 1
        (done,) = await book.resolve_cooled({("p", "sink"): 60})
        assert done["state"] == "resolved"
        clock.now += 30  # raised again within the cooldown after the resolve: the same alert, reopened
        ((action, again),) = await book.apply([raised()], cooldown=60)
        assert action == "reopened" and again["id"] == done["id"] and again["count"] == 4
        assert len(await book.list()) == 1
    finally:
        await book.close()


async def test_who_acted_on_an_alert_is_kept_across_a_re_raise(tmp_path: Path) -> None:
    clock = Clock()
    book = AlertBook(tmp_path / "alerts.db", clock)
    await book.open()
    try:
        ((_, alert),) = await book.apply([raised()], cooldown=60)
        clock.now += 5
        acked = await book.ack(alert["id"], by="ann", note="valve stuck, sent Bob")
        assert [(x["action"], x["by"], x["note"]) for x in acked["actions"]] == [
            ("acknowledged", "ann", "valve stuck, sent Bob")
        ]
        await book.apply([cleared()], cooldown=60)
        clock.now += 5
        await book.resolve(alert["id"], by="bob", note="valve replaced")
        clock.now += 10  # raised again within the cooldown: the same alert, reopened
        ((action, again),) = await book.apply([raised(reading=101)], cooldown=60)
        assert action == "reopened" and again["acked_by"] is None and again["state"] == "open"
        (listed,) = await book.list()
        assert [(x["action"], x["by"], x["note"], x["at"]) for x in listed["actions"]] == [
            ("acknowledged", "ann", "valve stuck, sent Bob", 1005.0),
            ("resolved", "bob", "valve replaced", 1010.0),
            ("reopened", "gateway", None, 1020.0),
        ]
    finally:
        await book.close()
    book = AlertBook(tmp_path / "alerts.db", clock)  # kept in alerts.db across a restart
    await book.open()
    try:
        (listed,) = await book.list()
        assert [x["by"] for x in listed["actions"]] == ["ann", "bob", "gateway"]
    finally:
        await book.close()


# --- end to end ---------------------------------------------------------------------------

ALERTS = "sluice/gw1/alerts/boiler"


def config(tmp_path: Path, port: int, sink: str = "") -> str:
    return f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data"}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {port}, reconnect_max: 1s}}
pipelines:
  - name: boiler
    nodes:
      - {{id: temp, type: mqtt, connection: plant, topic: "sensors/+/temp", key: "topic[1]"}}
      - {{id: hot, type: threshold, input: temp, above: 90, clear_below: 85, severity: critical}}
      - {{id: book, type: alert, input: hot, connection: plant{sink}}}
console: {{port: 0, auth: false}}
"""


def actions(client: MqttTestClient) -> list[dict[str, Any]]:
    return [json.loads(p) for p in client.payloads(ALERTS)]


async def until_subscribed(gw: Gateway, pub: MqttTestClient) -> None:
    src = node(gw, "boiler", "temp")
    start = src.n_in

    def arrived() -> bool:
        if src.n_in > start:
            return True
        pub.publish("sensors/probe/temp", json.dumps({"value": 20.0}), qos=0)
        return False

    await wait_for(arrived, timeout=15, interval=0.1)


async def post(gw: Gateway, path: str, body: Any = None) -> tuple[int, Any]:
    assert gw.console is not None
    url = f"http://127.0.0.1:{gw.console.port}{path}"
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def test_alert_sink_console_and_mqtt_commands(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    with mqtt_client(mosquitto, subscribe=[ALERTS, "sluice/gw1/cmd/reply"]) as sub, mqtt_client(mosquitto) as pub:
        async with running_gateway(config(tmp_path, mosquitto.port)) as gw:
            await until_subscribed(gw, pub)
            for v in (91, 95, 80):  # open, (no transition), auto-resolve
                pub.publish("sensors/s1/temp", json.dumps({"value": v}))
            pub.publish("sensors/s2/temp", json.dumps({"value": 99}))
            await wait_for(lambda: len(actions(sub)) >= 3)
            got = actions(sub)
            s1 = [(m["action"], m["alert"]["state"]) for m in got if m["alert"]["key"] == "s1"]
            assert s1 == [("opened", "open"), ("resolved", "resolved")]
            assert all(m["gateway_id"] == "gw1" and isinstance(m["seq"], int) for m in got)

            status, body = await get(gw, "/api/alerts?state=open")
            assert status == 200 and [a["alert_key"] for a in body["alerts"]] == ["boiler/hot/s2"]
            s2 = body["alerts"][0]
            assert s2["severity"] == "critical" and s2["reading"] == 99.0 and "connection" not in s2
            assert body["summary"] == {"open": 1, "resolved": 1}
            status, body = await get(gw, "/api/alerts?state=bogus")
            assert status == 400 and "state must be one of" in body["error"]

            # acknowledge on the console
            status, body = await post(gw, f"/api/alerts/{s2['id']}/ack", {"note": "valve checked"})
            assert status == 200 and body["alert"]["state"] == "acknowledged"
            assert body["alert"]["acked_by"] == "console"
            status, body = await post(gw, f"/api/alerts/{s2['id']}/ack")
            assert status == 409
            status, body = await post(gw, "/api/alerts/12345/resolve")
            assert status == 404
            status, body = await post(gw, "/api/alerts/99999999999999999999/ack")  # past SQLite's integers
            assert status == 404
            await wait_for(lambda: any(m["action"] == "acknowledged" for m in actions(sub)))

            # resolve over MQTT, answered on the reply topic
            pub.publish(
                "sluice/gw1/cmd/resolve", json.dumps({"alert_key": "boiler/hot/s2", "by": "scada", "request_id": "r1"})
            )
            await wait_for(lambda: sub.received("sluice/gw1/cmd/reply"))
            reply = json.loads(sub.payloads("sluice/gw1/cmd/reply")[0])
            assert reply["ok"] is True and reply["request_id"] == "r1"
            assert reply["alert"]["state"] == "resolved" and reply["alert"]["resolved_by"] == "scada"
            await wait_for(lambda: [m for m in actions(sub) if m["action"] == "resolved" and m["alert"]["key"] == "s2"])
            assert gw.health()["alerts"]["commands_ok"] == 1
            _, metrics = await get(gw, "/metrics")
            assert 'sluice_alert_steps_total{action="opened"} 2.0' in metrics
            assert 'sluice_alert_steps_total{action="acknowledged"} 1.0' in metrics


async def test_malformed_commands_are_answered_and_change_nothing(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    with mqtt_client(mosquitto, subscribe=["sluice/gw1/cmd/reply", ALERTS]) as sub, mqtt_client(mosquitto) as pub:
        async with running_gateway(config(tmp_path, mosquitto.port)) as gw:
            await until_subscribed(gw, pub)
            pub.publish("sensors/s1/temp", json.dumps({"value": 99}))
            await wait_for(lambda: actions(sub))
            alert_id = actions(sub)[0]["alert"]["id"]
            bad = [  # (topic, payload, request_id the reply carries, what the error says)
                ("sluice/gw1/cmd/ack", b"not json", None, "not JSON"),
                ("sluice/gw1/cmd/ack", json.dumps({"request_id": 2}).encode(), 2, "exactly one of `id` or `alert_key`"),
                ("sluice/gw1/cmd/ack", json.dumps({"id": "x", "request_id": 3}).encode(), 3, "id:"),
                ("sluice/gw1/cmd/ack", json.dumps({"id": alert_id, "evil": 1, "request_id": 4}).encode(), 4, "evil"),
                ("sluice/gw1/cmd/ack", json.dumps({"id": 999, "request_id": 5}).encode(), 5, "no alert 999"),
                (
                    "sluice/gw1/cmd/reboot",
                    json.dumps({"id": alert_id, "request_id": 6}).encode(),
                    6,
                    "unknown command 'reboot'",
                ),
            ]
            for topic, payload, _, _ in bad:
                pub.publish(topic, payload)
            await wait_for(lambda: len(sub.received("sluice/gw1/cmd/reply")) >= len(bad))
            replies = [json.loads(p) for p in sub.payloads("sluice/gw1/cmd/reply")]
            assert all(r["ok"] is False for r in replies)
            errors = sorted((str(r["request_id"]), r["error"]) for r in replies)
            for _, _, rid, why in bad:
                assert any(r == str(rid) and why in e for r, e in errors), (rid, why, errors)
            _, body = await get(gw, "/api/alerts?key=boiler/hot/s1")
            assert [a["state"] for a in body["alerts"]] == ["open"]  # unchanged
            assert gw.health()["alerts"]["commands_rejected"] == len(bad)


async def test_non_alert_events_are_dead_lettered(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    text = config(tmp_path, mosquitto.port).replace("input: hot, connection", "input: temp, connection")
    with mqtt_client(mosquitto) as pub:
        async with running_gateway(text) as gw:
            await until_subscribed(gw, pub)
            sink = node(gw, "boiler", "book")
            await wait_for(lambda: sink.n_errors >= 1)
            assert "takes detector alerts" in gw.dead_letters.recent[-1]["reason"]


async def test_flapping_sensor_is_one_alert_and_updates_are_rate_limited(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    text = config(tmp_path, mosquitto.port, sink=", cooldown: 1h, update_interval: 1h")
    with mqtt_client(mosquitto, subscribe=[ALERTS]) as sub, mqtt_client(mosquitto) as pub:
        async with running_gateway(text) as gw:
            await until_subscribed(gw, pub)
            for v in (95, 80, 95, 80, 95, 80):
                pub.publish("sensors/s1/temp", json.dumps({"value": v}))
            await wait_for(lambda: len(actions(sub)) >= 5)
            _, body = await get(gw, "/api/alerts")
            (alert,) = body["alerts"]
            assert alert["count"] == 3 and alert["state"] == "open" and alert["condition"] == "cleared"
            sink = node(gw, "boiler", "book")
            await wait_for(lambda: sink.suppressed == 1)
            assert [m["action"] for m in actions(sub)] == ["opened", "cleared", "updated", "cleared", "cleared"]
