"""A broker that takes each connection and drops it at once: the link backs off instead of storming.

The peer here is a few lines of asyncio, not Mosquitto: no broker configuration drops every
connection right after its CONNACK, which is what a broker does to a client it keeps refusing
something from (a topic it rejects, a twin client id). The bytes are plain MQTT 3.1.1.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gateway.config import MqttConnection
from gateway.mqtt import MqttLink
from tests._util import wait_for


async def test_a_broker_that_drops_every_connection_is_retried_with_backoff(caplog: Any) -> None:
    accepted = 0
    writers: list[asyncio.StreamWriter] = []

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writers.append(writer)
        try:
            await reader.read(1024)  # the CONNECT
            writer.write(b"\x20\x02\x00\x00")  # CONNACK: session not present, accepted
            await writer.drain()
            await asyncio.sleep(0.05)
        finally:
            writer.close()

    server = await asyncio.start_server(broker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = MqttConnection(type="mqtt", host="127.0.0.1", port=port, version="3.1.1", reconnect_max=30)
    link = MqttLink("flaky", conn, "drops-probe")
    with caplog.at_level(logging.WARNING, logger="gateway.mqtt"):
        task = asyncio.create_task(link.run())
        try:
            await wait_for(lambda: link.quick_drops >= 3, timeout=30)
            await asyncio.sleep(1.0)  # a storm would make hundreds of connections in this second
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            server.close()
            # a connection still open when the link stopped is closed here, not by the garbage
            # collector after the loop has gone (an unraisable ResourceWarning in a later test)
            for w in writers:
                w.close()
            await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
            await server.wait_closed()
    # backoff of 0.5, 1, 2, 4 s (jittered to 50–100 %): a handful of connections, not hundreds
    assert accepted <= 8, accepted
    drops = [r for r in caplog.records if "dropped the connection" in r.getMessage()]
    assert len(drops) == 1, [r.getMessage() for r in caplog.records]
