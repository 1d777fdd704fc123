"""Kafka in and out: the ``kafka_out`` sink (through the outbox) and the ``kafka`` source (a consumer group).

``kafka_out`` commits each event to the gateway's outbox and returns; the outbox hands it to an
aiokafka producer and deletes it only once the broker acknowledged it (``acks: all``), so broker
outages, gateway restarts and power cuts lose nothing within the outbox quota. The record key is
the event key; the value is the JSON envelope ``mqtt_out`` publishes (``gateway_id``, ``seq``,
``replayed``, ``pipeline``, ``source``, ``key``, ``ts``, ``value``); ``gateway_id``, ``seq``,
``replayed``, ``pipeline`` and ``key`` are also record headers, so a consumer can de-duplicate
without parsing the value.

The ``kafka`` source commits a batch's offsets only after every sink it reached has written it
and, with stateful nodes, after the state checkpoint that holds it is on disk — the same
guarantee as the QoS 1 MQTT source. The checkpoint also holds the offset each partition was
handed over up to, as Flink's Kafka source keeps its offsets in its checkpoints: a crash after
the checkpoint is on disk but before the commit reached the broker would otherwise read those
records again into windows that already hold them; on assignment the source seeks to the later
of the checkpoint's offset and the group's. A full pipeline pauses the fetch of every assigned partition.
Its event-time progress is per partition, as in Flink's Kafka source: the newest event time read
from each assigned partition, the slowest of those not idle declared to the windows downstream
(:class:`PartitionWatermarks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import ssl
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

from pydantic import Field, model_validator

from gateway.api import (
    Duration,
    Event,
    NodeOptions,
    SourceOutput,
    register,
    secret_field,
)
from nodes._outlink import Refused, SinkLink, StreamOut, split_row_topic
from nodes._stream import ConsumerOptions, ConsumerSource
from nodes._watermarks import PartitionWatermarks

__all__ = ["KafkaOut", "KafkaSource"]

log = logging.getLogger(__name__)


class KafkaClientOptions(NodeOptions):
    """How to reach the brokers: shared by the source and the sink."""

    bootstrap_servers: str | list[str] = Field(
        description="host:port of one or more brokers (a list, or one comma-separated string)."
    )
    client_id: str | None = Field(None, description="Client id the brokers see; default: sluice-<gateway>.")
    tls: bool = Field(
        False, description="Connect over TLS, verifying the brokers' certificates (on by itself with ca_file)."
    )
    ca_file: str | None = Field(None, description="PEM CA certificate(s); default: the system's trust store.")
    cert_file: str | None = Field(None, description="PEM client certificate for mutual TLS.")
    key_file: str | None = Field(None, description="PEM private key of cert_file (if not in the same file).")
    tls_insecure: bool = Field(False, description="Skip verifying certificates and names: for a test bench only.")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL authentication (with username and password); use with tls outside a lab."
    )
    username: str | None = None
    password: str | None = secret_field(None, description='Use "${KAFKA_PASSWORD}" rather than the password itself.')

    @model_validator(mode="after")
    def _security(self) -> KafkaClientOptions:
        if self.key_file and not self.cert_file:
            raise ValueError("`key_file` goes with `cert_file`")
        if self.ca_file or self.cert_file:
            object.__setattr__(self, "tls", True)
        if self.sasl_mechanism and (self.username is None or self.password is None):
            raise ValueError("`sasl_mechanism` needs `username` and `password`")
        return self

    @property
    def servers(self) -> list[str]:
        raw = self.bootstrap_servers
        parts = raw.split(",") if isinstance(raw, str) else raw
        return [p.strip() for p in parts if p.strip()]


def client_kwargs(o: KafkaClientOptions, gateway_id: str) -> dict[str, Any]:
    """aiokafka keyword arguments for the connection and security options."""
    kw: dict[str, Any] = {
        "bootstrap_servers": o.servers,
        "client_id": o.client_id or f"sluice-{gateway_id}",
        "security_protocol": ("SASL_" if o.sasl_mechanism else "") + ("SSL" if o.tls else "PLAINTEXT"),
    }
    if o.tls:
        from aiokafka.helpers import create_ssl_context

        ctx = create_ssl_context(cafile=o.ca_file, certfile=o.cert_file, keyfile=o.key_file)
        if o.tls_insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        kw["ssl_context"] = ctx
    if o.sasl_mechanism:
        kw.update(sasl_mechanism=o.sasl_mechanism, sasl_plain_username=o.username, sasl_plain_password=o.password)
    return kw


# --- the sink ---------------------------------------------------------------------------------


class KafkaOutOptions(KafkaClientOptions):
    type: Literal["kafka_out"]
    topic: str = Field(
        "sluice.{gateway}.{pipeline}",
        description="Topic template; fields {gateway} {pipeline} {node} {key} {source}.",
    )
    acks: Literal["all", 1] = Field("all", description="all: every in-sync replica has the record before it counts.")
    idempotent: bool = Field(
        True,
        description="Ask for an idempotent producer (no duplicates from the producer's own retries); a broker "
        "that cannot do it is used without, and the sink's health says so.",
    )
    compression: Literal["none", "gzip", "lz4", "zstd", "snappy"] = "none"
    linger: Duration = Field(0.005, description="How long the producer waits to fill a batch.")
    max_batch_bytes: int = Field(64 * 1024, ge=1024, description="Largest batch per partition.")
    request_timeout: Duration = Field(
        30.0, gt=0, description="A record not acknowledged in this time counts as failed: the link goes down."
    )
    reconnect_max: Duration = Field(30.0, description="Cap of the retry backoff after a failure.")


_REFUSED_NAMES = {
    "MessageSizeTooLargeError",
    "RecordTooLargeError",
    "RecordListTooLargeError",
    "InvalidTopicError",
    "TopicAuthorizationFailedError",
    "UnsupportedForMessageFormatError",
    "InvalidMessageError",
}
# Brokers that do not grant a producer id answer InitProducerId with one of these.
_NO_IDEMPOTENCE_NAMES = {"UnknownError", "UnsupportedVersionError", "ClusterAuthorizationFailedError"}


class KafkaLink(SinkLink):
    """An aiokafka producer as an outbox destination."""

    kind = "kafka"
    options: KafkaOutOptions

    def __init__(self, name: str, options: KafkaOutOptions, gateway_id: str, pipeline: str):
        super().__init__(name, options, gateway_id, pipeline)
        self._gw = gateway_id.encode()
        self._pipeline = pipeline.encode()
        self._producer: Any = None
        self.idempotent: bool | None = None
        self.idempotence_note: str | None = None

    def health(self) -> dict[str, Any]:
        h = super().health()
        h.update(
            bootstrap_servers=self.options.servers,
            idempotent=self.idempotent,
            compression=self.options.compression,
        )
        if self.idempotence_note:
            h["idempotence"] = self.idempotence_note
        return h

    async def _open(self) -> None:
        from aiokafka import AIOKafkaProducer

        o = self.options
        kw = client_kwargs(o, self.gateway_id)
        kw.update(
            acks="all" if o.acks == "all" else 1,
            compression_type=None if o.compression == "none" else o.compression,
            linger_ms=int(o.linger * 1000),
            max_batch_size=o.max_batch_bytes,
            request_timeout_ms=int(o.request_timeout * 1000),
        )
        if o.idempotent and o.acks == "all":
            producer = AIOKafkaProducer(enable_idempotence=True, **kw)
            try:
                await producer.start()
            except Exception as exc:
                await producer.stop()
                if type(exc).__name__ not in _NO_IDEMPOTENCE_NAMES:
                    raise
                self.idempotence_note = (
                    f"the broker does not grant a producer id ({type(exc).__name__}): sending without "
                    "idempotence; a retried record may arrive twice (de-duplicate on gateway_id, seq)"
                )
                log.warning("%s: %s", self.name, self.idempotence_note)
            else:
                self._producer, self.idempotent, self.idempotence_note = producer, True, None
                return
        producer = AIOKafkaProducer(**kw)
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer, self.idempotent = producer, False

    async def _close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def _send(self, row_topic: str, payload: bytes) -> asyncio.Future[Any] | None:
        topic, key = split_row_topic(row_topic)
        seq, replayed = self.envelope_headers(payload)
        kb = key.encode("utf-8", "surrogateescape")
        headers = [
            ("gateway_id", self._gw),
            ("seq", seq),
            ("replayed", b"true" if replayed else b"false"),
            ("pipeline", self._pipeline),
            ("key", kb),
        ]
        try:
            return await self._producer.send(topic, payload, key=kb, headers=headers)
        except Exception as exc:
            if self._refused(exc):
                raise Refused(self.name, f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc
            raise

    def _refused(self, exc: BaseException) -> bool:
        return type(exc).__name__ in _REFUSED_NAMES


@register
class KafkaOut(StreamOut):
    """Forward each event to a Kafka topic through the outbox: at least once, keyed by the event key."""

    Options = KafkaOutOptions
    options: KafkaOutOptions
    Link = KafkaLink
    link_prefix = "kafka"
    destination_field = "topic"

    @classmethod
    def check(cls, options: NodeOptions, config: Any) -> list[tuple[str, str]]:
        o: KafkaOutOptions = options  # type: ignore[assignment]
        issues = super().check(options, config)
        if not o.servers:
            issues.append(("bootstrap_servers", "give at least one host:port"))
        if o.compression in ("lz4", "zstd", "snappy"):
            try:
                import cramjam  # noqa: F401  # aiokafka's codec for these
            except ImportError:
                issues.append(("compression", f"{o.compression} needs the cramjam package (pip install cramjam)"))
        return issues


# --- the source -------------------------------------------------------------------------------


class KafkaReadOptions(KafkaClientOptions):
    """What the kafka source consumes, and as which group."""

    topic: str | None = Field(None, description="A topic to consume.")
    topics: list[str] | None = Field(None, description="Several topics.")
    pattern: str | None = Field(None, description="A regular expression: every matching topic, new ones too.")
    group: str | None = Field(None, description="Consumer group; default: sluice-<gateway>-<pipeline>-<node>.")
    start: Literal["committed", "earliest", "latest"] = Field(
        "committed",
        description="committed: where the group left off (earliest where it has no offset); earliest/latest: "
        "the start/end of each partition when this gateway is first assigned it, whatever the group committed.",
    )

    @model_validator(mode="after")
    def _one_subscription(self) -> KafkaReadOptions:
        n = bool(self.topic or self.topics) + bool(self.pattern)
        if n != 1:
            raise ValueError("give `topic`/`topics` or `pattern` (one of them): what to consume")
        if self.pattern:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"`pattern` is not a regular expression: {exc}") from None
        return self

    @property
    def topic_list(self) -> list[str]:
        return [*([self.topic] if self.topic else []), *(self.topics or [])]


class KafkaSourceOptions(ConsumerOptions, KafkaReadOptions):
    type: Literal["kafka"]
    key: str = Field(
        "record_key",
        description="Event key: `record_key` (the Kafka key; the topic when a record has none), `topic`, "
        "`topic[N]` (a dot-separated part) or a CEL expression over `topic` (its parts) and `payload`.",
    )
    session_timeout: Duration = Field(10.0, ge=1, description="The group drops a consumer silent this long.")
    idle_timeout: Duration | None = Field(
        60.0,
        gt=0,
        description="Event time is tracked per partition and windows follow the slowest one; a partition "
        "without records for this long (time paused by backpressure does not count) stops holding them back. "
        "null: a silent partition holds the windows until its next record.",
    )


class _PartitionReader:
    """The consumer's fetching as the engine's backpressure sees a reader
    (``SourceOutput.pause_while_full``): paused and resumed with aiokafka's per-partition
    ``pause``/``resume`` of every assigned partition, so the group's heartbeats go on and nothing
    rebalances. One per consumer: a resume that comes after the consumer stopped touches nothing.
    """

    __slots__ = ("_consumer", "_now", "_partitions", "closed", "reading", "resumed")

    def __init__(self, consumer: Any, partitions: PartitionWatermarks, now: Callable[[], float]):
        self._consumer = consumer
        self._partitions = partitions
        self._now = now
        self.closed = False
        self.reading = True
        self.resumed = asyncio.Event()
        self.resumed.set()

    def pause_reading(self) -> None:
        if self.reading and not self.closed:
            self.reading = False
            self.resumed.clear()
            self._consumer.pause(*self._consumer.assignment())
            self._partitions.pause(self._now())

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            if not self.closed:
                self._partitions.resume(self._now())
                self._consumer.resume(*self._consumer.assignment())
            self.resumed.set()


def _rebalance_listener(source: KafkaSource) -> Any:
    """aiokafka's rebalance listener: commit what is done before partitions go, seek new ones per ``start``."""
    from aiokafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: Any) -> None:
            source._partitions.revoke(set(revoked))
            await source._commit_now(set(revoked))

        async def on_partitions_assigned(self, assigned: Any) -> None:
            await source._assigned(set(assigned))

    return Listener()


@register
class KafkaSource(ConsumerSource):
    """Consume topics in a consumer group; offsets committed only once the pipeline has taken the records."""

    Options = KafkaSourceOptions
    options: KafkaSourceOptions
    name_sep = "."
    own_keys = ("record_key",)
    declares_watermark = True

    @classmethod
    def check(cls, options: NodeOptions, config: Any) -> list[tuple[str, str]]:
        o: KafkaSourceOptions = options  # type: ignore[assignment]
        issues = [("bootstrap_servers", "give at least one host:port")] if not o.servers else []
        return [*issues, *super().check(options, config)]

    def __init__(self, options: KafkaSourceOptions, ctx: Any):
        super().__init__(options, ctx)
        self._record_key: str | None = None  # the key of the record being decoded
        self._consumer: Any = None
        self._fifo: deque[list[Any]] = deque()  # [offsets by partition, done?] in hand-over order
        self._ready: dict[Any, int] = {}  # partition -> offset to commit
        self._seen: set[Any] = set()
        self._assignment: set[Any] = set()
        self._partitions = PartitionWatermarks(options.idle_timeout)
        self._handed: dict[str, int] = {}  # "topic/partition" -> next offset, of what was handed over
        self.n_commits = 0
        self.n_skipped = 0  # records not read again after a restart: the checkpoint holds them

    def health(self) -> dict[str, Any]:
        return {
            **super().health(),
            "partitions": sorted(f"{tp.topic}/{tp.partition}" for tp in self._assignment),
            "paused": self.paused,
            "commits": self.n_commits,
            "skipped_on_resume": self.n_skipped,
            "pending_batches": len(self._fifo),
            "watermark": None if self._partitions.value == -math.inf else self._partitions.value,
            "idle_partitions": sorted(
                f"{tp.topic}/{tp.partition}" for tp in self._partitions.idle(self.ctx.monotonic())
            ),
        }

    def snapshot(self) -> Any:
        # taken as the checkpoint's barrier enters the pipeline: exactly what was handed over before it
        return dict(self._handed) or None

    def restore(self, state: Any) -> None:
        self._handed = {str(k): int(v) for k, v in state.items()}

    def make_key(self, spec: str) -> Callable[[str, Any], str]:
        if spec == "record_key":
            return lambda topic, body: self._record_key if self._record_key is not None else topic
        return super().make_key(spec)

    async def run(self, output: SourceOutput) -> None:
        from aiokafka import AIOKafkaConsumer

        o = self.options
        group = o.group or f"sluice-{self.ctx.gateway_id}-{self.ctx.pipeline}-{self.id}"
        consumer = AIOKafkaConsumer(
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="latest" if o.start == "latest" else "earliest",
            session_timeout_ms=int(o.session_timeout * 1000),
            heartbeat_interval_ms=max(100, int(o.session_timeout * 1000 / 3)),
            max_poll_records=o.batch,
            **client_kwargs(o, self.ctx.gateway_id),
        )
        listener = _rebalance_listener(self)
        self._fifo.clear()
        self._ready.clear()
        self.state = "connecting"
        self._consumer = consumer  # the rebalance listener may run before start() returns
        try:
            if o.pattern:
                consumer.subscribe(pattern=o.pattern, listener=listener)
            else:
                consumer.subscribe(topics=o.topic_list, listener=listener)
            await consumer.start()
        except BaseException as exc:
            self._consumer = None
            self.state, self.last_error = "down", f"{type(exc).__name__}: {exc}"
            await consumer.stop()
            raise
        self.state, self.last_error = "running", None
        log.info(
            "kafka source %s/%s: consuming %s as group %s", self.ctx.pipeline, self.id, o.pattern or o.topic_list, group
        )
        committer = asyncio.create_task(self._confirmer(), name=f"kafka:commit:{self.ctx.pipeline}:{self.id}")
        reader = _PartitionReader(consumer, self._partitions, self.ctx.monotonic)
        try:
            while True:
                if output.full:
                    output.pause_while_full(reader)  # the engine resumes it once the queue drained to half
                    await reader.resumed.wait()
                records = await consumer.getmany(timeout_ms=500, max_records=o.batch)
                if records:
                    await self._hand_over(records, output)
                else:
                    now = self.ctx.monotonic()
                    await self._busy_while_behind(now)
                    if (wm := self._partitions.advance(now)) is not None:
                        await output.put([], watermark=wm)  # a partition fell idle
        except asyncio.CancelledError:
            # the pipeline stops: it drains what it was given and releases those offsets after its
            # final checkpoint; committed now, the next start does not read them again
            reader.closed = True
            committer.cancel()
            await output.settled()
            raise
        finally:
            reader.closed = True
            committer.cancel()
            await asyncio.gather(committer, return_exceptions=True)
            self.state = "stopped"
            with contextlib.suppress(Exception):  # best effort: what is not committed comes again
                await asyncio.wait_for(self._commit_now(None), 5)
            self._consumer = None
            await consumer.stop()

    async def _hand_over(self, records: dict[Any, list[Any]], output: SourceOutput) -> None:
        events: list[Event] = []
        offsets: dict[Any, int] = {}
        decode = self.decode
        now = self.ctx.monotonic()
        # a reading further ahead than max_future is dead-lettered on its way in: it moves nothing
        mf = self.options.max_future
        horizon = math.inf if mf is None else self.ctx.clock() + mf
        for tp, msgs in records.items():
            self.n_in += len(msgs)
            newest = -math.inf
            for m in msgs:
                self._record_key = m.key.decode("utf-8", "replace") if m.key is not None else None
                ev = decode(m.topic, m.value if m.value is not None else b"null")
                if ev is not None:
                    ev.meta = {"topic": m.topic, "partition": m.partition, "offset": m.offset}
                    events.append(ev)
                    if newest < ev.ts <= horizon:
                        newest = ev.ts
            offsets[tp] = msgs[-1].offset + 1
            self._partitions.seen(tp, newest, now)
        await self._busy_while_behind(now)
        wm = self._partitions.advance(now)
        entry: list[Any] = [offsets, False]
        self._fifo.append(entry)
        if events:
            await output.put(events, partial(self._processed, entry), watermark=wm)
        else:
            self._processed(entry)  # all dead-lettered: done, in its turn
        # in the queue now (put returned): a checkpoint barrier behind it takes these positions
        # (of partitions still owned: a rebalance may have come while put waited for room)
        for tp, off in offsets.items():
            if tp in self._assignment:
                self._handed[f"{tp.topic}/{tp.partition}"] = off
        if not events and wm is not None:
            await output.put([], watermark=wm)

    async def _busy_while_behind(self, now: float) -> None:
        """A partition that would fall idle but has records waiting (the highwater of its last fetch
        ahead of its position) is not idle: the consumer has not got to it yet (aiokafka hands over
        one partition's fetched records before another's, and a backlog can take minutes)."""
        consumer = self._consumer
        for tp in self._partitions.idle(now):
            hw = consumer.highwater(tp)
            if hw is None:
                continue  # no fetch answered for it yet: nothing known, time decides (as in Flink)
            from aiokafka.errors import IllegalStateError

            try:
                behind = hw > await consumer.position(tp)
            except IllegalStateError:  # revoked meanwhile: the rebalance drops it anyway
                continue
            if behind:
                self._partitions.seen(tp, -math.inf, now)

    def _processed(self, entry: list[Any]) -> None:
        entry[1] = True
        fifo = self._fifo
        moved = False
        while fifo and fifo[0][1]:
            offsets, _ = fifo.popleft()
            for tp, off in offsets.items():
                if tp in self._assignment:
                    self._ready[tp] = off
                    moved = True
        if moved:
            self._confirm_wanted.set()

    async def _confirm(self) -> None:
        await self._commit_now(None)

    async def _commit_now(self, only: set[Any] | None) -> None:
        consumer = self._consumer
        if consumer is None or not self._ready:
            if only is not None:
                self._forget(only)
            return
        take = {tp: off for tp, off in self._ready.items() if only is None or tp in only}
        for tp in take:
            del self._ready[tp]
        if take:
            try:
                await consumer.commit(take)
                self.n_commits += 1
            except asyncio.CancelledError:
                for tp, off in take.items():  # for the last commit as the source stops
                    self._ready.setdefault(tp, off)
                raise
            except Exception as exc:  # a rebalance, or the broker away: these records come again
                self._rl_commit(exc)
                if type(exc).__name__ not in ("CommitFailedError", "IllegalStateError"):
                    for tp, off in take.items():
                        self._ready.setdefault(tp, off)
        if only is not None:
            self._forget(only)

    def _rl_commit(self, exc: BaseException) -> None:
        self.last_error = f"commit failed: {type(exc).__name__}: {exc}"
        log.warning("kafka source %s/%s: %s", self.ctx.pipeline, self.id, self.last_error)

    def _forget(self, revoked: set[Any]) -> None:
        self._assignment -= revoked
        for tp in revoked:
            self._ready.pop(tp, None)

    async def _assigned(self, assigned: set[Any]) -> None:
        self._assignment = set(assigned)
        # positions of partitions this gateway no longer owns leave its state: if one comes back
        # later, its new owner's commits say where to go on. (A rebalance revokes every partition
        # before assigning: one assigned again keeps its position, and records still in the
        # pipeline are not read twice.)
        owned = {f"{tp.topic}/{tp.partition}" for tp in assigned}
        for name in [name for name in self._handed if name not in owned]:
            del self._handed[name]
        self._partitions.assign(self._assignment, self.ctx.monotonic())
        consumer = self._consumer
        if consumer is not None:
            # where this gateway had handed records over to (this run, or the restored checkpoint):
            # what comes before is in the pipeline or in its saved state, so not read again
            for tp in assigned:
                handed = self._handed.get(f"{tp.topic}/{tp.partition}")
                if handed is None:
                    continue
                self._seen.add(tp)
                committed = await consumer.committed(tp)
                if committed is None or committed < handed:
                    self.n_skipped += 0 if committed is None else handed - committed
                    consumer.seek(tp, handed)
        new = assigned - self._seen
        self._seen |= assigned
        if not new or consumer is None or self.options.start == "committed":
            return
        if self.options.start == "earliest":
            await consumer.seek_to_beginning(*new)
        else:
            await consumer.seek_to_end(*new)
