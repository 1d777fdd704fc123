"""The one delivery path of forwarding sinks: each event, enveloped, committed to the outbox and
sent at least once through a :class:`~gateway.api.Link` (``mqtt_out``, ``webhook``, ``kafka_out``,
``redis_out`` and third-party sinks of the same kind)."""

from __future__ import annotations

from typing import Any, ClassVar

from .envelope import event_fields
from .events import Event
from .node import NodeContext, NodeOptions, Sink

__all__ = ["TEMPLATE_FIELDS", "OutboxSink"]

TEMPLATE_FIELDS = {"gateway", "pipeline", "node", "key", "source"}
"""The fields a destination template (a topic, a stream) may use."""

_OUTBOX = frozenset({"outbox"})


class OutboxSink(Sink):
    """Forward each event through the outbox to a link of the node's own.

    A subclass names its link (``link_prefix``, e.g. ``"kafka"``: the link is then
    ``kafka:<pipeline>/<node id>``), builds it in :meth:`make_link`, and names the options field
    holding its destination template (``destination_field``, e.g. ``"topic"``), whose
    ``{gateway} {pipeline} {node} {key} {source}`` fields are filled per event. The message's
    ordering key is the event key: events of one key arrive in order. A reloaded pipeline's sink
    gets the running link back, with the new settings.
    """

    link_prefix: ClassVar[str] = "link"
    destination_field: ClassVar[str | None] = None
    merge_batches = True  # one commit for all that queued up: a put succeeds or fails as a whole

    def __init__(self, options: NodeOptions, ctx: NodeContext):
        super().__init__(options, ctx)
        self.link_name = f"{self.link_prefix}:{ctx.pipeline}/{options.id}"
        self._link: Any = None
        self._outbox: Any = None
        self._template: str = getattr(options, self.destination_field) if self.destination_field else ""
        t = self._template
        self._static: str | None = (
            None
            if "{key}" in t or "{source}" in t
            else t.format(gateway=ctx.gateway_id, pipeline=ctx.pipeline, node=options.id, key="", source="")
        )

    @classmethod
    def required_services(cls) -> frozenset[str]:
        return _OUTBOX

    def make_link(self) -> Any:
        """The :class:`~gateway.api.Link` this sink's messages go through."""
        raise NotImplementedError

    async def start(self) -> None:
        self._outbox = self.ctx.services.outbox
        if self._link is None:
            self._link = self._outbox.register_link(self.link_name, self.make_link())

    async def close(self) -> None:
        if self._link is not None:
            self._outbox.release_link(self.link_name)  # the outbox closes it once nothing waits for it

    def health(self) -> dict[str, Any]:
        return self._link.health() if self._link is not None else {"state": "starting"}

    def destination(self, ev: Event) -> str:
        """The destination template filled for ``ev``."""
        if self._static is not None:
            return self._static
        return self._template.format(
            gateway=self.ctx.gateway_id, pipeline=self.ctx.pipeline, node=self.id, key=ev.key, source=ev.source
        )

    def message(self, ev: Event) -> tuple[str, str, dict[str, Any], str | None]:
        """The outbox row of ``ev``: ``(link, "<destination>\\0<event key>", fields, ordering key)``."""
        return self.link_name, f"{self.destination(ev)}\x00{ev.key}", event_fields(self.ctx.pipeline, ev), ev.key

    async def write(self, batch: list[Event]) -> None:
        # Returns once the rows are committed; the outbox does the sending.
        message = self.message
        await self._outbox.put([message(ev) for ev in batch])
