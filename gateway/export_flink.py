"""``sluice export flink``: a pipeline translated into a PyFlink job that computes the same results.

The job reads the readings a gateway forwards to Kafka (the ``kafka`` source's topic and decode
options) and writes its results to Kafka (the ``kafka_out`` node's topic), as JSON objects
``{"key", "ts", "value"}`` keyed by the event key. Flink SQL carries what it can say exactly —
``filter`` and ``map`` (CEL translated to SQL), ``window`` tumbling/hopping/session with
count/sum/min/max/mean/stddev — and keyed process functions with state carry count windows and the
detectors ``threshold`` (hysteresis), ``zscore``, ``ewma`` and ``rate_of_change``. Anything the
translator cannot carry over exactly is refused by name, with what to do instead; nothing is
approximated silently.

For a run without the Kafka connector JAR (tests, a first look) the job takes
``--source-file`` (JSON lines ``{"key", "ts", "value"}``, read as a bounded Python collection)
and ``--sink-file`` (results as JSON lines) instead of Kafka.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from . import __version__
from .config import LoadedConfig
from .errors import SluiceError

__all__ = ["ExportError", "cel_to_sql", "export_flink"]


class ExportError(SluiceError):
    """The pipeline cannot be translated; ``problems`` names each node and what to do instead."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# What to do instead, for node types that have no meaning on a Flink cluster.
_NO_MEANING = {
    "serial": "a serial port belongs to the gateway",
    "modbus": "a Modbus device belongs to the gateway",
    "websocket": "the gateway holds that connection",
    "http": "the gateway's console receives those requests",
    "http_poll": "the gateway polls that URL",
    "simulate": "simulated sensors are for demos on the gateway",
    "mqtt": "Flink reads Kafka, not MQTT",
    "redis": "this export reads Kafka",
    "console": "the gateway's console shows it",
    "llm": "the local model runs on the gateway",
    "log": "the gateway's log is on the gateway",
    "history": "history is the gateway's SQLite",
    "alert": "the alert lifecycle (ack, resolve) lives in the gateway's alert book",
    "mqtt_out": "the job writes Kafka",
    "webhook": "the job writes Kafka",
    "redis_out": "the job writes Kafka",
    "lookup": "it reads a Redis hash from the gateway; in Flink, join the stream with that table (a lookup join)",
    "homeassistant": "Home Assistant discovery is the gateway's",
    "stale": "stale needs processing-time timers the gateway has; not translated yet",
    "flatline": "not translated yet",
}
# Node types a source stands for on the gateway only: the readings must reach Kafka first.
_GATEWAY_INPUTS = frozenset({"serial", "modbus", "websocket", "http", "http_poll", "simulate", "mqtt", "redis"})
# What the translator does with the node types it carries: where the job reads, where it writes.
_ROLE = {"kafka": "source", "kafka_out": "sink"}
_INSTEAD_SOURCE = (
    "forward the readings with a `kafka_out` node on the gateway and give this pipeline a `kafka` source "
    "reading that topic, then export it"
)


# --- CEL to SQL ---------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\.\d+)|(?P<int>\d+)|"
    r"(?P<str>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|"
    r"(?P<op>&&|\|\||==|!=|<=|>=|[<>+\-*/%!?:().,]))"
)


@dataclass
class _Sql:
    text: str
    kind: str  # "num", "str", "bool"


class _Parser:
    """A CEL subset, parsed by precedence climbing into SQL text with a type."""

    def __init__(self, source: str, columns: dict[str, _Sql]):
        self.source = source
        self.columns = columns
        self.toks: list[tuple[str, str]] = []
        pos, s = 0, source.strip()
        while pos < len(s):
            m = _TOKEN.match(s, pos)
            if not m or m.end() == pos:
                raise self.refuse(f"cannot read {s[pos : pos + 10]!r}")
            pos = m.end()
            kind = m.lastgroup or ""
            self.toks.append((kind, m.group(kind)))
        self.i = 0

    def refuse(self, what: str) -> ValueError:
        return ValueError(f"expression {self.source!r}: {what}")

    def peek(self) -> str:
        return self.toks[self.i][1] if self.i < len(self.toks) else ""

    def take(self, expected: str | None = None) -> tuple[str, str]:
        if self.i >= len(self.toks):
            raise self.refuse("ends too soon")
        tok = self.toks[self.i]
        if expected is not None and tok[1] != expected:
            raise self.refuse(f"expected {expected!r}, found {tok[1]!r}")
        self.i += 1
        return tok

    def parse(self) -> _Sql:
        out = self.ternary()
        if self.i != len(self.toks):
            raise self.refuse(f"unexpected {self.peek()!r}")
        return out

    def ternary(self) -> _Sql:
        cond = self.binary(0)
        if self.peek() != "?":
            return cond
        self.take("?")
        a = self.ternary()
        self.take(":")
        b = self.ternary()
        self._need(cond, "bool", "a condition")
        if a.kind != b.kind:
            raise self.refuse("the two branches of ?: have different types")
        return _Sql(f"(CASE WHEN {cond.text} THEN {a.text} ELSE {b.text} END)", a.kind)

    _LEVELS = (("||",), ("&&",), ("==", "!=", "<", "<=", ">", ">="), ("+", "-"), ("*", "/"))

    def binary(self, level: int) -> _Sql:
        if level == len(self._LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while self.peek() in self._LEVELS[level]:
            op = self.take()[1]
            right = self.binary(level + 1)
            left = self._combine(op, left, right)
        return left

    def _need(self, x: _Sql, kind: str, what: str) -> None:
        if x.kind != kind:
            raise self.refuse(f"{what} must be a {kind}, found a {x.kind}")

    def _combine(self, op: str, a: _Sql, b: _Sql) -> _Sql:
        if op in ("||", "&&"):
            self._need(a, "bool", op)
            self._need(b, "bool", op)
            return _Sql(f"({a.text} {'OR' if op == '||' else 'AND'} {b.text})", "bool")
        if op in ("==", "!=", "<", "<=", ">", ">="):
            if a.kind != b.kind:
                raise self.refuse(f"{op} between a {a.kind} and a {b.kind}")
            sql_op = {"==": "=", "!=": "<>"}.get(op, op)
            if a.kind == "num":
                # Flink orders -0.0 below 0.0 (it compares doubles as Java's Double.compare does); CEL
                # and IEEE 754 call them equal. Adding 0.0 turns -0.0 into 0.0 before comparing.
                return _Sql(f"(({a.text}) + 0.0 {sql_op} ({b.text}) + 0.0)", "bool")
            return _Sql(f"({a.text} {sql_op} {b.text})", "bool")
        if op == "+" and a.kind == b.kind == "str":
            return _Sql(f"({a.text} || {b.text})", "str")
        self._need(a, "num", op)
        self._need(b, "num", op)
        return _Sql(f"({a.text} {op} {b.text})", "num")

    def unary(self) -> _Sql:
        if self.peek() == "!":
            self.take()
            x = self.unary()
            self._need(x, "bool", "!")
            return _Sql(f"(NOT {x.text})", "bool")
        if self.peek() == "-":
            self.take()
            x = self.unary()
            self._need(x, "num", "-")
            return _Sql(f"(-{x.text})", "num")
        return self.member()

    def member(self) -> _Sql:
        x = self.primary()
        while self.peek() == ".":
            self.take(".")
            name = self.take()[1]
            if self.peek() == "(" and name in ("startsWith", "endsWith", "contains"):
                self.take("(")
                arg = self.ternary()
                self.take(")")
                self._need(x, "str", name)
                if arg.kind != "str" or not arg.text.startswith("'"):
                    raise self.refuse(f"{name}() is translated only with a literal string")
                lit = arg.text[1:-1]
                if "%" in lit or "_" in lit:
                    raise self.refuse(f"{name}() with % or _ in its text is not translated")
                pat = {"startsWith": f"'{lit}%'", "endsWith": f"'%{lit}'", "contains": f"'%{lit}%'"}[name]
                x = _Sql(f"({x.text} LIKE {pat})", "bool")
                continue
            raise self.refuse(f"field access `.{name}` (object readings) is not translated; map to a number first")
        return x

    def primary(self) -> _Sql:
        kind, tok = self.take()
        if tok == "(":
            x = self.ternary()
            self.take(")")
            return x
        if kind == "num":
            return _Sql(f"CAST({float(tok)!r} AS DOUBLE)", "num")
        if kind == "int":
            raise self.refuse(f"the int literal {tok} (readings are doubles: write {tok}.0)")
        if kind == "str":
            body = json.loads(tok) if tok.startswith('"') else json.loads('"' + tok[1:-1].replace('"', '\\"') + '"')
            return _Sql("'" + body.replace("'", "''") + "'", "str")
        if kind == "name":
            if tok in ("true", "false"):
                return _Sql(tok.upper(), "bool")
            if self.peek() == "(":
                if tok not in ("double", "size"):
                    raise self.refuse(f"the function {tok}() is not translated")
                self.take("(")
                arg = self.ternary()
                self.take(")")
                if tok == "double":
                    return _Sql(f"CAST({arg.text} AS DOUBLE)", "num")
                if tok == "size" and arg.kind == "str":
                    return _Sql(f"CAST(CHAR_LENGTH({arg.text}) AS DOUBLE)", "num")
                raise self.refuse(f"the function {tok}() is not translated")
            col = self.columns.get(tok)
            if col is None:
                raise self.refuse(f"`{tok}` has no column in the job (available: {', '.join(self.columns)})")
            return col
        raise self.refuse(f"unexpected {tok!r}")


_COLUMNS = {"value": _Sql("v", "num"), "key": _Sql("k", "str"), "ts": _Sql("ts", "num")}


def cel_to_sql(source: str) -> tuple[str, str]:
    """Translate a CEL expression over ``value``, ``key`` and ``ts`` to Flink SQL; (sql, type)."""
    out = _Parser(source, _COLUMNS).parse()
    return out.text, out.kind


# --- the translator -----------------------------------------------------------------------------

_SQL_AGG = {
    "count": "CAST(COUNT(*) AS DOUBLE)",
    "sum": "SUM(v)",
    "min": "MIN(v)",
    "max": "MAX(v)",
    "mean": "AVG(v)",
    "stddev": "STDDEV_POP(v)",
}


def _seconds(d: float, what: str) -> str:
    if d != int(d) or d <= 0:
        raise ValueError(f"{what} {d:g}s: only whole seconds are translated")
    return f"INTERVAL '{int(d)}' SECOND"


@dataclass
class _Plan:
    source: Any
    steps: list[tuple[str, Any]]  # ("sql", select-sql with {src}) or ("threshold", options)
    sinks: list[Any]
    lateness: float


def _plan(loaded: LoadedConfig, pipeline: str) -> _Plan:
    nodes = loaded.nodes.get(pipeline)
    if nodes is None:
        raise ExportError([f"no pipeline {pipeline!r} (pipelines: {', '.join(loaded.nodes) or 'none'})"])
    problems: list[str] = []
    for n in nodes:
        why = _NO_MEANING.get(n.type)
        if why is None:
            continue
        if n.type in _GATEWAY_INPUTS:
            problems.append(f"{pipeline}/{n.id}: `{n.type}` has no meaning on Flink ({why}); {_INSTEAD_SOURCE}")
        else:
            problems.append(f"{pipeline}/{n.id}: `{n.type}` is not exported: {why}")
    sources = [n for n in nodes if _ROLE.get(n.type) == "source"]
    if not sources and not problems:
        problems.append(f"{pipeline}: no `kafka` source; {_INSTEAD_SOURCE}")
    if len(sources) > 1:
        problems.append(f"{pipeline}: {len(sources)} kafka sources; export a pipeline with one")
    if problems:
        raise ExportError(problems)
    src = sources[0]
    if src.format != "json" or src.value_field is None or src.ts_field is None or src.key != "record_key":
        raise ExportError(
            [
                f"{pipeline}/{src.id}: the job reads JSON with a numeric `value_field` and an event time "
                "`ts_field` (epoch seconds), keyed by the record key (`key: record_key`); other decode "
                "options are not translated"
            ]
        )
    order = [src]
    sinks = []
    steps: list[tuple[str, Any]] = []
    lateness = 0.0
    current = src.id
    rest = [n for n in nodes if n is not src]
    while rest:
        nxt = [n for n in rest if current in n.input]
        ops = [n for n in nxt if _ROLE.get(n.type) != "sink"]
        sinks += [n for n in nxt if _ROLE.get(n.type) == "sink"]
        for n in nxt:
            if len(n.input) != 1:
                problems.append(f"{pipeline}/{n.id}: a node with several inputs is not translated")
        if len(ops) > 1:
            problems.append(f"{pipeline}: {', '.join(o.id for o in ops)} branch off {current}; export a straight chain")
        rest = [n for n in rest if n not in nxt]
        if not ops:
            if rest:
                problems.append(f"{pipeline}: {', '.join(n.id for n in rest)} are not on the chain from {src.id}")
            break
        op = ops[0]
        order.append(op)
        try:
            step, lat = _step(op, steps)
        except ValueError as exc:
            problems.append(f"{pipeline}/{op.id}: {exc}")
        else:
            steps.append(step)
            lateness = max(lateness, lat)
        current = op.id
    if not sinks:
        problems.append(f"{pipeline}: no `kafka_out` node: the job writes its results where one says")
    elif any(s.input != [order[-1].id] for s in sinks):
        problems.append(f"{pipeline}: every kafka_out must take the last node of the chain ({order[-1].id})")
    if problems:
        raise ExportError(problems)
    return _Plan(src, steps, sinks, lateness)


def _step(op: Any, before: list[tuple[str, Any]]) -> tuple[tuple[str, Any], float]:
    if before and before[-1][0] == "threshold":
        raise ValueError("nothing but a kafka_out may follow a threshold (its output is an alert)")
    translate = _TRANSLATE.get(op.type)
    if translate is None:
        raise ValueError(f"`{op.type}` is not translated")
    step = translate(op, before)
    if step[0][0] == "sql" and any(s[0] == "count" for s in before):
        raise ValueError("a SQL step after a count window is not translated (only threshold may follow it)")
    return step


def _filter(op: Any, before: list[tuple[str, Any]]) -> tuple[tuple[str, Any], float]:
    sql, kind = cel_to_sql(op.where)
    if kind != "bool":
        raise ValueError(f"where {op.where!r} is not a condition")
    return ("sql", f"SELECT k, ts, v, rowtime FROM {{src}} WHERE {sql}"), 0.0


def _map(op: Any, before: list[tuple[str, Any]]) -> tuple[tuple[str, Any], float]:
    if op.fields:
        raise ValueError("map `fields` (object readings) is not translated; map `value` to a number")
    v = "v"
    k = "k"
    if op.value is not None:
        v, kind = cel_to_sql(op.value)
        if kind != "num":
            raise ValueError(f"value {op.value!r} is not a number")
        v = f"CAST({v} AS DOUBLE)"
    if op.key is not None:
        k, kind = cel_to_sql(op.key)
        if kind != "str":
            k = f"CAST({k} AS STRING)"
    return ("sql", f"SELECT {k} AS k, ts, {v} AS v, rowtime FROM {{src}}"), 0.0


_COUNT_AGGS = ("count", "sum", "min", "max", "mean", "stddev", "first", "last")


def _window(op: Any, before: list[tuple[str, Any]]) -> tuple[tuple[str, Any], float]:
    if any(s[0] in ("window", "count") for s in before):
        raise ValueError("a window after a window is not translated (Flink's window time is end - 1 ms)")
    if op.kind == "count":
        # No count windows in Flink SQL: a keyed process function keeps the key's latest `count`
        # readings in arrival order, as the gateway does (count windows do not wait for a watermark).
        if op.key is not None or op.field is not None:
            raise ValueError("window `key`/`field` are not translated")
        if not isinstance(op.aggregate, str) or op.aggregate not in _COUNT_AGGS:
            raise ValueError(f"count windows are translated with one of {', '.join(_COUNT_AGGS)}")
        return ("count", {"count": op.count, "every": op.every or 1, "aggregate": op.aggregate}), 0.0
    if op.kind not in ("tumbling", "hopping", "session"):
        raise ValueError(f"`kind: {op.kind}` has no window table function in Flink SQL; not translated")
    if op.key is not None or op.field is not None:
        raise ValueError("window `key`/`field` are not translated")
    if not isinstance(op.aggregate, str):
        raise ValueError("a list of aggregates is not translated: one window node per aggregate")
    if op.aggregate not in _SQL_AGG:
        raise ValueError(
            f"aggregate {op.aggregate!r} is not translated exactly (first/last are by event time on the "
            "gateway, by arrival in Flink SQL; percentiles and collect have no SQL twin)"
        )
    if op.emit != "final" or op.route_late:
        raise ValueError("only `emit: final` without `route_late` is translated")
    agg = _SQL_AGG[op.aggregate]
    if op.kind == "tumbling":
        tvf = f"TUMBLE(TABLE {{src}}, DESCRIPTOR(rowtime), {_seconds(op.size, 'size')})"
    elif op.kind == "hopping":
        hop = op.hop if op.hop is not None else op.slide
        tvf = f"HOP(TABLE {{src}}, DESCRIPTOR(rowtime), {_seconds(hop, 'hop')}, {_seconds(op.size, 'size')})"
    else:
        tvf = f"SESSION(TABLE {{src}} PARTITION BY k, DESCRIPTOR(rowtime), {_seconds(op.gap, 'gap')})"
    sql = (
        f"SELECT k, CAST(EXTRACT(EPOCH FROM window_end) AS DOUBLE) AS ts, {agg} AS v, window_time AS rowtime "
        f"FROM TABLE({tvf}) GROUP BY k, window_start, window_end, window_time"
    )
    return ("sql", sql), op.allowed_lateness


def _threshold(op: Any, before: list[tuple[str, Any]]) -> tuple[tuple[str, Any], float]:
    if op.field is not None:
        raise ValueError("threshold `field` (object readings) is not translated")
    if op.min_duration:
        raise ValueError("threshold `min_duration` is not translated yet (it needs an event-time timer)")
    return ("threshold", op), 0.0


def _baseline(op: Any, before: list[tuple[str, Any]]) -> tuple[tuple[str, Any], float]:
    if op.field is not None:
        raise ValueError(f"{op.type} `field` (object readings) is not translated")
    return ("threshold", op), 0.0


_TRANSLATE = {
    "filter": _filter,
    "map": _map,
    "window": _window,
    "threshold": _threshold,
    "zscore": _baseline,
    "ewma": _baseline,
    "rate_of_change": _baseline,
}


_JOB = '''\
#!/usr/bin/env python3
"""PyFlink job for pipeline {pipeline!r}, exported by sluice {version} from {config}.

Regenerate with: sluice export flink {config} --pipeline {pipeline} -o FILE
Reads Kafka topic(s) {topics} (JSON; key = {key_desc}; value field {value_field!r}; event time
from {ts_field!r}, watermark {lateness:g} s behind) and writes {{"key", "ts", "value"}} JSON to
{sink_topics}. Run: python job.py [--bootstrap-servers HOST:PORT] [--kafka-jar flink-sql-connector-kafka.jar]
Without Kafka: python job.py --source-file readings.jsonl --sink-file results.jsonl
"""

import argparse
import json
import sys

SOURCE_TOPICS = {topics!r}
SINK_TOPICS = {sink_topics!r}
BOOTSTRAP = {bootstrap!r}
GROUP = {group!r}
VALUE_FIELD = {value_field!r}
TS_FIELD = {ts_field!r}
LATENESS_S = {lateness!r}
STEPS = {steps!r}
COUNT_WINDOW = {count_window!r}
THRESHOLD = {threshold!r}


def count_window_function():
    import math

    from pyflink.common import Row, Types
    from pyflink.datastream import KeyedProcessFunction
    from pyflink.datastream.state import ValueStateDescriptor

    c = COUNT_WINDOW
    size, every, agg = c["count"], c["every"], c["aggregate"]

    def aggregate(vs):
        n = len(vs)
        if agg == "count":
            return float(n)
        if agg == "sum":
            return sum(vs)
        if agg == "min":
            return min(vs)
        if agg == "max":
            return max(vs)
        if agg == "first":
            return vs[0]
        if agg == "last":
            return vs[-1]
        mean = sum(vs) / n
        if agg == "mean":
            return mean
        return math.sqrt(max(0.0, sum((x - mean) ** 2 for x in vs) / n))

    class CountWindow(KeyedProcessFunction):
        def open(self, ctx):
            self.buf = ctx.get_state(ValueStateDescriptor("latest", Types.PICKLED_BYTE_ARRAY()))

        def process_element(self, row, ctx):
            st = self.buf.value() or [[], 0]
            st[0] = (st[0] + [(row[1], row[2])])[-size:]
            st[1] += 1
            out = None
            if len(st[0]) == size and st[1] >= every:
                st[1] = 0
                out = Row(row[0], max(t for t, _ in st[0]), float(aggregate([v for _, v in st[0]])))
            self.buf.update(st)
            if out is not None:
                yield out

    return CountWindow()


def threshold_function():
    """The gateway's detector (threshold with hysteresis, zscore or ewma) as a keyed process function."""
    import math

    from pyflink.common import Row, Types
    from pyflink.datastream import KeyedProcessFunction
    from pyflink.datastream.state import ValueStateDescriptor

    t = THRESHOLD
    kind = t["kind"]

    def alert(key, ts, state, reading, rule, **extra):
        value = {{"state": state, "alert_key": "%s/%s/%s" % (t["pipeline"], t["id"], key),
                  "severity": t["severity"], "reading": reading, "rule": rule}}
        value.update(extra)
        return Row(key, ts, json.dumps(value))

    if kind == "threshold":
        hi, lo = t["above"], t["below"]
        hi_clear = t["clear_below"] if t["clear_below"] is not None else hi
        lo_clear = t["clear_above"] if t["clear_above"] is not None else lo

        def rule(key, side):
            name = t["name"] or key
            if side == "high":
                extra = " (clears below %g)" % hi_clear if hi_clear != hi else ""
                return "%s above %g%s" % (name, hi, extra)
            extra = " (clears above %g)" % lo_clear if lo_clear != lo else ""
            return "%s below %g%s" % (name, lo, extra)

        def step(st, key, ts, v):
            active = st.get("active")
            if active is None:
                side = "high" if hi is not None and v > hi else "low" if lo is not None and v < lo else None
                if side is None:
                    return None
                st["active"] = side
                return alert(key, ts, "raised", v, rule(key, side))
            if (active == "high" and v < hi_clear) or (active == "low" and v > lo_clear):
                del st["active"]
                return alert(key, ts, "cleared", v, rule(key, active))
            return None

    elif kind == "rate_of_change":

        def rule(key, side):
            limit = t["max_rise"] if side == "rise" else t["max_fall"]
            return "%s %s faster than %g per %gs" % (
                t["name"] or key, "rises" if side == "rise" else "falls", limit, t["per"])

        def step(st, key, ts, v):
            prev = st.get("last")
            if prev is not None and ts <= prev[0]:
                return None  # same or older event time: no rate to speak of
            st["last"] = (ts, v)
            if prev is None:
                return None
            rate = (v - prev[1]) / (ts - prev[0]) * t["per"]
            rise, fall = t["max_rise"], t["max_fall"]
            side = "rise" if rise is not None and rate > rise else "fall" if fall is not None and -rate > fall else None
            active = st.get("active")
            if side is not None and active is None:
                st["active"] = side
                return alert(key, ts, "raised", v, rule(key, side), rate=rate)
            if side is None and active is not None:
                del st["active"]
                return alert(key, ts, "cleared", v, rule(key, active), rate=rate)
            return None

    else:
        baseline = "rolling" if kind == "zscore" else "EWMA"

        def stats(st):
            if kind == "zscore":
                w = st.get("w")
                if not w:
                    return None
                n = len(w)
                mean = sum(w) / n
                var = sum((x - mean) ** 2 for x in w) / (n - 1) if n > 1 else 0.0
                return n, mean, math.sqrt(var)
            s = st.get("s")
            return None if s is None else (int(s[0]), s[1], math.sqrt(s[2]))

        def learn(st, v):
            if kind == "zscore":
                st["w"] = (st.get("w", []) + [v])[-t["window"]:]
                return
            s = st.get("s")
            if s is None:
                st["s"] = [1, v, 0.0]
                return
            n, mean, var = s
            a = max(t["alpha"], 1.0 / (n + 1))
            d = v - mean
            mean += a * d
            var = (1 - a) * (var + a * d * d)
            st["s"] = [n + 1, mean, var]

        def step(st, key, ts, v):
            s = stats(st)
            learn(st, v)
            if s is None or s[0] < t["warmup"]:
                return None
            _, mean, std = s
            z = (v - mean) / max(std, t["min_std"])
            extra = {{"score": round(z, 3), "baseline": round(mean, 6), "std": round(std, 6)}}
            rule = "%s more than %g standard deviations from its %s baseline (clears within %g)" % (
                t["name"] or key, t["threshold"], baseline, t["clear"])
            if not st.get("active"):
                if abs(z) > t["threshold"]:
                    st["active"] = True
                    return alert(key, ts, "raised", v, rule, **extra)
            elif abs(z) < t["clear"]:
                del st["active"]
                return alert(key, ts, "cleared", v, rule, **extra)
            return None

    class Detector(KeyedProcessFunction):
        def open(self, ctx):
            self.state = ctx.get_state(ValueStateDescriptor("detector", Types.PICKLED_BYTE_ARRAY()))

        def process_element(self, row, ctx):
            st = self.state.value() or {{}}
            out = step(st, row[0], row[1], row[2])
            self.state.update(st)
            if out is not None:
                yield out

    return Detector()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap-servers", default=BOOTSTRAP)
    ap.add_argument("--kafka-jar", help="path of flink-sql-connector-kafka-*.jar (not needed on a cluster that has it)")
    ap.add_argument("--source-file", help="JSON lines {{key, ts, value}} instead of Kafka (bounded)")
    ap.add_argument("--sink-file", help="write results as JSON lines here instead of Kafka")
    args = ap.parse_args(argv)

    from pyflink.common import Row, Types
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.table import DataTypes, Schema, StreamTableEnvironment

    env = StreamExecutionEnvironment.get_execution_environment()
    env.set_python_executable(sys.executable)
    if args.kafka_jar:
        env.add_jars("file://" + args.kafka_jar)
    t_env = StreamTableEnvironment.create(env)
    t_env.get_config().set_local_timezone("UTC")
    watermark = "rowtime - INTERVAL '%s' SECOND" % ("%.3f" % LATENESS_S)
    if args.source_file:
        rows = []
        with open(args.source_file) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    rows.append(Row(str(r["key"]), float(r["ts"]), float(r["value"])))
        env.set_parallelism(1)
        ds = env.from_collection(
            rows, type_info=Types.ROW_NAMED(["k", "ts", "v"], [Types.STRING(), Types.DOUBLE(), Types.DOUBLE()])
        )
        schema = (
            Schema.new_builder()
            .column("k", DataTypes.STRING())
            .column("ts", DataTypes.DOUBLE())
            .column("v", DataTypes.DOUBLE())
            .column_by_expression("rowtime", "TO_TIMESTAMP_LTZ(CAST(ROUND(ts * 1000) AS BIGINT), 3)")
            .watermark("rowtime", watermark)
            .build()
        )
        t_env.create_temporary_view("src", t_env.from_data_stream(ds, schema))
    else:
        # the payload's fields by the names the gateway reads them by; epoch seconds for the time
        t_env.execute_sql(
            "CREATE TEMPORARY TABLE src_raw (k STRING, `%s` DOUBLE, `%s` DOUBLE) WITH ("
            "'connector' = 'kafka', 'topic' = '%s', 'properties.bootstrap.servers' = '%s', "
            "'properties.group.id' = '%s', 'scan.startup.mode' = 'group-offsets', "
            "'properties.auto.offset.reset' = 'earliest', 'key.format' = 'raw', 'key.fields' = 'k', "
            "'value.format' = 'json', 'value.fields-include' = 'EXCEPT_KEY')"
            % (VALUE_FIELD, TS_FIELD, ";".join(SOURCE_TOPICS), args.bootstrap_servers, GROUP)
        )
        t_env.execute_sql(
            "CREATE TEMPORARY VIEW src AS SELECT k, `%s` AS ts, `%s` AS v, "
            "TO_TIMESTAMP_LTZ(CAST(ROUND(`%s` * 1000) AS BIGINT), 3) AS rowtime FROM src_raw"
            % (TS_FIELD, VALUE_FIELD, TS_FIELD)
        )
    name = "src"
    for i, sql in enumerate(STEPS):
        view = "step%d" % i
        t_env.create_temporary_view(view, t_env.sql_query(sql.format(src=name)))
        name = view
    table = t_env.from_path(name)
    if COUNT_WINDOW is not None or THRESHOLD is not None:
        ds = t_env.to_data_stream(t_env.sql_query("SELECT k, ts, v FROM %s" % name))
        if COUNT_WINDOW is not None:
            ds = ds.key_by(lambda r: r[0], key_type=Types.STRING()).process(
                count_window_function(),
                output_type=Types.ROW_NAMED(["k", "ts", "v"], [Types.STRING(), Types.DOUBLE(), Types.DOUBLE()]),
            )
    if THRESHOLD is not None:
        alerts = (
            ds.key_by(lambda r: r[0], key_type=Types.STRING())
            .process(threshold_function(),
                     output_type=Types.ROW_NAMED(["k", "ts", "vj"], [Types.STRING(), Types.DOUBLE(), Types.STRING()]))
        )
        table = t_env.from_data_stream(alerts)
        encode = lambda r: {{"key": r[0], "ts": r[1], "value": json.loads(r[2])}}  # noqa: E731
    elif COUNT_WINDOW is not None:
        table = t_env.from_data_stream(ds)
        encode = lambda r: {{"key": r[0], "ts": r[1], "value": r[2]}}  # noqa: E731
    else:
        table = t_env.sql_query("SELECT k, ts, v FROM %s" % name)
        encode = lambda r: {{"key": r[0], "ts": r[1], "value": r[2]}}  # noqa: E731
    if args.sink_file:
        with table.execute().collect() as results, open(args.sink_file, "w") as out:
            for r in results:
                out.write(json.dumps(encode(r)) + "\\n")
        return 0
    t_env.create_temporary_view("results", table)
    for topic in SINK_TOPICS:
        t_env.execute_sql(
            "CREATE TEMPORARY TABLE sink_%d (k STRING, ts DOUBLE, v %s) WITH ("
            "'connector' = 'kafka', 'topic' = '%s', 'properties.bootstrap.servers' = '%s', "
            "'key.format' = 'raw', 'key.fields' = 'k', 'value.format' = 'json', 'value.fields-include' = 'ALL')"
            % (SINK_TOPICS.index(topic), "STRING" if THRESHOLD is not None else "DOUBLE", topic, args.bootstrap_servers)
        )
    stmt = t_env.create_statement_set()
    for i in range(len(SINK_TOPICS)):
        stmt.add_insert_sql("INSERT INTO sink_%d SELECT * FROM results" % i)
    stmt.execute().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def export_flink(loaded: LoadedConfig, pipeline: str) -> str:
    """The PyFlink job's source text for ``pipeline``; :class:`ExportError` names what cannot be carried."""
    plan = _plan(loaded, pipeline)
    src = plan.source
    threshold = None
    count_window = None
    steps = []
    for kind, item in plan.steps:
        if kind == "sql":
            steps.append(item)
        elif kind == "count":
            count_window = item
        else:
            o = item
            threshold = {"kind": o.type, "pipeline": pipeline, "id": o.id, "severity": o.severity, "name": o.name}
            if hasattr(o, "above"):  # threshold; zscore and ewma judge against a baseline
                threshold.update(above=o.above, below=o.below, clear_below=o.clear_below, clear_above=o.clear_above)
            elif hasattr(o, "max_rise"):  # rate of change
                threshold.update(max_rise=o.max_rise, max_fall=o.max_fall, per=o.per)
            else:
                threshold.update(
                    threshold=o.threshold,
                    clear=o.clear if o.clear is not None else 0.8 * o.threshold,
                    warmup=o.warmup,
                    min_std=o.min_std,
                    window=getattr(o, "window", None),
                    alpha=getattr(o, "alpha", None),
                )
    for s in plan.sinks:
        if "{key}" in s.topic or "{source}" in s.topic:
            raise ExportError([f"{pipeline}/{s.id}: a topic template with {{key}} or {{source}} is not translated"])
    gw = loaded.config.gateway.id
    sink_topics = [s.topic.format(gateway=gw, pipeline=pipeline, node=s.id, key="", source="") for s in plan.sinks]
    lateness = max(plan.lateness, 0.0)
    return _JOB.format(
        pipeline=pipeline,
        version=__version__,
        config=loaded.path,
        topics=src.topic_list or [src.pattern],
        key_desc="the record key",
        value_field=src.value_field,
        ts_field=src.ts_field,
        lateness=lateness,
        sink_topics=sink_topics,
        bootstrap=",".join(src.servers),
        group=src.group or f"flink-{gw}-{pipeline}",
        steps=steps,
        count_window=count_window,
        threshold=threshold,
    )
