"""Sink nodes: where events leave a pipeline (``mqtt_out``, ``webhook``, ``log``, ``console``).

``mqtt_out`` commits each event to the gateway's outbox (SQLite) and returns; the outbox
publishes it at QoS 1 and deletes it only on the broker's PUBACK, so an outage or a restart loses
nothing and does not stall the pipeline (the outbox's disk quota is the bound). Each message
carries ``gateway_id``, a ``seq`` that increases across restarts and ``replayed`` so consumers can
de-duplicate.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from gateway.api import (
    TEMPLATE_FIELDS,
    Duration,
    Envelope,
    Event,
    LinkError,
    NodeOptions,
    OutboxSink,
    Sink,
    check_connection,
    check_topic_template,
    event_fields,
    register,
    secret_field,
)

__all__ = ["ConsoleSink", "LogSink", "MqttOut", "Webhook"]


class MqttOutOptions(NodeOptions):
    type: Literal["mqtt_out"]
    connection: str = Field(description="Name of an entry under `connections`.")
    topic: str = Field(
        "sluice/{gateway}/alerts/{pipeline}",
        description="Topic template; fields {gateway} {pipeline} {node} {key} {source}.",
    )
    qos: Literal[0, 1] = Field(
        1,
        description="1: through the outbox, at least once. 0: sent directly, best "
        "effort, without seq (dropped and counted while disconnected).",
    )
    retain: bool = False


@register
class MqttOut(OutboxSink):
    """Publish each event as JSON to the broker."""

    Options = MqttOutOptions
    options: MqttOutOptions
    destination_field = "topic"

    @classmethod
    def check(cls, options: NodeOptions, config: Any) -> list[tuple[str, str]]:
        o: MqttOutOptions = options  # type: ignore[assignment]
        return [*check_connection(o.connection, config), *check_topic_template(o.topic, TEMPLATE_FIELDS)]

    def __init__(self, options: MqttOutOptions, ctx: Any):
        super().__init__(options, ctx)
        self.link_name = options.connection  # the broker connection's shared link, not one of its own
        self._envelope = Envelope(ctx.gateway_id)

    async def start(self) -> None:
        self._link = self.ctx.services.publisher(self.options.connection)
        self._outbox = self.ctx.services.outbox

    async def close(self) -> None:
        pass  # the shared link outlives the sink

    def message(self, ev: Event) -> tuple[str, str, dict[str, Any], str | None]:
        topic = self.destination(ev)
        return self.link_name, topic, event_fields(self.ctx.pipeline, ev), f"{topic}\x00{ev.key}"

    async def write(self, batch: list[Event]) -> None:
        if self.options.qos == 0:
            self._write_qos0(batch)
            return
        message = self.message
        # Returns once the rows are committed; the outbox does the sending.
        await self._outbox.put([message(ev) for ev in batch], retain=self.options.retain)

    def _write_qos0(self, batch: list[Event]) -> None:
        """QoS 0 is fire-and-forget by choice: no outbox; while disconnected, events are counted as dropped."""
        link = self._link
        envelope = self._envelope
        pipeline = self.ctx.pipeline
        for ev in batch:
            if not link.connected:
                self.n_dropped += 1
                continue
            payload = envelope.event(pipeline, ev)
            try:
                link.publish(self.destination(ev), payload, qos=0, retain=self.options.retain)
            except LinkError:
                self.n_dropped += 1
            except ValueError as exc:  # a topic no broker takes (a wildcard from the key): dead-lettered
                self.fail(ev, exc)


class WebhookOptions(NodeOptions):
    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://", description="Where to POST each event as JSON (http or https).")
    headers: dict[str, str] = secret_field(
        default_factory=dict, description='Extra request headers, e.g. Authorization: "Bearer ${TOKEN}".'
    )
    timeout: Duration = Field(10.0, gt=0, description="Per request.")
    concurrency: int = Field(
        1, ge=1, le=64, description="Requests in flight; above 1 the order of arrival is no longer guaranteed."
    )
    reconnect_max: Duration = Field(30.0, description="Cap of the retry backoff after a failed POST.")

    @model_validator(mode="after")
    def _one_credential(self) -> WebhookOptions:
        # aiohttp refuses a request with both, and the link would never send
        if urlsplit(self.url).username is not None and any(k.lower() == "authorization" for k in self.headers):
            raise ValueError("give credentials in the URL or in an Authorization header, not both")
        return self


@register
class Webhook(OutboxSink):
    """POST each event as JSON through the outbox: committed first, retried with backoff, at least once.

    The body is what ``mqtt_out`` publishes (``gateway_id``, ``seq``, ``replayed``, ``pipeline``,
    ``source``, ``key``, ``ts``, ``value``). 2xx acknowledges; 408, 429, 5xx and network errors
    are retried; other 4xx answers are dead-lettered with the status and the start of the body.
    """

    Options = WebhookOptions
    options: WebhookOptions
    link_prefix = "webhook"

    def make_link(self) -> Any:
        from gateway.api import WebhookLink

        o = self.options
        return WebhookLink(
            self.link_name,
            o.url,
            o.headers,
            timeout=o.timeout,
            concurrency=o.concurrency,
            reconnect_max=o.reconnect_max,
        )

    def message(self, ev: Event) -> tuple[str, str, dict[str, Any], str | None]:
        return self.link_name, self.options.url, event_fields(self.ctx.pipeline, ev), ev.key


class LogOptions(NodeOptions):
    type: Literal["log"]
    level: Literal["debug", "info", "warning", "error"] = "info"
    prefix: str | None = Field(None, description="Text before each line; default: the node id.")


@register
class LogSink(Sink):
    """Write each event to the gateway log, one line per event (for demos and debugging)."""

    Options = LogOptions
    options: LogOptions

    def __init__(self, options: LogOptions, ctx: Any):
        super().__init__(options, ctx)
        self._log = logging.getLogger(f"sluice.{ctx.pipeline}.{options.id}")
        self._level = logging.getLevelName(options.level.upper())

    async def write(self, batch: list[Event]) -> None:
        if not self._log.isEnabledFor(self._level):
            return
        prefix = self.options.prefix or self.id
        for ev in batch:
            # readable (°F, not \u00b0F); a lone surrogate, which no log stream can write, stays escaped
            text = json.dumps(ev.value, default=str, separators=(",", ":"), ensure_ascii=False)
            self._log.log(self._level, "%s: %s %s", prefix, ev.key, text.encode("utf-8", "backslashreplace").decode())


class ConsoleOptions(NodeOptions):
    type: Literal["console"]
    label: str | None = Field(None, description="Tab title in the editor's console panel; default: the node id.")


@register
class ConsoleSink(Sink):
    """Show events live in the web console's editor (its console panel), over the console's WebSocket.

    Costs the pipeline nothing while no browser watches; a slow browser loses the oldest events
    of its own bounded buffer (counted), never slowing the pipeline.
    """

    Options = ConsoleOptions
    options: ConsoleOptions

    def __init__(self, options: ConsoleOptions, ctx: Any):
        super().__init__(options, ctx)
        self.n_shown = 0  # events handed to watching browsers

    async def write(self, batch: list[Event]) -> None:
        out = self.ctx.services.console
        if out is None or not out.console_watched:
            return
        out.console_publish(self.ctx.pipeline, self.id, self.options.label or self.id, batch)
        self.n_shown += len(batch)

    def counters(self) -> dict[str, int]:
        return {**super().counters(), "shown": self.n_shown}
