"""Detectors: threshold (hysteresis, minimum duration), z-score, EWMA, rate of change, stale, flatline."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.config import parse_config
from gateway.deadletter import DeadLetters
from gateway.errors import ConfigError
from gateway.events import Event
from gateway.node import NodeContext, Operator, get_node_type
from tests.gateway._harness import node, running_gateway


def make(spec: dict[str, Any], monotonic: Any = None) -> Any:
    cls = get_node_type(spec["type"])
    assert cls is not None
    opts = cls.Options.model_validate({"id": "det", "input": "src", **spec})
    ctx = NodeContext("gw1", "p", "det", ".", None, DeadLetters(None), clock=lambda: 1000.0)
    if monotonic is not None:
        ctx.monotonic = monotonic
    return cls(opts, ctx)


def feed(det: Any, readings: list[tuple[float, Any]], key: str = "k") -> list[dict[str, Any]]:
    return [e.value for e in det.process_batch([Event(key, ts, v, "src") for ts, v in readings])]


def states(alerts: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(a["state"], a["reading"]) for a in alerts]


def test_threshold_hysteresis_and_shape() -> None:
    det = make({"type": "threshold", "above": 90, "clear_below": 85, "severity": "critical"})
    got = feed(det, [(1, 80), (2, 91), (3, 95), (4, 88), (5, 84), (6, 86)])
    assert states(got) == [("raised", 91.0), ("cleared", 84.0)]
    assert got[0] == {
        "state": "raised",
        "alert_key": "p/det/k",
        "severity": "critical",
        "reading": 91.0,
        "rule": "k above 90 (clears below 85)",
    }


def test_an_alert_has_its_own_result_id_not_the_windows() -> None:
    det = make({"type": "threshold", "above": 90, "clear_below": 85})
    window_meta = {"window_start": 0.0, "window_end": 10.0, "result_id": "p/w/k/0.0/10.0"}
    out = det.process_batch([Event("k", 10.0, 95.0, "w", dict(window_meta)), Event("k", 20.0, 80.0, "w", None)])
    assert [e.meta["result_id"] for e in out] == ["p/det/k/10.0/raised", "p/det/k/20.0/cleared"]
    assert out[0].meta["window_start"] == 0.0  # the rest of the input's meta goes along


def test_threshold_min_duration() -> None:
    det = make({"type": "threshold", "above": 90, "min_duration": "10s"})
    # a 5 s spike raises nothing; a crossing held for 10 s raises once, at the reading that completes it
    got = feed(det, [(0, 95), (5, 96), (6, 50), (10, 91), (15, 92), (19, 99), (20, 93), (25, 94), (30, 80)])
    assert states(got) == [("raised", 93.0), ("cleared", 80.0)]
    assert got[0]["rule"] == "k above 90 for 10s"
    det.restore(det.snapshot())


def test_threshold_bad_reading_is_dead_lettered() -> None:
    det = make({"type": "threshold", "below": 0, "field": "t"})
    assert feed(det, [(1, {"t": -1}), (2, {"x": 1}), (3, "hot")]) == [
        {"state": "raised", "alert_key": "p/det/k", "severity": "warning", "reading": -1.0, "rule": "k below 0"}
    ]
    assert det.n_errors == 2


def test_zscore_warms_up_then_flags_outliers_per_key() -> None:
    det = make({"type": "zscore", "window": 50, "warmup": 20, "threshold": 4})
    rng = random.Random(1)
    normal = [(i, 20 + rng.gauss(0, 0.5)) for i in range(19)]
    assert feed(det, [*normal, (19, 100.0)]) == []  # the 20th reading is still learning
    det2 = make({"type": "zscore", "window": 50, "warmup": 20, "threshold": 4})
    normal = [(i, 20 + rng.gauss(0, 0.5)) for i in range(40)]
    got = feed(det2, [*normal, (40, 30.0), (41, 31.0), (42, 20.1)])
    assert [a["state"] for a in got] == ["raised", "cleared"]
    assert got[0]["score"] > 4 and abs(got[0]["baseline"] - 20) < 0.5
    assert feed(det2, [(50, 25.0)], key="other") == []  # a new key has its own warm-up
    det3 = make({"type": "zscore", "window": 50, "warmup": 20, "threshold": 4})
    det3.restore(det2.snapshot())
    assert feed(det3, [(60, 40.0)])[0]["state"] == "raised"


def test_ewma_follows_slow_drift_but_flags_jumps() -> None:
    det = make({"type": "ewma", "alpha": 0.1, "warmup": 10, "threshold": 5})
    rng = random.Random(2)
    drift = [(i, 20 + i * 0.01 + rng.gauss(0, 0.2)) for i in range(300)]
    assert feed(det, drift) == []  # a slow drift is learned, not alarmed
    got = feed(det, [(300, 40.0)])
    assert got and got[0]["state"] == "raised" and "EWMA baseline" in got[0]["rule"]


def test_baseline_option_errors() -> None:
    with pytest.raises(ValueError, match="`warmup` cannot exceed `window`"):
        make({"type": "zscore", "window": 10, "warmup": 20})
    with pytest.raises(ValueError, match="`clear` must not exceed `threshold`"):
        make({"type": "ewma", "threshold": 2, "clear": 3})


def test_rate_of_change() -> None:
    det = make({"type": "rate_of_change", "max_rise": 2, "max_fall": 5, "per": "1m"})
    # per minute: +1/min, then +6/min (raise), +1/min (clear), -12/min (raise fall)
    got = feed(det, [(0, 10), (60, 11), (120, 17), (180, 18), (240, 6), (240, 99), (300, 6)])
    assert [(a["state"], a["rate"]) for a in got] == [
        ("raised", 6.0),
        ("cleared", 1.0),
        ("raised", -12.0),
        ("cleared", 0.0),
    ]
    assert got[2]["rule"] == "k falls faster than 5 per 60s"
    with pytest.raises(ValueError, match="max_rise"):
        make({"type": "rate_of_change"})


def test_stale_fires_from_the_monotonic_timer() -> None:
    now = [500.0]
    det = make({"type": "stale", "timeout": "30s", "keys": ["never"]}, monotonic=lambda: now[0])
    feed(det, [(1, 20.0)], key="a")
    now[0] += 29
    assert det.on_timer(now[0]) == []
    now[0] += 1
    raised = [e.value for e in det.on_timer(now[0])]
    assert sorted((a["alert_key"], a["state"]) for a in raised) == [("p/det/a", "raised"), ("p/det/never", "raised")]
    assert det.on_timer(now[0] + 100) == []  # raised once, not every tick
    assert [a["state"] for a in feed(det, [(2, 21.0)], key="a")] == ["cleared"]
    assert raised[0]["rule"].startswith("no reading from") and raised[0]["reading"] in (20.0, None)


async def test_stale_in_a_running_pipeline(tmp_path: Path) -> None:
    text = f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data"}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, count: 1, realtime: false, sensors: [{{key: boiler}}]}}
      - {{id: quiet, type: stale, input: sim, timeout: 1s}}
      - {{id: out, type: log, input: quiet}}
console: {{enabled: false}}
"""
    from tests._util import wait_for

    async with running_gateway(text) as gw:
        out = node(gw, "p", "out")
        await wait_for(lambda: out.n_in >= 1, timeout=10)
        assert node(gw, "p", "quiet").n_out == 1


def test_flatline() -> None:
    det = make({"type": "flatline", "duration": "10s", "tolerance": 0.01})
    got = feed(det, [(0, 5.0), (4, 5.005), (8, 5.0), (12, 5.01), (13, 5.0), (14, 6.0), (15, 6.0)])
    assert states(got) == [("raised", 5.01), ("cleared", 6.0)]
    assert got[0]["rule"] == "k stuck (±0.01) for 10s"
    det2 = make({"type": "flatline", "duration": "10s", "tolerance": 0.01})
    det2.restore(det.snapshot())
    assert feed(det2, [(30, 6.0)])[0]["state"] == "raised"


def test_detectors_in_config_are_validated(tmp_path: Path) -> None:
    text = f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}"}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, sensors: [{{key: a}}]}}
      - {{id: z, type: zscore, input: sim, threshold: -1}}
      - {{id: s, type: stale, input: sim}}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, "t.yaml", {})
    msgs = [f"{i.path}: {i.message}" for i in err.value.issues]
    assert any(m.startswith("pipelines.0.nodes.1.threshold") for m in msgs), msgs
    assert any(m.startswith("pipelines.0.nodes.2.timeout: required") for m in msgs), msgs


# --- property tests against plain references ------------------------------------------------------

_values = st.lists(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), min_size=1, max_size=80)


def _ref_zscore(xs: list[float], window: int, warmup: int, z: float, clear: float) -> list[str]:
    import statistics

    out, hist, active = [], [], False
    for x in xs:
        if len(hist) >= warmup:
            mean = statistics.fmean(hist)
            std = max(statistics.stdev(hist) if len(hist) > 1 else 0.0, 1e-9)
            score = abs(x - mean) / std
            if not active and score > z:
                active = True
                out.append("raised")
            elif active and score < clear:
                active = False
                out.append("cleared")
        hist = [*hist, x][-window:]
    return out


@settings(max_examples=150, deadline=None)
@given(_values, st.integers(min_value=2, max_value=10), st.integers(min_value=2, max_value=10))
def test_zscore_matches_a_reference(xs: list[float], window: int, warmup: int) -> None:
    warmup = min(warmup, window)
    det = make({"type": "zscore", "window": window, "warmup": warmup, "threshold": 2.0, "clear": 1.5})
    got = [a["state"] for a in feed(det, [(float(i), x) for i, x in enumerate(xs)])]
    assert got == _ref_zscore(xs, window, warmup, 2.0, 1.5)


def _ref_flatline(points: list[tuple[float, float]], duration: float, tol: float, min_n: int) -> list[str]:
    out, start, active = [], None, False
    for ts, v in points:
        if start is None or abs(v - start[0]) > tol:
            start = (v, ts, 1)
            if active:
                active = False
                out.append("cleared")
            continue
        start = (start[0], start[1], start[2] + 1)
        if not active and ts - start[1] >= duration and start[2] >= min_n:
            active = True
            out.append("raised")
    return out


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from([1.0, 1.05, 2.0, 3.0]), min_size=1, max_size=60),
    st.floats(min_value=0.5, max_value=10.0),
    st.sampled_from([0.0, 0.1]),
)
def test_flatline_matches_a_reference(vals: list[float], duration: float, tol: float) -> None:
    det = make({"type": "flatline", "duration": duration, "tolerance": tol})
    points = [(float(i), v) for i, v in enumerate(vals)]
    got = [a["state"] for a in feed(det, points)]
    assert got == _ref_flatline(points, duration, tol, 3)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(min_value=0.1, max_value=5.0), st.floats(min_value=0, max_value=200)),
        min_size=1,
        max_size=60,
    ),
    st.floats(min_value=0.0, max_value=8.0),
)
def test_threshold_min_duration_matches_a_reference(steps: list[tuple[float, float]], hold: float) -> None:
    det = make({"type": "threshold", "above": 100, "clear_below": 90, "min_duration": hold})
    ts, points = 0.0, []
    for dt, v in steps:
        ts += dt
        points.append((ts, v))
    got = [a["state"] for a in feed(det, points)]
    want, active, since = [], False, None
    for t, v in points:
        if not active:
            if v > 100:
                since = t if since is None else since
                if t - since >= hold:
                    active, since = True, None
                    want.append("raised")
            else:
                since = None
        elif v < 90:
            active = False
            want.append("cleared")
    assert got == want


_limits = st.sampled_from([-1.0, 0.0, 5.0, 10.0, 11.0, 89.0, 90.0, 95.0, 100.0, 101.0])  # at and beside them
_readings = st.one_of(
    _limits,
    _limits,
    _limits,
    st.floats(min_value=-50, max_value=150),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-50, max_value=150),
    st.booleans(),
    st.just("hot"),
    st.fixed_dictionaries({"t": st.floats(min_value=-50, max_value=150)}),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["a", "b"]), _readings), max_size=40),
    st.sampled_from(
        [
            {"above": 100, "clear_below": 90},
            {"below": 0, "clear_above": 10},
            {"above": 100, "below": 0},
            {"above": 100, "clear_below": 90, "severity": "critical", "name": "boiler"},
        ]
    ),
    st.one_of(st.none(), st.just({"result_id": "p/w/k/0.0/10.0", "window_start": 0.0})),
)
@example([("a", 101.0), ("a", 90.0), ("a", 89.0)], {"above": 100, "clear_below": 90}, None)
@example([("a", -1.0), ("a", 10.0), ("a", 11.0)], {"below": 0, "clear_above": 10}, None)
def test_threshold_batch_equals_event_by_event(
    steps: list[tuple[str, Any]], limits: dict[str, Any], meta: dict[str, Any] | None
) -> None:
    """A batch (the usual case in one loop) gives what the events one at a time give: the same
    alerts, and bad readings dead-lettered alike."""
    batch, single = make({"type": "threshold", **limits}), make({"type": "threshold", **limits})
    events = [Event(k, float(i), v, "src", dict(meta) if meta else None) for i, (k, v) in enumerate(steps)]
    got = batch.process_batch(events)
    want = Operator.process_batch(single, events)  # on_event, one event at a time
    assert got == want
    assert batch.n_errors == single.n_errors
    assert batch.snapshot() == single.snapshot()


def test_stale_timeouts_start_again_at_restore_on_the_injected_clock() -> None:
    now = [10.0]
    det = make({"type": "stale", "timeout": "30s"}, monotonic=lambda: now[0])
    feed(det, [(1, 20.0)], key="a")
    saved = det.snapshot()
    now[0] = 5000.0  # a restart: the monotonic times of the old process mean nothing now
    again = make({"type": "stale", "timeout": "30s"}, monotonic=lambda: now[0])
    again.restore(saved)
    assert again.on_timer(now[0] + 29) == []
    assert [e.value["alert_key"] for e in again.on_timer(now[0] + 30)] == ["p/det/a"]
