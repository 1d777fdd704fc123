"""gmqtt's private insides that gateway/_gmqtt_compat.py relies on are still where it expects them.

This fails on a gmqtt version nobody has checked: read gateway/_gmqtt_compat.py against the new
version's source, run the MQTT suites (tests/nodes/test_mqtt.py, tests/gateway/test_outbox*.py),
then add the version to ``TESTED``.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import gmqtt
import pytest
from gmqtt.mqtt.utils import IdGenerator
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import _gmqtt_compat as compat
from gateway.config import MqttConnection
from gateway.mqtt import MqttLink
from tests._util import MosquittoBroker, wait_for


def test_the_installed_gmqtt_is_a_tested_version() -> None:
    assert gmqtt.__version__ in compat.TESTED, (
        f"gmqtt {gmqtt.__version__} is not in gateway._gmqtt_compat.TESTED {compat.TESTED}: "
        "check that module's private attribute uses against this version, then add it"
    )


def test_an_untested_version_is_said_at_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    compat.check.cache_clear()
    monkeypatch.setattr(gmqtt, "__version__", "9.9.9")
    try:
        with caplog.at_level(logging.WARNING, "gateway._gmqtt_compat"):
            assert compat.check() is False
    finally:
        compat.check.cache_clear()
    assert "gmqtt 9.9.9 is not a version Sluice was tested with" in caplog.text


async def test_every_private_attribute_used_exists_on_a_live_connection(mosquitto: MosquittoBroker) -> None:
    conn = MqttConnection(type="mqtt", host=mosquitto.host, port=mosquitto.port, version="5")
    link = MqttLink("b", conn, "compat-probe")
    task = asyncio.create_task(link.run())
    try:
        await wait_for(lambda: link.connected, timeout=10)
        client = link._client
        objects = {
            "gmqtt.Client": gmqtt.Client,
            "client": client,
            "package handler": client._package_handler,
            "id generator": client._package_handler.id_generator,
            "connection": client._connection,
            "protocol": client._connection._protocol,
        }
        missing = [
            f"{what}.{attr}"
            for what, attrs in compat.PRIVATE_ATTRIBUTES.items()
            for attr in attrs
            if not hasattr(objects[what], attr)
        ]
        assert missing == []
        assert hasattr(client._connection._protocol._stream_reader, "_buffer")
        assert compat.id_capacity(client) > 4
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await link.close()


@given(
    top=st.integers(3, 40),
    used=st.sets(st.integers(1, 45), max_size=40),
    last=st.integers(0, 45),
    n=st.integers(0, 50),
)
@settings(max_examples=300, deadline=None)
def test_next_ids_hands_out_what_gmqtts_generator_would(top: int, used: set[int], last: int, n: int) -> None:
    def generator() -> IdGenerator:
        gen = IdGenerator(max=top)
        gen._used_ids = set(used)
        gen._last_used_id = last
        return gen

    theirs = generator()
    want = []
    for _ in range(n):
        try:
            want.append(theirs._mid_generate())
        except OverflowError:
            break
    ours = generator()
    got = compat.next_ids(SimpleNamespace(_package_handler=SimpleNamespace(id_generator=ours)), n)
    assert got == want
    assert (ours._used_ids, ours._last_used_id) == (theirs._used_ids, theirs._last_used_id)
