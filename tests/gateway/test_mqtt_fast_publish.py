"""QoS 0 PUBLISH packets reach ``on_message`` straight from the read buffer (gateway._gmqtt_compat's
fast path), exactly as gmqtt's own path delivers them; whatever the fast path does not take
(MQTT 5 properties, QoS 1) still arrives through gmqtt. Against a real Mosquitto."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import gmqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import _gmqtt_compat as compat
from gateway.config import MqttConnection
from gateway.errors import LinkError
from gateway.mqtt import MqttLink, PublishRefused
from tests._util import MosquittoBroker, mqtt_client, wait_for


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_plain_qos0_publishes_skip_gmqtts_handler_and_arrive_intact(
    mosquitto: MosquittoBroker, version: str
) -> None:
    got: list[tuple[str, bytes, int, Any]] = []

    def on_message(client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        got.append((topic, payload, qos, props))
        return 0

    conn = MqttConnection(type="mqtt", host=mosquitto.host, port=mosquitto.port, version=version)
    link = MqttLink("in", conn, f"fast-{version}", on_message=on_message)
    link.subscribe("fast/#", 0)
    task = asyncio.create_task(link.run())
    try:
        await wait_for(lambda: link.connected, timeout=10)
        handler = link._client._package_handler
        general = handler._handle_publish_packet
        through_gmqtt = []

        def counted(cmd: int, packet: bytes) -> None:
            through_gmqtt.append(cmd)
            general(cmd, packet)

        handler._handle_publish_packet = counted
        handler._handler_cache.clear()
        protocol = paho.MQTTv5 if version == "5" else paho.MQTTv311
        with mqtt_client(mosquitto, protocol=protocol) as pub:

            def subscribed() -> bool:
                if got:
                    return True
                pub.publish("fast/probe", b"p", qos=0)
                return False

            await wait_for(subscribed, timeout=10, interval=0.1)
            got.clear()
            through_gmqtt.clear()
            # Sizes that straddle the 64 KiB reads, and a multi-byte remaining length.
            sent = [(f"fast/k{i % 7}/é", bytes([i % 251]) * (i * 37 % 3000)) for i in range(600)]
            for topic, payload in sent:
                pub.publish(topic, payload, qos=0)
            await wait_for(lambda: len(got) >= len(sent), timeout=20)
            assert [(t, p) for t, p, _, _ in got] == sent
            assert all(q == 0 and props["retain"] == 0 and props["dup"] == 0 for _, _, q, props in got)
            assert through_gmqtt == []  # all of them took the fast path

            got.clear()
            pub.publish("fast/retained", b"kept", qos=0, retain=True)
            pub.publish("fast/qos1", b"one", qos=1)
            if version == "5":
                props = Properties(PacketTypes.PUBLISH)
                props.UserProperty = ("site", "north")
                pub.paho.publish("fast/props", b"with", qos=0, properties=props)
            want = 3 if version == "5" else 2
            await wait_for(lambda: len(got) >= want, timeout=10)
            by_topic = {t: (p, q, props) for t, p, q, props in got}
            assert by_topic["fast/retained"][0] == b"kept"
            assert by_topic["fast/qos1"][0] == b"one"
            if version == "5":
                assert by_topic["fast/props"][2]["user_property"] == [("site", "north")]
                assert len(through_gmqtt) == 1  # the one with properties

        # PUBACKs of our own QoS 1 publishes reach the handler's PUBACK method without gmqtt's
        # per-packet dispatch, and each still frees its packet id and acknowledges.
        client = link._client
        packages: list[int] = []
        put = client._connection.put_package
        client._connection.put_package = lambda pkg: (packages.append(pkg.cmd), put(pkg))[1]
        acked: list[int] = []
        plain_acked = client.on_acked
        client.on_acked = lambda mid: (acked.append(mid), plain_acked(mid))[1]
        mids = [compat.publish_qos1(client, gmqtt.Message(f"out/{i}", b"x", qos=1)) for i in range(40)]
        await wait_for(lambda: sorted(acked) == sorted(mids), timeout=10)
        assert 0x40 not in packages
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await link.close()


async def test_qos1_publishes_reach_on_publish_qos1_and_only_acked_ones_stay_acknowledged(
    mosquitto: MosquittoBroker,
) -> None:
    """With ``on_publish_qos1`` (MQTT 5, acknowledged after processing), plain QoS 1 messages skip
    gmqtt's task-per-message path; ``ack(mids)`` acknowledges them, and what was never acknowledged
    comes back from the broker on the next connection of the same session."""
    conn = MqttConnection(type="mqtt", host=mosquitto.host, port=mosquitto.port, version="5")

    async def on_message(client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        slow.append((topic, payload))
        return 0

    async def session(got: list[tuple[str, bytes, int, Any]], body: Any) -> None:
        link = MqttLink(
            "in",
            conn,
            "fast-qos1",
            on_message=on_message,
            clean_session=False,
            session_expiry=300,
            ack_after_processing=True,
            on_publish_qos1=lambda topic, payload, mid, ack: got.append((topic, payload, mid, ack)),
        )
        link.subscribe("q1/#", 1)
        task = asyncio.create_task(link.run())
        try:
            await wait_for(lambda: link.connected, timeout=10)
            await body(link)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await link.close()

    slow: list[tuple[str, bytes]] = []
    first: list[tuple[str, bytes, int, Any]] = []
    sent = [(f"q1/k{i % 7}/é", bytes([i % 251]) * (i * 37 % 3000)) for i in range(300)]

    async def publish_and_ack_some(link: MqttLink) -> None:
        await session_ready.wait()
        with mqtt_client(mosquitto, protocol=paho.MQTTv5) as pub:
            infos = [pub.paho.publish(t, p, qos=1) for t, p in sent]
            await wait_for(lambda: all(i.is_published() for i in infos), timeout=20)
        await wait_for(lambda: len(first) >= len(sent), timeout=20)
        assert [(t, p) for t, p, _, _ in first] == sent
        assert slow == []  # none took gmqtt's per-message path
        ack = first[0][3]
        ack([mid for _, _, mid, _ in first[:100]])  # one write of 100 PUBACKs
        # a round trip after the PUBACKs, so the broker has them before the disconnect
        with mqtt_client(mosquitto, protocol=paho.MQTTv5) as pub:
            pub.publish("q1/probe", b"p", qos=1)
        await wait_for(lambda: any(t == "q1/probe" for t, _, _, _ in first), timeout=10)

    session_ready = asyncio.Event()
    session_ready.set()
    await session(first, publish_and_ack_some)

    again: list[tuple[str, bytes, int, Any]] = []

    async def redelivered(link: MqttLink) -> None:
        # what the broker resends right after CONNACK may come before the fast path is in place
        # (it is installed once connect() returns): those take the coroutine path
        await wait_for(lambda: len(again) + len(slow) >= 201, timeout=20)

    await session(again, redelivered)
    want = sorted([*sent[100:], ("q1/probe", b"p")])
    assert sorted([(t, p) for t, p, _, _ in again] + slow) == want


def publish(link: MqttLink, api: str, messages: list[tuple[str, bytes, bool]], settled: Any) -> int:
    """Send through ``publish_acked_many`` (a future each) or ``publish_acked_calls`` (a callback,
    or with ``acked`` one call per read for the acknowledged ones); ``settled(i, exc)`` is called
    either way once message ``i`` is acknowledged or failed."""
    if api == "calls":
        return link.publish_acked_calls(messages, settled)
    if api == "acked":

        def acked(indices: list[int]) -> None:
            for i in indices:
                settled(i, None)

        return link.publish_acked_calls(messages, settled, acked)
    futs = link.publish_acked_many(messages)
    for i, fut in enumerate(futs):
        fut.add_done_callback(lambda f, i=i: settled(i, f.exception()))
    return len(futs)


@pytest.mark.parametrize("api", ["futures", "calls", "acked"])
@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_pubacks_take_the_fast_path_resolve_in_order_and_free_their_ids(
    mosquitto: MosquittoBroker, version: str, api: str
) -> None:
    """The PUBACKs of publish_acked_many's (or _calls') messages are handled straight from the
    read buffer, a read's worth at a time; a QoS 1 message gmqtt sent itself still has its PUBACK
    handled by gmqtt."""
    conn = MqttConnection(type="mqtt", host=mosquitto.host, port=mosquitto.port, version=version)
    link = MqttLink("out", conn, f"acks-{version}")
    task = asyncio.create_task(link.run())
    try:
        await wait_for(lambda: link.connected, timeout=10)
        handler = link._client._package_handler
        general = handler._handle_puback_packet
        through_gmqtt: list[bytes] = []

        def counted(cmd: int, packet: bytes) -> None:
            through_gmqtt.append(packet)
            general(cmd, packet)

        handler._handle_puback_packet = counted
        with mqtt_client(mosquitto) as sub:
            sub.subscribe("acks/#", qos=1)
            done: list[int] = []
            failed: list[BaseException] = []
            sent = 0
            theirs: list[int] = []
            while sent < 2000:
                room = link.send_window - link.in_flight
                if room <= 0:
                    await asyncio.sleep(0.001)
                    continue
                # MQTT 5: Mosquitto acknowledges a message nobody subscribed to with reason 0x10
                batch = [
                    (f"acks/{i % 5}" if i % 2 else f"nobody/{i % 5}", b'{"i":%d}' % i, False)
                    for i in range(sent, min(2000, sent + room))
                ]

                def settled(i: int, exc: BaseException | None, first: int = sent) -> None:
                    done.append(first + i)
                    if exc is not None:
                        failed.append(exc)

                sent += publish(link, api, batch, settled)
                if sent >= 1000 and not theirs:
                    theirs.append(1)
                    link._client.publish("acks/gmqtt", b"its own", qos=1)  # gmqtt stores and acks this one
            await wait_for(lambda: len(done) == 2000, timeout=20)
            assert failed == []
            assert done == list(range(2000))  # in the order the broker acknowledged them: sent order
            assert theirs
            await wait_for(lambda: link._client._persistent_storage.is_empty, timeout=10)
            assert len(through_gmqtt) == 1  # only the message gmqtt sent itself
            assert link.in_flight == 0 and not handler.id_generator._used_ids  # every id given back
            await wait_for(lambda: len(sub.messages) == 1001, timeout=20)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await link.close()


@pytest.mark.parametrize("api", ["futures", "calls", "acked"])
async def test_a_puback_refusing_the_message_fails_it(mosquitto_factory: Any, tmp_path: Any, api: str) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic write allowed/#\n")
    broker = mosquitto_factory(extra=f"acl_file {acl}")
    conn = MqttConnection(type="mqtt", host=broker.host, port=broker.port, version="5")
    link = MqttLink("out", conn, "refused")
    task = asyncio.create_task(link.run())
    try:
        await wait_for(lambda: link.connected, timeout=10)
        got: dict[int, BaseException | None] = {}
        messages = [("allowed/a", b"{}", False), ("denied/b", b"{}", False), ("allowed/c", b"{}", False)]
        assert publish(link, api, messages, got.__setitem__) == 3
        await wait_for(lambda: len(got) == 3, timeout=10)
        assert got[0] is None and got[2] is None
        assert isinstance(got[1], PublishRefused) and got[1].reason == 0x87
        assert link.in_flight == 0 and link.connected
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await link.close()


@pytest.mark.parametrize("api", ["futures", "calls", "acked"])
async def test_messages_unacknowledged_when_the_link_stops_fail_with_link_error(
    mosquitto: MosquittoBroker, api: str
) -> None:
    conn = MqttConnection(type="mqtt", host=mosquitto.host, port=mosquitto.port, version="5")
    link = MqttLink("out", conn, "stops")
    task = asyncio.create_task(link.run())
    try:
        await wait_for(lambda: link.connected, timeout=10)
        assert mosquitto.pid is not None
        os.kill(mosquitto.pid, signal.SIGSTOP)  # the broker reads nothing, acknowledges nothing
        try:
            got: dict[int, BaseException | None] = {}
            assert publish(link, api, [(f"stops/{i}", b"{}", False) for i in range(5)], got.__setitem__) == 5
            await asyncio.sleep(0)
            assert got == {} and link.in_flight == 5
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await wait_for(lambda: len(got) == 5, timeout=10)
            assert all(isinstance(e, LinkError) and "link stopped" in str(e) for e in got.values())
            assert link.in_flight == 0 and not link._client._package_handler.id_generator._used_ids
        finally:
            os.kill(mosquitto.pid, signal.SIGCONT)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await link.close()
