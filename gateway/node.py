"""What a node type is: an options model (what) and a runtime object (how), plus the registry.

A node type is a class deriving from :class:`Source`, :class:`Operator` or :class:`Sink`, with a
nested pydantic ``Options`` model. Built-in and third-party node types are found the same way:
through the ``sluice.nodes`` entry-point group, each entry point named by the type name and
naming the node class (``module:Class``). Nodes import what they use from :mod:`gateway.api`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import string
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from .clock import ingest_clock
from .events import Event

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from .api import Services, SourceOutput
    from .deadletter import DeadLetters

__all__ = [
    "Duration",
    "NodeContext",
    "NodeOptions",
    "Operator",
    "Sink",
    "Source",
    "check_connection",
    "check_topic_template",
    "get_node_type",
    "load_node_types",
    "node_types",
    "register",
    "types_needing_tls",
]

log = logging.getLogger(__name__)

# Longest a NodeContext.sleep_until sleeps before asking its clock again.
_CLOCK_TICK = 1.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _parse_duration(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("expected a duration such as 500ms, 10s, 5m, 1h")
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        m = _DURATION.match(v)
        if not m:
            raise ValueError(f"{v!r} is not a duration; use a number of seconds or e.g. 500ms, 10s, 5m, 1h")
        return float(m.group(1)) * _UNIT[m.group(2)]
    return v


ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_\-]*$"
"""What a gateway, pipeline, connection or node id may be: it names topics, state rows and URLs."""

Duration = Annotated[
    float, BeforeValidator(_parse_duration), Field(ge=0), Field(json_schema_extra={"format": "duration"})
]
"""Seconds; accepts ``10``, ``"10s"``, ``"500ms"``, ``"5m"``, ``"1h"``, ``"1d"``."""


class NodeOptions(BaseModel):
    """Options every node has. Node types subclass this with ``type: Literal["name"]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN, description="Stable id: names state, metrics and logs.")
    type: str
    input: list[str] = Field(default_factory=list, description="Upstream node ids.")
    description: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _one_input(cls, v: Any) -> Any:
        # A single upstream id is the common case; accept it without a list.
        return [v] if isinstance(v, str) else v


@dataclass(slots=True)
class NodeContext:
    """What a running node may use from the runtime: who it is, its clocks and the services.

    A test builds one directly, with only the services the node under test needs (``None`` for
    a node that needs none) and clocks it drives itself.
    """

    gateway_id: str
    pipeline: str
    node_id: str
    data_dir: str
    services: Services | Any
    """The runtime's services (:class:`gateway.api.Services`): outbox, alerts, llm, history, ingest
    routes, connections by name."""
    dead_letters: DeadLetters
    clock: Callable[[], float] = ingest_clock
    """Ingest time (epoch seconds) for readings without a time of their own: the gateway's
    :class:`~gateway.clock.IngestClock`, which a step of the system clock does not move."""
    logger: logging.Logger = field(default_factory=lambda: log)
    emit: Callable[[list[Event]], bool] = field(default=lambda events: _not_running())
    """Set by the pipeline: an operator hands events downstream from outside ``on_event``/``on_timer``
    (from its :meth:`Operator.run` task); they enter the chain right below the operator. The queue
    is bounded: into a full one the events are refused (returns False; counted as dropped), so
    ``await ctx.room()`` before emitting what must not be lost."""
    room: Callable[[], Awaitable[None]] = field(default=lambda: _not_running())
    """Set by the pipeline: wait until ``emit`` has room (backpressure for an operator's own tasks)."""
    monotonic: Callable[[], float] = time.monotonic
    """Seconds that only go forward (timeouts, staleness, rates): never steps with the wall clock."""

    async def sleep_until(self, deadline: float) -> None:
        """Wait until :attr:`monotonic` reaches ``deadline`` (a poll's next turn, a retry).

        The clock is asked again at least once a second, so a node paced by it follows the clock
        it was given — a test's, which jumps an hour at once — not only the event loop's own.
        """
        left = deadline - self.monotonic()
        while left > 0:
            await asyncio.sleep(min(left, _CLOCK_TICK))
            left = deadline - self.monotonic()

    @property
    def links(self) -> Services | Any:
        """The former name of :attr:`services`."""
        return self.services


@dataclass(frozen=True, slots=True)
class Metric:
    """One sample a node reports through :meth:`_Node.metrics`, exported on ``/metrics``.

    ``pipeline`` and ``node`` labels are added by the runtime; ``labels`` are the node's own
    (the same label names for every sample of one ``name``).
    """

    name: str
    help: str
    kind: Literal["gauge", "counter"]
    value: float
    labels: tuple[tuple[str, str], ...] = ()


def metric_families(pipelines: Iterable[Any]) -> list[Any]:
    """Prometheus families of what every running node reports through its ``metrics()`` hook,
    and of every source's backpressure (pauses so far, paused now)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    pauses = CounterMetricFamily(
        "sluice_source_pauses", "Times a full pipeline paused a source's reading", labels=["pipeline", "node"]
    )
    paused = GaugeMetricFamily(
        "sluice_source_paused", "1 while a full pipeline holds a source's reading paused", labels=["pipeline", "node"]
    )
    families: dict[str, Any] = {"sluice_source_pauses": pauses, "sluice_source_paused": paused}
    for p in pipelines:
        for n in p.nodes:
            if isinstance(n, Source):
                pauses.add_metric([p.name, n.id], n.n_pauses)
                paused.add_metric([p.name, n.id], 1 if n.paused else 0)
            for m in n.metrics():
                fam = families.get(m.name)
                if fam is None:
                    kind = GaugeMetricFamily if m.kind == "gauge" else CounterMetricFamily
                    fam = families[m.name] = kind(
                        m.name, m.help, labels=["pipeline", "node", *(k for k, _ in m.labels)]
                    )
                fam.add_metric([p.name, n.id, *(v for _, v in m.labels)], m.value)
    return list(families.values())


def _not_running() -> Any:
    raise RuntimeError("this node is not running in a pipeline; ctx.emit is unavailable")


def check_connection(name: str | None, config: Any) -> list[tuple[str, str]]:
    """For a node's :meth:`check`: the issue when ``name`` is not under the config's ``connections``."""
    conns = (config.get("connections") or {}) if isinstance(config, dict) else {}
    if name is None or name in conns:
        return []
    known = ", ".join(sorted(conns)) or "none defined"
    return [("connection", f"unknown connection {name!r} (connections: {known})")]


def check_topic_template(topic: str, fields: set[str]) -> list[tuple[str, str]]:
    """For a node's :meth:`check`: problems of a publish topic template using ``{field}`` names."""
    issues = []
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(topic) if f is not None}
    except ValueError as exc:
        issues.append(("topic", f"bad topic template: {exc}"))
    else:
        bad = names - fields
        if bad:
            issues.append(
                ("topic", f"unknown template field {{{sorted(bad)[0]}}}; available: {', '.join(sorted(fields))}")
            )
    if "+" in topic or "#" in topic:
        issues.append(("topic", "a topic to publish to cannot contain + or #"))
    return issues


class _Node:
    kind: ClassVar[Literal["source", "operator", "sink"]]
    type_name: ClassVar[str]
    Options: ClassVar[type[NodeOptions]]
    keeps_watermark: ClassVar[bool] = False
    """Whether the node's saved state holds an event-time watermark (``sluice state reset-watermark``)."""

    def __init__(self, options: NodeOptions, ctx: NodeContext) -> None:
        self.options = options
        self.ctx = ctx
        self.id = options.id
        self.n_in = 0
        self.n_out = 0
        self.n_errors = 0
        self.n_dropped = 0

    @classmethod
    def check(cls, options: NodeOptions, config: Any) -> Iterable[tuple[str, str]]:
        """Semantic checks beyond the options model: yield ``(field, message)`` pairs.

        Runs at validation time, so a bad expression or a missing connection is reported
        with its line before anything starts.
        """
        return ()

    def fail(self, event: Event | None, exc: BaseException, raw: Any = None) -> None:
        """Count an input this node could not handle and dead-letter it with the reason."""
        self.n_errors += 1
        self.ctx.dead_letters.record(self.ctx.pipeline, self.id, str(exc) or type(exc).__name__, event, raw)

    def snapshot(self) -> Any:
        """Plain, serialisable state for the store; ``None`` when stateless."""
        return None

    def restore(self, state: Any) -> None:
        """Take back what :meth:`snapshot` produced."""

    def counters(self) -> dict[str, int]:
        """Event counts (``in``, ``out``, ``errors``, ``dropped`` and the node's own), for
        ``/metrics`` as ``sluice_node_<name>`` and the console."""
        return {"in": self.n_in, "out": self.n_out, "errors": self.n_errors, "dropped": self.n_dropped}

    # --- hooks: what the runtime and the console ask a node, instead of knowing its type ---

    @classmethod
    def required_services(cls) -> frozenset[str]:
        """Names of the :class:`gateway.api.Services` this node type cannot run without
        (``"outbox"``, ``"alerts"``, ``"llm"``, ``"history"`` …); checked when a pipeline is built."""
        return frozenset()

    @classmethod
    def command_connections(cls, options: NodeOptions) -> Iterable[str]:
        """Connections on which the gateway must listen for commands for this node (e.g. alert
        acknowledgements over MQTT). Fixed at start: a reload cannot change them."""
        return ()

    def metrics(self) -> Iterable[Metric]:
        """Samples beyond :meth:`counters` for ``/metrics``, read at scrape time."""
        return ()

    async def removed(self) -> None:
        """Called once a live reload has taken this node out for good — removed from the config,
        its pipeline removed or disabled — after it stopped (a sink's ``close()`` has run). Not
        called when the gateway stops, nor when a reload only restarts the node's pipeline.
        For undoing what the node announced outside the gateway (e.g. a discovery record)."""

    def live_topics(self) -> frozenset[str]:
        """Console WebSocket topics (beyond the node's own event tap) fed from this node's output,
        e.g. ``"llm"`` for the token stream."""
        return frozenset()


class Source(_Node):
    """Produces micro-batches of events. ``run`` returns only when the source is exhausted."""

    kind = "source"
    n_pauses: int = 0
    """How many times backpressure paused the source's reading (``SourceOutput.pause_while_full``)."""
    paused: bool = False
    """Whether its reading is paused now, until the pipeline's queue has room."""
    declares_watermark: ClassVar[bool] = False
    """Whether the source says its own event-time progress with ``output.put(..., watermark=t)``
    (e.g. the slowest of its Kafka partitions). Nodes downstream that keep a watermark then take
    this source's progress from those declarations only, never from its readings' times, and
    wait for its first declaration."""

    def counters(self) -> dict[str, int]:
        c = super().counters()
        c["pauses"] = self.n_pauses
        return c

    async def run(self, output: SourceOutput) -> None:
        """Read from the outside and hand batches to ``output`` until cancelled or exhausted."""
        raise NotImplementedError

    def health(self) -> dict[str, Any]:
        return {}


class Operator(_Node):
    """A synchronous step fused into its pipeline's chain: a batch in, a batch out."""

    kind = "operator"

    def on_event(self, event: Event) -> Event | list[Event] | None:
        raise NotImplementedError

    def process_batch(self, batch: list[Event]) -> list[Event]:
        out: list[Event] = []
        on_event = self.on_event
        for ev in batch:
            try:
                r = on_event(ev)
            except Exception as exc:  # node boundary: dead-letter and go on
                self.fail(ev, exc)
                continue
            if r is None:
                continue
            if type(r) is list:
                out.extend(r)
            else:
                out.append(r)  # type: ignore[arg-type]
        return out

    def on_timer(self, now: float) -> list[Event]:
        """Called about once a second with the monotonic clock; for timeouts and windows."""
        return []

    def on_watermark(self, source: str, progress: float) -> list[Event]:
        """Event-time progress declared by source ``source`` (one whose ``declares_watermark`` is
        true): no reading still to come from it is older than ``progress``, except late ones.

        Called after the node has processed the batch the declaration came with, and once at
        build time with ``-inf`` (the source holds the watermark back until it declares). An
        operator that keeps an event-time watermark overrides it and returns what closes; the
        declaration then stops at it (its own output carries its progress further on). Others
        let it pass to the nodes below them.
        """
        return []

    async def run(self) -> None:
        """Optional background work (e.g. the LLM stage's workers), emitting via ``ctx.emit``.

        Started with the pipeline, cancelled when it stops (after the chain has taken everything
        queued before), restarted with backoff if it raises.
        """


class Sink(_Node):
    """Consumes batches in its own task behind a bounded queue."""

    kind = "sink"
    merge_batches: ClassVar[bool] = False
    """True: the batches that queued up while a write ran are given to the next write together.
    For a sink whose write succeeds or fails as a whole anyway (an outbox commit): fewer, larger
    writes under load. A failed write dead-letters all it was given."""

    async def start(self) -> None:
        """Acquire what the sink needs; called before any batch."""

    async def write(self, batch: list[Event]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Flush and release; called once after the last batch."""

    def health(self) -> dict[str, Any]:
        return {}


_REGISTRY: dict[str, type[_Node]] = {}
_GROUP = "sluice.nodes"
_DIST = "sluice-gateway"
_loaded = False
_entry_points: dict[str, EntryPoint] | None = None
_NEED_TLS: set[str] = set()  # entry points refused: their library needs OpenSSL, kept out (SLUICE_TLS=auto)


def register(cls: type[_Node]) -> type[_Node]:
    """Class decorator: make a node type known by its ``Options.type`` literal."""
    ann = cls.Options.model_fields["type"].annotation
    args = getattr(ann, "__args__", ())
    if not args or not isinstance(args[0], str):
        raise TypeError(f"{cls.__name__}.Options.type must be a Literal['name']")
    name = args[0]
    other = _REGISTRY.get(name)
    if other is not None and other is not cls:
        raise TypeError(f"node type {name!r} is registered twice ({other.__module__} and {cls.__module__})")
    cls.type_name = name
    _REGISTRY[name] = cls
    return cls


# The built-in node types, as ``[project.entry-points."sluice.nodes"]`` in pyproject.toml names them
# (tests/gateway/test_registry.py holds the two equal). A config of built-in types finds them here
# without reading any package's metadata: importlib.metadata (with zipfile, email, csv, tempfile)
# costs a gateway about 1.5 MiB resident, and is imported only to look for a plug-in's type.
_BUILT_IN = {
    "mqtt": "nodes.sources:MqttSource",
    "simulate": "nodes.sources:SimulateSource",
    "filter": "nodes.operators:Filter",
    "map": "nodes.operators:Map",
    "window": "nodes.windows:Window",
    "history": "nodes.history:HistorySink",
    "threshold": "nodes.detectors:Threshold",
    "zscore": "nodes.detectors:ZScore",
    "ewma": "nodes.detectors:Ewma",
    "rate_of_change": "nodes.detectors:RateOfChange",
    "stale": "nodes.detectors:Stale",
    "flatline": "nodes.detectors:Flatline",
    "mqtt_out": "nodes.sinks:MqttOut",
    "log": "nodes.sinks:LogSink",
    "webhook": "nodes.sinks:Webhook",
    "console": "nodes.sinks:ConsoleSink",
    "kafka": "nodes.kafka:KafkaSource",
    "kafka_out": "nodes.kafka:KafkaOut",
    "redis": "nodes.redis_streams:RedisSource",
    "redis_out": "nodes.redis_streams:RedisOut",
    "lookup": "nodes.redis_streams:Lookup",
    "homeassistant": "nodes.homeassistant:HomeAssistant",
    "serial": "nodes.devices:SerialSource",
    "modbus": "nodes.devices:ModbusSource",
    "websocket": "nodes.devices:WebSocketSource",
    "http": "nodes.http:HttpPushSource",
    "http_poll": "nodes.http:HttpPollSource",
    "llm": "nodes.llm:Llm",
    "alert": "nodes.alerts:AlertSink",
}


def _node_entry_points() -> dict[str, EntryPoint]:
    """Every ``sluice.nodes`` entry point by name; built-ins are found this way like any plugin's.

    An entry point's name is the node type name and its value a node class (``module:Class``),
    so a config that uses one type imports only that type's module (each node module costs
    1-5 MB resident, mostly its options models). A value without ``:Class`` names a module
    whose import registers its nodes with :func:`register`. The built-ins come from
    :data:`_BUILT_IN` (the same as this package's installed metadata, or newer in a source tree
    whose editable install predates a node type).
    """
    global _entry_points
    if _entry_points is None:
        from importlib.metadata import EntryPoint, entry_points

        found: dict[str, EntryPoint] = {name: EntryPoint(name, value, _GROUP) for name, value in _BUILT_IN.items()}
        for ep in entry_points(group=_GROUP):
            if ep.dist is not None and ep.dist.name == _DIST and ep.name in found:
                continue  # this package's own: _BUILT_IN says the same, or is newer
            if ep.name in found and found[ep.name].value != ep.value:
                log.warning(
                    "node type %r is offered by two plugins (%s and %s); using the first",
                    ep.name,
                    found[ep.name].value,
                    ep.value,
                )
                continue
            found[ep.name] = ep
        _entry_points = found
    return _entry_points


class _BuiltIn:
    """A built-in type's entry point without importlib.metadata: what :func:`_load` reads of one."""

    __slots__ = ("name", "value")

    def __init__(self, name: str, value: str):
        self.name = name
        self.value = value

    def load(self) -> Any:
        import importlib

        module, _, attr = self.value.partition(":")
        return getattr(importlib.import_module(module), attr)


def _load(ep: EntryPoint | _BuiltIn) -> None:
    try:
        obj = ep.load()
    except Exception as exc:  # a broken plugin must not stop the gateway; say which one
        from . import _tls

        if _tls.refused(exc):
            _NEED_TLS.add(ep.name)
            log.info("node type %r is not available: its library needs OpenSSL, kept out (SLUICE_TLS=auto)", ep.name)
            return
        log.exception("could not load node plugin %r from %s", ep.name, ep.value)
        return
    if isinstance(obj, type) and issubclass(obj, _Node):
        if _REGISTRY.get(getattr(obj, "type_name", None) or "") is not obj:
            try:
                register(obj)
            except TypeError as exc:
                log.error("node plugin %r from %s: %s", ep.name, ep.value, exc)
                return
        if obj.type_name != ep.name:
            log.warning(
                "node plugin entry point %r names %s, whose type is %r: configs must use %r",
                ep.name,
                ep.value,
                obj.type_name,
                obj.type_name,
            )


def load_node_types() -> None:
    """Load every ``sluice.nodes`` entry point (built-in and third-party), once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in _node_entry_points().values():
        _load(ep)


def node_types() -> dict[str, type[_Node]]:
    load_node_types()
    return dict(_REGISTRY)


def types_needing_tls() -> list[str]:
    """The node types this process cannot load because their library needs OpenSSL, which it keeps
    out (``SLUICE_TLS=auto``, see :mod:`gateway._tls`): a restart whose config uses them loads it."""
    load_node_types()
    return sorted(_NEED_TLS)


def get_node_type(name: str) -> type[_Node] | None:
    """The node class of type ``name``, loading only its entry point when it is not known yet."""
    cls = _REGISTRY.get(name)
    if cls is not None:
        return cls
    # a built-in name is never a plug-in's (the built-in wins): no need to read the metadata
    ep = _BuiltIn(name, _BUILT_IN[name]) if name in _BUILT_IN else _node_entry_points().get(name)
    if ep is not None:
        _load(ep)
        cls = _REGISTRY.get(name)
        if cls is not None:
            return cls
    load_node_types()  # an entry point named otherwise, or an unknown name: everything must be known to say so
    return _REGISTRY.get(name)
