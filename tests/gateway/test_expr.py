"""CEL expressions: the Python fast path must agree with CEL itself on every input."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ExpressionError
from gateway.events import Event
from gateway.expr import Expression, check_expression

FAST_SHAPES = [
    "value > 20.0 && value < 80.0",
    "value * 1.8 + 32.0",
    "-value < 3.0 || value == 0.5",
    "!(value >= 2.0)",
    'key == "boiler/temp" && value > 1.5',
    "value - 2.5 * value",
    'source != "x"',
]


@pytest.mark.parametrize("src", FAST_SHAPES)
def test_common_shapes_take_the_fast_path(src: str) -> None:
    assert Expression(src).fast


@pytest.mark.parametrize("src", ["value > 2", "value / 2.0", "size(key) > 2", "value > 1.0 ? true : false"])
def test_other_shapes_run_on_cel(src: str) -> None:
    e = Expression(src)
    assert not e.fast
    e(Event("k", 0.0, 3.0))  # still evaluates


def _outcome(fn, ev: Event):  # type: ignore[no-untyped-def]
    try:
        return ("ok", fn(ev))
    except Exception:  # any failure counts as "failed" for the comparison
        return ("failed", None)


numbers = st.floats(allow_nan=False, width=64) | st.sampled_from([0.0, -0.0, 20.0, 80.0, 1e308, -1e308])
values = numbers | st.dictionaries(st.sampled_from(["temp", "humidity"]), numbers, max_size=2)


@settings(max_examples=300, deadline=None)
@given(
    src=st.sampled_from([*FAST_SHAPES, "value.temp > 30.0 && value.humidity < 50.0"]),
    value=values,
    key=st.sampled_from(["boiler/temp", "x", ""]),
)
def test_fast_path_agrees_with_cel(src: str, value: object, key: str) -> None:
    e = Expression(src)
    ev = Event(key, 1.0, value, "s", None)
    fast = _outcome(e.evaluate, ev)
    slow = _outcome(e._cel, ev)
    if fast[0] == "ok" and slow[0] == "ok" and isinstance(fast[1], float) and math.isnan(fast[1]):
        assert math.isnan(slow[1])
    else:
        assert fast == slow, (src, value)


def test_errors_name_the_expression() -> None:
    e = Expression("value.temp > 1.0")
    with pytest.raises(ExpressionError) as err:
        e(Event("k", 0.0, 3.0))
    assert "value.temp > 1.0" in str(err.value)
    with pytest.raises(ExpressionError, match="no such key: temp"):
        e(Event("k", 0.0, {"humidity": 1.0}))


def test_validation_catches_int_double_mix_and_unknown_names() -> None:
    assert "2.0" in (check_expression("value * 2") or "")
    assert "unknown name 'valu'" in (check_expression("valu > 1.0") or "")
    assert check_expression("value * 2.0") is None


def test_fast_path_cannot_reach_python() -> None:
    for src in ["__import__('os')", "value.__class__", "().__class__", "[x for x in key]", "lambda: 1"]:
        try:
            e = Expression(src)
        except ExpressionError:
            continue
        assert not e.fast, src


def test_filter_batch_path_rejects_non_booleans_per_event(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gateway.deadletter import DeadLetters
    from gateway.node import NodeContext
    from nodes.operators import Filter, FilterOptions, Map, MapOptions

    dl = DeadLetters(None)
    ctx = NodeContext("g", "p", "f", str(tmp_path), None, dl)
    f = Filter(FilterOptions(id="f", type="filter", input=["s"], where="value * 1.0"), ctx)
    batch = [Event("a", 0.0, 0.0), Event("b", 0.0, 1.0)]
    assert f.process_batch(batch) == []
    assert f.n_errors == 2 and f.n_dropped == 0  # 0.0 is not false: each is an error, none dropped
    g = Filter(FilterOptions(id="g", type="filter", input=["s"], where="value > 0.5"), ctx)
    assert [e.key for e in g.process_batch([*batch, Event("c", 0.0, {"x": 1.0})])] == ["b"]
    assert g.n_dropped == 1 and g.n_errors == 1  # the object reading fails alone
    m = Map(MapOptions(id="m", type="map", input=["s"], value="value * 2.0"), ctx)
    out = m.process_batch([*batch, Event("c", 0.0, {"x": 1.0})])
    assert [(e.key, e.value) for e in out] == [("a", 0.0), ("b", 2.0)] and m.n_errors == 1


# --- cost budget: CEL holds the GIL while it evaluates, so cost is bounded before it runs ------


@pytest.mark.parametrize(
    "source",
    [
        "[0].all(a, [0].all(b, [0].exists(c, true)))",
        "[0] . map ( a , [0].filter(b, [0].exists_one(c, true)).size() > 0 )",
        # a raw string's backslash escapes nothing: the quote after it ends the string
        r'r"\" + "x" + [0].map(a, [0].map(b, [0].map(c, 1))).size() == 1',
    ],
)
def test_comprehensions_nested_three_deep_are_refused(source: str) -> None:
    problem = check_expression(source)
    assert problem is not None and problem.startswith("comprehensions nested 3 deep"), problem


@pytest.mark.parametrize(
    "source",
    [
        '"[0].all(a, [0].all(b, [0].all(c, true)))" == key',  # inside a string: not code
        "'''.map(a, .map(b, .map(c'''.size() > 0",
        "[0.0].all(key, [1.0].exists(ts, ts > key)) // [0].all(a, [0].all(b, [0].all(c, true)))",
    ],
)
def test_macros_in_strings_and_comments_cost_nothing(source: str) -> None:
    assert check_expression(source) is None


def test_input_too_large_for_nested_comprehensions_is_refused_per_event() -> None:
    expr = Expression("value.all(key, value.exists(ts, ts == key))")  # loop variables may shadow
    assert expr(Event("k", 1.0, [1.0, 2.0], "s", None)) is True
    # 100,000 iterations at depth 2: 316 items, less the expression's own literal items (3 at most here)
    assert expr(Event("k", 1.0, [float(i) for i in range(313)], "s", None)) is True
    with pytest.raises(ExpressionError, match="over 313 list or map items"):
        expr(Event("k", 1.0, [float(i) for i in range(314)], "s", None))
    # one level deep may go through 100,000
    flat = Expression("value.exists(key, key == 1999.0)")
    assert flat(Event("k", 1.0, [float(i) for i in range(2000)], "s", None)) is True


def test_long_literal_lists_in_nested_comprehensions_are_refused() -> None:
    zeros = "[" + ",".join(["0"] * 200) + "]"
    problem = check_expression(f"{zeros}.all(a, {zeros}.exists(b, true))")
    assert problem is not None and "comprehensions nested 2 deep could take over 100,000 iterations" in problem
    assert check_expression(f"{zeros}.all(a, true)") is None


def test_comprehension_variables_are_bound_names_not_unknown_ones() -> None:
    """`x` in `value.exists(x, x > 2.0)` was refused as an unknown name: comprehensions could not be written."""
    assert check_expression("value.exists(x, x > 2.0)") is None
    nested = Expression('value.items.all(i, i.tags.exists(t, t == "x"))')
    assert nested.variables == ("value",)
    assert nested(Event("k", 1.0, {"items": [{"tags": ["x"]}, {"tags": ["y", "x"]}]}, "s", None)) is True
    assert nested(Event("k", 1.0, {"items": [{"tags": ["y"]}]}, "s", None)) is False
    assert Expression("value.map(x, x * 2.0)[1]")(Event("k", 1.0, [1.0, 3.0], "s", None)) == 6.0
    problem = check_expression("value.all(x, y > 1.0)")
    assert problem is not None and "unknown name 'y'" in problem
