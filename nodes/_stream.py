"""What the sources that read named streams share — MQTT, Kafka and Redis Streams: the options
that say how a message's payload becomes an event, the decoding itself (malformed input counted
and dead-lettered), the event key taken from the stream's name, and, for the sources reading in a
consumer group (Kafka, Redis), confirming to the peer what the pipeline has taken.

A *name* is where a message came from: an MQTT topic (parts joined by ``/``), a Kafka topic
(``.``) or a Redis stream (``:``). A source's ``key`` option is the whole name (``topic``, or
``stream`` for Redis), one part of it (``topic[N]``/``stream[N]``), one of the source's own
choices (Kafka's ``record_key``, Redis's ``auto``), or a CEL expression over ``topic`` (the
name's parts) and ``payload``.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable
from datetime import datetime
from functools import cache
from typing import Any, ClassVar, Literal

import msgspec
from pydantic import Field

from firmware_bridges import loads_json, loads_strict
from gateway.api import (
    Duration,
    Event,
    Expression,
    ExpressionError,
    NodeOptions,
    Source,
    check_expression,
    max_future_field,
)

__all__ = [
    "ConsumerOptions",
    "ConsumerSource",
    "DecodeOptions",
    "PayloadSource",
    "check_key",
    "key_function",
    "parse_ts",
]


class DecodeOptions(NodeOptions):
    """How a message's payload becomes an event: its key, its reading and its event time.

    A source's options list these after its own (where to connect, what to read), so a form
    reads from top to bottom: ``class XSourceOptions(DecodeOptions, XReadOptions)``, with the
    fields of ``XReadOptions`` first (pydantic orders fields along the reversed MRO, and
    ``sluice schema`` and the editor's form show them in that order). A source redeclares
    ``key`` with its own default and the names it understands.
    """

    key: str = Field(
        "topic",
        description="Event key: `topic` (the whole topic), `topic[N]` (its N-th level, from 0; -1: the last) or "
        "a CEL expression over `topic` (the list of levels) and `payload`.",
    )
    value_field: str | None = Field("value", description="Payload field holding the reading; null: the whole payload.")
    ts_field: str | None = Field(
        "ts", description="Payload field with event time (epoch s/ms or ISO 8601); absent: ingest time."
    )
    max_future: Duration | None = max_future_field()
    format: Literal["json", "raw"] = Field(
        "json", description="json: the payload is a JSON object or number; raw: the payload is a number in text."
    )


class ConsumerOptions(DecodeOptions):
    """The decode options and the batch size of a source that reads in a consumer group (Kafka,
    Redis Streams)."""

    batch: int = Field(500, ge=1, le=100_000, description="Largest micro-batch handed to the pipeline.")


@cache
def _part_index(part: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(part)}\[(-?\d+)\]$")


def key_function(spec: str, part: str = "topic", sep: str = "/") -> Callable[[str, Any], str]:
    """The event key of a message on stream ``name`` with ``payload``, per a ``key`` option:
    ``part`` (the whole name), ``part[N]`` (its N-th ``sep``-separated part) or a CEL expression
    over ``topic`` (the name's ``sep``-separated parts, as ``part[N]`` takes them) and ``payload``.
    Only ``sep`` separates: a Redis stream ``site/a:temp`` has the parts ``site/a`` and ``temp``."""
    if spec == part:
        return lambda name, payload: name
    m = _part_index(part).match(spec)
    if m:
        idx = int(m.group(1))

        seen: dict[str, str] = {}  # name -> key: a gateway sees the same few names over and over

        def by_part(name: str, payload: Any) -> str:
            key = seen.get(name)
            if key is None:
                key = name.split(sep)[idx]  # IndexError: the caller dead-letters the message
                if len(seen) >= 4096:
                    seen.clear()
                seen[name] = key
            return key

        by_part.seen = seen  # type: ignore[attr-defined]  # for a batch's loop to look up itself
        return by_part
    expr = Expression(spec, ("topic", "payload"))

    def by_expr(name: str, payload: Any) -> str:
        return str(expr({"topic": name.split(sep), "payload": payload}))

    return by_expr


def check_key(spec: str, part: str = "topic", fixed: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """For a source's :meth:`check`: the problem of a ``key`` option, as :func:`key_function` reads it
    (``fixed``: further names the source itself understands)."""
    if spec == part or spec in fixed or _part_index(part).match(spec):
        return []
    problem = check_expression(spec, ("topic", "payload"), {"topic": ["a", "b"], "payload": {}})
    return [("key", problem)] if problem else []


# --- decoding ----------------------------------------------------------------------------


def parse_ts(raw: Any) -> float:
    """Event time from a payload field: epoch seconds, epoch milliseconds, or ISO 8601."""
    if isinstance(raw, bool):
        raise ValueError(f"timestamp {raw!r} is not a time")
    if isinstance(raw, int | float):
        t = float(raw) if type(raw) is float or abs(raw) < 2**1023 else math.inf  # a 400-digit int: too big
        if not math.isfinite(t):
            raise ValueError(f"timestamp {raw!r} is not finite")
        return t / 1000.0 if t > 1e11 else t  # > year 5138 in seconds: it is milliseconds
    if isinstance(raw, str):
        try:
            dt = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"timestamp {raw!r} is neither epoch seconds/ms nor ISO 8601") from None
        if dt.tzinfo is None:
            raise ValueError(f"timestamp {raw!r} has no time zone; add Z or +00:00")
        return dt.timestamp()
    raise ValueError(f"timestamp {raw!r} is not a time")


def _number(v: Any) -> Any:
    """Readings are floats (ints become floats); mappings keep their fields, numbers as floats."""
    t = type(v)
    if t is float:
        return v
    if t is int:
        return float(v)
    if t is dict:
        return {k: (float(x) if type(x) is int else x) for k, x in v.items()}
    return v


_MAX_DEPTH = 32


def _value_fault(value: dict[str, Any]) -> str | None:
    """Why an object reading is not one every store can write: a NaN/Infinity, or nesting so deep
    that serialising it (outbox, state, dead letters) would hit the recursion limit."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > _MAX_DEPTH:
            return f"the reading is nested deeper than {_MAX_DEPTH} levels"
        for x in obj.values() if type(obj) is dict else obj:
            t = type(x)
            if t is float:
                if not math.isfinite(x):
                    return "a number in the reading is not finite (NaN or Infinity)"
            elif t is dict or t is list:
                stack.append((x, depth + 1))
    return None


# Longest payload the typed decode takes: it skips the fields it does not read without checking
# them as the general decode does, and an integer there over Python's 4,300 digits (which the
# general decode refuses) needs a longer payload than this.
_TYPED_MAX = 4300


@cache
def _typed_reading(value_field: str, ts_field: str) -> Callable[[bytes], Any]:
    """A decoder of the common reading, a JSON object with a number under ``value_field`` and one
    under ``ts_field`` (both as floats; every other field skipped), without building a dict."""
    reading = msgspec.defstruct(
        "_Reading", [("value", float), ("ts", float)], rename={"value": value_field, "ts": ts_field}, gc=False
    )
    return msgspec.json.Decoder(reading).decode


# --- the source ----------------------------------------------------------------------------


class PayloadSource(Source):
    """A source that decodes each message's payload into an event (:meth:`decode`), its key taken
    from the name it came on (``name_part``, ``name_sep``: see :func:`key_function`); input it cannot
    decode is counted as ``malformed`` and dead-lettered with the reason."""

    name_part: ClassVar[str] = "topic"
    name_sep: ClassVar[str] = "/"
    own_keys: ClassVar[tuple[str, ...]] = ()
    """Values of ``key`` the subclass's :meth:`make_key` understands besides the name's."""

    @classmethod
    def check(cls, options: NodeOptions, config: Any) -> list[tuple[str, str]]:
        o: DecodeOptions = options  # type: ignore[assignment]
        return check_key(o.key, cls.name_part, cls.own_keys)

    def __init__(self, options: DecodeOptions, ctx: Any):
        super().__init__(options, ctx)
        self._key = self.make_key(options.key)
        self._raw = options.format == "raw"
        self._value_field = options.value_field
        self._ts_field = options.ts_field
        self.n_malformed = 0
        # topic -> its key and the meta its readings share (the typed path's, bounded)
        self._topics: dict[str, tuple[str, dict[str, Any]]] = {}
        # the common reading decoded without a dict, where the key needs nothing of the payload
        key = options.key
        self._typed = (
            _typed_reading(self._value_field, self._ts_field)
            if not self._raw
            and self._value_field
            and self._ts_field
            and self._value_field != self._ts_field
            and type(self).make_key is PayloadSource.make_key
            and (key == self.name_part or _part_index(self.name_part).match(key))
            else None
        )

    def make_key(self, spec: str) -> Callable[[str, Any], str]:
        """The key function for the ``key`` option ``spec``: (name, payload) -> key."""
        return key_function(spec, self.name_part, self.name_sep)

    def counters(self) -> dict[str, int]:
        c = super().counters()
        c["malformed"] = self.n_malformed
        return c

    def decode_many(self, messages: list[tuple[str, bytes]]) -> list[Event]:
        """:meth:`decode` over ``messages`` (name, payload), the events of those that decode.

        The common message — a JSON object whose value and epoch-seconds time are finite numbers —
        is decoded here in one loop (into a typed reading when the key comes from the name alone
        and the payload is short ASCII, else into a dict); any other goes through :meth:`decode`
        (which defines the behaviour and dead-letters), so the result is that of calling
        :meth:`decode` on each."""
        vf, tf = self._value_field, self._ts_field
        if self._raw or vf is None or not tf:
            return [e for t, p in messages if (e := self.decode(t, p)) is not None]
        out: list[Event] = []
        append = out.append
        key_of, sid, decode, strict, typed = self._key, self.id, self.decode, loads_strict, self._typed
        seen: dict[str, str] = getattr(key_of, "seen", None) or {}  # a key by name (topic[N]) made before
        topics = self._topics
        for topic, payload in messages:
            # ASCII: the typed decode does not check the UTF-8 of the fields it skips
            if typed is not None and payload.isascii() and len(payload) <= _TYPED_MAX:
                try:
                    r = typed(payload)
                    ts = r.ts
                    v = r.value
                    if 0.0 < ts < 1e11 and v - v == 0.0:
                        known = topics.get(topic)
                        if known is None:
                            known = (key_of(topic, None), {"topic": topic})
                            if len(topics) >= 4096:
                                topics.clear()
                            topics[topic] = known
                        append(Event(known[0], ts, v, sid, known[1]))
                        continue
                except Exception:  # not the common reading: the paths below judge it
                    pass
            try:
                body = strict(payload)
                if type(body) is dict:
                    v = body.get(vf)
                    ts = body.get(tf)
                    if type(v) is float and type(ts) is float and 0.0 < ts < 1e11 and v - v == 0.0:
                        key = seen.get(topic)
                        append(Event(key_of(topic, body) if key is None else key, ts, v, sid, {"topic": topic}))
                        continue
            except Exception:  # judged again, with its reason, by decode
                pass
            e = decode(topic, payload)
            if e is not None:
                append(e)
        return out

    def decode(self, topic: str, payload: bytes) -> Event | None:
        try:
            if self._raw:
                body: Any = float(payload)
                value = body
                ts = self.ctx.clock()
            else:
                body = loads_json(payload)  # refuses lone surrogates: see firmware_bridges._json
                vf = self._value_field
                if vf is None:
                    value = body
                elif type(body) is dict:
                    if vf not in body:
                        raise ValueError(f"payload has no field {vf!r}")
                    value = body[vf]
                else:
                    value = body  # a bare number is the reading itself
                raw_ts = body.get(self._ts_field) if self._ts_field and type(body) is dict else None
                if raw_ts is None:
                    ts = self.ctx.clock()
                elif type(raw_ts) is float and 0.0 < raw_ts < 1e11:
                    ts = raw_ts  # epoch seconds, the common case
                else:
                    ts = parse_ts(raw_ts)
            t = type(value)
            if t is int:
                value = float(value)
            elif t is dict:
                value = _number(value)
                why = _value_fault(value)
                if why is not None:
                    raise ValueError(why)
            elif t is not float:
                raise ValueError(f"reading {value!r:.60} is not a number or an object")
            if type(value) is float and not math.isfinite(value):
                raise ValueError(f"reading {value!r} is not finite")  # like every codec: NaN never enters
            key = self._key(topic, body)
        except (
            ValueError,
            TypeError,
            IndexError,
            OverflowError,
            RecursionError,
            ExpressionError,
            UnicodeDecodeError,
        ) as exc:
            self.n_malformed += 1
            reason = f"malformed payload on {topic}: {exc}"
            if isinstance(exc, RecursionError):
                reason = f"malformed payload on {topic}: JSON nested too deeply"
            elif isinstance(exc, json.JSONDecodeError):
                reason = f"malformed payload on {topic}: not JSON ({exc.msg} at char {exc.pos})"
            self.ctx.dead_letters.record(self.ctx.pipeline, self.id, reason, None, payload)
            self.n_errors += 1
            return None
        return Event(key, ts, value, self.id, {"topic": topic})


class ConsumerSource(PayloadSource):
    """A source that reads in a consumer group and confirms to its peer what the pipeline has
    taken (Kafka commits offsets, Redis acknowledges entries), a few batches at a time: the
    source sets ``_confirm_wanted``, and :meth:`_confirmer` (a task of the source's ``run``)
    waits ``confirm_gather`` for more, then calls :meth:`_confirm`."""

    confirm_gather: ClassVar[float] = 0.05

    def __init__(self, options: ConsumerOptions, ctx: Any):
        super().__init__(options, ctx)
        self._confirm_wanted = asyncio.Event()
        self.state = "starting"
        self.last_error: str | None = None

    def health(self) -> dict[str, Any]:
        return {"state": self.state, "error": self.last_error}

    async def _confirm(self) -> None:
        """Confirm to the peer whatever the pipeline has taken since the last time."""
        raise NotImplementedError

    async def _confirmer(self) -> None:
        while True:
            await self._confirm_wanted.wait()
            await asyncio.sleep(self.confirm_gather)  # gather a few batches into one confirmation
            self._confirm_wanted.clear()
            await self._confirm()
