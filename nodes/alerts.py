"""The ``alert`` sink: detector alerts become managed alerts (open → acknowledged → resolved).

Each raised/cleared event from a detector updates the gateway's alert book (SQLite); every
lifecycle step (opened, updated, reopened, cleared, acknowledged, resolved) is published through
the outbox when ``connection`` is set, as ``{"action": ..., "alert": {...}}`` plus the outbox's
``gateway_id``/``seq``/``replayed``.

``suppress`` lists maintenance windows (days, local from/to, time zone, key globs, severities):
an alert opened inside one is recorded (``suppressed: true``) but published only once the window
is over, if it is still unresolved; updates of an already published alert are held back meanwhile.
The windows are read with the node's wall clock (``ctx.clock``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from gateway.api import (
    SEVERITIES,
    Duration,
    Event,
    NodeOptions,
    Sink,
    SuppressWindow,
    check_connection,
    check_topic_template,
    register,
)

__all__ = ["AlertSink"]

_TEMPLATE_FIELDS = {"gateway", "pipeline", "node"}


class AlertOptions(NodeOptions):
    type: Literal["alert"]
    connection: str | None = Field(
        None,
        description="Publish each lifecycle step to this connection "
        "(through the outbox); none: keep alerts on the gateway only.",
    )
    topic: str = Field("sluice/{gateway}/alerts/{pipeline}", description="Topic template; {gateway} {pipeline} {node}.")
    cooldown: Duration = Field(
        0.0,
        description="A cleared condition resolves the alert only after staying "
        "clear this long; a raise within it after a resolve reopens "
        "the same alert.",
    )
    auto_resolve: bool = Field(True, description="Resolve when the detector clears; false: an operator must.")
    notify_updates: bool = Field(True, description="Also publish repeat raises of an open alert (count + 1).")
    update_interval: Duration = Field(
        0.0, description="Publish an alert's updates at most this often (a suppression window; its count stays exact)."
    )
    suppress: list[SuppressWindow] = Field(
        default_factory=list,
        description="Maintenance windows: {days, from, to, tz, keys, severities}; alerts are kept but "
        "published only when the window is over.",
    )


@register
class AlertSink(Sink):
    """Keep detector alerts as managed alerts, de-duplicated by alert key."""

    Options = AlertOptions
    options: AlertOptions

    @classmethod
    def check(cls, options: NodeOptions, config: Any) -> list[tuple[str, str]]:
        o: AlertOptions = options  # type: ignore[assignment]
        return [*check_connection(o.connection, config), *check_topic_template(o.topic, _TEMPLATE_FIELDS)]

    @classmethod
    def required_services(cls) -> frozenset[str]:
        return frozenset({"alerts"})

    @classmethod
    def command_connections(cls, options: NodeOptions) -> list[str]:
        connection = getattr(options, "connection", None)  # acknowledgements arrive where alerts go
        return [connection] if connection else []

    def __init__(self, options: AlertOptions, ctx: Any):
        super().__init__(options, ctx)
        self._service: Any = None
        self._last_update: dict[int, float] = {}  # alert id -> monotonic time its update was last published
        self.suppressed = 0
        self._topic = options.topic.format(gateway=ctx.gateway_id, pipeline=ctx.pipeline, node=options.id)

    async def start(self) -> None:
        self._service = self.ctx.services.alerts
        key = (self.ctx.pipeline, self.id)
        if self.options.cooldown and self.options.auto_resolve:
            self._service.cooldowns[key] = self.options.cooldown
        else:
            self._service.cooldowns.pop(key, None)  # a reload may have taken the cooldown away
        if self.options.suppress:
            self._service.windows[key] = (tuple(self.options.suppress), self.ctx.clock)
        else:
            self._service.windows.pop(key, None)

    def health(self) -> dict[str, Any]:
        if self._service is None:
            return {"state": "starting"}
        return {**self._service.health(), "suppressed_updates": self.suppressed}

    def _item(self, ev: Event) -> dict[str, Any]:
        v = ev.value
        if (
            type(v) is not dict
            or v.get("state") not in ("raised", "cleared")
            or not isinstance(v.get("alert_key"), str)
            or not v["alert_key"]
        ):
            raise ValueError(
                "the alert sink takes detector alerts: a value with state raised/cleared and an "
                "alert_key (put a detector such as threshold before it)"
            )
        severity = v.get("severity") if v.get("severity") in SEVERITIES else "warning"
        return {
            "pipeline": self.ctx.pipeline,
            "node": self.id,
            "key": ev.key,
            "ts": ev.ts,
            "value": v,
            "connection": self.options.connection,
            "topic": self._topic,
            "suppress": self._service.is_suppressed(self.ctx.pipeline, self.id, v["alert_key"], severity),
        }

    async def write(self, batch: list[Event]) -> None:
        items = []
        taken: list[Event] = []
        for ev in batch:
            try:
                items.append(self._item(ev))
            except ValueError as exc:
                self.fail(ev, exc)
            else:
                taken.append(ev)
        if not items:
            return
        o = self.options
        steps = await self._service.book.apply(
            items,
            cooldown=o.cooldown,
            auto_resolve=o.auto_resolve,
            on_rejected=lambda i, exc: self.fail(taken[i], ValueError(f"alert not stored: {exc}")),
        )
        for action, alert in steps:
            if (
                action in ("updated", "cleared")
                and not alert.get("suppressed")
                and self._service.is_suppressed(self.ctx.pipeline, self.id, alert["alert_key"], alert["severity"])
            ):
                # published before the window began: the console sees the step, MQTT does not
                await self._service.notify(action, alert, hold=True)
                continue
            if action == "updated":
                if not o.notify_updates:
                    continue
                now = self.ctx.monotonic()
                last = self._last_update.get(alert["id"])
                if last is not None and now - last < o.update_interval:
                    self.suppressed += 1
                    continue
                self._last_update[alert["id"]] = now
            elif action in ("resolved", "opened"):
                self._last_update.pop(alert["id"], None)
            await self._service.notify(action, alert)
