"""The `key` option of the sources that read named streams — mqtt, kafka, redis — and the
destination templates of kafka_out and redis_out: the same rules, each in its own naming scheme
(MQTT topics split at /, Kafka topics at ., Redis streams at :).

The kafka and redis sources run against their real peers; the rules at validation time need none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from tests._peers import KafkaCollector, RedisServer, TansuBroker
from tests._util import wait_for
from tests.gateway._harness import running_gateway
from tests.nodes.test_kafka import produce
from tests.nodes.test_kafka import source_config as kafka_source_config
from tests.nodes.test_redis import Reader, read_until, xadd_all
from tests.nodes.test_redis import source_config as redis_source_config

SOURCES = {
    "mqtt": '{id: src, type: mqtt, connection: m, topic: "plant/#"KEY}',
    "kafka": '{id: src, type: kafka, bootstrap_servers: "k:9092", topic: plant.line1KEY}',
    "redis": '{id: src, type: redis, url: "redis://127.0.0.1:1/0", stream: "plant:line1"KEY}',
}
SINKS = {
    "kafka_out": '{id: out, type: kafka_out, input: src, bootstrap_servers: "k:9092", topic: DEST}',
    "redis_out": '{id: out, type: redis_out, input: src, url: "redis://127.0.0.1:1/0", stream: DEST}',
}


def config(source: str, key: str | None = None, *, sink: str | None = None, dest: str = "") -> str:
    nodes = [SOURCES[source].replace("KEY", "" if key is None else f", key: {json.dumps(key)}")]
    if sink:
        nodes.append(SINKS[sink].replace("DEST", json.dumps(dest)))
    lines = "".join(f"      - {n}\n" for n in nodes)
    return f"""\
gateway: {{id: gw}}
connections: {{m: {{type: mqtt, host: 127.0.0.1, port: 1}}}}
pipelines:
  - name: p
    nodes:
{lines}"""


def issues(text: str) -> list[tuple[str, str]]:
    try:
        parse_config(text, "t.yaml", {})
    except ConfigError as err:
        return [(i.path, i.message) for i in err.issues]
    return []


# --- at validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ("mqtt", "topic"),
        ("mqtt", "topic[-1]"),
        ("kafka", "record_key"),
        ("kafka", "topic"),
        ("kafka", "topic[1]"),
        ("redis", "auto"),
        ("redis", "stream"),
        ("redis", "stream[0]"),
        ("mqtt", 'topic[0] + "-" + payload.dev'),
        ("kafka", 'topic[0] + "-" + payload.dev'),
        ("redis", 'topic[0] + "-" + payload.dev'),
    ],
)
def test_every_key_a_source_understands_is_accepted(source: str, key: str) -> None:
    assert issues(config(source, key)) == []


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ("mqtt", "topic[1"),
        ("mqtt", "record_key"),  # a name of another source's, not a CEL expression here
        ("kafka", "auto"),
        ("kafka", "stream[1]"),
        ("redis", "record_key"),
        ("redis", "topic[1"),
    ],
)
def test_a_key_the_source_cannot_read_is_refused_on_its_field(source: str, key: str) -> None:
    found = issues(config(source, key))
    assert [path for path, _ in found] == ["pipelines.0.nodes.0.key"], found


@pytest.mark.parametrize("sink", sorted(SINKS))
def test_destination_templates_are_checked_on_their_own_field(sink: str) -> None:
    field = "topic" if sink == "kafka_out" else "stream"
    assert issues(config("kafka", sink=sink, dest="out.{pipeline}.{key}")) == []
    bad = issues(config("kafka", sink=sink, dest="out.{pipe}"))
    assert [(p, "unknown template field {pipe}" in m) for p, m in bad] == [(f"pipelines.0.nodes.1.{field}", True)], bad
    bad = issues(config("kafka", sink=sink, dest="out.#"))
    assert [(p, "+ or #" in m) for p, m in bad] == [(f"pipelines.0.nodes.1.{field}", True)], bad


# --- on real peers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("record_key", "a"),
        ("topic", "plant.line1"),
        ("topic[1]", "line1"),
        ('topic[0] + "/" + payload.dev', "plant/d1"),
    ],
)
async def test_kafka_source_keys(tmp_path: Path, tansu: TansuBroker, key: str, expected: str) -> None:
    await produce(tansu.bootstrap, "plant.line1", [("a", {"value": 1, "dev": "d1"})])
    text = kafka_source_config(tmp_path, tansu.bootstrap, "plant.line1", extra=f", key: {json.dumps(key)}")
    async with KafkaCollector(tansu.bootstrap, "copy") as got, running_gateway(text):
        await wait_for(lambda: len(got.records) == 1, timeout=30)
        assert json.loads(got.records[0].value)["key"] == expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("auto", "plant:line1"),  # no `key` in the payload: the stream's name
        ("stream", "plant:line1"),
        ("stream[1]", "line1"),
        ('topic[0] + "/" + payload.dev', "plant/d1"),
    ],
)
async def test_redis_source_keys(tmp_path: Path, redis_server: RedisServer, key: str, expected: str) -> None:
    await xadd_all(redis_server.url, "plant:line1", [{"data": json.dumps({"value": 1, "dev": "d1"})}])
    text = redis_source_config(tmp_path, redis_server.url, stream="plant:line1", extra=f", key: {json.dumps(key)}")
    copy = Reader(redis_server.url, "copy")
    async with running_gateway(text):
        await read_until(copy, lambda: len(copy.entries) == 1)
        assert json.loads(copy.entries[0]["data"])["key"] == expected
