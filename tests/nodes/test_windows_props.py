"""Property tests: every window kind against a plain reference, on random streams (hypothesis).

Streams are out of order, with duplicates, gaps, bursts and readings later than the allowed
lateness. The reference decides lateness the way the node documents it, then groups the accepted
readings into windows the obvious way and aggregates them with the statistics module.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.deadletter import DeadLetters
from gateway.events import Event
from gateway.node import NodeContext
from nodes.windows import Window, WindowOptions

AGGS = ["count", "sum", "min", "max", "mean", "stddev", "p50", "p90", "first", "last", "collect"]
COLLECT_MAX = 3
END = "~end"

Reading = tuple[str, float, float]  # key, ts, value


@st.composite
def streams(draw: Any) -> list[Reading]:
    """Readings around a moving front: jitter behind it (out of order, late), bursts, pauses, repeats."""
    n = draw(st.integers(0, 60))
    base = draw(st.integers(0, 50)) / 2
    out: list[Reading] = []
    for _ in range(n):
        base += draw(st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0, 7.0, 25.0]))
        ts = base - draw(st.sampled_from([0.0, 0.0, 0.0, 0.5, 1.5, 3.0, 6.0, 12.0]))
        key = draw(st.sampled_from(["a", "b", "c"]))
        value = float(draw(st.integers(-50, 50)))
        out.append((key, ts, value))
        if draw(st.integers(0, 9)) == 0:
            out.append((key, ts, value))  # a duplicate delivery
    return out


def make(**opts: Any) -> Window:
    ctx = NodeContext("gw", "p", "w", "/nonexistent", None, DeadLetters(None))
    return Window(WindowOptions(id="w", type="window", aggregate=AGGS, collect_max=COLLECT_MAX, **opts), ctx)


def run_node(
    w: Window,
    readings: list[Reading],
    cut: int | None = None,
    opts: dict[str, Any] | None = None,
    batch: int = 0,
    two_sources: bool = False,
) -> list[Event]:
    """Readings one by one through on_event, or (batch > 0) in batches through process_batch."""
    out: list[Event] = []
    evs = [
        Event(k, ts, v, "t" if two_sources and i % 3 == 0 else "s")
        for i, (k, ts, v) in enumerate([*readings, (END, 1e9, 0.0)])
    ]
    i = 0
    while i < len(evs):
        if cut is not None and i == cut:
            snap = json.loads(json.dumps(w.snapshot()))
            w = make(**(opts or {}))
            w.restore(snap)
        n = 1 if batch <= 0 else min(batch, (cut - i) if cut is not None and i < cut else batch)
        if batch <= 0:
            r = w.on_event(evs[i])
            out.extend(r if isinstance(r, list) else [r] if r is not None else [])
        else:
            out.extend(w.process_batch(evs[i : i + n]))
        i += n
    return [e for e in out if e.key != END and e.meta.get("final") and not e.meta.get("late")]


# --- the reference ------------------------------------------------------------------------


def aggregate(items: list[tuple[float, int, float]]) -> dict[str, Any]:
    """items: (ts, arrival, value)."""
    vals = [v for _, _, v in items]
    s = sorted(vals)
    by_time = sorted(items, key=lambda x: (x[0], x[1]))
    first = min(items, key=lambda x: (x[0], x[1]))
    last = max(items, key=lambda x: (x[0], x[1]))
    return {
        "count": float(len(vals)),
        "sum": math.fsum(vals),
        "min": min(vals),
        "max": max(vals),
        "mean": statistics.fmean(vals),
        "stddev": statistics.pstdev(vals),
        "p50": s[0] if len(s) == 1 else statistics.quantiles(s, n=100, method="inclusive")[49],
        "p90": s[0] if len(s) == 1 else statistics.quantiles(s, n=100, method="inclusive")[89],
        "first": first[2],
        "last": last[2],
        "collect": [{"ts": t, "value": v} for t, _, v in by_time[-COLLECT_MAX:]],
    }


def reference(
    kind: str,
    readings: list[Reading],
    lateness: float,
    size: float = 0,
    hop: float = 0,
    gap: float = 0,
    count: int = 0,
    every: int = 1,
) -> dict[tuple[str, float, float], dict[str, Any]]:
    windows: dict[tuple[str, float, float], list[tuple[float, int, float]]] = defaultdict(list)
    accepted: dict[str, list[tuple[float, int, float]]] = defaultdict(list)
    wm = -math.inf
    front = -math.inf
    for i, (k, ts, v) in enumerate(readings):
        item = (ts, i, v)
        if kind in ("tumbling", "hopping"):
            h = size if kind == "tumbling" else hop
            starts = [
                j * h for j in range(math.floor((ts - size) / h), math.floor(ts / h) + 1) if j * h <= ts < j * h + size
            ]
            live = [s for s in starts if s + size > wm]
            for s in live:
                windows[(k, s, s + size)].append(item)
        elif kind in ("sliding", "session"):
            if ts >= wm:
                accepted[k].append(item)
        else:
            accepted[k].append(item)
        front = max(front, ts)
        wm = max(wm, front - lateness)
    if kind == "sliding":
        for k, items in accepted.items():
            for t in {ts for ts, _, _ in items}:
                windows[(k, t - size, t)] = [x for x in items if t - size < x[0] <= t]
    elif kind == "session":
        for k, items in accepted.items():
            items = sorted(items)
            group = [items[0]]
            for x in items[1:]:
                if x[0] - group[-1][0] < gap:
                    group.append(x)
                else:
                    windows[(k, group[0][0], group[-1][0] + gap)] = group
                    group = [x]
            windows[(k, group[0][0], group[-1][0] + gap)] = group
    elif kind == "count":
        for k, items in accepted.items():
            for n in range(count, len(items) + 1, every):
                last_n = items[n - count : n]
                windows[(k, min(x[0] for x in last_n), max(x[0] for x in last_n))] = last_n
    return {w: aggregate(items) for w, items in windows.items()}


def close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-7)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def check(out: list[Event], expected: dict[tuple[str, float, float], dict[str, Any]], kind: str) -> None:
    got: dict[tuple[str, float, float], dict[str, Any]] = {}
    for e in out:
        wid = (e.key, e.value["window_start"], e.value["window_end"])
        if kind != "count":
            assert wid not in got, f"window {wid} emitted twice as final"
        got[wid] = {k: v for k, v in e.value.items() if k not in ("window_start", "window_end")}
    assert got.keys() == expected.keys()
    for wid, agg in expected.items():
        assert close(got[wid], agg), (wid, got[wid], agg)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LATENESS = st.sampled_from([0.0, 0.0, 1.0, 4.0, 10.0])


@SETTINGS
@given(
    readings=streams(),
    lateness=LATENESS,
    size=st.sampled_from([1.0, 2.5, 5.0, 10.0]),
    emit=st.sampled_from(["final", "early"]),
    batch=st.sampled_from([0, 1, 3, 50]),
)
def test_tumbling(readings: list[Reading], lateness: float, size: float, emit: str, batch: int) -> None:
    out = run_node(make(kind="tumbling", size=size, allowed_lateness=lateness, emit=emit), readings, batch=batch)
    check(out, reference("tumbling", readings, lateness, size=size), "tumbling")


@SETTINGS
@given(
    readings=streams(),
    lateness=LATENESS,
    size=st.sampled_from([1.0, 5.0, 0.1, 2.5, 0.3]),  # inexact sizes: window edges off by an ulp
    batch=st.sampled_from([1, 4, 50]),
    aggs=st.sampled_from([["mean"], ["count", "sum", "min", "max", "mean"]]),
    two=st.booleans(),
)
def test_tumbling_batch_fast_path(
    readings: list[Reading], lateness: float, size: float, batch: int, aggs: list[str], two: bool
) -> None:
    """The inlined batch path (plain aggregates) against on_event, event by event, same outputs."""
    ctx = NodeContext("gw", "p", "w", "/nonexistent", None, DeadLetters(None))

    def node() -> Window:
        return Window(
            WindowOptions(id="w", type="window", kind="tumbling", size=size, allowed_lateness=lateness, aggregate=aggs),
            ctx,
        )

    fast, slow = node(), node()
    assert fast._fast
    a = run_node(fast, readings, batch=batch, two_sources=two)
    b = run_node(slow, readings, two_sources=two)
    assert [(e.key, e.ts, e.value, e.meta) for e in a] == [(e.key, e.ts, e.value, e.meta) for e in b]
    assert fast.counters() == slow.counters()
    assert json.dumps(fast.snapshot()) == json.dumps(slow.snapshot())


@SETTINGS
@given(
    readings=streams(),
    lateness=LATENESS,
    shape=st.sampled_from([(4.0, 1.0), (5.0, 2.5), (10.0, 5.0), (6.0, 6.0), (3.0, 2.0)]),
)
def test_hopping(readings: list[Reading], lateness: float, shape: tuple[float, float]) -> None:
    size, hop = shape
    out = run_node(make(kind="hopping", size=size, hop=hop, allowed_lateness=lateness), readings)
    check(out, reference("hopping", readings, lateness, size=size, hop=hop), "hopping")


@SETTINGS
@given(
    readings=streams(),
    lateness=LATENESS,
    size=st.sampled_from([0.5, 3.0, 8.0]),
    emit=st.sampled_from(["final", "early"]),
)
def test_sliding(readings: list[Reading], lateness: float, size: float, emit: str) -> None:
    out = run_node(make(kind="sliding", size=size, allowed_lateness=lateness, emit=emit), readings)
    check(out, reference("sliding", readings, lateness, size=size), "sliding")


@SETTINGS
@given(
    readings=streams(),
    lateness=LATENESS,
    gap=st.sampled_from([0.5, 2.0, 5.0, 20.0]),
    emit=st.sampled_from(["final", "early"]),
)
def test_session(readings: list[Reading], lateness: float, gap: float, emit: str) -> None:
    out = run_node(make(kind="session", gap=gap, allowed_lateness=lateness, emit=emit), readings)
    check(out, reference("session", readings, lateness, gap=gap), "session")


@SETTINGS
@given(readings=streams(), shape=st.sampled_from([(1, 1), (3, 1), (3, 3), (4, 2), (5, 3)]))
def test_count(readings: list[Reading], shape: tuple[int, int]) -> None:
    count, every = shape
    out = run_node(make(kind="count", count=count, every=every), readings)
    check(out, reference("count", readings, 0.0, count=count, every=every), "count")


KINDS = {
    "tumbling": {"kind": "tumbling", "size": 5.0},
    "hopping": {"kind": "hopping", "size": 6.0, "hop": 2.0},
    "sliding": {"kind": "sliding", "size": 4.0},
    "session": {"kind": "session", "gap": 3.0},
    "count": {"kind": "count", "count": 3, "every": 2},
}


@SETTINGS
@given(readings=streams(), kind=st.sampled_from(list(KINDS)), lateness=LATENESS, data=st.data())
def test_snapshot_and_restore_anywhere_changes_nothing(
    readings: list[Reading], kind: str, lateness: float, data: Any
) -> None:
    opts = dict(KINDS[kind])
    if kind != "count":
        opts["allowed_lateness"] = lateness
    cut = data.draw(st.integers(0, len(readings)))
    straight = run_node(make(**opts), readings)
    resumed = run_node(make(**opts), readings, cut=cut, opts=opts, batch=data.draw(st.sampled_from([0, 1, 7])))
    assert [(e.key, e.ts, e.value, e.meta) for e in resumed] == [(e.key, e.ts, e.value, e.meta) for e in straight]


@pytest.mark.parametrize("size", [0.1, 0.3, 2.5, 10.0, 1e-3])
def test_tumbling_batch_path_at_window_edges(size: float) -> None:
    """Readings within a few ulps of window edges land where on_event puts them (floor of ts/size)."""
    readings: list[Reading] = []
    for k in range(1, 200):
        edge = k * size
        for steps in (-2, -1, 0, 1, 2):
            ts = edge
            for _ in range(abs(steps)):
                ts = math.nextafter(ts, math.inf if steps > 0 else -math.inf)
            readings.append(("a", ts, float(k % 7)))
    ctx = NodeContext("gw", "p", "w", "/nonexistent", None, DeadLetters(None))

    def node() -> Window:
        return Window(WindowOptions(id="w", type="window", kind="tumbling", size=size, aggregate="mean"), ctx)

    fast, slow = node(), node()
    a = run_node(fast, readings, batch=50)
    b = run_node(slow, readings)
    assert len(a) > 100
    assert [(e.key, e.ts, e.value, e.meta) for e in a] == [(e.key, e.ts, e.value, e.meta) for e in b]
