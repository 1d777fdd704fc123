"""Home Assistant MQTT discovery through a real Mosquitto: device config, states, re-announce, removal."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

from tests._util import MosquittoBroker, mqtt_client, wait_for
from tests.gateway._harness import running_gateway

TOKEN = "0123456789abcdef0123"


def config(data: Path, port: int, pipelines: str) -> str:
    return f"""\
gateway: {{id: gw-ha, data_dir: "{data}"}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {port}}}
console: {{host: 127.0.0.1, port: 0, auth: false}}
pipelines:
{pipelines}"""


BOILER = """\
  - name: boiler
    nodes:
      - {id: in, type: http, token: "0123456789abcdef0123", codec: {type: json, key_field: key}}
      - {id: hot, type: threshold, input: in, above: 90, clear_below: 80}
      - {id: ha, type: homeassistant, input: [in, hot], connection: plant, cleanup_after: 1s,
         units: {boiler: "°C"}}
"""
ROOM = """\
  - name: room
    nodes:
      - {id: in2, type: http, token: "0123456789abcdef0123", codec: {type: json, key_field: key}}
      - {id: ha2, type: homeassistant, input: in2, connection: plant, cleanup_after: 1s}
"""


def post(gw: Any, source: str, body: Any) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{gw.console.port}/ingest/{source}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 202


def configs(sub: Any, topic: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) if m.payload else {} for m in sub.messages if m.topic == topic]


def states(sub: Any, topic: str) -> list[str]:
    return [m.payload.decode() for m in sub.messages if m.topic == topic]


def check_schema(cfg: dict[str, Any]) -> None:
    """What Home Assistant's device-based discovery requires (dev, o, cmps with p and unique_id)."""
    assert cfg["dev"]["ids"] and cfg["dev"]["name"]
    assert cfg["o"]["name"] == "sluice"
    assert cfg["avty"][0]["t"] == "sluice/gw-ha/status"
    for comp in cfg["cmps"].values():
        assert comp["p"] in ("sensor", "binary_sensor") and comp["unique_id"] and comp["stat_t"]


async def test_discovery_states_reannounce_and_removal(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    data = tmp_path / "data"
    topic = "homeassistant/device/sluice_gw-ha_boiler_ha/config"
    with mqtt_client(mosquitto, subscribe=["homeassistant/#", "sluice/gw-ha/ha/#"]) as sub:
        async with running_gateway(config(data, mosquitto.port, BOILER)) as gw:
            await asyncio.to_thread(
                post, gw, "in", [{"key": "boiler", "value": 50.0}, {"key": "boiler", "value": 95.0}]
            )
            await wait_for(lambda: any(len(c.get("cmps", {})) == 2 for c in configs(sub, topic)), timeout=20)
            cfg = [c for c in configs(sub, topic) if len(c.get("cmps", {})) == 2][-1]
            check_schema(cfg)
            boiler = cfg["cmps"]["boiler"]
            assert boiler["p"] == "sensor" and boiler["unit_of_meas"] == "°C" and boiler["dev_cla"] == "temperature"
            alert = next(c for c in cfg["cmps"].values() if c["p"] == "binary_sensor")
            assert alert["dev_cla"] == "problem"
            await wait_for(lambda: states(sub, boiler["stat_t"])[-1:] == ["95.0"], timeout=10)
            await wait_for(lambda: states(sub, alert["stat_t"])[-1:] == ["ON"], timeout=10)
            await asyncio.to_thread(post, gw, "in", {"key": "boiler", "value": 70.0})
            await wait_for(lambda: states(sub, alert["stat_t"])[-1:] == ["OFF"], timeout=10)

            # Home Assistant restarts: it says online, the device is announced again
            before = len(configs(sub, topic))
            sub.publish("homeassistant/status", b"online")
            await wait_for(lambda: len(configs(sub, topic)) > before, timeout=10)

        # the boiler pipeline is removed from the config: its device goes away at the next start
        async with running_gateway(config(data, mosquitto.port, ROOM)):
            await wait_for(lambda: configs(sub, topic)[-1:] == [{}], timeout=20)
            room = "homeassistant/device/sluice_gw-ha_room_ha2/config"
            await wait_for(lambda: configs(sub, room), timeout=10)
    # the broker keeps no config for the removed device (an empty retained message deletes it)
    with mqtt_client(mosquitto, subscribe="homeassistant/#") as late:
        await wait_for(lambda: configs(late, "homeassistant/device/sluice_gw-ha_room_ha2/config"), timeout=10)
        assert not configs(late, topic)


async def test_a_node_a_live_reload_takes_out_loses_its_device_at_once(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """A reload that takes a homeassistant node out clears its device's discovery config (an empty
    retained message) while the gateway runs on; a node whose pipeline only restarts keeps its own."""
    from gateway.config import parse_config

    data = tmp_path / "data"
    boiler_topic = "homeassistant/device/sluice_gw-ha_boiler_ha/config"
    room_topic = "homeassistant/device/sluice_gw-ha_room_ha2/config"
    with mqtt_client(mosquitto, subscribe=["homeassistant/#"]) as sub:
        async with running_gateway(config(data, mosquitto.port, BOILER + ROOM)) as gw:
            await asyncio.to_thread(post, gw, "in", {"key": "boiler", "value": 50.0})
            await asyncio.to_thread(post, gw, "in2", {"key": "room", "value": 21.0})
            await wait_for(lambda: configs(sub, boiler_topic) and configs(sub, room_topic), timeout=20)
            assert (data / "homeassistant" / "boiler.ha.json").exists()

            # the boiler pipeline loses its homeassistant node; the room pipeline changes an option
            boiler = BOILER.split("      - {id: ha,")[0]
            room = ROOM.replace("cleanup_after: 1s}", "cleanup_after: 1s, device_name: Room}")
            summary = await gw.reload(parse_config(config(data, mosquitto.port, boiler + room), "test.yaml", {}))
            assert summary["changed"] == ["boiler", "room"]
            await wait_for(lambda: configs(sub, boiler_topic)[-1:] == [{}], timeout=20)
            assert not (data / "homeassistant" / "boiler.ha.json").exists()
            assert gw.state == "running"
            await asyncio.to_thread(post, gw, "in2", {"key": "room", "value": 22.0})
            await wait_for(
                lambda: configs(sub, room_topic)[-1:] and configs(sub, room_topic)[-1]["dev"]["name"] == "Room"
            )
            assert {} not in configs(sub, room_topic)  # restarted, not removed

    # what the broker keeps: the room's device, none for the boiler's
    with mqtt_client(mosquitto, subscribe="homeassistant/#") as late:
        await wait_for(lambda: configs(late, room_topic), timeout=10)
        assert not configs(late, boiler_topic)


async def test_a_removal_the_broker_cannot_take_now_is_done_at_the_next_start(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """With the broker away, a reload does not wait for it: the node's record stays, and at the
    next start another homeassistant node removes the device, as for a node gone while stopped."""
    from gateway.config import parse_config

    data = tmp_path / "data"
    topic = "homeassistant/device/sluice_gw-ha_boiler_ha/config"
    record = data / "homeassistant" / "boiler.ha.json"
    without = config(data, mosquitto.port, BOILER.split("      - {id: ha,")[0] + ROOM)
    with mqtt_client(mosquitto, subscribe=["homeassistant/#"]) as sub:
        async with running_gateway(config(data, mosquitto.port, BOILER + ROOM)) as gw:
            await asyncio.to_thread(post, gw, "in", {"key": "boiler", "value": 50.0})
            await wait_for(lambda: configs(sub, topic), timeout=20)
            mosquitto.stop()
            await wait_for(lambda: not gw.links.publisher("plant").connected, timeout=20)
            await gw.reload(parse_config(without, "test.yaml", {}))
            assert record.exists() and gw.state == "running"  # kept for the next start
            mosquitto.start()
    with mqtt_client(mosquitto, subscribe=["homeassistant/#"]) as sub:
        async with running_gateway(without):
            await wait_for(lambda: configs(sub, topic)[-1:] == [{}], timeout=30)
            await wait_for(lambda: not record.exists(), timeout=10)


async def test_cleanup_after_is_timed_by_the_nodes_monotonic_clock(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """``cleanup_after`` is measured on ``ctx.monotonic``: an hour on the node's clock removes the
    devices of nodes gone from the config, though only a moment passed on the process's clock."""
    from tests.gateway._harness import node

    data = tmp_path / "data"
    topic = "homeassistant/device/sluice_gw-ha_boiler_ha/config"
    with mqtt_client(mosquitto, subscribe=["homeassistant/#"]) as sub:
        async with running_gateway(config(data, mosquitto.port, BOILER)) as gw:
            await asyncio.to_thread(post, gw, "in", {"key": "boiler", "value": 50.0})
            await wait_for(lambda: configs(sub, topic), timeout=20)
        # the boiler pipeline is gone; the room's node removes its device after an hour of its clock
        async with running_gateway(
            config(data, mosquitto.port, ROOM.replace("cleanup_after: 1s", "cleanup_after: 1h"))
        ) as gw:
            ha2 = node(gw, "room", "ha2")
            now = [ha2.ctx.monotonic()]
            ha2.ctx.monotonic = lambda: now[0]
            await asyncio.to_thread(post, gw, "in2", {"key": "room", "value": 21.0})
            await wait_for(lambda: configs(sub, "homeassistant/device/sluice_gw-ha_room_ha2/config"), timeout=20)
            assert {} not in configs(sub, topic)  # not yet: the node's clock has not moved
            now[0] += 3601.0  # an hour and a second: (t + 3600) - t may round below 3600
            await wait_for(lambda: configs(sub, topic)[-1:] == [{}], timeout=20)
