"""Suppression (maintenance) windows: scheduled windows on the alert sink, ad-hoc suppressions on
the console and the MQTT command topic; held alerts are kept and published once at the end."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from gateway.alerts import AlertBook, AlertError, AlertService, SuppressCommand, SuppressWindow
from tests._util import MosquittoBroker, mqtt_client, wait_for
from tests.gateway._harness import get, running_gateway
from tests.gateway.test_alerts import ALERTS, Clock, actions, cleared, config, post, raised, until_subscribed

BERLIN = dt.timezone(dt.timedelta(hours=1))  # Berlin in winter
BERLIN_SUMMER = dt.timezone(dt.timedelta(hours=2))


def at(tz: dt.tzinfo, *args: int) -> float:
    return dt.datetime(*args, tzinfo=tz).timestamp()  # type: ignore[misc]


def window(**kw: Any) -> SuppressWindow:
    return SuppressWindow.model_validate(kw)


def test_window_over_midnight_in_a_time_zone() -> None:
    w = window(days=["mon"], **{"from": "22:00", "to": "06:00"}, tz="Europe/Berlin")
    # 2026-11-30 is a Monday
    assert not w.covers(at(BERLIN, 2026, 11, 30, 21, 59), "a", "warning")
    assert w.covers(at(BERLIN, 2026, 11, 30, 22, 0), "a", "warning")
    assert w.covers(at(BERLIN, 2026, 12, 1, 5, 59), "a", "warning")  # Tuesday morning: Monday's window
    assert not w.covers(at(BERLIN, 2026, 12, 1, 6, 0), "a", "warning")
    assert not w.covers(at(BERLIN, 2026, 12, 1, 23, 0), "a", "warning")  # Tuesday evening: no window
    assert not w.covers(at(BERLIN, 2026, 11, 30, 1, 0), "a", "warning")  # Monday morning: Sunday's, not set
    # summer time: the same local times, an hour earlier in UTC (2026-06-01 is a Monday)
    assert w.covers(at(BERLIN_SUMMER, 2026, 6, 1, 22, 30), "a", "warning")
    assert w.covers(at(dt.UTC, 2026, 6, 2, 3, 59), "a", "warning")  # 05:59 in Berlin
    assert not w.covers(at(dt.UTC, 2026, 6, 2, 4, 0), "a", "warning")  # 06:00 in Berlin
    assert not w.covers(at(dt.UTC, 2026, 6, 1, 19, 59), "a", "warning")  # 21:59 in Berlin
    assert w.covers(at(dt.UTC, 2026, 6, 1, 20, 0), "a", "warning")  # 22:00 in Berlin


def test_window_offsets_keys_and_severities() -> None:
    w = window(
        **{"from": "08:00", "to": "24:00"},
        tz="+02:00",
        keys=["boiler/*", "pumps/p1/x"],
        severities=["warning", "info"],
    )
    noon = at(dt.timezone(dt.timedelta(hours=2)), 2026, 11, 28, 12, 0)
    assert w.covers(noon, "boiler/hot/s1", "warning")
    assert w.covers(noon, "pumps/p1/x", "info")
    assert not w.covers(noon, "boiler/hot/s1", "critical")  # severity not listed
    assert not w.covers(noon, "pumps/p2/x", "warning")  # key not matched
    assert not w.covers(noon - 5 * 3600, "boiler/hot/s1", "warning")  # 07:00 there
    assert w.covers(at(dt.UTC, 2026, 11, 28, 21, 59), "boiler/x", "info")  # 23:59 there
    assert window(**{"from": "00:00", "to": "24:00"}, tz="UTC-5").covers(noon, "k", "critical")


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"from": "22:00", "to": "22:00"}, "empty window"),
        ({"from": "25:00", "to": "06:00"}, "not a time"),
        ({"from": "22:00", "to": "6"}, "not a time"),
        ({"from": "24:00", "to": "06:00"}, "cannot start at 24:00"),
        ({"from": "22:00", "to": "06:00", "tz": "Mars/Olympus"}, "unknown time zone"),
        ({"from": "22:00", "to": "06:00", "tz": "+15:00"}, "out of range"),
        ({"from": "22:00", "to": "06:00", "days": ["monday"]}, "days.0"),
        ({"from": "22:00", "to": "06:00", "severities": ["fatal"]}, "severities.0"),
        ({"from": "22:00"}, "to"),
    ],
)
def test_window_validation(kw: dict[str, Any], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        window(**kw)


def test_suppress_command_until() -> None:
    assert SuppressCommand.model_validate({"alert_key": "a/*", "until": "2026-11-28T15:00:00Z"}).until == at(
        dt.UTC, 2026, 11, 28, 15, 0
    )
    assert SuppressCommand.model_validate({"alert_key": "a", "until": 5}).until == 5.0
    for bad, why in (("2026-11-28T15:00:00", "needs an offset"), ("soon", "not an ISO 8601"), (True, "epoch")):
        with pytest.raises(ValidationError, match=why):
            SuppressCommand.model_validate({"alert_key": "a", "until": bad})


class Outbox:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def put(self, rows: list[tuple[str, str, dict[str, Any], str]]) -> None:
        self.sent.extend(body for _, _, body, _ in rows)


def item(it: dict[str, Any], svc: AlertService) -> dict[str, Any]:
    """What the alert sink hands the book: the detector alert, where to publish, and whether it is suppressed."""
    v = it["value"]
    return {
        **it,
        "connection": "plant",
        "topic": "t",
        "suppress": svc.is_suppressed("p", "sink", v["alert_key"], v["severity"]),
    }


async def test_scheduled_window_holds_and_releases_once(tmp_path: Path) -> None:
    clock = Clock()
    clock.now = at(dt.UTC, 2026, 11, 30, 21, 0)  # Monday 22:00 in Berlin
    outbox = Outbox()
    svc = AlertService(tmp_path / "alerts.db", "gw", outbox, {}, clock=clock)
    svc.windows[("p", "sink")] = ((window(**{"from": "22:00", "to": "06:00"}, tz="Europe/Berlin"),), clock)
    await svc.open()
    try:
        steps = await svc.book.apply([item(raised(), svc), item(raised("p/hot/s2"), svc), item(raised(), svc)])
        for action, alert in steps:
            await svc.notify(action, alert)
        assert outbox.sent == [] and svc.notifications_suppressed == 3
        (s1,) = await svc.book.list(key="p/hot/s1")
        assert s1["suppressed"] is True and s1["state"] == "open" and s1["count"] == 2  # recorded as usual
        # s2 clears during the window: resolved, and nothing is ever published about it
        for action, alert in await svc.book.apply([item(cleared("p/hot/s2"), svc)]):
            await svc.notify(action, alert)
        assert outbox.sent == []
        assert await svc.release_due() == []  # still in the window

        clock.now = at(dt.UTC, 2026, 12, 1, 5, 0)  # Tuesday 06:00 in Berlin: the window is over
        (released,) = await svc.release_due()
        assert released["alert_key"] == "p/hot/s1" and released["suppressed"] is False
        assert [(m["action"], m["alert"]["alert_key"], m["alert"]["count"]) for m in outbox.sent] == [
            ("opened", "p/hot/s1", 2)
        ]
        assert await svc.release_due() == [] and len(outbox.sent) == 1  # once
        for action, alert in await svc.book.apply([item(raised(reading=99), svc)]):
            await svc.notify(action, alert)  # after the window, updates are published again
        assert [m["action"] for m in outbox.sent] == ["opened", "updated"]
        assert svc.health()["released"] == 1
    finally:
        await svc.close()


async def test_adhoc_suppression_persists_and_ends(tmp_path: Path) -> None:
    clock = Clock()
    outbox = Outbox()
    svc = AlertService(tmp_path / "alerts.db", "gw", outbox, {}, clock=clock)
    await svc.open()
    with pytest.raises(AlertError, match="not in the future") as err:
        await svc.suppress("p/*", clock.now - 1, by="ann")
    assert err.value.status == 409
    sup = await svc.suppress("p/hot/*", clock.now + 600, note="valve swap", by="ann")
    assert (sup["pattern"], sup["note"], sup["created_by"]) == ("p/hot/*", "valve swap", "ann")
    assert svc.is_suppressed("p", "sink", "p/hot/s1", "critical")
    assert not svc.is_suppressed("p", "sink", "p/cold/s1", "critical")
    ((action, alert),) = await svc.book.apply([item(raised(), svc)])
    await svc.notify(action, alert)
    await svc.book.ack(alert["id"], by="bob")  # acknowledged while held: published as acknowledged
    await svc.close()

    svc = AlertService(tmp_path / "alerts.db", "gw", outbox, {}, clock=clock)  # survives a restart
    await svc.open()
    try:
        assert [s["id"] for s in await svc.suppressions()] == [sup["id"]]
        assert await svc.release_due() == []
        clock.now += 600  # expired
        assert await svc.suppressions() == []
        (released,) = await svc.release_due()
        assert released["state"] == "acknowledged"
        assert [m["action"] for m in outbox.sent] == ["acknowledged"]
        with pytest.raises(AlertError, match="no suppression 99") as err:
            await svc.unsuppress(99)
        assert err.value.status == 404
    finally:
        await svc.close()


async def test_old_alerts_db_gets_the_suppressed_column(tmp_path: Path) -> None:
    path = tmp_path / "alerts.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE alerts (id INTEGER PRIMARY KEY AUTOINCREMENT, alert_key TEXT NOT NULL,"
        " pipeline TEXT, node TEXT, key TEXT, severity TEXT, state TEXT NOT NULL, condition TEXT,"
        " rule TEXT, reading TEXT, count INTEGER NOT NULL, opened_at REAL, updated_at REAL,"
        " cleared_at REAL, acked_at REAL, acked_by TEXT, resolved_at REAL, resolved_by TEXT, note TEXT,"
        " connection TEXT, topic TEXT)"
    )
    db.execute("INSERT INTO alerts (alert_key, state, count) VALUES ('old/a/b', 'open', 1)")
    db.commit()
    db.close()
    book = AlertBook(path)
    await book.open()
    try:
        (old,) = await book.list()
        assert old["suppressed"] is False
        ((action, _),) = await book.apply([raised()])
        assert action == "opened"
    finally:
        await book.close()


# --- end to end ---------------------------------------------------------------------------

WINDOW = ', suppress: [{from: "00:00", to: "24:00", tz: Europe/Berlin, keys: ["boiler/hot/s1"]}]'


async def delete(gw: Any, path: str) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{gw.console.port}{path}"
    async with aiohttp.ClientSession() as session, session.delete(url) as resp:
        return resp.status, await resp.json()


async def test_suppression_end_to_end(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    reply_topic = "sluice/gw1/cmd/reply"
    with mqtt_client(mosquitto, subscribe=[ALERTS, reply_topic]) as sub, mqtt_client(mosquitto) as pub:
        async with running_gateway(config(tmp_path, mosquitto.port, sink=WINDOW)) as gw:
            await until_subscribed(gw, pub)
            # a scheduled window covering the whole day holds s1, not s2
            pub.publish("sensors/s1/temp", json.dumps({"value": 99}))
            pub.publish("sensors/s2/temp", json.dumps({"value": 99}))
            await wait_for(lambda: actions(sub))
            await wait_for(lambda: gw.alerts is not None and gw.alerts.book.counts["opened"] >= 2)
            _, body = await get(gw, "/api/alerts?state=open")
            held = {a["alert_key"]: a["suppressed"] for a in body["alerts"]}
            assert held == {"boiler/hot/s1": True, "boiler/hot/s2": False}

            # ad-hoc on the console: validated, listed, then removed, which publishes the held alert once
            status, body = await post(gw, "/api/alerts/suppress", {"alert_key": "boiler/hot/s3", "until": 1})
            assert status == 409 and "not in the future" in body["error"]
            status, body = await post(gw, "/api/alerts/suppress", {"alert_key": "boiler/hot/s3", "bogus": 1})
            assert status == 400 and "until" in body["error"]
            until = time.time() + 3600
            status, body = await post(
                gw, "/api/alerts/suppress", {"alert_key": "boiler/hot/s3", "until": until, "note": "service"}
            )
            assert status == 201 and body["suppression"]["created_by"] == "console"
            sup_id = body["suppression"]["id"]

            # ad-hoc over MQTT: the same validation, answered on the reply topic
            pub.publish("sluice/gw1/cmd/suppress", json.dumps({"alert_key": "boiler/*", "request_id": "bad"}))
            pub.publish(
                "sluice/gw1/cmd/suppress",
                json.dumps({"alert_key": "boiler/hot/s4", "until": until, "by": "scada", "request_id": "good"}),
            )
            await wait_for(lambda: len(sub.received(reply_topic)) >= 2)
            replies = {r["request_id"]: r for r in map(json.loads, sub.payloads(reply_topic))}
            assert replies["bad"]["ok"] is False and replies["bad"]["status"] == 400
            assert "until" in replies["bad"]["error"]
            assert replies["good"]["ok"] is True and replies["good"]["suppression"]["created_by"] == "scada"
            status, body = await get(gw, "/api/alerts/suppressions")
            assert status == 200 and [s["pattern"] for s in body["suppressions"]] == ["boiler/hot/s3", "boiler/hot/s4"]

            pub.publish("sensors/s3/temp", json.dumps({"value": 99}))
            await wait_for(lambda: gw.alerts is not None and gw.alerts.book.counts["opened"] >= 3)
            assert [m["alert"]["key"] for m in actions(sub)] == ["s2"]

            status, _ = await delete(gw, f"/api/alerts/suppressions/{sup_id}")
            assert status == 200
            status, body = await delete(gw, f"/api/alerts/suppressions/{sup_id}")
            assert status == 404
            await wait_for(lambda: len(actions(sub)) >= 2)
            got = [(m["action"], m["alert"]["key"], m["alert"]["suppressed"]) for m in actions(sub)]
            assert got == [("opened", "s2", False), ("opened", "s3", False)]
            _, metrics = await get(gw, "/metrics")
            assert "sluice_alert_notifications_suppressed_total 2.0" in metrics
            assert "sluice_alert_released_total 1.0" in metrics
            _, doc = await get(gw, "/api/openapi.json")
            assert "post" in doc["paths"]["/api/alerts/suppress"]


def test_bad_windows_fail_the_config_check_with_the_field_named(tmp_path: Path) -> None:
    from gateway.config import parse_config
    from gateway.errors import ConfigError

    bad = ', suppress: [{from: "22:00", to: "06:00", tz: Mars/Olympus}, {from: "25:00", to: "01:00"}]'
    with pytest.raises(ConfigError) as err:
        parse_config(config(tmp_path, 1883, sink=bad), "test.yaml", {})
    text = str(err.value)
    assert "suppress.0.tz" in text and "unknown time zone 'Mars/Olympus'" in text
    assert "suppress.1.from" in text and "'25:00' is not a time" in text


async def test_sink_reads_windows_with_its_injected_clock(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from gateway.deadletter import DeadLetters
    from gateway.events import Event
    from gateway.node import NodeContext
    from nodes.alerts import AlertOptions, AlertSink

    wall = Clock()
    wall.now = at(dt.UTC, 2026, 11, 28, 12, 0)  # Saturday 13:00 in Berlin: inside the window
    outbox = Outbox()
    svc = AlertService(tmp_path / "alerts.db", "gw", outbox, {})  # the book keeps the real clock
    await svc.open()
    opts = AlertOptions.model_validate(
        {
            "id": "sink",
            "type": "alert",
            "connection": "plant",
            "suppress": [{"days": ["sat"], "from": "12:00", "to": "14:00", "tz": "Europe/Berlin", "keys": ["p/*"]}],
        }
    )
    ctx = NodeContext("gw", "p", "sink", str(tmp_path), SimpleNamespace(alerts=svc), DeadLetters(None), clock=wall)
    sink = AlertSink(opts, ctx)
    await sink.start()
    seen: list[tuple[str, str, bool]] = []  # the console's view: every step, held or not
    svc.listeners.append(lambda action, alert: seen.append((action, alert["alert_key"], alert["suppressed"])))
    try:

        def ev(key: str, state: str = "raised") -> Event:
            return Event(key, 1.0, {"state": state, "alert_key": f"p/hot/{key}", "severity": "critical"})

        await sink.write([ev("s1"), ev("s1")])
        assert outbox.sent == [] and svc.notifications_suppressed == 2
        wall.now += 3600  # 14:00 in Berlin: the window is over
        await sink.write([ev("s2")])
        assert [m["alert"]["alert_key"] for m in outbox.sent] == ["p/hot/s2"]
        await svc.release_due()
        assert [(m["action"], m["alert"]["alert_key"]) for m in outbox.sent][-1] == ("opened", "p/hot/s1")
        assert [m["alert"]["count"] for m in outbox.sent] == [1, 2]
        wall.now += 7 * 86400 - 3600  # next Saturday 13:00: s2, published before, gets no updates
        await sink.write([ev("s2")])
        assert len(outbox.sent) == 2 and svc.notifications_suppressed == 3
        assert seen[-1] == ("updated", "p/hot/s2", False)
        assert seen[:2] == [("opened", "p/hot/s1", True), ("updated", "p/hot/s1", True)]
        await sink.write([ev("s2", "cleared")])  # a resolve is always published: it ends what was announced
        assert [(m["action"], m["alert"]["alert_key"]) for m in outbox.sent][-1] == ("resolved", "p/hot/s2")
    finally:
        await svc.close()
