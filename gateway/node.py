"""What a node type is: an options model (what) and a runtime object (how), plus the registry.

A node type is a class deriving from :class:`Source`, :class:`Operator` or :class:`Sink`, with a
nested pydantic ``Options`` model, registered by type name with :func:`register`. Third-party
packages register theirs through the ``sluice.nodes`` entry-point group: each entry point names a
module (importing it registers its nodes) or a node class.
"""

from __future__ import annotations

import importlib
import logging
import re
import string
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from .events import Event

if TYPE_CHECKING:
    from .deadletter import DeadLetters
    from .engine import SourceQueue

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
]

log = logging.getLogger(__name__)

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

Duration = Annotated[float, BeforeValidator(_parse_duration), Field(ge=0)]
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
    """What a running node may use from the runtime."""

    gateway_id: str
    pipeline: str
    node_id: str
    data_dir: str
    links: Any  # gateway.runtime.Links: shared connections by name
    dead_letters: DeadLetters
    clock: Callable[[], float] = time.time
    logger: logging.Logger = field(default_factory=lambda: log)
    emit: Callable[[list[Event]], bool] = field(default=lambda events: _not_running())
    """Set by the pipeline: an operator hands events downstream from outside ``on_event``/``on_timer``
    (from its :meth:`Operator.run` task); they enter the chain right below the operator. The queue
    is bounded: into a full one the events are refused (returns False; counted as dropped), so
    ``await ctx.room()`` before emitting what must not be lost."""
    room: Callable[[], Awaitable[None]] = field(default=lambda: _not_running())
    """Set by the pipeline: wait until ``emit`` has room (backpressure for an operator's own tasks)."""


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
        return {"in": self.n_in, "out": self.n_out, "errors": self.n_errors, "dropped": self.n_dropped}


class Source(_Node):
    """Produces micro-batches of events. ``run`` returns only when the source is exhausted."""

    kind = "source"

    async def run(self, output: SourceQueue) -> None:
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

    async def run(self) -> None:
        """Optional background work (e.g. the LLM stage's workers), emitting via ``ctx.emit``.

        Started with the pipeline, cancelled when it stops (after the chain has taken everything
        queued before), restarted with backoff if it raises.
        """


class Sink(_Node):
    """Consumes batches in its own task behind a bounded queue."""

    kind = "sink"

    async def start(self) -> None:
        """Acquire what the sink needs; called before any batch."""

    async def write(self, batch: list[Event]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Flush and release; called once after the last batch."""

    def health(self) -> dict[str, Any]:
        return {}


_REGISTRY: dict[str, type[_Node]] = {}
# Built-in type name -> its module, imported when a config first uses the type: a gateway that
# reads MQTT does not carry Modbus, serial, windows or the LLM stage in memory (each node module
# costs 1-5 MB resident, mostly its options models). tests/gateway/test_registry.py keeps this
# index equal to what the modules register.
_BUILTIN_TYPES: dict[str, str] = {
    "mqtt": "nodes.sources",
    "simulate": "nodes.sources",
    "filter": "nodes.operators",
    "map": "nodes.operators",
    "window": "nodes.windows",
    "history": "nodes.history",
    "threshold": "nodes.detectors",
    "zscore": "nodes.detectors",
    "ewma": "nodes.detectors",
    "rate_of_change": "nodes.detectors",
    "stale": "nodes.detectors",
    "flatline": "nodes.detectors",
    "mqtt_out": "nodes.sinks",
    "log": "nodes.sinks",
    "webhook": "nodes.sinks",
    "console": "nodes.sinks",
    "serial": "nodes.devices",
    "modbus": "nodes.devices",
    "websocket": "nodes.devices",
    "http": "nodes.http",
    "http_poll": "nodes.http",
    "llm": "nodes.llm",
    "alert": "nodes.alerts",
    "kafka": "nodes.kafka",
    "kafka_out": "nodes.kafka",
    "redis": "nodes.redis_streams",
    "redis_out": "nodes.redis_streams",
    "homeassistant": "nodes.homeassistant",
}
_BUILTIN_MODULES = tuple(dict.fromkeys(_BUILTIN_TYPES.values()))
_loaded = False


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


def load_node_types() -> None:
    """Import the built-in node modules and every ``sluice.nodes`` entry point, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)
    for ep in entry_points(group="sluice.nodes"):
        try:
            obj = ep.load()
        except Exception:  # a broken plugin must not stop the gateway; say which one
            log.exception("could not load node plugin %r from %s", ep.name, ep.value)
            continue
        if isinstance(obj, type) and issubclass(obj, _Node) and obj not in _REGISTRY.values():
            register(obj)


def node_types() -> dict[str, type[_Node]]:
    load_node_types()
    return dict(_REGISTRY)


def get_node_type(name: str) -> type[_Node] | None:
    cls = _REGISTRY.get(name)
    if cls is not None:
        return cls
    module = _BUILTIN_TYPES.get(name)
    if module is not None:
        importlib.import_module(module)
        cls = _REGISTRY.get(name)
        if cls is not None:
            return cls
    load_node_types()  # a plugin's type, or an unknown name: everything must be known to say so
    return _REGISTRY.get(name)
