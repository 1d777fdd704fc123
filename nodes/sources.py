"""Source nodes: where readings enter a pipeline (``mqtt``, ``simulate``).

Sources hand micro-batches to their pipeline's bounded input queue. When the queue is full they
pause at the edge: the MQTT source stops reading its socket (the broker holds the rest), the
simulator simply waits.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from firmware_bridges import loads_json
from gateway.api import (
    Duration,
    Event,
    Expression,
    ExpressionError,
    NodeOptions,
    Source,
    SourceOutput,
    Subscriber,
    check_connection,
    check_expression,
    max_future_field,
    register,
)

__all__ = ["MqttSource", "SimulateSource"]

_TOPIC_INDEX = re.compile(r"^topic\[(-?\d+)\]$")


# --- helpers shared by payload-decoding sources ---------------------------------------------


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


# --- mqtt -----------------------------------------------------------------------------------


class MqttSourceOptions(NodeOptions):
    type: Literal["mqtt"]
    connection: str = Field(description="Name of an entry under `connections`.")
    topic: str | None = Field(None, description="Topic filter; + and # wildcards allowed.")
    topics: list[str] | None = Field(None, description="Several topic filters.")
    qos: Literal[0, 1] = Field(0, description="1: at-least-once (acknowledged once the sinks wrote it; MQTT 5).")
    key: str = Field(
        "topic",
        description="Event key: `topic`, `topic[N]` (a level) or a CEL "
        "expression over `topic` (list of levels) and `payload`.",
    )
    value_field: str | None = Field("value", description="Payload field holding the reading; null: the whole payload.")
    ts_field: str | None = Field(
        "ts", description="Payload field with event time (epoch s/ms or ISO 8601); absent: ingest time."
    )
    format: Literal["json", "raw"] = Field("json", description="json: decode payload; raw: a number in text.")
    max_future: Duration | None = max_future_field()
    session_expiry: Duration = Field(
        3600.0,
        description="QoS 1: how long the broker keeps the session (and queued messages) while the gateway is away.",
    )
    batch: int = Field(500, ge=1, le=100_000, description="Largest micro-batch handed to the pipeline.")

    @model_validator(mode="after")
    def _one_topic(self) -> MqttSourceOptions:
        if not self.topic and not self.topics:
            raise ValueError("give `topic` (or `topics`): the topic filter to subscribe to")
        return self

    @property
    def filters(self) -> list[str]:
        return [*([self.topic] if self.topic else []), *(self.topics or [])]


def key_function(spec: str) -> Callable[[str, Any], str]:
    if spec == "topic":
        return lambda topic, payload: topic
    m = _TOPIC_INDEX.match(spec)
    if m:
        idx = int(m.group(1))

        def by_level(topic: str, payload: Any) -> str:
            return topic.split("/")[idx]

        return by_level
    expr = Expression(spec, ("topic", "payload"))

    def by_expr(topic: str, payload: Any) -> str:
        return str(expr({"topic": topic.split("/"), "payload": payload}))

    return by_expr


@register
class MqttSource(Source):
    """Subscribe to topic filters and turn each JSON message into an event.

    QoS 0 messages are collected in the client's socket callback and handed over as one batch per
    loop iteration; when the pipeline queue is full, reading stops until it drains to half.
    QoS 1 messages are acknowledged to the broker only after every sink they reach has written
    them (or dead-lettered them), so a crash redelivers them (at-least-once; needs MQTT 5 and a
    persistent session).
    """

    Options = MqttSourceOptions
    options: MqttSourceOptions

    @classmethod
    def check(cls, options: NodeOptions, config: Any) -> list[tuple[str, str]]:
        o: MqttSourceOptions = options  # type: ignore[assignment]
        issues = check_connection(o.connection, config)
        if not issues and o.qos == 1 and str((config["connections"][o.connection] or {}).get("version", "5")) != "5":
            issues.append(("qos", "QoS 1 at-least-once ingest needs MQTT version 5 on the connection"))
        if o.key != "topic" and not _TOPIC_INDEX.match(o.key):
            problem = check_expression(o.key, ("topic", "payload"), {"topic": ["a", "b"], "payload": {}})
            if problem:
                issues.append(("key", problem))
        return issues

    def __init__(self, options: MqttSourceOptions, ctx: Any):
        super().__init__(options, ctx)
        self._key = key_function(options.key)
        self._raw = options.format == "raw"
        self._value_field = options.value_field
        self._ts_field = options.ts_field
        self._link: Subscriber | None = None
        self._pending: list[Event] = []
        self._flush_scheduled = False
        self._acks: list[int] = []  # QoS 1: packet ids of the pending batch, to acknowledge
        self._ack: Callable[[list[int]], None] = lambda mids: None
        self._out: SourceOutput | None = None
        self.n_malformed = 0

    def health(self) -> dict[str, Any]:
        return self._link.health() if self._link else {"state": "starting"}

    def counters(self) -> dict[str, int]:
        c = super().counters()
        c["malformed"] = self.n_malformed
        return c

    # decoding ---------------------------------------------------------------------------

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

    # QoS 0: synchronous callback, batched per loop iteration -----------------------------

    def _on_message_qos0(self, client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        self.n_in += 1
        ev = self.decode(topic, payload)
        if ev is not None:
            self._pending.append(ev)
            if len(self._pending) >= self.options.batch:
                self._flush()
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        return 0

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending or self._out is None:
            return
        batch, self._pending = self._pending, []
        if not self._out.put_nowait(batch) and self._link is not None:
            self._out.pause_while_full(self._link)

    # QoS 1: acknowledged after processing --------------------------------------------------

    def _on_publish_qos1(self, topic: str, payload: bytes, mid: int, ack: Callable[[list[int]], None]) -> None:
        # the fast path: batched like QoS 0, one PUBACK write per batch once the sinks have it
        self.n_in += 1
        if ack is not self._ack and self._acks:
            self._flush_qos1()  # a new connection: the old one's ids go to the old one
        self._ack = ack
        ev = self.decode(topic, payload)
        self._acks.append(mid)  # dead-lettered too: redelivery would not make it valid
        if ev is not None:
            self._pending.append(ev)
        if len(self._acks) >= self.options.batch:
            self._flush_qos1()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_qos1)

    def _flush_qos1(self) -> None:
        self._flush_scheduled = False
        if not self._acks or self._out is None:
            return
        batch, self._pending = self._pending, []
        mids, self._acks = self._acks, []
        ack = self._ack
        if not batch:
            ack(mids)
            return
        self._out.put_nowait(batch, lambda: ack(mids))
        if self._link is not None:
            self._out.pause_while_full(self._link)

    async def _on_message_qos1(self, client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        self.n_in += 1
        ev = self.decode(topic, payload)
        if ev is None or self._out is None:
            return 0  # dead-lettered: acknowledge, redelivery would not make it valid
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._out.put_nowait([ev], lambda: done.done() or done.set_result(None))
        if self._link is not None:
            self._out.pause_while_full(self._link)
        await done  # cancelled (shutdown) -> no PUBACK -> the broker redelivers
        return 0

    async def run(self, output: SourceOutput) -> None:
        o = self.options
        services = self.ctx.services
        prefix = services.connection(o.connection).client_id or self.ctx.gateway_id
        self._out = output
        persistent = o.qos == 1
        self._link = services.subscriber(
            o.connection,
            f"{prefix}-{self.ctx.pipeline}-{self.id}",
            on_message=self._on_message_qos1 if persistent else self._on_message_qos0,
            clean_session=not persistent,
            session_expiry=int(o.session_expiry) if persistent else 0,
            ack_after_processing=persistent,
            on_publish_qos1=self._on_publish_qos1 if persistent else None,
        )
        for f in o.filters:
            self._link.subscribe(f, o.qos)
        try:
            await self._link.run()
        finally:
            if persistent:
                self._flush_qos1()
            else:
                self._flush()
            await self._link.close()


# --- simulate -------------------------------------------------------------------------------


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Anomaly(_Part):
    kind: Literal["spike", "step", "stuck"] = "spike"
    every: Duration = Field(60.0, gt=0, description="Mean time between anomalies.")
    size: float = Field(30.0, description="How far a spike/step moves the value.")
    duration: Duration = Field(5.0, description="How long a step or stuck value lasts.")


class SimulatedSensor(_Part):
    key: str
    base: float = 20.0
    amplitude: float = Field(2.0, description="Daily-style sine swing around base.")
    period: Duration = Field(300.0, gt=0)
    noise: float = Field(0.2, ge=0, description="Standard deviation of Gaussian noise.")
    drift: float = Field(0.0, description="Change of base per hour.")
    anomalies: list[Anomaly] = Field(default_factory=list)


class SimulateOptions(NodeOptions):
    type: Literal["simulate"]
    sensors: list[SimulatedSensor] = Field(min_length=1)
    interval: Duration = Field(1.0, gt=0, description="Time between readings of each sensor.")
    count: int | None = Field(None, ge=1, description="Stop after this many rounds; default: run forever.")
    seed: int | None = Field(None, description="Fixes the random sequence (reproducible demos and tests).")
    realtime: bool = Field(True, description="false: emit as fast as the pipeline takes them (tests, benchmarks).")


@register
class SimulateSource(Source):
    """Simulated sensors: a sine around a base, noise, drift, and injected anomalies."""

    Options = SimulateOptions
    options: SimulateOptions

    def __init__(self, options: SimulateOptions, ctx: Any):
        super().__init__(options, ctx)
        self._rng = random.Random(options.seed)
        self._round = 0
        self._anomaly: dict[str, tuple[str, float, float]] = {}  # key -> (kind, until_t, value)

    def health(self) -> dict[str, Any]:
        return {"state": "running", "rounds": self._round}

    def _reading(self, s: SimulatedSensor, t: float, dt: float) -> float:
        rng = self._rng
        v = s.base + s.drift * t / 3600.0 + s.amplitude * math.sin(2 * math.pi * t / s.period)
        v += rng.gauss(0.0, s.noise) if s.noise else 0.0
        active = self._anomaly.get(s.key)
        if active and t >= active[1]:
            del self._anomaly[s.key]
            active = None
        if active is None:
            for a in s.anomalies:
                if rng.random() < dt / a.every:
                    if a.kind == "spike":
                        return round(v + a.size, 3)
                    # step: an offset for a while; stuck: the value freezes where it is
                    active = (a.kind, t + a.duration, a.size if a.kind == "step" else v)
                    self._anomaly[s.key] = active
                    break
        if active is not None:
            kind, _, param = active
            v = param if kind == "stuck" else v + param
        return round(v, 3)

    async def run(self, output: SourceOutput) -> None:
        o = self.options
        start_wall = self.ctx.clock()
        start_mono = self.ctx.monotonic()
        while o.count is None or self._round < o.count:
            t = self._round * o.interval
            ts = start_wall + t if not o.realtime else self.ctx.clock()
            batch = [Event(s.key, ts, self._reading(s, t, o.interval), self.id) for s in o.sensors]
            self.n_in += len(batch)
            self._round += 1
            await output.put(batch)
            if o.realtime:
                await self.ctx.sleep_until(start_mono + self._round * o.interval)
            elif self._round % 64 == 0:
                await asyncio.sleep(0)
