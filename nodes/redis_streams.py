"""Redis Streams in and out: the ``redis_out`` sink (XADD through the outbox) and the ``redis`` source (XREADGROUP).

``redis_out`` commits each event to the gateway's outbox; the outbox sends it with ``XADD`` (in
pipelined batches, trimmed with ``MAXLEN ~`` when asked) and deletes it once Redis answered, so
an outage or a restart loses nothing within the outbox quota. Each entry has the fields
``gateway_id``, ``seq``, ``replayed``, ``pipeline``, ``key`` and ``data`` (the JSON envelope
``mqtt_out`` publishes), so a consumer can de-duplicate on (``gateway_id``, ``seq``).

The ``lookup`` operator enriches events from a Redis hash kept centrally (per-asset thresholds,
labels): it keeps a copy of the whole hash, refreshed every ``refresh``, and goes on with its
last copy — saved with the node's state, so across a restart too — while Redis is away.

The ``redis`` source reads in a consumer group and acknowledges (``XACK``) an entry only after
every sink it reached has written it and, with stateful nodes, after the state checkpoint that
holds it — the same guarantee as the QoS 1 MQTT source. On start it first reads its own pending
entries again (what a crash left unacknowledged), and it claims entries another consumer of the
group left pending longer than ``claim_idle`` (``XAUTOCLAIM``: a consumer that died). The
checkpoint also holds the ids of the entries handed over and not yet acknowledged: a crash after
the checkpoint is on disk but before the XACK reached Redis leaves them pending, and read again
they are acknowledged without going into windows that already hold them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

from pydantic import Field, model_validator

from gateway.api import (
    Duration,
    Event,
    Expression,
    LinkError,
    NodeOptions,
    Operator,
    SourceOutput,
    check_expression,
    register,
)
from nodes._outlink import SinkLink, StreamOut, split_row_topic
from nodes._stream import ConsumerOptions, ConsumerSource
from nodes._watermarks import PartitionWatermarks

__all__ = ["Lookup", "RedisOut", "RedisSource"]

log = logging.getLogger(__name__)


class RedisClientOptions(NodeOptions):
    url: str = Field(
        "redis://localhost:6379/0",
        pattern=r"^(redis|rediss|unix)://",
        description="redis://[user:password@]host:port/db; rediss:// for TLS. Put a password in ${ENV}.",
    )
    ca_file: str | None = Field(None, description="rediss://: PEM CA certificate(s) to verify the server.")
    socket_timeout: Duration = Field(10.0, gt=0, description="A command not answered in this time fails.")


def _client(o: RedisClientOptions) -> Any:
    import redis.asyncio as aioredis

    kw: dict[str, Any] = {"socket_timeout": o.socket_timeout, "socket_connect_timeout": o.socket_timeout}
    if o.ca_file and o.url.startswith("rediss://"):
        kw["ssl_ca_certs"] = o.ca_file
    return aioredis.from_url(o.url, **kw)


# --- the sink ---------------------------------------------------------------------------------


class RedisOutOptions(RedisClientOptions):
    type: Literal["redis_out"]
    stream: str = Field(
        "sluice:{gateway}:{pipeline}",
        description="Stream name template; fields {gateway} {pipeline} {node} {key} {source}.",
    )
    maxlen: int | None = Field(
        None, ge=1, description="Trim the stream to about this many entries (XADD MAXLEN ~); default: no trimming."
    )
    reconnect_max: Duration = Field(30.0, description="Cap of the retry backoff after a failure.")


class RedisLink(SinkLink):
    """A Redis client as an outbox destination: XADD in pipelined batches, in order."""

    kind = "redis"
    options: RedisOutOptions

    def __init__(self, name: str, options: RedisOutOptions, gateway_id: str, pipeline: str):
        super().__init__(name, options, gateway_id, pipeline)
        self._gw = gateway_id
        self._pipeline = pipeline
        self._client: Any = None

    def health(self) -> dict[str, Any]:
        h = super().health()
        h["maxlen"] = self.options.maxlen
        return h

    async def _open(self) -> None:
        client = _client(self.options)
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        self._client = client

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _pump(self) -> None:
        # One pipeline (one round trip) per batch of queued messages, instead of one per message.
        while True:
            await self._work.wait()
            self._work.clear()
            while self._queue:
                batch = []
                while self._queue and len(batch) < 500:
                    item = self._queue.popleft()
                    if not item[2].done():
                        batch.append(item)
                if not batch:
                    continue
                if not self.connected or self._client is None:
                    for _, _, fut in batch:
                        fut.set_exception(self._down_error())
                    continue
                pipe = self._client.pipeline(transaction=False)
                maxlen = self.options.maxlen
                for row_topic, payload, _ in batch:
                    stream, key = split_row_topic(row_topic)
                    seq, replayed = self.envelope_headers(payload)
                    fields = {
                        "gateway_id": self._gw,
                        "seq": seq,
                        "replayed": "true" if replayed else "false",
                        "pipeline": self._pipeline,
                        "key": key,
                        "data": payload,
                    }
                    pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)
                try:
                    await pipe.execute(raise_on_error=False)
                except asyncio.CancelledError:
                    for _, _, fut in batch:
                        fut.cancel()
                    raise
                except Exception as exc:  # redis-py's connection errors: none of the batch is known to be in
                    for _, _, fut in batch:
                        self._fail(fut, exc)
                    continue
                finally:
                    await pipe.reset()
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)

    def _down_error(self) -> Exception:
        return LinkError(self.name, self.last_error or "down")


@register
class RedisOut(StreamOut):
    """Append each event to a Redis stream through the outbox: at least once, de-duplicable on (gateway_id, seq)."""

    Options = RedisOutOptions
    options: RedisOutOptions
    Link = RedisLink
    link_prefix = "redis"
    destination_field = "stream"


# --- the source -------------------------------------------------------------------------------


class RedisReadOptions(RedisClientOptions):
    """What the redis source reads, and as which group and consumer."""

    stream: str | None = Field(None, description="The stream to read.")
    streams: list[str] | None = Field(None, description="Several streams.")
    group: str | None = Field(None, description="Consumer group; default: sluice-<pipeline>-<node>.")
    consumer: str | None = Field(
        None, description="This reader's name in the group; default: <gateway>. Keep it stable across restarts."
    )
    start: Literal["earliest", "latest"] = Field(
        "latest", description="Where a group created by this source starts: the first entry, or new entries only."
    )
    claim_idle: Duration = Field(
        60.0, gt=0, description="Take over entries another consumer left unacknowledged this long (it died)."
    )
    data_field: str | None = Field(
        "data", description="Entry field holding a JSON payload; null: the entry's fields are the payload."
    )

    @property
    def stream_list(self) -> list[str]:
        return [*([self.stream] if self.stream else []), *(self.streams or [])]

    @model_validator(mode="after")
    def _some_stream(self) -> RedisReadOptions:
        if not self.stream_list:
            raise ValueError("give `stream` (or `streams`): what to read")
        return self


class RedisSourceOptions(ConsumerOptions, RedisReadOptions):
    type: Literal["redis"]
    key: str = Field(
        "auto",
        description="Event key: `auto` (the payload's `key` field, else the stream name), `stream`, `stream[N]` "
        "(a :-separated part) or a CEL expression over `topic` (the stream name's :-separated parts; a / is "
        "part of a part) and `payload`.",
    )
    batch: int = Field(500, ge=1, le=100_000, description="Entries read per call (largest micro-batch).")
    idle_timeout: Duration | None = Field(
        60.0,
        gt=0,
        description="With several streams, event time is tracked per stream and windows follow the slowest "
        "one; a stream without entries for this long (time waiting for a full pipeline does not count) stops "
        "holding them back. null: a silent stream holds the windows until its next entry.",
    )


def _number_or_text(v: str) -> Any:
    try:
        return float(v)
    except ValueError:
        return v


@register
class RedisSource(ConsumerSource):
    """Read streams in a consumer group; XACK once the pipeline has taken the entries."""

    Options = RedisSourceOptions
    options: RedisSourceOptions
    confirm_gather = 0.02
    name_part = "stream"
    name_sep = ":"
    own_keys = ("auto",)

    def __init__(self, options: RedisSourceOptions, ctx: Any):
        super().__init__(options, ctx)
        self._client: Any = None
        self._in_flight: set[tuple[str, bytes]] = set()
        self._to_ack: dict[str, list[bytes]] = {}
        # stream -> ids handed over (or restored with the checkpoint) and not acknowledged yet
        self._handed: dict[str, dict[str, None]] = {}
        self.n_acked = 0
        self.n_claimed = 0
        self.n_skipped = 0  # pending entries read again that the saved state already holds
        # several streams: event-time progress per stream, the slowest declared to the windows
        self.declares_watermark = len(options.stream_list) > 1
        self._streams = PartitionWatermarks(options.idle_timeout)

    def health(self) -> dict[str, Any]:
        h = {
            **super().health(),
            "acked": self.n_acked,
            "claimed": self.n_claimed,
            "in_flight": len(self._in_flight),
            "skipped_on_resume": self.n_skipped,
        }
        if self.declares_watermark:
            wm = self._streams.value
            h["watermark"] = None if wm == -math.inf else wm
            h["idle_streams"] = sorted(self._streams.idle(self.ctx.monotonic()))
        return h

    def snapshot(self) -> Any:
        # taken as the checkpoint's barrier enters the pipeline: exactly what was handed over before it
        return {stream: pack_ids(ids) for stream, ids in self._handed.items() if ids} or None

    def restore(self, state: Any) -> None:
        # a list of ids: a checkpoint written before they were packed
        self._handed = {
            str(stream): dict.fromkeys(unpack_ids(ids) if isinstance(ids, str) else map(str, ids))
            for stream, ids in state.items()
        }

    def make_key(self, spec: str) -> Callable[[str, Any], str]:
        if spec == "auto":
            return lambda stream, body: str(body["key"]) if type(body) is dict and "key" in body else stream
        return super().make_key(spec)

    @property
    def group(self) -> str:
        return self.options.group or f"sluice-{self.ctx.pipeline}-{self.id}"

    @property
    def consumer_name(self) -> str:
        return self.options.consumer or self.ctx.gateway_id

    async def run(self, output: SourceOutput) -> None:
        from redis.exceptions import ResponseError

        o = self.options
        client = _client(o)
        self.state = "connecting"
        try:
            for s in o.stream_list:
                try:
                    await client.xgroup_create(s, self.group, id="0" if o.start == "earliest" else "$", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
            self._client = client
            self.state, self.last_error = "running", None
            log.info("redis source %s/%s: reading %s as %s/%s", self.ctx.pipeline, self.id, o.stream_list,
                     self.group, self.consumer_name)  # fmt: skip
            acker = asyncio.create_task(self._confirmer(), name=f"redis:ack:{self.ctx.pipeline}:{self.id}")
            try:
                await self._read(output, client)
            except asyncio.CancelledError:
                # the pipeline stops: it drains what it was given and releases those entries after
                # its final checkpoint; acknowledged now, the next start does not read them again
                acker.cancel()
                await output.settled()
                raise
            except Exception as exc:
                # said at once: the acknowledgements below may wait out the client's retries first
                self.state, self.last_error = "down", f"{type(exc).__name__}: {exc}"
                raise
            finally:
                acker.cancel()
                await asyncio.gather(acker, return_exceptions=True)
                await self._confirm()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.state, self.last_error = "down", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._client = None
            await client.aclose()

    async def _read(self, output: SourceOutput, client: Any) -> None:
        o = self.options
        group, me = self.group, self.consumer_name
        # first what this consumer read before and never acknowledged (a crash), then new entries
        ids: dict[str, Any] = dict.fromkeys(o.stream_list, "0")
        history = set(o.stream_list)  # streams whose own pending entries are still being read again
        loop = asyncio.get_running_loop()
        next_claim = loop.time()
        if self.declares_watermark:
            self._streams.assign(set(o.stream_list), self.ctx.monotonic())
        while True:
            if loop.time() >= next_claim:
                next_claim = loop.time() + max(1.0, o.claim_idle / 4)
                await self._claim(output, client)
            got = await client.xreadgroup(group, me, ids, count=o.batch, block=None if history else 1000)
            if not got and self.declares_watermark and (wm := self._streams.advance(self.ctx.monotonic())):
                await output.put([], watermark=wm)  # a stream fell idle
            answered = set()
            for stream_b, entries in got or []:
                stream = stream_b.decode() if isinstance(stream_b, bytes) else stream_b
                answered.add(stream)
                if stream in history:
                    if not entries:
                        history.discard(stream)
                        ids[stream] = ">"
                        continue
                    ids[stream] = entries[-1][0]  # own history is paged by the last id read
                await self._hand_over(stream, entries, output)
            for stream in history - answered:
                history.discard(stream)
                ids[stream] = ">"

    async def _claim(self, output: SourceOutput, client: Any) -> None:
        o = self.options
        idle_ms = int(o.claim_idle * 1000)
        for stream in o.stream_list:
            start = "0-0"
            while True:
                res = await client.xautoclaim(stream, self.group, self.consumer_name, idle_ms, start, count=o.batch)
                start, entries = res[0], res[1]
                entries = [e for e in entries if e[1] is not None]
                if entries:
                    self.n_claimed += len(entries)
                    log.info("redis source %s/%s: claimed %d entries of %s left by another consumer",
                             self.ctx.pipeline, self.id, len(entries), stream)  # fmt: skip
                    await self._hand_over(stream, entries, output)
                if start in (b"0-0", "0-0"):
                    break

    async def _hand_over(self, stream: str, entries: list[Any], output: SourceOutput) -> None:
        events: list[Event] = []
        ids: list[bytes] = []
        handed = self._handed.setdefault(stream, {})
        again: list[bytes] = []
        for eid, fields in entries:
            if (stream, eid) in self._in_flight:
                continue  # still on its way through the pipeline
            if _text(eid) in handed:
                again.append(eid)  # taken before (the saved state holds it), not acknowledged yet
                continue
            ids.append(eid)
            if fields is None:
                continue  # trimmed away while pending: nothing to read, acknowledge it
            self.n_in += 1
            ev = self._decode_entry(stream, fields)
            if ev is not None:
                ev.meta = {"stream": stream, "id": eid.decode() if isinstance(eid, bytes) else eid}
                events.append(ev)
        if again:
            self.n_skipped += len(again)
            self._to_ack.setdefault(stream, []).extend(again)
            self._confirm_wanted.set()
        if not ids:
            return
        for eid in ids:
            self._in_flight.add((stream, eid))
        done = partial(self._processed, stream, ids)
        wm = self._progress(stream, events) if self.declares_watermark else None
        if events:
            await self._put(output, events, done, wm)
        # in the queue now (put returned): a checkpoint barrier behind it takes these ids
        handed.update(dict.fromkeys(map(_text, ids)))
        if not events:
            done()  # all dead-lettered: acknowledge, reading them again would not make them valid
            if wm is not None:
                await self._put(output, [], None, wm)

    def _progress(self, stream: str, events: list[Event]) -> float | None:
        """The source's progress once ``events`` of ``stream`` are in, if it moved (a reading further
        ahead than max_future is dead-lettered on its way in: it moves nothing)."""
        mf = self.options.max_future
        horizon = math.inf if mf is None else self.ctx.clock() + mf
        newest = max((ev.ts for ev in events if ev.ts <= horizon), default=-math.inf)
        now = self.ctx.monotonic()
        self._streams.seen(stream, newest, now)
        return self._streams.advance(now)

    async def _put(self, output: SourceOutput, events: list[Event], done: Any, wm: float | None) -> None:
        # waiting for room in the pipeline does not make the other streams idle: they were not read
        full = output.full and self.declares_watermark
        if full:
            self._streams.pause(self.ctx.monotonic())
        try:
            await output.put(events, done, watermark=wm)
        finally:
            if full:
                self._streams.resume(self.ctx.monotonic())

    def _decode_entry(self, stream: str, fields: dict[Any, Any]) -> Event | None:
        try:
            f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
        except UnicodeDecodeError as exc:
            # refused like any text that is not Unicode (firmware_bridges._json); raised, it would
            # restart the source onto the same pending entry, forever
            self.n_malformed += 1
            self.n_errors += 1
            reason = f"entry on {stream}: garbage: a field name is not UTF-8 text (byte {exc.start})"
            raw = json.dumps({_text(k): _text(v) for k, v in fields.items()}).encode()
            self.ctx.dead_letters.record(self.ctx.pipeline, self.id, reason, None, raw)
            return None
        df = self.options.data_field
        if df is not None:
            raw = f.get(df)
            if raw is None:
                self.n_malformed += 1
                self.n_errors += 1
                reason = f"entry on {stream} has no field {df!r} (fields: {', '.join(sorted(f)) or 'none'})"
                self.ctx.dead_letters.record(
                    self.ctx.pipeline, self.id, reason, None, json.dumps({k: _text(v) for k, v in f.items()}).encode()
                )
                return None
            return self.decode(stream, raw if isinstance(raw, bytes) else str(raw).encode())
        body = {k: _number_or_text(_text(v)) for k, v in f.items()}
        return self.decode(stream, json.dumps(body).encode())

    def _processed(self, stream: str, ids: list[bytes]) -> None:
        for eid in ids:
            self._in_flight.discard((stream, eid))
        self._to_ack.setdefault(stream, []).extend(ids)
        self._confirm_wanted.set()

    async def _confirm(self) -> None:
        """XACK what the pipeline has taken."""
        client = self._client
        if client is None or not self._to_ack:
            return
        todo, self._to_ack = self._to_ack, {}
        try:
            for stream, ids in todo.items():
                self.n_acked += await client.xack(stream, self.group, *ids)
                handed = self._handed.get(stream, {})
                for eid in ids:
                    handed.pop(_text(eid), None)
        except asyncio.CancelledError:
            for stream, ids in todo.items():  # for the last XACK as the source stops (XACK twice is harmless)
                self._to_ack.setdefault(stream, []).extend(ids)
            raise
        except Exception as exc:  # Redis away: these entries stay pending and come again
            self.last_error = f"XACK failed: {type(exc).__name__}: {exc}"
            log.warning("redis source %s/%s: %s", self.ctx.pipeline, self.id, self.last_error)


def pack_ids(ids: Any) -> str:
    """Stream entry ids (``<ms>-<seq>``) as one short text for the checkpoint: sorted, each the
    difference of its milliseconds from the one before (``<d>`` when its sequence number is 0,
    else ``<d>-<seq>``; the first one whole), and ``*<n>`` for n ids that each follow the one
    before in the same millisecond. About 2-3 bytes an id instead of ~19 (measured by
    scripts/bench/redis_checkpoint.py)."""
    parsed = sorted((int(ms), int(seq)) for ms, _, seq in (str(i).partition("-") for i in ids))
    out: list[str] = []
    prev_ms = prev_seq = -1
    run = 0
    for ms, seq in parsed:
        if ms == prev_ms and seq == prev_seq + 1:
            run += 1
        else:
            if run:
                out.append(f"*{run}")
                run = 0
            if prev_ms < 0:
                out.append(f"{ms}-{seq}")
            else:
                out.append(f"{ms - prev_ms}-{seq}" if seq else str(ms - prev_ms))
        prev_ms, prev_seq = ms, seq
    if run:
        out.append(f"*{run}")
    return ",".join(out)


def unpack_ids(text: str) -> list[str]:
    """The ids :func:`pack_ids` packed, in order."""
    ids: list[str] = []
    ms = seq = 0
    for n, token in enumerate(text.split(",") if text else ()):
        if token[0] == "*":
            for _ in range(int(token[1:])):
                seq += 1
                ids.append(f"{ms}-{seq}")
            continue
        d, _, s = token.partition("-")
        ms = int(d) if n == 0 else ms + int(d)
        seq = int(s) if s else 0
        ids.append(f"{ms}-{seq}")
    return ids


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


# --- lookup: enrich events from a Redis hash ----------------------------------------------------


class LookupOptions(RedisClientOptions):
    type: Literal["lookup"]
    hash: str = Field(description="The Redis hash to read: field = what `by` gives, value = what to attach.")
    by: str = Field("key", description="CEL expression naming the hash field for an event; default: its key.")
    into: str = Field(
        "lookup", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Name under the event's meta (`meta.<into>`)."
    )
    refresh: Duration = Field(30.0, gt=0, description="How often the copy of the hash is read again (its TTL).")
    missing: Literal["pass", "drop"] = Field(
        "pass", description="An event whose field is not in the hash: pass it on without, or drop it (counted)."
    )
    max_fields: int = Field(100_000, ge=1, description="A hash larger than this is refused (kept in memory).")


def _parse_hash_value(raw: Any) -> Any:
    text = _text(raw)
    try:
        v = json.loads(text)
    except ValueError:
        return text
    return float(v) if type(v) is int else v


@register
class Lookup(Operator):
    """Attach ``meta.<into>`` from a Redis hash to each event; works from its last copy while Redis is away."""

    Options = LookupOptions
    options: LookupOptions

    @classmethod
    def check(cls, options: NodeOptions, config: Any) -> list[tuple[str, str]]:
        problem = check_expression(options.by)  # type: ignore[attr-defined]
        return [("by", problem)] if problem else []

    def __init__(self, options: LookupOptions, ctx: Any):
        super().__init__(options, ctx)
        self._by = None if options.by == "key" else Expression(options.by)
        self._table: dict[str, Any] = {}
        self._loaded_at: float | None = None  # wall clock of the copy in use
        self._state = "never loaded"
        self._error: str | None = None
        self.n_missing = 0
        self.n_unloaded = 0

    def health(self) -> dict[str, Any]:
        age = None if self._loaded_at is None else round(self.ctx.clock() - self._loaded_at, 1)
        return {"state": self._state, "error": self._error, "fields": len(self._table), "age_s": age}

    def counters(self) -> dict[str, int]:
        c = super().counters()
        c["missing"] = self.n_missing
        c["unloaded"] = self.n_unloaded
        return c

    def on_event(self, event: Event) -> Event | None:
        if self._loaded_at is None:
            self.n_unloaded += 1  # no copy yet: the event goes on without
            return event
        field = event.key if self._by is None else str(self._by(event))
        found = self._table.get(field, _MISSING)
        if found is _MISSING:
            self.n_missing += 1
            return None if self.options.missing == "drop" else event
        meta = dict(event.meta) if event.meta else {}
        meta[self.options.into] = found
        return Event(event.key, event.ts, event.value, event.source, meta)

    async def run(self) -> None:
        o = self.options
        client = _client(o)
        try:
            while True:
                try:
                    size = await client.hlen(o.hash)
                    if size > o.max_fields:
                        raise ValueError(f"hash {o.hash!r} has {size} fields, more than max_fields {o.max_fields}")
                    raw = await client.hgetall(o.hash)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis away or the hash unusable: keep the last copy
                    err = f"{type(exc).__name__}: {exc}"
                    if err != self._error:
                        log.warning("lookup %s/%s: %s; %s", self.ctx.pipeline, self.id, err,
                                    "working from the last copy" if self._loaded_at else "no copy yet")  # fmt: skip
                    self._error = err
                    self._state = "stale" if self._loaded_at is not None else "never loaded"
                else:
                    self._table = {_text(k): _parse_hash_value(v) for k, v in raw.items()}
                    self._loaded_at = self.ctx.clock()
                    if self._state != "fresh":
                        log.info("lookup %s/%s: %d fields of %s", self.ctx.pipeline, self.id, len(raw), o.hash)
                    self._state, self._error = "fresh", None
                await asyncio.sleep(o.refresh)
        finally:
            await client.aclose()

    def snapshot(self) -> Any:
        # the last copy, so a gateway restarted while Redis is away still has it
        return None if self._loaded_at is None else {"at": self._loaded_at, "table": self._table}

    def restore(self, state: Any) -> None:
        if state:
            self._table = dict(state["table"])
            self._loaded_at = float(state["at"])
            self._state = "stale"


_MISSING = object()
