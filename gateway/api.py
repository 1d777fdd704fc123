"""The node API: everything a node type may use from the runtime, in one module.

A node module — built in or from another package — imports from here (and from
``firmware_bridges`` for device codecs) and from nothing else in ``gateway``. What is here is kept
stable across releases of the same :data:`api_version` major number; everything else in
``gateway`` may change without notice.

What a node is made of:

- an options model deriving from :class:`NodeOptions` with ``type: Literal["name"]`` (the
  ``type`` literal is the name a config uses, and the options model is the node's JSON Schema);
- a class deriving from :class:`Source`, :class:`Operator` or :class:`Sink` whose ``Options``
  is that model, registered with :func:`register` (or named by an entry point in the
  ``sluice.nodes`` group, which is how Sluice finds it: see ``docs/writing-a-node.md``);
- a :class:`NodeContext` handed to the constructor, carrying the node's identity, its clocks and
  the runtime's services (:class:`Services`), each a narrow :class:`~typing.Protocol` below.

Hooks the runtime asks a node (all optional, with defaults on the base classes):
``check(options, config)`` (validation beyond the model), ``required_services()``,
``command_connections(options)``, ``counters()``, ``metrics()``, ``live_topics()``, ``health()``,
``snapshot()``/``restore()``, ``removed()``; for event time, a source's ``declares_watermark``
with ``SourceOutput.put(..., watermark=t)`` and an operator's ``on_watermark(source, t)``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from . import __version__ as sluice_version
from ._log import RateLimitedLog
from ._retry import backoff
from .clock import max_future_field
from .envelope import Envelope, encode_fields, event_fields
from .errors import ExpressionError, LinkError, SluiceError
from .events import Event
from .expr import Expression, check_expression
from .forwarding import TEMPLATE_FIELDS, OutboxSink
from .node import (
    ID_PATTERN,
    Duration,
    Metric,
    NodeContext,
    NodeOptions,
    Operator,
    Sink,
    Source,
    check_connection,
    check_topic_template,
    register,
)
from .redact import secret_field

if TYPE_CHECKING:
    from .alerts import SEVERITIES, SuppressWindow
    from .deadletter import DeadLetters
    from .llm import SHED_REASONS, AdmissionQueue, Chunk, LlmHub, LlmRequest, Outcome, ProviderSlot, run_chain
    from .mqtt import status_topic
    from .webhook import WebhookLink

__all__ = [
    "ID_PATTERN",
    "SEVERITIES",
    "SHED_REASONS",
    "TEMPLATE_FIELDS",
    "AdmissionQueue",
    "Alerts",
    "Chunk",
    "ConsoleOut",
    "DeadLetters",
    "Duration",
    "Envelope",
    "Event",
    "Expression",
    "ExpressionError",
    "History",
    "Link",
    "LinkError",
    "LlmHub",
    "LlmProviders",
    "LlmRequest",
    "Metric",
    "NodeContext",
    "NodeOptions",
    "Operator",
    "Outbox",
    "OutboxSink",
    "Outcome",
    "Pausable",
    "ProviderSlot",
    "Publisher",
    "RateLimitedLog",
    "Services",
    "Sink",
    "SluiceError",
    "Source",
    "SourceOutput",
    "Subscriber",
    "SuppressWindow",
    "WebhookLink",
    "api_version",
    "backoff",
    "check_connection",
    "check_expression",
    "check_topic_template",
    "encode_fields",
    "event_fields",
    "max_future_field",
    "register",
    "run_chain",
    "secret_field",
    "sluice_version",
    "status_topic",
]

api_version = "1.2"
"""The node API's version: the major number changes when a node written for the previous one
may no longer work; the minor number when something was added."""


# --- what a source hands its events to ---------------------------------------------------------


class SourceOutput(Protocol):
    """A source's handle on its pipeline's bounded input queue (the argument of ``Source.run``)."""

    async def put(
        self, events: list[Event], done: Callable[[], None] | None = None, *, watermark: float | None = None
    ) -> None:
        """Hand over a batch, waiting while the pipeline is full; ``done`` runs once it is processed.

        ``watermark`` (a source with ``declares_watermark``): the source's event-time progress once
        this batch is in — it goes down the pipeline behind the batch's events, so windows close on
        it only after taking them. ``events`` may be empty to move the progress alone."""

    def put_nowait(
        self, events: list[Event], done: Callable[[], None] | None = None, *, watermark: float | None = None
    ) -> bool:
        """Hand over a batch without waiting; False means the producer should pause."""

    @property
    def full(self) -> bool: ...

    def when_room(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the queue has room again (to resume a paused producer)."""

    def pause_while_full(self, reader: Pausable) -> None:
        """While the queue is full, pause ``reader``'s reads; resume them once it has room."""

    async def settled(self) -> None:
        """For a source whose ``run`` was cancelled because the pipeline stops, and that confirms to
        its peer what the pipeline took (Kafka offsets, Redis XACK): it hands over nothing more, and
        this returns once the pipeline has drained and run the ``done`` of every batch it was given
        (after the final checkpoint), so the source can confirm the last ones before it closes."""


class Pausable(Protocol):
    """A reader that backpressure can pause: a :class:`Subscriber`, a socket transport's wrapper."""

    @property
    def reading(self) -> bool: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


# --- transports ----------------------------------------------------------------------------------


@runtime_checkable
class Link(Protocol):
    """A transport the outbox sends through (an MQTT connection, a webhook URL, …).

    ``publish_acked_many`` takes ``(topic, payload, retain)`` triples and returns one future per
    message it accepted now (a prefix of them: the rest are offered again later); a future's
    result acknowledges the message, a :class:`LinkError` fails it (sent again later), one with
    ``refused = True`` dead-letters it. At most ``send_window`` messages wait for their
    acknowledgement at once (``in_flight``). A link a sink registers may also offer
    ``configure(other)``: take a rebuilt sink's settings without dropping what is in flight.
    """

    name: str
    connected: bool
    state: str
    last_error: str | None
    send_window: int

    @property
    def in_flight(self) -> int: ...

    async def wait_connected(self) -> None: ...

    def publish_acked_many(self, messages: list[tuple[str, bytes, bool]]) -> list[Any]: ...

    def health(self) -> dict[str, Any]: ...

    async def run(self) -> None: ...

    async def close(self) -> None: ...


class Publisher(Protocol):
    """A shared broker connection by name, for best-effort (QoS 0) publishing."""

    name: str
    connected: bool

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """Send now; raises :class:`LinkError` while disconnected."""

    def health(self) -> dict[str, Any]: ...


class Subscriber(Protocol):
    """A broker connection of the node's own, receiving what it subscribed to (see :meth:`Services.subscriber`)."""

    reading: bool
    connected: bool
    connects: int
    """How many times it has connected (a new connection may need a new announcement)."""

    async def wait_connected(self) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """Send now; raises :class:`LinkError` while disconnected."""

    def subscribe(self, topic_filter: str, qos: int) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def health(self) -> dict[str, Any]: ...

    async def run(self) -> None: ...

    async def close(self) -> None: ...


# --- the runtime's services ----------------------------------------------------------------------


class Outbox(Protocol):
    """Store-and-forward delivery: committed to disk, sent at least once, numbered with ``seq``."""

    async def put(
        self, messages: Iterable[tuple[str, str, dict[str, Any] | bytes, str | None]], retain: bool = False
    ) -> int:
        """Commit ``(link name, topic, envelope fields, ordering key)`` messages; return the first seq."""

    def register_link(self, name: str, link: Link) -> Link:
        """Make a link of the node's own (e.g. a webhook) known by ``name``; returns the one in use."""

    def release_link(self, name: str) -> None:
        """The node no longer writes to ``name``; the outbox closes it once nothing waits for it."""


class Alerts(Protocol):
    """The gateway's alert book and its notifications (used by the ``alert`` sink)."""

    book: Any
    cooldowns: dict[Any, float]
    windows: dict[Any, Any]

    def is_suppressed(self, pipeline: str, node: str, alert_key: str, severity: str) -> bool: ...

    async def notify(self, action: str, alert: dict[str, Any], hold: bool = False) -> None: ...

    def health(self) -> dict[str, Any]: ...


class History(Protocol):
    """The history store behind the console's charts (used by the ``history`` sink)."""

    def flush(self) -> None: ...


class ConsoleOut(Protocol):
    """The web console's live feed (used by the ``console`` sink); ``None`` without a console."""

    @property
    def console_watched(self) -> bool:
        """Whether any browser watches the console topic now (else sending is wasted)."""

    def console_publish(self, pipeline: str, node: str, label: str, events: list[Event]) -> None: ...


class LlmProviders(Protocol):
    """The gateway's LLM providers (the ``llm:`` section), for a node that asks a model: each by
    name with its breaker, concurrency limit and statistics. Requests go through
    :func:`run_chain` over slots, behind the node's own :class:`AdmissionQueue`."""

    def slot(self, name: str) -> ProviderSlot: ...


@runtime_checkable
class Services(Protocol):
    """What the runtime offers a running node (``ctx.services``). A node says which it needs
    with ``required_services()``; in a test, a plain object with just those is enough."""

    gateway_id: str
    started_at: float
    """When this run of the gateway started (epoch seconds)."""
    outbox: Outbox | None
    alerts: Alerts | None
    llm: LlmProviders | None
    history: History | None
    console: ConsoleOut | None
    ingest: MutableMapping[str, Callable[[Any], Awaitable[Any]]]
    """``POST /ingest/<node id>`` handlers: a push source adds its own while it runs."""

    def connection(self, name: str) -> Any:
        """The settings of the connection called ``name`` under ``connections``."""

    def publisher(self, name: str) -> Publisher:
        """The shared publishing link of connection ``name``."""

    def subscriber(
        self,
        connection: str,
        client_id: str,
        on_message: Callable[..., Any],
        *,
        clean_session: bool = True,
        session_expiry: int = 0,
        ack_after_processing: bool = False,
        on_publish_qos1: Callable[[str, bytes, int, Callable[[list[int]], None]], None] | None = None,
        on_messages: Callable[[list[tuple[str, bytes]]], None] | None = None,
    ) -> Subscriber:
        """A new receiving connection to broker ``connection``, owned (run and closed) by the node.

        With ``ack_after_processing``, ``on_publish_qos1(topic, payload, mid, ack)`` (optional)
        takes each plain QoS 1 message synchronously; the node calls ``ack(mids)`` once the
        messages are handled. Others still go to the coroutine ``on_message``. With
        ``on_messages`` (optional, for a plain function ``on_message``), the plain QoS 0 messages
        of one socket read go to ``on_messages([(topic, payload), ...])`` in one call; others
        still go to ``on_message``."""


# Names of the LLM stage and the alert book that the built-in ``llm`` and ``alert`` nodes use;
# imported on first use so that a gateway without those nodes does not load them.
_LAZY = {
    "SHED_REASONS": "llm",
    "AdmissionQueue": "llm",
    "Chunk": "llm",
    "LlmHub": "llm",
    "LlmRequest": "llm",
    "Outcome": "llm",
    "ProviderSlot": "llm",
    "run_chain": "llm",
    "SEVERITIES": "alerts",
    "SuppressWindow": "alerts",
    "DeadLetters": "deadletter",
    "WebhookLink": "webhook",
    "status_topic": "mqtt",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"gateway.{module}"), name)
