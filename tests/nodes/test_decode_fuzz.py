"""Wide fuzz of every source's decode → store path, at the decode functions, into real stores.

Hostile payloads: lone surrogates (as JSON escapes and as raw bytes), NaN/Infinity, nesting up to
12,000 levels, integers of 5,000 digits, floats beyond any double, and random bytes. For each
source's own decode function (mqtt, serial's codecs, http push/poll, websocket) the property is:
decoding never raises; every event it yields can be written by every store (UTF-8 text, strict
JSON without NaN, its key a row in SQLite); every rejection reaches a real dead-letter file; and
the state store, the history and the dead letters never have to drop a record.

The same payloads go end to end through real peers in test_decode_fuzz_e2e.py (fewer examples).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_bridges import CodecOptions, make_decoder
from gateway.deadletter import DeadLetters
from gateway.engine import BatchQueue, SourceQueue
from gateway.events import Event
from gateway.history import History
from gateway.node import NodeContext
from gateway.store import StateStore
from nodes.devices import WebSocketOptions, WebSocketSource
from nodes.http import HttpPushOptions, HttpPushSource
from nodes.sources import MqttSource, MqttSourceOptions

# --- hostile payloads ------------------------------------------------------------------------

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXT = st.text(st.one_of(st.characters(), SURROGATES), max_size=8)
KEYS = st.one_of(TEXT, st.sampled_from(["value", "ts", "t", "k", "dev", "v"]))
NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=2**63, max_value=10**400),  # beyond SQLite's INTEGER, beyond a double
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=16,
)
OBJECTS = st.dictionaries(KEYS, VALUES, max_size=6)


def _dump(obj: Any, raw: bool) -> bytes:
    """JSON text; ``raw``: non-ASCII (and surrogates) as raw UTF-8 bytes instead of \\u escapes."""
    return json.dumps(obj, ensure_ascii=not raw).encode("utf-8", "surrogatepass")


def _deep(depth: int, kind: str, inner: bytes) -> bytes:
    if kind == "[":
        return b"[" * depth + inner + b"]" * depth
    return b'{"value":' * depth + inner + b"}" * depth


EXTREMES = st.sampled_from(
    [
        b'{"value": 1' + b"0" * 5000 + b"}",  # 10**5000: Python refuses over 4,300 digits
        b'{"value": -1' + b"0" * 400 + b"}",  # a 400-digit int: no float holds it
        b'{"value": 1e999}',  # a float literal beyond any double: inf
        b'{"value": -1e400, "t": 2}',
        b'{"value": NaN}',
        b'{"value": Infinity, "ts": NaN}',
        b'{"value": 1, "ts": 1' + b"0" * 5000 + b"}",
        b'{"t\\ud800": 1}',
        b'{"value": 1, "k": "\\udfff"}',
        b'{"\xed\xa0\x80": 1}',
        b'{"a#b": 1, "c+d": 2, "e\\u0000f": 3, "": 4}',  # keys no MQTT topic may hold
        b'{"value": 1, "ts": "2024-01-01T00:00:00\\ud800Z"}',
        b"",
        b"\n\n",
    ]
)

PAYLOADS = st.one_of(
    st.builds(_dump, OBJECTS, st.booleans()),
    st.builds(_dump, VALUES, st.booleans()),
    st.builds(_deep, st.integers(1, 12_000), st.sampled_from("[{"), st.sampled_from([b"1", b'"\\ud800"', b"NaN"])),
    EXTREMES,
    st.builds(lambda parts: b"\n".join(parts), st.lists(st.builds(_dump, OBJECTS, st.booleans()), max_size=4)),
    st.binary(max_size=64),
)

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

# --- stores ----------------------------------------------------------------------------------


class Stores:
    """Real dead-letter and state (with history) files, written synchronously after each example."""

    def __init__(self, root: Path):
        self.dead = DeadLetters(root / "deadletter.db")
        self.state = StateStore(root / "state.db", commit_interval=0.0)
        self.state.open()
        self.history = History(self.state)

    def ctx(self, node_id: str) -> NodeContext:
        return NodeContext("gw", "fuzz", node_id, "", None, self.dead, clock=lambda: 1_700_000_000.0)

    def take(self, node_id: str, events: list[Event]) -> None:
        """What the stores do with decoded events: check them, then write them for real."""
        rows = []
        for ev in events:
            assert type(ev.key) is str
            ev.key.encode()  # a row key, an MQTT topic level, a log line
            text = json.dumps(ev.to_dict(), allow_nan=False)  # the outbox, the console, strict JSON
            text.encode()
            rows.append(("fuzz", node_id, ev.key, text.encode()))
            if type(ev.value) is float:
                self.history.add(ev.key, ev.ts, ev.value)
        self.state.write(rows)
        self.history.flush()
        self.state.flush_sync(timeout=30)
        pending = list(self.dead._pending)
        self.dead._pending.clear()
        if pending:
            assert self.dead._write(pending) == []  # every dead letter written
        assert self.state.rejected_rows == 0 and self.dead.lost == 0 and self.history.dropped == 0

    def close(self) -> None:
        self.state.close_sync()
        if self.dead._db is not None:
            self.dead._db.close()


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Stores]:
    s = Stores(tmp_path)
    try:
        yield s
    finally:
        s.close()


def fuzz(stores: Stores, node_id: str, decode: Callable[[bytes], list[Event]], quiet_ok: bool = False) -> None:
    """``quiet_ok``: the codec may take a line without a reading or an error (a CSV header row)."""

    @FUZZ
    @given(payload=PAYLOADS)
    def run(payload: bytes) -> None:
        before = stores.dead.total
        events = decode(payload)
        stores.take(node_id, events)
        # nothing vanishes unseen: a payload gives readings or a dead letter (or held none: blank, [])
        assert events or stores.dead.total > before or payload.strip() in (b"", b"[]") or quiet_ok

    run()


# --- each source's decode ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"key": "topic"},
        {"key": "payload.k", "value_field": "v"},
        {"value_field": None},
        {"format": "raw"},
    ],
)
def test_mqtt_decode(stores: Stores, options: dict[str, Any]) -> None:
    opts = MqttSourceOptions(id="m", type="mqtt", connection="c", topic="in/#", **options)
    src = MqttSource(opts, stores.ctx("m"))

    def decode(payload: bytes) -> list[Event]:
        ev = src.decode("in/x", payload)
        return [] if ev is None else [ev]

    fuzz(stores, "m", decode)


def _reading(v: Any, ts: Any, extra: dict[str, Any], dup: tuple[bytes, Any] | None, raw: bool, last: bool) -> bytes:
    """A reading as devices send it (value and time), with other fields around it, maybe a field
    twice: what the typed decode of the common reading takes or hands on."""
    own = [b'"value": ' + _dump(v, raw), b'"ts": ' + _dump(ts, raw)]
    others = [_dump(k, raw) + b": " + _dump(x, raw) for k, x in extra.items()]
    if dup is not None:
        others.append(b'"' + dup[0] + b'": ' + _dump(dup[1], raw))
    return b"{" + b", ".join([*others, *own] if last else [*own, *others]) + b"}"


COMMON = st.builds(
    _reading,
    st.one_of(st.floats(-1e6, 1e6), NUMBERS),
    st.one_of(st.floats(1e9, 2e9), st.integers(-10, 10**12), NUMBERS, st.none()),
    st.dictionaries(KEYS, VALUES, max_size=3),
    st.one_of(st.none(), st.tuples(st.sampled_from([b"value", b"ts"]), st.one_of(NUMBERS, TEXT))),
    st.booleans(),
    st.booleans(),
)

_T = b'"ts": 1700000000.5'
COMMON_EXTREMES = st.sampled_from(
    [
        b'{"value": 1.5, ' + _T + b', "x": "\xed\xa0\x80"}',  # a raw lone surrogate where the typed decode skips
        b'{"value": 1.5, ' + _T + b', "\xed\xa0\x80": 1}',
        b'{"value": 1.5, ' + _T + b', "x": "\xff\xfe"}',  # not UTF-8
        b'{"value": 1.5, ' + _T + b', "x": "\\ud800"}',
        b'{"value": 1.5, ' + _T + b', "x": 1' + b"0" * 5000 + b"}",  # over 4,300 digits, skipped
        b'{"value": 1.5, ' + _T + b', "x": NaN}',
        b'{"value": 1.5, ' + _T + b', "x": [[[{"y": [1e400]}]]]}',
        b'{"value": 1.5, "value": "x", ' + _T + b"}",
        b'{"value": "x", "value": 2, ' + _T + b"}",
        b'{"value": 2.5, ' + _T + b', "ts": 1700000000000}',
        b'{"value": 2.5, "ts": 1700000000000}',  # milliseconds
        b'{"value": 123456789012345678901234567890, "ts": 1700000000}',
        b'{"value": 9007199254740993, "ts": 1700000000}',  # 2**53 + 1
        b'{"value": -0.0, "ts": 1e-300}',
        b'{"value": true, ' + _T + b"}",
        b' {"value": 1.5, ' + _T + b"} ",
        b'{"value": 1.5, ' + _T + b"} x",
        b'{"value": 1.5}',
    ]
)

READINGS = st.one_of(
    PAYLOADS,
    COMMON,
    COMMON_EXTREMES,
    st.builds(
        lambda v, ts, k: _dump({"value": v, "ts": ts, "k": k}, False),
        NUMBERS,
        st.one_of(NUMBERS, st.none(), TEXT),
        st.sampled_from(["a", "b"]),
    ),
)


@pytest.mark.parametrize(
    "options", [{"key": "topic[1]"}, {"key": "topic"}, {"key": "payload.k"}, {"value_field": None}, {"ts_field": "t"}]
)
def test_mqtt_decode_many_is_decode_on_each(stores: Stores, options: dict[str, Any]) -> None:
    """A QoS 0 batch is decoded in one loop (``decode_many``): the same events, the same dead
    letters, in the same order, as :meth:`decode` called on each message."""
    opts = MqttSourceOptions(id="m", type="mqtt", connection="c", topic="in/#", **options)
    one, many = MqttSource(opts, stores.ctx("m")), MqttSource(opts, stores.ctx("m"))

    @FUZZ
    @given(msgs=st.lists(st.tuples(st.sampled_from(["in/x", "in/y/z", "in"]), READINGS), max_size=8))
    def run(msgs: list[tuple[str, bytes]]) -> None:
        stores.dead._pending.clear()
        expected = [e for t, p in msgs if (e := one.decode(t, p)) is not None]
        dead_one = [r[3:] for r in stores.dead._pending]  # reason, key, payload
        stores.dead._pending.clear()
        got = many.decode_many(msgs)
        dead_many = [r[3:] for r in stores.dead._pending]
        stores.dead._pending.clear()
        assert [e.to_dict() for e in got] == [e.to_dict() for e in expected]
        assert [(type(e.value), type(e.ts)) for e in got] == [(type(e.value), type(e.ts)) for e in expected]
        assert dead_many == dead_one and many.n_malformed == one.n_malformed

    run()


CODECS = [
    "json",
    {"type": "json", "max_line": 1_048_576},
    {"type": "json", "record": "r", "max_line": 1_048_576},
    {"type": "json", "key_field": "k", "value_field": "value"},
    {"type": "json", "device_field": "dev"},
    {"type": "csv", "columns": ["t", "value", "dev"], "device_field": "dev"},
    "csv",
    "kv",
]


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: json.dumps(c))
def test_serial_codec_decode(stores: Stores, codec: Any) -> None:
    from pydantic import TypeAdapter

    opts = TypeAdapter(CodecOptions).validate_python(codec)

    def decode(payload: bytes) -> list[Event]:
        # a fresh decoder per payload, as after a reconnect; what the serial source does with each read
        decoder = make_decoder(opts)
        events, errors = decoder.feed_as(payload + b"\n", Event, time.time(), "s")
        for e in errors:
            stores.dead.record("fuzz", "s", str(e), None, e.raw)
        return events

    fuzz(stores, "s", decode, quiet_ok=opts.type == "csv")


def test_http_push_and_poll_decode(stores: Stores) -> None:
    # http_poll decodes its answers with the same method as the push source
    src = HttpPushSource(HttpPushOptions(id="h", type="http", token="x" * 16), stores.ctx("h"))

    def decode(payload: bytes) -> list[Event]:
        events, reasons = src._decode("POST /ingest/h", payload)
        for r in reasons:
            r.encode()  # what the client is answered
        return events

    fuzz(stores, "h", decode)


def test_websocket_decode(stores: Stores) -> None:
    opts = WebSocketOptions(
        id="w", type="websocket", url="ws://127.0.0.1:1/", codec={"type": "json", "max_line": 1_048_576}
    )
    src = WebSocketSource(opts, stores.ctx("w"))
    fuzz(stores, "w", src.decode)


@pytest.mark.parametrize("batch", [1, 3, 500])
def test_mqtt_reads_handed_over_whole_make_the_batches_of_one_call_each(stores: Stores, batch: int) -> None:
    """The QoS 0 fast path hands the messages of a socket read to the source in one call
    (``_on_messages_qos0``): the pipeline gets the same batches — the same events, cut at the same
    places — and the same dead letters as from one ``_on_message_qos0`` call per message. Batches
    go into a real pipeline input queue; the loop turns between reads, as it does between reads
    of a socket."""
    opts = MqttSourceOptions(id="m", type="mqtt", connection="c", topic="in/#", key="topic[1]", batch=batch)
    reads_of = st.lists(st.tuples(st.sampled_from(["in/x", "in/y/z", "in"]), READINGS), max_size=7)

    async def drive(reads: list[list[tuple[str, bytes]]], whole: bool) -> tuple[list[Any], list[Any], int]:
        stores.dead._pending.clear()
        src = MqttSource(opts, stores.ctx("m"))
        q = BatchQueue(1_000_000)
        src._out = SourceQueue(q, 0, src)
        for read in reads:
            if whole:
                src._on_messages_qos0(list(read))
            else:
                for topic, payload in read:
                    src._on_message_qos0(None, topic, payload, 0, {})
            await asyncio.sleep(0)  # the next read comes at a later turn of the loop
        await asyncio.sleep(0)
        batches = []
        while len(q):
            batches.append([e.to_dict() for e in q.get_nowait().events])
        dead = [r[3:] for r in stores.dead._pending]
        stores.dead._pending.clear()
        return batches, dead, src.n_in

    @FUZZ
    @given(reads=st.lists(reads_of, max_size=6))
    def run(reads: list[list[tuple[str, bytes]]]) -> None:
        assert asyncio.run(drive(reads, True)) == asyncio.run(drive(reads, False))

    run()
