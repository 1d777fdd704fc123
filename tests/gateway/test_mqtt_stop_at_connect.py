"""A stop that arrives as the broker connection completes ends the link at once.

A pipeline stops its MQTT source by cancelling the task that runs the link. On Python 3.11,
``asyncio.wait_for`` drops a cancellation that meets its inner awaitable completing: the link
then went on to wait for a connection loss that never came, and the gateway's stop waited out
its whole ``shutdown_timeout`` ("stop took longer than 10s; abandoning 0 queued events").

The broker is a real Mosquitto. Only the moment is arranged: the client's ``connect`` is wrapped
so that the cancel lands right after the real CONNACK has been read, in the same loop turn —
no real peer can time a stop that exactly.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.config import MqttConnection
from gateway.mqtt import MqttLink
from tests._util import MosquittoBroker


async def test_a_stop_as_the_connection_completes_ends_the_link(mosquitto: MosquittoBroker) -> None:
    conn = MqttConnection(type="mqtt", host="127.0.0.1", port=mosquitto.port)
    link = MqttLink("plant", conn, "stop-at-connect")
    task = asyncio.create_task(link.run())
    real_connect = link._client.connect

    async def connect_then_stop(*args: Any, **kwargs: Any) -> Any:
        result = await real_connect(*args, **kwargs)
        task.cancel()  # the pipeline's stop, just as the CONNACK is in
        return result

    link._client.connect = connect_then_stop
    try:
        # bounded only so that a link that ignores the stop fails here instead of hanging the run
        done, _ = await asyncio.wait({task}, timeout=60)
        assert task in done, f"the link ignored its stop and is still {link.state}"
        assert task.cancelled()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await link.close()
