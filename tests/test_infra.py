"""The test infrastructure itself: the Mosquitto fixtures and the helpers in tests/_util.py."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from tests._util import MosquittoBroker, free_port, mqtt_client, wait_for, wait_for_sync


def _refused(broker: MosquittoBroker) -> bool:
    try:
        with socket.create_connection((broker.host, broker.port), timeout=0.5):
            return False
    except OSError:
        return True


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()


def test_publish_subscribe_through_broker(mosquitto: MosquittoBroker) -> None:
    with (
        mqtt_client(mosquitto, subscribe="infra/#") as sub,
        mqtt_client(mosquitto.host, mosquitto.port) as pub,
    ):
        for i in range(100):
            pub.publish(f"infra/{i % 3}", f"m{i}", qos=1)
        pub.publish("other/topic", b"ignored", qos=0)
        wait_for_sync(lambda: len(sub.messages) >= 100)
        assert [m.text() for m in sub.messages] == [f"m{i}" for i in range(100)]
        assert sub.payloads("infra/1")[:2] == [b"m1", b"m4"]
    assert "mosquitto version" in mosquitto.log_text()


async def test_async_test_can_wait_for_messages(mosquitto: MosquittoBroker) -> None:
    with mqtt_client(mosquitto, subscribe="a/b") as client:
        client.publish("a/b", "hello", qos=1, retain=True)
        received = await wait_for(lambda: client.received("a/b"), timeout=5)
        assert received[0].payload == b"hello"
    # A retained message reaches a later subscriber.
    with mqtt_client(mosquitto, subscribe="a/#") as late:
        msgs = await wait_for(lambda: late.messages, timeout=5)
        assert msgs[0].retain and msgs[0].payload == b"hello"


def test_stop_and_start_on_the_same_port(mosquitto: MosquittoBroker) -> None:
    port = mosquitto.port
    with mqtt_client(mosquitto) as client:
        mosquitto.stop()
        assert not mosquitto.running
        assert _refused(mosquitto)
        wait_for_sync(lambda: not client.is_connected, timeout=5)

    mosquitto.start()
    assert mosquitto.port == port and mosquitto.running
    with mqtt_client(mosquitto, subscribe="back/again") as client:
        client.publish("back/again", "ok")
        wait_for_sync(lambda: client.payloads() == [b"ok"])


def test_persistence_keeps_retained_messages_across_restart(mosquitto_factory) -> None:
    broker = mosquitto_factory(persistence=True)
    with mqtt_client(broker) as client:
        client.publish("state/x", "42", qos=1, retain=True)
    broker.stop()  # graceful: the database is written
    broker.start()
    with mqtt_client(broker, subscribe="state/#") as client:
        msgs = wait_for_sync(lambda: client.messages, timeout=5)
        assert (msgs[0].topic, msgs[0].payload) == ("state/x", b"42")


def test_client_reconnects_and_resubscribes_after_outage(mosquitto: MosquittoBroker) -> None:
    with mqtt_client(mosquitto, subscribe="up/#") as sub:
        mosquitto.stop()
        wait_for_sync(lambda: not sub.is_connected, timeout=5)
        mosquitto.start()
        sub.wait_connected(timeout=5)
        with mqtt_client(mosquitto) as pub:
            # The renewed SUBSCRIBE may still be in flight: publish until one arrives.
            def delivered() -> bool:
                pub.publish("up/again", "1")
                return bool(sub.received("up/again"))

            wait_for_sync(delivered, timeout=5, interval=0.05)


def test_kill_is_abrupt_and_restart_works(mosquitto: MosquittoBroker) -> None:
    mosquitto.kill()
    assert _refused(mosquitto)
    mosquitto.start()
    with mqtt_client(mosquitto, subscribe="t") as client:
        client.publish("t", "x")
        wait_for_sync(lambda: client.messages)


def test_extra_config_lines_apply(mosquitto_factory) -> None:
    second_port = free_port()
    broker = mosquitto_factory(extra=f"listener {second_port} 127.0.0.1")
    with mqtt_client(broker.host, second_port, subscribe="x") as on_second:
        with mqtt_client(broker) as on_first:
            on_first.publish("x", "across listeners")
        wait_for_sync(lambda: on_second.payloads() == [b"across listeners"])
    assert f"port {second_port}" in broker.log_text()


def test_brokers_are_isolated(mosquitto_factory) -> None:
    a, b = mosquitto_factory(), mosquitto_factory()
    assert a.port != b.port
    with mqtt_client(b, subscribe="#") as on_b, mqtt_client(a) as on_a:
        on_a.publish("only/a", "1")
        on_b.publish("only/b", "2")
        wait_for_sync(lambda: on_b.received("only/b"))
        assert on_b.received("only/a") == []


def test_sys_topics_are_published_every_second(mosquitto: MosquittoBroker) -> None:
    with mqtt_client(mosquitto, subscribe="$SYS/broker/uptime") as client:
        wait_for_sync(lambda: len(client.messages) >= 2, timeout=5)


async def test_wait_for_times_out_with_a_clear_message() -> None:
    with pytest.raises(AssertionError, match=r"timed out after 0\.1s waiting for: never"):
        await wait_for(lambda: False, timeout=0.1, message="never")
    with pytest.raises(AssertionError, match=r"lambda: 1 \+ 1 == 3"):
        await wait_for(lambda: 1 + 1 == 3, timeout=0.05)


async def test_wait_for_returns_the_truthy_value() -> None:
    box: list[int] = []
    asyncio.get_running_loop().call_later(0.05, box.append, 7)
    assert await wait_for(lambda: box, timeout=2) == [7]


async def test_wait_for_rejects_async_predicates() -> None:
    async def predicate() -> bool:
        return True

    with pytest.raises(TypeError, match="sync"):
        await wait_for(predicate, timeout=0.1)


async def test_harness_gateway_without_console_section_starts_while_8080_is_taken(tmp_path: Path) -> None:
    from tests.gateway._harness import running_gateway

    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 8080))
        holder.listen()
    except OSError:
        pass  # something else holds 8080 already: the same situation
    try:
        async with running_gateway(f"gateway: {{id: gw1, data_dir: '{tmp_path}/data'}}\npipelines: []\n") as gw:
            assert gw.console is not None and gw.console.port not in (0, 8080)
    finally:
        holder.close()
