"""The ``serial`` source against a real pty pair: codecs end to end, bad input, a port that vanishes."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from firmware_bridges import CodecOptions, make_encoder
from firmware_bridges.simulators import PtyDevice, SerialSimulator
from gateway import node as node_mod
from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.events import Event
from gateway.node import NodeOptions, Sink, register
from nodes.devices import HANGUP_CHECK, READ_SIZE
from tests._util import wait_for
from tests.gateway._harness import get, node, running_gateway


class CollectOptions(NodeOptions):
    type: Literal["t_dev_collect"]
    delay: float = 0.0
    hold: bool = False  # each write waits for GATE: the pipeline backs up until a test opens it


GATE = asyncio.Event()


class Collect(Sink):
    Options = CollectOptions

    def __init__(self, options: Any, ctx: Any):
        super().__init__(options, ctx)
        self.events: list[Event] = []

    async def write(self, batch: list[Event]) -> None:
        if self.options.hold:  # type: ignore[attr-defined]
            await GATE.wait()
        if self.options.delay:  # type: ignore[attr-defined]
            await asyncio.sleep(self.options.delay)  # type: ignore[attr-defined]
        self.events.extend(batch)


@pytest.fixture(autouse=True)
def collect_sink() -> Iterator[None]:
    register(Collect)
    yield
    node_mod._REGISTRY.pop("t_dev_collect", None)


def config(tmp_path: Path, port: str | Path, codec: str, extra: str = "") -> str:
    return f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data"}}
pipelines:
  - name: field
    nodes:
      - {{id: dev, type: serial, port: "{port}", baud: 115200, codec: {codec}, reconnect_max: 0.3s{extra}}}
      - {{id: out, type: t_dev_collect, input: dev}}
console: {{port: 0, auth: false}}
"""


def values(gw: Any, key: str | None = None) -> list[float]:
    return [e.value for e in node(gw, "field", "out").events if key is None or e.key == key]


async def test_json_lines_end_to_end(tmp_path: Path) -> None:
    with PtyDevice() as dev:
        async with running_gateway(config(tmp_path, dev.path, "json")) as gw:
            await wait_for(lambda: node(gw, "field", "dev").health()["state"] == "up")
            await dev.send(b'{"temp": 21.5, "hum": 40, "ts": 1700000000}\n{"temp": 22')
            await dev.send(b".0}\n")
            await wait_for(lambda: len(values(gw)) == 3)
            evs = node(gw, "field", "out").events
            assert [(e.key, e.value, e.source) for e in evs] == [
                ("temp", 21.5, "dev"),
                ("hum", 40.0, "dev"),
                ("temp", 22.0, "dev"),
            ]
            assert evs[0].ts == 1700000000.0 and evs[2].ts > 1700000000.0  # device time, else ingest time


async def test_csv_with_a_quoted_delimiter_end_to_end(tmp_path: Path) -> None:
    """Cells were split on every comma: a quoted site name broke its row, which was dead-lettered."""
    codec = "{type: csv, device_field: site}"
    with PtyDevice() as dev:
        async with running_gateway(config(tmp_path, dev.path, codec)) as gw:
            src = node(gw, "field", "dev")
            await wait_for(lambda: src.health()["state"] == "up")
            await dev.send(b'site,temp\r\n"kiln, north",812.5\r\nyard,12.0\r\n"open,99\r\n')
            await wait_for(lambda: len(values(gw)) == 2 and src.counters()["malformed"] == 1)
            assert [(e.key, e.value) for e in node(gw, "field", "out").events] == [
                ("kiln, north.temp", 812.5),
                ("yard.temp", 12.0),
            ]


@pytest.mark.parametrize(
    "codec",
    [
        "nmea",
        "csv",
        "kv",
        "{type: cobs, crc: crc32, fields: [{name: t, type: i16, scale: 0.01}, {name: rh, type: u8}]}",
    ],
)
async def test_every_codec_through_the_simulator(tmp_path: Path, codec: str) -> None:
    import yaml
    from pydantic import TypeAdapter

    opts = TypeAdapter(CodecOptions).validate_python(yaml.safe_load(codec))
    with PtyDevice() as dev:
        sim = SerialSimulator(opts, dev, interval=0.0, seed=1)
        async with running_gateway(config(tmp_path, dev.path, codec)) as gw:
            await wait_for(lambda: node(gw, "field", "dev").health()["state"] == "up")
            await sim.run(count=20)
            src = node(gw, "field", "dev")
            await wait_for(lambda: src.health()["decoder"]["pieces"] >= 20)
            assert src.counters()["malformed"] == 0
            want = {
                "nmea": {"gps.lat", "gps.lon", "wind.rel.speed", "xdr.AIRT"},
                "csv": {"temp", "hum"},
                "kv": {"temp", "hum", "vbat"},
            }.get(codec, {"t", "rh"})
            # decoded is not yet delivered: the events reach the sink through the pipeline's queue
            await wait_for(lambda: want <= {e.key for e in node(gw, "field", "out").events})


async def test_bad_input_is_dead_lettered_by_kind_and_decoding_resyncs(tmp_path: Path) -> None:
    with PtyDevice() as dev:
        async with running_gateway(config(tmp_path, dev.path, "{type: nmea, max_line: 90}")) as gw:
            src = node(gw, "field", "dev")
            await wait_for(lambda: src.health()["state"] == "up")
            good = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"
            await dev.send(b"\x00\xfe\xff" + good)  # noise, then a sentence: resync
            await dev.send(good.replace(b"*47", b"*11"))  # wrong checksum
            await dev.send(b"$" + b"A" * 200 + b"\r\n")  # over-long line
            await dev.send(
                b"$GPGGA,123519,48x7.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*"
                + b"%02X\r\n" % _xor(b"GPGGA,123519,48x7.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,")
            )
            await dev.send(b"$WIMWV,NaN,R,inf,M,A*" + b"%02X\r\n" % _xor(b"WIMWV,NaN,R,inf,M,A"))
            await dev.send(good)
            await wait_for(lambda: len(values(gw, "gps.lat")) == 2)
            await wait_for(lambda: src.counters()["malformed"] == 6)
            c = src.counters()
            assert (
                c["malformed_garbage"],
                c["malformed_checksum"],
                c["malformed_overlong"],
                c["malformed_malformed"],
                c["malformed_nonfinite"],
            ) == (1, 1, 1, 1, 2)
            assert gw.dead_letters.counts[("field", "dev")] == 6
            reasons = [r["reason"] for r in gw.dead_letters.recent]
            assert any("checksum 11 does not match 47" in r and dev.path in r for r in reasons), reasons
            status, metrics = await get(gw, "/metrics")
            assert status == 200
            line = [
                x for x in metrics.splitlines() if x.startswith("sluice_node_malformed_total{") and 'node="dev"' in x
            ]
            assert line and line[0].endswith(" 6.0"), line


def _xor(body: bytes) -> int:
    c = 0
    for b in body:
        c ^= b
    return c


async def test_port_that_vanishes_is_down_then_resumes(tmp_path: Path) -> None:
    link = tmp_path / "ttyUSB0"
    dev = PtyDevice(link)
    enc = make_encoder(parse_codec("kv"))
    try:
        async with running_gateway(config(tmp_path, link, "kv")) as gw:
            src = node(gw, "field", "dev")
            await wait_for(lambda: src.health()["state"] == "up")
            await dev.send(enc.encode({"v": 1.0}))
            await wait_for(lambda: values(gw) == [1.0])

            dev.unplug()
            await wait_for(lambda: src.health()["state"] == "down")
            h = src.health()
            assert h["losses"] == 1 and h["reason"], h
            # reopening fails while it is gone, and the health says why
            await wait_for(lambda: "cannot open" in (src.health().get("reason") or ""))
            status, body = await get(gw, "/healthz")
            assert status == 200 and body["status"] == "degraded", body
            assert any("dev" in p and "down" in p for p in body["problems"]), body

            dev.plug()
            await wait_for(lambda: src.health()["state"] == "up", timeout=10)
            await dev.send(enc.encode({"v": 2.0}))
            await wait_for(lambda: values(gw) == [1.0, 2.0])
            status, body = await get(gw, "/healthz")
            assert body["status"] == "ok", body
    finally:
        dev.unplug()


async def test_missing_port_at_start_keeps_the_gateway_running(tmp_path: Path) -> None:
    link = tmp_path / "ttyACM0"
    async with running_gateway(config(tmp_path, link, "json")) as gw:
        src = node(gw, "field", "dev")
        await wait_for(lambda: src.health()["state"] == "down")
        assert "cannot open" in src.health()["reason"] and str(link) in src.health()["reason"]
        with PtyDevice(link) as dev:
            await wait_for(lambda: src.health()["state"] == "up", timeout=10)
            await dev.send(json.dumps({"x": 5}).encode() + b"\n")
            await wait_for(lambda: values(gw) == [5.0])
        assert gw.state == "running"


def backed_up(tmp_path: Path, port: str | Path, queue_size: int, sink: str) -> str:
    """JSON lines into small queues and a sink slowed by ``sink`` (its options), so reading pauses."""
    text = config(tmp_path, port, "json").replace(
        "gateway: {", f"gateway: {{queue_size: {queue_size}, sink_queue_size: 10, "
    )
    return text.replace("type: t_dev_collect,", f"type: t_dev_collect, {sink},")


async def test_full_pipeline_pauses_reading_and_loses_nothing(tmp_path: Path) -> None:
    with PtyDevice() as dev:
        async with running_gateway(backed_up(tmp_path, dev.path, 50, "delay: 0.002")) as gw:
            src = node(gw, "field", "dev")
            await wait_for(lambda: src.health()["state"] == "up")
            lines = b"".join(b'{"n": %d}\n' % i for i in range(3000))
            await dev.send(lines)
            await wait_for(lambda: len(values(gw)) == 3000, timeout=20)
            assert values(gw) == [float(i) for i in range(3000)]
            # reading paused while the queue was full: it held at most one read's lines over capacity
            q = gw.pipelines["field"].queue
            assert q.high_water <= 50 + READ_SIZE // len(b'{"n": 0}\n'), q.stats()
            assert q.high_water < 3000, q.stats()
            assert src.n_pauses >= 1


def source_metrics(text: str, pipeline: str, node_id: str) -> dict[str, float]:
    """``sluice_source_*`` samples of one source from a ``/metrics`` answer."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        s.name: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name.startswith("sluice_source_") and s.labels == {"pipeline": pipeline, "node": node_id}
    }


async def test_the_engine_pauses_the_port_and_it_is_read_again_once_the_sink_caught_up(tmp_path: Path) -> None:
    """Backpressure for the serial port goes through the engine's queue, like every push source:
    the engine counts the pause and says so on /metrics and /api/pipelines; once the slow sink
    has caught up, the port is read again and nothing was lost."""
    with PtyDevice() as dev:
        async with running_gateway(backed_up(tmp_path, dev.path, 50, "delay: 0.002")) as gw:
            src = node(gw, "field", "dev")
            await wait_for(lambda: src.health()["state"] == "up")
            await dev.send(b"".join(b'{"n": %d}\n' % i for i in range(3000)))
            await wait_for(lambda: len(values(gw)) == 3000, timeout=30)
            _status, text = await get(gw, "/metrics")
            m = source_metrics(text, "field", "dev")
            assert m["sluice_source_pauses_total"] >= 1, m
            assert m["sluice_source_paused"] == 0, m  # resumed once the queue drained
            _status, body = await get(gw, "/api/pipelines")
            (entry,) = [n for p in body["pipelines"] if p["name"] == "field" for n in p["nodes"] if n["id"] == "dev"]
            assert entry["counters"]["pauses"] == m["sluice_source_pauses_total"]
            assert entry["health"]["paused"] is False
            # the port is read again: a second burst arrives whole and in order
            await dev.send(b"".join(b'{"n": %d}\n' % i for i in range(3000, 3500)))
            await wait_for(lambda: len(values(gw)) == 3500, timeout=30)
            assert values(gw) == [float(i) for i in range(3500)]


async def test_port_vanishing_while_reading_is_paused_is_noticed(tmp_path: Path) -> None:
    """Paused reading polls nothing, so the port's hang-up is checked apart; the lines read stay queued."""
    link = tmp_path / "ttyUSB0"
    dev = PtyDevice(link)
    GATE.clear()
    try:
        async with running_gateway(backed_up(tmp_path, link, 50, "hold: true")) as gw:
            src = node(gw, "field", "dev")
            await wait_for(lambda: src.health()["state"] == "up")
            asyncio.get_running_loop().create_task(dev.send(b"".join(b'{"n": %d}\n' % i for i in range(2000))))
            await wait_for(lambda: src.health()["paused"])
            read = src.n_in
            dev.unplug()
            # the sink still holds the pipeline full: only the hang-up check can see the port go
            await wait_for(lambda: src.health()["state"] == "down", timeout=10)
            assert src.health()["losses"] == 1
            GATE.set()
            await wait_for(lambda: len(values(gw)) == src.n_in, timeout=20)
            assert src.n_in >= read and values(gw) == [float(i) for i in range(src.n_in)]  # in order, none lost
            dev.plug()
            await wait_for(lambda: src.health()["state"] == "up", timeout=10)
            n = len(values(gw))
            await dev.send(b'{"n": -1}\n')
            await wait_for(lambda: len(values(gw)) == n + 1)
    finally:
        GATE.set()
        dev.unplug()


async def test_one_hang_up_check_at_a_time_under_sustained_back_pressure(tmp_path: Path) -> None:
    """Reading pauses and resumes many times a second under overload; the port is still checked about once a second."""
    with PtyDevice() as dev:
        async with running_gateway(backed_up(tmp_path, dev.path, 20, "delay: 0.01")) as gw:
            src = node(gw, "field", "dev")
            await wait_for(lambda: src.health()["state"] == "up")
            checks: list[tuple[float, int]] = []  # (when, pauses so far)
            check = src._check_hangup

            def counted(t: Any) -> None:
                checks.append((time.monotonic(), src.n_pauses))
                check(t)

            src._check_hangup = counted

            async def flood() -> None:
                while True:  # as long as the test looks: the pressure must outlast several checks
                    await dev.send(b'{"n": 1}\n' * 2000)

            writer = asyncio.get_running_loop().create_task(flood())
            await wait_for(lambda: len(checks) >= 4, timeout=30)
            writer.cancel()
            times, pauses = zip(*checks, strict=True)
            # however often reading paused, each check came a full HANGUP_CHECK after the one before
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert min(gaps) >= HANGUP_CHECK - 0.01, (gaps, pauses)
            assert pauses[-1] - pauses[0] > 2 * (len(checks) - 1), ("the test needs reading to pause often", pauses)


def parse_codec(spec: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(CodecOptions).validate_python(spec)


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    bad = config(tmp_path, "/dev/ttyUSB0", "{type: cobs, fields: [{type: u9, name: x}]}")
    with pytest.raises(ConfigError) as err:
        parse_config(bad, "test.yaml", {})
    lines = [str(i) for i in err.value.issues]
    # file, line of the node, and the path down to the field inside the codec
    assert lines[0] == (
        "test.yaml:5: pipelines.0.nodes.0.codec.cobs.fields.0.type: input should be "
        "'u8', 'i8', 'u16', 'i16', 'u32', 'i32', 'u64', 'i64', 'f32', 'f64' or 'pad'"
    ), lines
