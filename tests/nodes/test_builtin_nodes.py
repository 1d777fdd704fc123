"""The first built-in nodes on their own: threshold, filter, map, simulate, and the MQTT payload decoder."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import parse_config
from gateway.deadletter import DeadLetters
from gateway.errors import ExpressionError
from gateway.events import Event
from gateway.node import NodeContext, Operator, get_node_type
from nodes._stream import parse_ts
from tests._util import wait_for


def make(node_yaml: str, tmp_path: Path | None = None, connections: str = "") -> Any:
    """One node built from YAML through the real config loader, with a dead-letter table in memory.

    Operators get an upstream source (`up`) so the pipeline validates.
    """
    conns = f"connections: {{{connections}}}\n" if connections else ""
    is_source = "type: simulate" in node_yaml or "type: mqtt," in node_yaml
    if not is_source:
        node_yaml = "{input: up, " + node_yaml[1:]
    text = (
        f"gateway: {{id: gw}}\n{conns}pipelines:\n  - name: p\n    nodes:\n"
        f"      - {{id: up, type: simulate, sensors: [{{key: x}}]}}\n      - {node_yaml}\n"
    )
    opts = parse_config(text, env={}).nodes["p"][1]
    ctx = NodeContext("gw", "p", opts.id, str(tmp_path or "."), None, DeadLetters(None), clock=lambda: 1000.0)
    cls = get_node_type(opts.type)
    assert cls is not None
    return cls(opts, ctx)


def ev(value: Any, key: str = "k", ts: float = 1.0) -> Event:
    return Event(key, ts, value, "s")


def run(node: Any, values: list[Any], key: str = "k") -> list[Event]:
    return node.process_batch([ev(v, key) for v in values])


# --- threshold -----------------------------------------------------------------------------------


def test_threshold_hysteresis_raises_once_and_clears_below_the_clear_level() -> None:
    t = make("{id: hot, type: threshold, above: 90.0, clear_below: 85.0, severity: critical, name: boiler}")
    out = run(t, [80.0, 90.0, 91.0, 95.0, 89.0, 86.0, 84.9, 84.0, 92.0])
    assert [(e.value["state"], e.value["reading"]) for e in out] == [
        ("raised", 91.0),
        ("cleared", 84.9),
        ("raised", 92.0),
    ]
    a = out[0].value
    assert a["alert_key"] == "p/hot/k" and a["severity"] == "critical"
    assert a["rule"] == "boiler above 90 (clears below 85)"
    assert out[0].source == "hot" and out[0].key == "k"


def test_threshold_below_keys_are_independent() -> None:
    t = make("{id: cold, type: threshold, below: 5.0, clear_above: 7.0}")
    out = t.process_batch([ev(4.0, "a"), ev(6.0, "b"), ev(4.5, "b"), ev(6.0, "a"), ev(7.5, "a")])
    assert [(e.key, e.value["state"]) for e in out] == [("a", "raised"), ("b", "raised"), ("a", "cleared")]
    assert out[0].value["rule"] == "a below 5 (clears above 7)"


def test_threshold_on_a_field_and_bad_readings_are_dead_lettered() -> None:
    t = make("{id: hot, type: threshold, above: 1.0, field: temp}")
    out = run(t, [{"temp": 2.0}, {"hum": 3.0}, 5.0, {"temp": math.nan}, {"temp": "x"}, {"temp": 0.0}])
    assert [e.value["state"] for e in out] == ["raised", "cleared"]
    assert t.n_errors == 4
    reasons = [r["reason"] for r in t.ctx.dead_letters.recent]
    assert reasons == [
        "reading has no field 'temp'",
        "reading has no field 'temp'",
        "threshold needs a finite number, got nan",
        "threshold needs a finite number, got 'x'",
    ]


def test_threshold_state_survives_snapshot_and_restore() -> None:
    t = make("{id: hot, type: threshold, above: 10.0}")
    run(t, [11.0])
    t2 = make("{id: hot, type: threshold, above: 10.0}")
    t2.restore(t.snapshot())
    assert run(t2, [12.0]) == []  # already raised: no second alert
    assert [e.value["state"] for e in run(t2, [9.0])] == ["cleared"]


# --- filter and map ---------------------------------------------------------------------------


def test_filter_keeps_true_counts_false_and_dead_letters_non_booleans() -> None:
    f = make("{id: f, type: filter, where: 'value > 1.0'}")
    assert [e.value for e in run(f, [0.0, 2.0, 3.0])] == [2.0, 3.0]
    assert f.counters() == {"in": 0, "out": 0, "errors": 0, "dropped": 1}  # in/out are counted by the chain
    g = make("{id: g, type: filter, where: 'value'}")
    assert [e.value for e in run(g, [True, 1.0, False])] == [True]
    assert g.n_errors == 1 and g.n_dropped == 1
    assert g.ctx.dead_letters.recent[-1]["reason"] == "filter 'value' must give true or false, gave 1.0"


def test_map_value_key_and_fields() -> None:
    m = make("{id: m, type: map, value: 'value * 2.0', key: 'key + \"/x\"'}")
    (out,) = run(m, [1.5])
    assert (out.key, out.value, out.ts, out.source) == ("k/x", 3.0, 1.0, "s")
    f = make("{id: f, type: map, fields: {double: 'value.t * 2.0', tag: 'key'}}")
    (out,) = run(f, [{"t": 2.0}])
    assert out.value == {"double": 4.0, "tag": "k"}
    i = make("{id: i, type: map, value: 'int(value)'}")
    (out,) = run(i, [2.7])
    assert out.value == 2.0 and type(out.value) is float  # readings stay floats


def test_map_errors_are_dead_lettered_with_the_expression() -> None:
    m = make("{id: m, type: map, value: 'value.t * 2.0'}")
    assert [e.value for e in run(m, [{"t": 1.0}, 3.0, {"u": 1.0}])] == [2.0]
    reasons = [r["reason"] for r in m.ctx.dead_letters.recent]
    assert len(reasons) == 2 and all(r.endswith("(in expression 'value.t * 2.0')") for r in reasons)
    with pytest.raises(ExpressionError):
        m._value(ev({"u": 1.0}))


def test_filter_and_map_over_a_batch_give_what_they_give_event_by_event() -> None:
    """A batch of readings is evaluated in one pass with the expression's Python form; where that
    raises for one reading, CEL judges each reading of the batch (an error or-ed with true is
    true in CEL), so the batch gives what event-by-event evaluation gives."""
    values: list[Any] = [2.0, "a", 0.5, 3.0]
    f = make("{id: f, type: filter, where: 'value > 1.0 || true'}")
    assert f._where.value_fn is not None  # the batch pass is taken
    assert [e.value for e in run(f, values)] == values and f.n_errors == 0
    g = make("{id: g, type: filter, where: 'value > 1.0'}")
    assert [e.value for e in run(g, values)] == [2.0, 3.0] and g.n_errors == 1 and g.n_dropped == 1
    m = make("{id: m, type: map, value: 'value * 2.0'}")
    assert m._value.value_fn is not None
    assert [e.value for e in run(m, values)] == [4.0, 1.0, 6.0] and m.n_errors == 1
    assert [e.value for e in run(m, [1.0, 2.5])] == [2.0, 5.0]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    values=st.lists(
        st.one_of(
            st.floats(allow_nan=True),
            st.integers(-3, 3),
            st.booleans(),
            st.just("a"),
            st.none(),
            st.dictionaries(st.just("t"), st.floats(-5, 5), max_size=1),
        ),
        max_size=12,
    ),
    where=st.sampled_from(["value > 1.0", "value > 1.0 || true", "value", "value * 0.0", "value.t > 0.0"]),
)
def test_filter_batch_pass_keeps_drops_and_fails_what_the_per_event_pass_does(values: list[Any], where: str) -> None:
    """The batch pass of ``filter`` (one list of results, judged as a whole) against the same
    node's event-by-event pass: the same events kept, the same dropped and failed counts."""
    batch, per_event = (
        make(f"{{id: b, type: filter, where: '{where}'}}"),
        make(f"{{id: e, type: filter, where: '{where}'}}"),
    )
    events = [ev(v) for v in values]
    kept = batch.process_batch(list(events))
    want = Operator.process_batch(per_event, list(events))
    assert [id(e) for e in kept] == [id(e) for e in want]
    assert (batch.n_dropped, batch.n_errors) == (per_event.n_dropped, per_event.n_errors)


# --- simulate ---------------------------------------------------------------------------------


class _Collect:
    def __init__(self) -> None:
        self.batches: list[list[Event]] = []

    async def put(self, events: list[Event], done: Any = None) -> None:
        self.batches.append(events)


async def _simulate(node_yaml: str) -> list[list[Event]]:
    out = _Collect()
    await asyncio.wait_for(make(node_yaml).run(out), 10)
    return out.batches


async def test_simulate_is_reproducible_with_a_seed() -> None:
    spec = (
        "{id: s, type: simulate, realtime: false, count: 200, seed: 7, interval: 1s, sensors: "
        "[{key: a, base: 20.0, noise: 0.5, anomalies: [{kind: spike, every: 20s, size: 30.0}]}, {key: b}]}"
    )
    first, second = await _simulate(spec), await _simulate(spec)
    assert [[e.value for e in b] for b in first] == [[e.value for e in b] for b in second]
    assert len(first) == 200 and all([e.key for e in b] == ["a", "b"] for b in first)
    a = [b[0].value for b in first]
    assert sum(v > 40.0 for v in a) >= 3  # spikes happened (about one per 20 rounds)
    assert sorted(a)[100] == pytest.approx(20.0, abs=2.0)
    ts = [b[0].ts for b in first]
    assert ts == [1000.0 + i for i in range(200)]  # event time advances by the interval


async def test_simulate_in_real_time_is_paced_by_the_nodes_monotonic_clock() -> None:
    node = make("{id: s, type: simulate, interval: 1h, count: 3, sensors: [{key: a}]}")
    now = [50.0]
    node.ctx.monotonic = lambda: now[0]
    out = _Collect()
    task = asyncio.create_task(node.run(out))
    try:
        await wait_for(lambda: len(out.batches) == 1)
        now[0] += 3600.0  # an hour on the node's clock, a moment on the wall
        await wait_for(lambda: len(out.batches) == 2)
        now[0] += 3600.0
        await wait_for(lambda: len(out.batches) == 3)
        now[0] += 3600.0  # the last round's interval is over: done
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    assert len(out.batches) == 3


async def test_simulate_drift_and_step_anomaly() -> None:
    batches = await _simulate(
        "{id: s, type: simulate, realtime: false, count: 10, interval: 1h, sensors: "
        "[{key: a, base: 0.0, amplitude: 0.0, noise: 0.0, drift: 2.0}]}"
    )
    assert [b[0].value for b in batches] == [2.0 * i for i in range(10)]
    steps = await _simulate(
        "{id: s, type: simulate, realtime: false, count: 50, seed: 1, interval: 1s, sensors: "
        "[{key: a, base: 0.0, amplitude: 0.0, noise: 0.0, "
        "anomalies: [{kind: step, every: 1s, size: 5.0, duration: 3s}]}]}"
    )
    assert {b[0].value for b in steps} <= {0.0, 5.0} and 5.0 in {b[0].value for b in steps}


# --- the MQTT payload decoder -------------------------------------------------------------------


def _mqtt(extra: str = "") -> Any:
    return make(
        "{id: m, type: mqtt, connection: c, topic: 'a/#'" + (", " + extra if extra else "") + "}",
        connections="c: {type: mqtt}",
    )


def test_mqtt_decoding() -> None:
    m = _mqtt()
    e = m.decode("a/b", b'{"value": 3, "ts": 1700000000}')
    assert (e.key, e.ts, e.value, e.source, e.meta) == ("a/b", 1_700_000_000.0, 3.0, "m", {"topic": "a/b"})
    assert type(e.value) is float
    assert m.decode("a/b", b"21.5").value == 21.5  # a bare number is the reading
    assert m.decode("a/b", b'{"value": 1}').ts == 1000.0  # no ts: ingest time from the clock
    assert m.decode("a/b", b'{"value": {"t": 1, "ok": true}}').value == {"t": 1.0, "ok": True}
    whole = _mqtt("value_field: null, key: 'topic[1]'")
    e = whole.decode("a/b", b'{"t": 2, "h": 3.5}')
    assert (e.key, e.value) == ("b", {"t": 2.0, "h": 3.5})
    raw = _mqtt("format: raw")
    assert raw.decode("a/b", b" 7.25 ").value == 7.25
    assert raw.decode("a/b", b"warm") is None
    assert m.n_malformed == 0 and raw.n_malformed == 1
    # integers beyond any float (JSON allows them): a malformed payload, not an exception
    huge = b"1" + b"0" * 400
    assert m.decode("a/b", b'{"value": ' + huge + b"}") is None
    assert m.decode("a/b", b'{"value": {"t": ' + huge + b"}}") is None
    assert m.decode("a/b", b'{"value": 1.0, "ts": ' + huge + b"}") is None
    assert m.n_malformed == 3
    assert m.decode("a/b", b"[" * 100_000 + b"]" * 100_000) is None  # RecursionError in the parser
    assert m.n_malformed == 4


def test_mqtt_key_by_topic_part_stays_right_for_many_topics_and_short_ones() -> None:
    """The key of a topic is remembered (a gateway sees the same topics over and over): beyond
    the remembered count every topic still gets its own part, and a topic without the part is
    dead-lettered each time it comes, not once."""
    m = _mqtt("key: 'topic[1]'")
    for rnd in range(2):
        for i in range(5000):
            e = m.decode(f"a/d{i}/t", b"1")
            assert e is not None and e.key == f"d{i}", (rnd, i)
    assert m.decode("a", b"1") is None
    assert m.decode("a", b"1") is None
    assert m.n_malformed == 2 and m.decode("a/x", b"2").key == "x"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1_700_000_000, 1_700_000_000.0),
        (1_700_000_000_123, 1_700_000_000.123),
        ("2024-01-02T03:04:05Z", 1704164645.0),
        ("2024-01-02T04:04:05+01:00", 1704164645.0),
    ],
)
def test_parse_ts(raw: Any, expected: float) -> None:
    assert parse_ts(raw) == pytest.approx(expected)


@pytest.mark.parametrize("raw", [True, "soon", "2024-01-02T03:04:05", math.inf, None, [1]])
def test_parse_ts_rejects(raw: Any) -> None:
    with pytest.raises(ValueError):
        parse_ts(raw)


async def test_log_sink_writes_text_readably_and_escapes_what_no_stream_can_write(caplog: Any) -> None:
    node = make("{id: shown, type: log}")
    with caplog.at_level("INFO"):
        await node.write([ev({"rule": "above 194 °F"}), ev({"bad": "x\ud800y"})])
    lines = [r.getMessage() for r in caplog.records]
    assert 'shown: k {"rule":"above 194 °F"}' in lines, lines
    assert 'shown: k {"bad":"x\\ud800y"}' in lines, lines
    for line in lines:
        line.encode("utf-8")  # every line can be written to a UTF-8 stream
