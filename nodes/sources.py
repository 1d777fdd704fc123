"""Source nodes: where readings enter a pipeline (``mqtt``, ``simulate``).

Sources hand micro-batches to their pipeline's bounded input queue. When the queue is full they
pause at the edge: the MQTT source stops reading its socket (the broker holds the rest), the
simulator simply waits.
"""

from __future__ import annotations

import asyncio
import math
import random
import struct
from base64 import b64decode, b64encode
from collections.abc import Callable
from functools import partial
from typing import Any, Literal
from zlib import crc32

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.api import (
    Duration,
    Event,
    NodeOptions,
    Source,
    SourceOutput,
    Subscriber,
    check_connection,
    register,
)
from nodes._stream import DecodeOptions, PayloadSource

__all__ = ["MqttSource", "SimulateSource"]


# --- mqtt -----------------------------------------------------------------------------------


class MqttReadOptions(NodeOptions):
    """Where the MQTT source reads: a connection and topic filters."""

    connection: str = Field(description="Name of an entry under `connections`.")
    topic: str | None = Field(None, description="Topic filter; + and # wildcards allowed.")
    topics: list[str] | None = Field(None, description="Several topic filters.")
    qos: Literal[0, 1] = Field(0, description="1: at-least-once (acknowledged once the sinks wrote it; MQTT 5).")

    @model_validator(mode="after")
    def _one_topic(self) -> MqttReadOptions:
        if not self.topic and not self.topics:
            raise ValueError("give `topic` (or `topics`): the topic filter to subscribe to")
        return self

    @property
    def filters(self) -> list[str]:
        return [*([self.topic] if self.topic else []), *(self.topics or [])]


class MqttSourceOptions(DecodeOptions, MqttReadOptions):
    type: Literal["mqtt"]
    session_expiry: Duration = Field(
        3600.0,
        description="QoS 1: how long the broker keeps the session (and queued messages) while the gateway is away.",
    )
    batch: int = Field(500, ge=1, le=100_000, description="Largest micro-batch handed to the pipeline.")


@register
class MqttSource(PayloadSource):
    """Subscribe to topic filters and turn each JSON message into an event.

    QoS 0 messages are collected from the client's socket reads (all of a read's messages in one
    call) and handed over as one batch per loop iteration; when the pipeline queue is full,
    reading stops until it drains to half.
    QoS 1 messages are acknowledged to the broker only after every sink they reach has written
    them (or dead-lettered them), so a crash redelivers them (at-least-once; needs MQTT 5 and a
    persistent session). A message the broker sends again (its packet id and a CRC-32 of its
    topic and payload seen before) that the pipeline already has — in flight, or in the saved
    state: the checkpoint keeps what was taken and not yet known acknowledged — is acknowledged
    in its turn without going in again; a PUBACK counts as known only once a PINGREQ written after
    it is answered.
    """

    Options = MqttSourceOptions
    options: MqttSourceOptions

    @classmethod
    def check(cls, options: NodeOptions, config: Any) -> list[tuple[str, str]]:
        o: MqttSourceOptions = options  # type: ignore[assignment]
        issues = check_connection(o.connection, config)
        if not issues and o.qos == 1 and str((config["connections"][o.connection] or {}).get("version", "5")) != "5":
            issues.append(("qos", "QoS 1 at-least-once ingest needs MQTT version 5 on the connection"))
        return [*issues, *super().check(options, config)]

    def __init__(self, options: MqttSourceOptions, ctx: Any):
        super().__init__(options, ctx)
        self._link: Subscriber | None = None
        self._pending: list[Event] = []
        self._received: list[tuple[str, bytes]] = []  # QoS 0: messages of the next batch, decoded at its flush
        self._flush_scheduled = False
        # QoS 1: the pending batch's messages, [crc, copies in the pipeline, session, packet id] each
        self._acks: list[list[int]] = []
        self._ack: Any = lambda mids: None
        self._out: SourceOutput | None = None
        # QoS 1, what was taken and not yet known acknowledged (packet id -> entry / crc): a message
        # sent again that matches is not counted again
        self._taken: dict[int, list[int]] = {}  # in the pipeline
        self._acked: dict[int, int] = {}  # PUBACK written (or restored from the checkpoint)
        self._confirming: dict[int, int] = {}  # PUBACK written before the PINGREQ in flight
        self._pinging: Any = None  # the connection's ack whose PINGREQ is in flight
        self._session = 0  # a new session (the broker lost the old one) sends nothing again
        self.n_skipped = 0

    def health(self) -> dict[str, Any]:
        if self._link is None:
            return {"state": "starting"}
        return {**self._link.health(), "skipped_on_resume": self.n_skipped} if self.options.qos else self._link.health()

    def snapshot(self) -> Any:
        # taken as the checkpoint's barrier enters the pipeline: what was handed over before it;
        # packed (little-endian packet ids, then their CRCs, in base64: 8 bytes a message)
        taken = {mid: e[0] for mid, e in self._taken.items() if e[2] == self._session}
        held = {**self._acked, **self._confirming, **taken}
        if not held:
            return None
        mids = sorted(held)
        n = len(mids)
        return b64encode(struct.pack(f"<{n}H{n}I", *mids, *[held[m] for m in mids])).decode()

    def restore(self, state: Any) -> None:
        if isinstance(state, str):
            raw = b64decode(state)
            n = len(raw) // 6
            values = struct.unpack(f"<{n}H{n}I", raw)
            self._acked = dict(zip(values[:n], values[n:], strict=True))
        else:  # {packet id: crc}, as the first checkpoints of this list were written
            self._acked = {int(mid): int(crc) for mid, crc in state.items()}

    # QoS 0: synchronous callback, batched per loop iteration -----------------------------

    def _on_message_qos0(self, client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        self.n_in += 1
        received = self._received
        received.append((topic, payload))
        if len(received) >= self.options.batch:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return 0

    def _on_messages_qos0(self, messages: list[tuple[str, bytes]]) -> None:
        # the fast path: the messages of one socket read in one call, cut into the same batches
        # as one call each would make (full ones handed over now, the rest at the loop's next turn)
        self.n_in += len(messages)
        received = self._received
        received += messages
        size = self.options.batch
        if len(received) >= size and self._out is not None:
            whole = len(received) - len(received) % size
            self._received = received[whole:]
            for k in range(0, whole, size):
                self._hand_over(received[k : k + size])
            received = self._received
        if received and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._received or self._out is None:
            return
        received, self._received = self._received, []
        self._hand_over(received)

    def _hand_over(self, received: list[tuple[str, bytes]]) -> None:
        assert self._out is not None
        batch = self.decode_many(received)  # one loop for the batch; bad messages dead-lettered
        if not batch:
            return
        if not self._out.put_nowait(batch) and self._link is not None:
            self._out.pause_while_full(self._link)

    # QoS 1: acknowledged after processing --------------------------------------------------

    def _on_publish_qos1(self, topic: str, payload: bytes, mid: int, ack: Callable[[list[int]], None]) -> None:
        # the fast path: batched like QoS 0, one PUBACK write per batch once the sinks have it
        self.n_in += 1
        if ack is not self._ack:
            self._connected(ack)
        crc = crc32(payload, crc32(topic.encode()))
        entry = self._taken.get(mid)
        if entry is not None and entry[0] == crc and entry[2] == self._session:
            entry[1] += 1  # sent again while the first copy is in the pipeline (a reconnect)
            again = True
        else:
            held = self._acked.pop(mid, None)
            if held is None:
                held = self._confirming.pop(mid, None)
            again = held == crc  # (a CRC may be 0)
            entry = self._taken[mid] = [crc, 1, self._session, mid]
        self._acks.append(entry)  # dead-lettered too: redelivery would not make it valid
        if again:
            self.n_skipped += 1  # the pipeline has it: acknowledged in its turn, not counted twice
        elif (ev := self.decode(topic, payload)) is not None:
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
        entries, self._acks = self._acks, []
        done = partial(self._acknowledge, self._ack, entries)
        # in turn even when nothing decoded: a copy the saved state holds waits for that state
        self._out.put_nowait(batch, done)
        if batch and self._link is not None:
            self._out.pause_while_full(self._link)

    def _acknowledge(self, ack: Any, entries: list[list[int]]) -> None:
        ack([e[3] for e in entries])
        taken, acked, session = self._taken, self._acked, self._session
        for e in entries:
            e[1] -= 1
            if e[1] == 0 and taken.get(e[3]) is e:
                del taken[e[3]]
                if e[2] == session:
                    acked[e[3]] = e[0]  # until the broker has surely read its PUBACK
        self._confirm()

    def _confirm(self) -> None:
        confirm = getattr(self._ack, "confirm", None)
        if self._acked and self._pinging is None and confirm is not None:
            self._confirming.update(self._acked)
            self._acked = {}
            self._pinging = self._ack
            confirm(partial(self._confirmed, self._ack))

    def _confirmed(self, ack: Any) -> None:
        if self._pinging is ack:
            self._pinging = None
            self._confirming = {}
            self._confirm()

    def _connected(self, ack: Any) -> None:
        """The first message of a new connection."""
        if self._acks:
            self._flush_qos1()  # the old one's ids go to the old one
        self._ack = ack
        # a PINGREQ the old connection did not answer: its PUBACKs may not have arrived
        self._acked.update(self._confirming)
        self._confirming, self._pinging = {}, None
        if not getattr(self._link, "session_present", True):
            self._session += 1  # a new session: nothing of the old one comes again
            self._acked = {}

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
            on_messages=None if persistent else self._on_messages_qos0,
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
