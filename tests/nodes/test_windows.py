"""The window node: options, kinds, lateness, idle sources, early emission, snapshot/restore."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.deadletter import DeadLetters
from gateway.errors import ConfigError
from gateway.events import Event
from gateway.node import NodeContext
from nodes.windows import Window, WindowOptions


def make(**opts: Any) -> Window:
    ctx = NodeContext("gw", "p", "w", "/nonexistent", None, DeadLetters(None))
    return Window(WindowOptions(id="w", type="window", **opts), ctx)


def feed(w: Window, events: list[tuple[Any, ...]]) -> list[Event]:
    """(key, ts, value[, source]) tuples through on_event; everything emitted, in order."""
    out: list[Event] = []
    for e in events:
        key, ts, v = e[:3]
        src = e[3] if len(e) > 3 else "s"
        r = w.on_event(Event(key, float(ts), v, src))
        if isinstance(r, list):
            out.extend(r)
        elif r is not None:
            out.append(r)
    return out


def bounds(evs: list[Event]) -> list[tuple[str, float, float]]:
    return [(e.key, e.meta["window_start"], e.meta["window_end"]) for e in evs]  # type: ignore[index]


def test_single_aggregate_is_a_plain_number_and_a_list_gives_a_mapping() -> None:
    w = make(kind="tumbling", size=10, aggregate="mean")
    out = feed(w, [("a", 1, 1.0), ("a", 2, 3.0), ("a", 10, 100.0)])
    assert len(out) == 1
    ev = out[0]
    assert ev.value == 2.0 and ev.key == "a" and ev.ts == 10.0 and ev.source == "w"
    assert ev.meta == {
        "window_start": 0.0,
        "window_end": 10.0,
        "count": 2.0,
        "final": True,
        "result_id": "p/w/a/0.0/10.0",  # pipeline/node/key/start/end: the de-duplication key
    }

    w = make(kind="tumbling", size=10, aggregate=["mean", "max", "count", "p50", "first", "last", "collect"])
    out = feed(w, [("a", 2, 3.0), ("a", 1, 1.0), ("a", 5, 2.0), ("a", 10, 0.0)])
    assert out[0].value == {
        "mean": 2.0,
        "max": 3.0,
        "count": 3.0,
        "p50": 2.0,
        "first": 1.0,
        "last": 2.0,
        "collect": [{"ts": 1.0, "value": 1.0}, {"ts": 2.0, "value": 3.0}, {"ts": 5.0, "value": 2.0}],
        "window_start": 0.0,
        "window_end": 10.0,
    }


def test_aggregates_on_a_field_and_bounded_collect() -> None:
    w = make(kind="tumbling", size=60, field="temp", aggregate=["stddev", "p90", "collect"], collect_max=2)
    out = feed(
        w,
        [("a", t, {"temp": float(v)}) for t, v in ((1, 2), (2, 4), (3, 4), (4, 4), (5, 5), (6, 5), (7, 7), (8, 9))]
        + [("a", 60, {"temp": 0.0})],
    )
    v = out[0].value
    assert math.isclose(v["stddev"], 2.0)
    assert math.isclose(v["p90"], 7.6)
    assert v["collect"] == [{"ts": 7.0, "value": 7.0}, {"ts": 8.0, "value": 9.0}]


def test_bad_readings_raise_with_the_node_id() -> None:
    w = make(kind="tumbling", size=10, aggregate="sum")
    with pytest.raises(TypeError, match="window w: sum need a finite number"):
        w.on_event(Event("a", 1.0, "hot", "s"))
    with pytest.raises(TypeError, match="finite"):
        w.on_event(Event("a", 1.0, math.nan, "s"))
    with pytest.raises(ValueError, match="event time"):
        w.on_event(Event("a", math.inf, 1.0, "s"))
    w = make(kind="tumbling", size=10, field="temp")
    with pytest.raises(ValueError, match="no field 'temp'"):
        w.on_event(Event("a", 1.0, {"hum": 1.0}, "s"))
    # count/first/last/collect take any value
    w = make(kind="count", count=2, aggregate=["first", "last"])
    assert feed(w, [("a", 1, "x"), ("a", 2, {"y": 1})])[0].value["last"] == {"y": 1}


def test_lateness_update_within_and_drop_or_route_beyond() -> None:
    w = make(kind="tumbling", size=10, aggregate="count", allowed_lateness=5)
    out = feed(w, [("a", 1, 1.0), ("a", 12, 1.0), ("a", 9, 1.0)])  # wm 7: 9 is out of order but in time
    assert out == []
    out = feed(w, [("a", 15, 1.0)])  # wm 10: [0, 10) closes with 1 and 9
    assert [(e.meta["window_start"], e.value) for e in out] == [(0.0, 2.0)]
    assert feed(w, [("a", 3, 1.0)]) == []  # too late: counted and dropped
    assert w.counters()["late"] == 1 and w.counters()["dropped"] == 1

    w = make(kind="tumbling", size=10, aggregate="count", route_late=True)
    out = feed(w, [("a", 1, 1.0), ("a", 11, 1.0), ("a", 3, 7.0)])
    assert [(e.ts, e.value, e.meta) for e in out] == [
        (
            10.0,
            1.0,
            {"window_start": 0.0, "window_end": 10.0, "count": 1.0, "final": True, "result_id": "p/w/a/0.0/10.0"},
        ),
        (3.0, 7.0, {"late": True}),
    ]
    assert w.counters()["late"] == 1 and w.counters()["dropped"] == 0


def test_early_updates_re_emit_then_final() -> None:
    w = make(kind="tumbling", size=10, aggregate="sum", emit="early", allowed_lateness=5)
    out = feed(w, [("a", 1, 1.0), ("a", 8, 2.0), ("a", 4, 4.0), ("a", 16, 0.0)])
    assert [(e.meta["window_start"], e.value, e.meta["final"]) for e in out] == [
        (0.0, 1.0, False),
        (0.0, 3.0, False),
        (0.0, 7.0, False),
        (10.0, 0.0, False),
        (0.0, 7.0, True),
    ]
    # each update is its own result; the final one has the window's id alone
    assert [e.meta["result_id"] for e in out] == [
        "p/w/a/0.0/10.0@1",
        "p/w/a/0.0/10.0@2",
        "p/w/a/0.0/10.0@3",
        "p/w/a/10.0/20.0@1",
        "p/w/a/0.0/10.0",
    ]

    w = make(kind="tumbling", size=10, aggregate="sum", emit="early", early_every=5)
    assert feed(w, [("a", 1, 1.0), ("a", 2, 2.0), ("b", 3, 1.0)]) == []
    out = w.on_timer(100.0)
    assert sorted((e.key, e.value, e.meta["final"]) for e in out) == [("a", 3.0, False), ("b", 1.0, False)]
    feed(w, [("a", 3, 1.0)])
    assert w.on_timer(102.0) == []  # not yet early_every since the last update
    assert [(e.key, e.value) for e in w.on_timer(105.0)] == [("a", 4.0)]
    assert w.on_timer(111.0) == []  # nothing changed


def test_watermark_is_the_minimum_over_sources_and_idle_sources_stop_holding_it() -> None:
    w = make(kind="tumbling", size=10, aggregate="count", idle_timeout=30)
    out = feed(w, [("a", 1, 1.0, "fast"), ("a", 2, 1.0, "slow"), ("a", 25, 1.0, "fast")])
    assert out == [] and w.watermark == 2.0  # the slow source holds the watermark back
    assert w.on_timer(1000.0) == []
    out = feed(w, [("a", 26, 1.0, "fast")])
    assert out == [] and w.on_timer(1029.0) == []
    out = w.on_timer(1030.0)  # "slow" has been quiet for 30 s: only "fast" counts
    assert bounds(out) == [("a", 0.0, 10.0)] and w.watermark == 26.0


def test_all_sources_idle_moves_the_watermark_with_the_monotonic_clock() -> None:
    w = make(kind="tumbling", size=10, aggregate="count", idle_timeout=5, allowed_lateness=1)
    assert feed(w, [("a", 101, 1.0), ("a", 104, 1.0)]) == []
    assert w.on_timer(50.0) == []
    assert w.on_timer(54.9) == []
    assert w.on_timer(55.0) == []  # idle now: wm = 104 + 5 - 1 = 108
    assert w.watermark == 108.0
    out = w.on_timer(57.0)  # wm = 110
    assert [(e.meta["window_start"], e.value) for e in out] == [(100.0, 2.0)]
    # the source comes back: events behind the advanced watermark are late
    assert feed(w, [("a", 109, 1.0)]) == [] and w.counters()["late"] == 1
    assert feed(w, [("a", 111, 1.0)]) == [] and w.counters()["late"] == 1


def test_session_merges_out_of_order_readings() -> None:
    w = make(kind="session", gap=7, aggregate=["count", "min", "max"], allowed_lateness=20)
    feed(w, [("a", 1, 1.0), ("a", 12, 12.0), ("a", 7, 7.0), ("b", 3, 3.0)])  # 7 bridges 1 and 12
    out = feed(w, [("a", 100, 0.0)])  # wm 80 closes everything before
    got = {(e.key, e.meta["window_start"], e.meta["window_end"]): e.value["count"] for e in out}
    assert got == {("a", 1.0, 19.0): 3.0, ("b", 3.0, 10.0): 1.0}


def test_count_windows_latest_n_and_every_n() -> None:
    w = make(kind="count", count=3, aggregate="sum")
    out = feed(w, [("a", i, float(i)) for i in range(1, 6)])
    assert [e.value for e in out] == [6.0, 9.0, 12.0]
    w = make(kind="count", count=2, every=2, aggregate="sum")
    out = feed(w, [("a", i, float(i)) for i in range(1, 6)] + [("b", 0, 7.0)])
    assert [e.value for e in out] == [3.0, 7.0]


def test_key_expression() -> None:
    w = make(kind="tumbling", size=10, aggregate="count", key="value.site")
    out = feed(w, [("x", 1, {"site": "n"}), ("y", 2, {"site": "n"}), ("z", 3, {"site": "s"}), ("q", 20, {"site": "s"})])
    assert sorted((e.key, e.value) for e in out) == [("n", 2.0), ("s", 1.0)]


@pytest.mark.parametrize(
    "kind,extra",
    [
        ("tumbling", {"size": 10}),
        ("hopping", {"size": 10, "hop": 5}),
        ("sliding", {"size": 10}),
        ("session", {"gap": 4}),
        ("count", {"count": 3, "every": 2}),
    ],
)
def test_snapshot_is_plain_data_and_restores_to_the_same_results(kind: str, extra: dict[str, Any]) -> None:
    aggs = ["count", "sum", "stddev", "p50", "first", "last", "collect", "min", "max"]
    events = [("a", t, float(t % 7)) for t in (1, 3, 2, 8, 11, 9, 14, 13, 20)] + [("b", 4, 1.0), ("b", 6, 2.0)]
    tail = [("a", 22, 5.0), ("b", 9, 3.0), ("a", 31, 1.0), ("b", 60, 0.0), ("a", 200, 0.0)]
    straight = make(kind=kind, aggregate=aggs, allowed_lateness=3, **extra)
    expected = feed(straight, events + tail)

    first = make(kind=kind, aggregate=aggs, allowed_lateness=3, **extra)
    got = feed(first, events)
    snap = json.loads(json.dumps(first.snapshot()))  # what the store keeps
    second = make(kind=kind, aggregate=aggs, allowed_lateness=3, **extra)
    second.restore(snap)
    got += feed(second, tail)
    assert [(e.key, e.ts, e.value, e.meta) for e in got] == [(e.key, e.ts, e.value, e.meta) for e in expected]
    assert second.snapshot() == json.loads(json.dumps(straight.snapshot()))


def test_snapshot_reuses_entries_of_unchanged_keys() -> None:
    w = make(kind="tumbling", size=10, aggregate="mean")
    feed(w, [("a", 1, 1.0), ("b", 1, 1.0)])
    s1 = w.snapshot()
    feed(w, [("a", 2, 1.0)])
    s2 = w.snapshot()
    assert s2["k:b"] is s1["k:b"] and s2["k:a"] is not s1["k:a"]


@pytest.mark.parametrize(
    "other",
    [
        {"kind": "session", "gap": 10},
        {"kind": "tumbling", "size": 20},
        {"kind": "tumbling", "size": 10, "aggregate": "sum"},
    ],
)
def test_restore_for_other_options_starts_empty(other: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    w = make(kind="tumbling", size=10)
    feed(w, [("a", 1, 1.0)])
    snap = json.loads(json.dumps(w.snapshot()))
    same = make(kind="tumbling", size=10)
    same.restore(snap)
    assert same.open_windows() == 1
    changed = make(**other)
    changed.restore(snap)
    assert changed.open_windows() == 0
    assert "saved state is for other options" in caplog.text


@pytest.mark.parametrize(
    "node,message",
    [
        ("{id: w, type: window, input: s, kind: tumbling}", "kind tumbling needs `size`"),
        ("{id: w, type: window, input: s, kind: hopping, size: 10s}", "kind hopping needs `hop`"),
        ("{id: w, type: window, input: s, kind: hopping, size: 10s, hop: 20s}", "must not exceed `size`"),
        ("{id: w, type: window, input: s, kind: session, size: 10s, gap: 1s}", "`size` is for kind"),
        ("{id: w, type: window, input: s, kind: count, count: 2, every: 3}", "`every` must not exceed"),
        (
            "{id: w, type: window, input: s, kind: tumbling, size: 1m, aggregate: [mean, median]}",
            "unknown aggregate 'median'",
        ),
        ("{id: w, type: window, input: s, kind: tumbling, size: 1m, key: 'value +'}", "key"),
        ("{id: w, type: window, input: s, kind: tumbling, size: 1m, emit: sometimes}", "emit"),
    ],
)
def test_config_errors_name_the_field(node: str, message: str) -> None:
    text = f"""\
gateway: {{id: g}}
pipelines:
  - name: p
    nodes:
      - {{id: s, type: simulate, sensors: [{{key: a}}]}}
      - {node}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, "w.yaml")
    assert message in str(err.value)
    assert "w.yaml:6:" in str(err.value)


def test_config_accepts_durations_and_slide_alias() -> None:
    text = """\
gateway: {id: g}
pipelines:
  - name: p
    nodes:
      - {id: s, type: simulate, sensors: [{key: a}]}
      - {id: w, type: window, input: s, kind: hopping, size: 1m, slide: 10s, aggregate: [mean, p99],
         allowed_lateness: 500ms, idle_timeout: 30s}
"""
    loaded = parse_config(text)
    w = loaded.nodes["p"][1]
    assert (w.size, w.slide, w.allowed_lateness, w.idle_timeout) == (60.0, 10.0, 0.5, 30.0)  # type: ignore[attr-defined]


def test_no_wall_clock_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows run on event time and the monotonic ``now`` given to on_timer: a clock step is harmless."""
    import time

    w = make(kind="session", gap=5, aggregate="count", idle_timeout=3, emit="early", early_every=1)

    def no_wall_clock() -> float:
        raise AssertionError("the window read the wall clock")

    monkeypatch.setattr(time, "time", no_wall_clock)
    feed(w, [("a", 100, 1.0), ("a", 102, 1.0)])
    assert [e.value for e in w.on_timer(10.0)] == [2.0]  # early update
    assert w.on_timer(12.9) == []
    out = w.on_timer(13.0)  # idle 3 s: wm = 102 + 3 -> not yet 107
    assert out == []
    out = w.on_timer(15.0)  # wm = 107: the session [100, 107) closes
    assert [(e.value, e.meta["final"]) for e in out] == [(2.0, True)]


@pytest.mark.parametrize("batch", [False, True], ids=["on_event", "batch"])
def test_a_source_that_declares_its_progress_moves_the_watermark_by_that_alone(batch: bool) -> None:
    """A Kafka source declares the slowest partition's progress: its readings' own times (a
    partition read ahead) do not close windows; another source waits for its first declaration."""
    w = make(kind="tumbling", size=10, aggregate="sum")
    assert w.on_watermark("k", -math.inf) == []  # what the pipeline does when it is built

    def put(events: list[tuple[Any, ...]]) -> list[Event]:
        if batch:
            return w.process_batch([Event(k, float(ts), v, src) for k, ts, v, src in events])
        return feed(w, events)

    assert put([("a", 105, 1.0, "k"), ("a", 3, 2.0, "k"), ("a", 4, 1.0, "m")]) == []
    assert w.watermark == -math.inf  # "m" alone must not close what "k" may still send
    out = w.on_watermark("k", 5.0)
    assert out == [] and w.watermark == 4.0  # the slower of the two sources
    assert put([("a", 7, 3.0, "k"), ("a", 30, 0.0, "m")]) == []  # 7: not late, "k" is only at 5
    out = w.on_watermark("k", 25.0)
    assert [(e.key, e.ts, e.value) for e in out] == [("a", 10.0, 6.0)] and w.counters()["late"] == 0
    assert w.on_watermark("k", 20.0) == [] and w.watermark == 25.0  # never goes back
