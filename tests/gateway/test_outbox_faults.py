"""Store-and-forward against a real Mosquitto: outages, a SIGKILLed gateway, a broker restart
mid-burst and a full outbox. Each test asserts that nothing is lost.

The consumer is a persistent MQTT session (clean_session false on a broker with persistence), so
what the broker accepted reaches it even across the broker's own restart; any gap is the gateway's.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from tests._proxy import LineProxy, MqttFramer
from tests._util import MosquittoBroker, MqttTestClient, wait_for
from tests.gateway._harness import get, node, running_gateway

ROOT = Path(__file__).resolve().parents[2]
ALERTS = "sluice/gw1/alerts/#"


def config(
    tmp_path: Path,
    port: int,
    *,
    interval: float = 0.01,
    count: int = 100,
    realtime: bool = False,
    outbox: str = "{}",
    console: str = "{enabled: false}",
    version: str = "5",
) -> str:
    # Four sensors swinging 50 → 100 → 50 → 0: each raises and clears an alert every four rounds.
    sensors = ", ".join(f"{{key: s{i}, base: 50, amplitude: 50, period: {4 * interval}, noise: 0}}" for i in range(4))
    return f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data", outbox: {outbox}}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {port}, reconnect_max: 1s, version: "{version}"}}
pipelines:
  - name: boiler
    nodes:
      - {{id: sim, type: simulate, interval: {interval}, count: {count}, realtime: {str(realtime).lower()},
          sensors: [{sensors}]}}
      - {{id: hot, type: threshold, input: sim, above: 75, clear_below: 25, severity: critical}}
      - {{id: out, type: mqtt_out, input: hot, connection: plant}}
console: {console}
"""


class Consumer:
    """A persistent-session subscriber that keeps every alert (of ``topic``) with the broker's DUP flag."""

    def __init__(self, broker: MosquittoBroker, client_id: str, topic: str = ALERTS):
        self.topic = topic
        self.client = MqttTestClient(broker.host, broker.port, client_id=client_id, clean_session=False)
        self._lock = threading.Lock()
        self._got: list[tuple[dict[str, Any], bool]] = []
        self.client.paho.on_message = self._on_message

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self._got.append((json.loads(msg.payload), bool(msg.dup)))

    def start(self) -> Consumer:
        self.client.connect()
        self.client.subscribe(self.topic, 1)
        return self

    @property
    def got(self) -> list[tuple[dict[str, Any], bool]]:
        with self._lock:
            return list(self._got)

    def seqs(self) -> set[int]:
        return {m["seq"] for m, _ in self.got}

    def stop(self) -> None:
        self.client.disconnect()


def check_delivery(got: list[tuple[dict[str, Any], bool]], expected: set[int]) -> dict[int, dict[str, Any]]:
    """Every expected seq arrived; a repeat is marked replayed (or is the broker's own DUP
    redelivery to this consumer); each alert key's messages arrived in order."""
    first: dict[int, dict[str, Any]] = {}
    per_key: dict[str, list[int]] = {}
    for m, dup in got:
        s = m["seq"]
        assert m["gateway_id"] == "gw1"
        if s in first:
            assert m["replayed"] or dup, f"seq {s} arrived twice without replayed: true"
            continue
        first[s] = m
        per_key.setdefault(m["value"]["alert_key"], []).append(s)
    missing = expected - set(first)
    assert not missing, f"{len(missing)} alerts never arrived, e.g. seq {sorted(missing)[:5]}"
    for key, seqs in per_key.items():
        assert seqs == sorted(seqs), f"{key}: out of order"
        states = [first[s]["value"]["state"] for s in seqs]
        assert all(a != b for a, b in itertools.pairwise(states)), f"{key}: raised/cleared do not alternate"
    return first


def outbox_rows(data_dir: Path) -> int:
    path = data_dir / "outbox.db"
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # not created yet
    finally:
        db.close()


OUTAGE = 30.0  # seconds the broker stays down in the long outage test


async def test_broker_down_30s_while_alerts_are_produced(tmp_path: Path, mosquitto_factory: Any) -> None:
    broker = mosquitto_factory(persistence=True)
    consumer = Consumer(broker, f"consumer-{broker.port}").start()
    try:
        # 3600 rounds at 10 ms: about 36 s of alerts, two per round, most of them during the outage
        text = config(tmp_path, broker.port, interval=0.01, count=3600, realtime=True)
        async with running_gateway(text) as gw:
            await wait_for(lambda: len(consumer.got) >= 50)
            broker.stop()
            await wait_for(lambda: not gw.links.publishers["plant"].connected)
            queued_at_stop = gw.outbox.count
            await asyncio.sleep(OUTAGE)  # the outage is the thing under test, not a synchronisation
            produced_offline = gw.outbox.count - queued_at_stop
            assert produced_offline > 2000, produced_offline
            broker.start()
            sim = node(gw, "boiler", "sim")
            # the source counts a batch before the pipeline takes it: wait for the queue to be empty too
            await wait_for(lambda: sim.n_in == 3600 * 4 and gw.pipelines["boiler"].queue.depth == 0, timeout=60)
            out = node(gw, "boiler", "out")
            await wait_for(lambda: out.n_in == out.n_out and gw.outbox.count == 0, timeout=60)
            total = gw.outbox.last_id
            await wait_for(lambda: len(consumer.seqs()) >= total, timeout=60)
            assert gw.outbox.dropped == 0
        first = check_delivery(consumer.got, set(range(1, total + 1)))
        assert len(first) == total == out.n_out
    finally:
        consumer.stop()


async def test_broker_restart_mid_burst_loses_nothing(tmp_path: Path, mosquitto_factory: Any) -> None:
    broker = mosquitto_factory(persistence=True)
    consumer = Consumer(broker, f"consumer-{broker.port}").start()
    try:
        async with running_gateway(config(tmp_path, broker.port, count=5000)) as gw:
            await wait_for(lambda: len(consumer.got) >= 500, timeout=30)
            broker.stop()  # with QoS 1 messages in flight
            broker.start()
            out = node(gw, "boiler", "out")
            await wait_for(lambda: out.n_in == 10_000 and gw.outbox.count == 0, timeout=60)
            await wait_for(lambda: len(consumer.seqs()) >= 10_000, timeout=60)
            assert gw.outbox.last_id == 10_000
        check_delivery(consumer.got, set(range(1, 10_001)))
    finally:
        consumer.stop()


async def test_mqtt_311_delivery(tmp_path: Path, mosquitto_factory: Any) -> None:
    broker = mosquitto_factory(persistence=True)
    consumer = Consumer(broker, f"consumer-{broker.port}").start()
    try:
        async with running_gateway(config(tmp_path, broker.port, count=250, version="3.1.1")) as gw:
            await wait_for(lambda: len(consumer.seqs()) >= 500, timeout=30)
            await wait_for(lambda: gw.outbox.count == 0)
        first = check_delivery(consumer.got, set(range(1, 501)))
        assert not any(m["replayed"] for m in first.values())
    finally:
        consumer.stop()


class CuttableLink(LineProxy):
    """A TCP proxy to the broker that can swallow what passes, both ways, and then cut the line:
    messages in flight at that moment never reach the broker, or their PUBACKs never come back.

    The proxy frames both sides of the stream (MQTT fixed header and remaining length). It counts
    the PUBLISH packets it forwards and those it swallows whole: none of the latter reached the
    broker, so each must be sent again. (The gateway's own count of messages in flight is no lower
    bound: a PUBACK already in its socket buffer when the count is taken still acknowledges a
    message, which is then, rightly, not sent again.) It also counts the PUBACKs it lets through,
    so :attr:`unacknowledged` is how many of the gateway's PUBLISHes wait for one."""

    def __init__(self, target_port: int):
        super().__init__(target_port)
        self.swallow = False
        # swallow from the PUBLISH after this many went through, even mid-read (None: only when told)
        self.swallow_after: int | None = None
        self.forwarded_publishes = 0
        self.swallowed_publishes = 0
        self.pubacks = 0  # PUBACKs that reached the gateway

    @property
    def unacknowledged(self) -> int:
        return self.forwarded_publishes + self.swallowed_publishes - self.pubacks

    def passes(self, data: bytes, upstream: bool, framer: MqttFramer) -> int:
        keep = 0 if self.swallow else len(data)  # bytes of this read that go through
        for offset, first_byte in framer.feed(data):
            kind = first_byte >> 4
            if upstream and kind == 3:  # a PUBLISH from the gateway
                if not self.swallow and self.forwarded_publishes == self.swallow_after:
                    self.swallow = True
                    keep = offset  # the packets before this one still go through
                if self.swallow:
                    self.swallowed_publishes += 1
                else:
                    self.forwarded_publishes += 1
            elif not upstream and kind == 4 and keep:  # a PUBACK that reaches the gateway
                self.pubacks += 1
        return keep

    def cut(self) -> None:
        super().cut()
        self.swallow = False
        self.swallow_after = None


@pytest.mark.parametrize("swallow_after", [250, 1250])
async def test_messages_in_flight_when_the_line_is_cut_are_sent_again(
    tmp_path: Path, mosquitto_factory: Any, swallow_after: int
) -> None:
    broker = mosquitto_factory(persistence=True)
    consumer = Consumer(broker, f"consumer-{broker.port}").start()
    line = await CuttableLink(broker.port).start()
    # After this many PUBLISHes went through, the next ones are lost on the way and no PUBACK comes
    # back: 250 falls in the opening burst (the rate cap's bucket starts full, so the window is full
    # and much of it may have reached the broker when the line goes dead); 1250 in the capped flow.
    line.swallow_after = swallow_after
    try:
        # a rate cap keeps the burst going long enough to cut it in the middle, whatever the machine's load
        async with running_gateway(config(tmp_path, line.port, count=1500, outbox="{max_rate: 1000}")) as gw:
            # With no PUBACK coming, the gateway sends on until its whole window waits for one, and
            # stops there: how many of those the broker got first depends on timing (none at all when
            # the window was sent before a PUBACK came), so the test waits for the window, not a count.
            window = gw.outbox.config.inflight
            await wait_for(lambda: line.unacknowledged >= window, timeout=30)
            line.cut()
            lost = line.swallowed_publishes  # none of these reached the broker
            out = node(gw, "boiler", "out")
            await wait_for(lambda: out.n_in == 3000 and gw.outbox.count == 0, timeout=60)
            await wait_for(lambda: len(consumer.seqs()) >= 3000, timeout=60)
            assert gw.outbox.replayed >= lost
        first = check_delivery(consumer.got, set(range(1, 3001)))
        # the swallowed ones first reached the broker when sent again, marked as such
        assert sum(1 for m in first.values() if m["replayed"]) >= lost
    finally:
        await line.close()
        consumer.stop()


async def test_quota_drops_the_oldest_and_says_how_many(tmp_path: Path, mosquitto_factory: Any) -> None:
    broker = mosquitto_factory(persistence=True)
    consumer = Consumer(broker, f"consumer-{broker.port}").start()
    broker.stop()  # the consumer's session waits in the broker's persistence
    try:
        text = config(tmp_path, broker.port, count=500, outbox="{max_messages: 300}", console="{port: 0, auth: false}")
        async with running_gateway(text) as gw:
            out = node(gw, "boiler", "out")
            await wait_for(lambda: out.n_out == 1000, timeout=30)
            assert gw.outbox.dropped == 700 and gw.outbox.count == 300
            status, metrics = await get(gw, "/metrics")
            assert status == 200
            assert "sluice_outbox_dropped_total 700.0" in metrics
            assert "sluice_outbox_messages 300.0" in metrics
            _, health = await get(gw, "/healthz")
            assert health["outbox"]["dropped"] == 700 and health["outbox"]["messages"] == 300
            assert any("outbox nearly full" in p for p in health["problems"])
            broker.start()
            await wait_for(lambda: len(consumer.seqs()) >= 300, timeout=30)
            await wait_for(lambda: gw.outbox.count == 0)
        # exactly the newest 300 arrived, none of the dropped ones
        assert consumer.seqs() == set(range(701, 1001))
    finally:
        consumer.stop()


async def test_sigkilled_gateway_delivers_its_backlog_after_restart(tmp_path: Path, mosquitto_factory: Any) -> None:
    broker = mosquitto_factory(persistence=True)
    consumer = Consumer(broker, f"consumer-{broker.port}").start()
    broker.stop()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(config(tmp_path, broker.port, count=500))
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "gateway.cli", "run", str(cfg), "--log-level", "warning"]
    log_path = tmp_path / "gateway.log"

    def start() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    proc = start()
    try:
        await wait_for(lambda: outbox_rows(data) == 1000 or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, log_path.read_text()
        proc.send_signal(signal.SIGKILL)  # a power cut, with the whole backlog on disk
        proc.wait(10)
        assert outbox_rows(data) == 1000

        broker.start()
        proc = start()
        # the restarted gateway simulates 1000 more alerts; the backlog comes first
        await wait_for(lambda: len(consumer.seqs()) >= 2000, timeout=60)
        first = check_delivery(consumer.got, set(range(1, 2001)))
        assert all(first[s]["replayed"] for s in range(1, 1001)), "a backlog message is not marked replayed"
        assert not any(first[s]["replayed"] for s in range(1001, 2001))
        await wait_for(lambda: outbox_rows(data) == 0, timeout=30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        consumer.stop()
