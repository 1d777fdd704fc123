"""The ``homeassistant`` sink: readings and alerts appear in Home Assistant by themselves.

It uses Home Assistant's MQTT device-based discovery: one retained config message per sink node at
``<prefix>/device/<device id>/config``, with a component for each key the node has seen — a
``sensor`` for a number (unit and device class from the options, or from the reading's ``unit``,
as Modbus device profiles give it), a ``binary_sensor`` (device class ``problem``) for each alert
key of a detector's output. States are retained plain-text messages on
``sluice/<gateway>/ha/<pipeline>/<node>/<component>``. Availability follows the gateway's retained
status topic and its last will, so entities turn unavailable when the gateway goes away. The
config is published again whenever Home Assistant says ``online`` on its status topic (it restarted
and forgot retained configs only if the broker did), and the node's components are kept in
``<data_dir>/homeassistant/`` so a restart announces them before the first new reading. A sink
node that a live reload takes out has its device removed (an empty retained config) at once; one
that is no longer in the config when the gateway starts (or whose removal could not reach the
broker), a little after that start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from gateway.api import (
    Duration,
    Event,
    LinkError,
    NodeOptions,
    Sink,
    Subscriber,
    check_connection,
    register,
    sluice_version,
    status_topic,
)

__all__ = ["HomeAssistant", "discovery_config"]

log = logging.getLogger(__name__)

# Home Assistant's device class for a unit, when the options name none
DEVICE_CLASSES = {
    "°C": "temperature",
    "°F": "temperature",
    "K": "temperature",
    "V": "voltage",
    "mV": "voltage",
    "A": "current",
    "mA": "current",
    "W": "power",
    "kW": "power",
    "Wh": "energy",
    "kWh": "energy",
    "Hz": "frequency",
    "VA": "apparent_power",
    "var": "reactive_power",
    "hPa": "pressure",
    "Pa": "pressure",
    "bar": "pressure",
    "lx": "illuminance",
    "ppm": "carbon_dioxide",
}
ENERGY_UNITS = {"Wh", "kWh"}
_SLUG = re.compile(r"[^A-Za-z0-9_-]")
# sink nodes whose device was announced: one file each, so a removed node's device can be removed
REGISTRY = "homeassistant"
# How long a node that a reload took out waits for the broker to take its device away
REMOVE_WAIT = 10.0


class HomeAssistantOptions(NodeOptions):
    type: Literal["homeassistant"]
    connection: str = Field(description="The MQTT connection Home Assistant listens on.")
    discovery_prefix: str = Field("homeassistant", description="Home Assistant's discovery prefix.")
    status_topic: str = Field(
        "homeassistant/status", description="Where Home Assistant says `online` when it starts: announce again."
    )
    device_name: str | None = Field(
        None, description="The device's name in Home Assistant (default: gateway/pipeline)."
    )
    units: dict[str, str] = Field(
        default_factory=dict, description="Unit of measurement per key (overrides the reading's own `unit`)."
    )
    device_classes: dict[str, str] = Field(
        default_factory=dict, description="Home Assistant device class per key (default: guessed from the unit)."
    )
    cleanup_after: Duration = Field(
        10.0,
        description="This long after start, devices of homeassistant nodes no longer in the config are removed.",
    )


def _ignore(client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
    return 0


def _slug(key: str) -> str:
    slug = _SLUG.sub("_", key)
    if slug != key:  # two keys must not collide after slugging
        slug = f"{slug}_{hashlib.sha1(key.encode()).hexdigest()[:6]}"
    return slug


def discovery_config(
    *,
    device_id: str,
    device_name: str,
    gateway_id: str,
    components: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The device-based discovery payload: ``dev``, ``o``, availability and ``cmps``."""
    return {
        "dev": {
            "ids": [device_id],
            "name": device_name,
            "mf": "Sluice",
            "mdl": "Sluice pipeline",
            "sw": sluice_version,
        },
        "o": {"name": "sluice", "sw": sluice_version},
        "avty": [
            {
                "t": status_topic(gateway_id),
                "val_tpl": "{{ value_json.state }}",
                "pl_avail": "online",
                "pl_not_avail": "offline",
            }
        ],
        "qos": 1,
        "cmps": components,
    }


@register
class HomeAssistant(Sink):
    """Announce each key's sensor (or alert's binary sensor) to Home Assistant and publish its state."""

    Options = HomeAssistantOptions
    options: HomeAssistantOptions

    @classmethod
    def check(cls, options: NodeOptions, config: Any) -> list[tuple[str, str]]:
        o: HomeAssistantOptions = options  # type: ignore[assignment]
        return check_connection(o.connection, config)

    def __init__(self, options: HomeAssistantOptions, ctx: Any):
        super().__init__(options, ctx)
        gw = ctx.gateway_id
        self.device_id = f"sluice_{gw}_{ctx.pipeline}_{options.id}"
        self.device_name = options.device_name or f"{gw} {ctx.pipeline}"
        self.config_topic = f"{options.discovery_prefix}/device/{self.device_id}/config"
        self.state_base = f"sluice/{gw}/ha/{ctx.pipeline}/{options.id}"
        self.components: dict[str, dict[str, Any]] = {}
        self._registry = Path(ctx.data_dir) / REGISTRY
        self._record = self._registry / f"{ctx.pipeline}.{options.id}.json"
        self._link: Subscriber | None = None
        self._task: asyncio.Task[None] | None = None
        self._announce = asyncio.Event()
        self._waiting: dict[str, bytes] = {}  # latest state per component while disconnected
        self.announced = 0

    # --- start and stop -------------------------------------------------------------------

    async def start(self) -> None:
        try:
            saved = json.loads(self._record.read_text())
            if saved.get("device_id") == self.device_id:
                self.components = saved.get("components", {})
        except (OSError, ValueError):
            pass
        services = self.ctx.services
        prefix = services.connection(self.options.connection).client_id or self.ctx.gateway_id
        self._link = services.subscriber(
            self.options.connection,
            f"{prefix}-{self.ctx.pipeline}-{self.id}-ha",
            on_message=self._on_message,
            clean_session=True,
        )
        self._link.subscribe(self.options.status_topic, 1)
        self._save()  # this node belongs to this run: another node's cleanup must leave its device alone
        self._task = asyncio.create_task(self._run(), name=f"homeassistant:{self.ctx.pipeline}:{self.id}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._link is not None:
            await self._link.close()

    def health(self) -> dict[str, Any]:
        h = self._link.health() if self._link is not None else {"state": "starting"}
        return {**h, "components": len(self.components), "announced": self.announced}

    async def removed(self) -> None:
        """A reload took this node out: remove its device from Home Assistant now, over a
        connection of its own (the node's link is closed). If the broker cannot be reached, the
        record stays and the next start of the gateway removes the device."""
        services = self.ctx.services
        if not services.publisher(self.options.connection).connected:  # the broker is away: no wait for it
            log.warning(
                "homeassistant %s/%s: broker not connected; device %s is removed at the next start",
                self.ctx.pipeline,
                self.id,
                self.device_id,
            )
            return
        prefix = services.connection(self.options.connection).client_id or self.ctx.gateway_id
        link = services.subscriber(
            self.options.connection, f"{prefix}-{self.ctx.pipeline}-{self.id}-ha-removal", on_message=_ignore
        )
        runner = asyncio.create_task(link.run(), name=f"mqtt:{self.options.connection}:ha-removal:{self.id}")
        try:
            async with asyncio.timeout(REMOVE_WAIT):  # not wait_for: it can drop a cancel (3.11)
                await link.wait_connected()
            link.publish(self.config_topic, b"", qos=1, retain=True)
        except (TimeoutError, LinkError) as exc:
            log.warning(
                "homeassistant %s/%s: cannot remove device %s now (%s); it is removed at the next start",
                self.ctx.pipeline,
                self.id,
                self.device_id,
                exc or "broker not reachable",
            )
            return
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            await link.close()
        log.info("homeassistant: removed device %s (its node is no longer configured)", self.device_id)
        self._record.unlink(missing_ok=True)

    def _on_message(self, client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        if topic == self.options.status_topic and payload.strip() == b"online":
            log.info("homeassistant %s/%s: Home Assistant is online: announcing again", self.ctx.pipeline, self.id)
            self._announce.set()
        return 0

    async def _run(self) -> None:
        assert self._link is not None
        link = self._link
        runner = asyncio.create_task(link.run(), name=f"mqtt:{self.options.connection}:ha:{self.id}")
        try:
            connects = 0
            started = self.ctx.monotonic()  # the node's clock: a test moves it, a wall-clock step does not
            swept = False
            while True:
                await link.wait_connected()
                if link.connects != connects or self._announce.is_set():
                    connects = link.connects
                    self._announce.clear()
                    self._publish_config()
                    waiting, self._waiting = self._waiting, {}
                    for slug, payload in waiting.items():
                        self._send_state(slug, payload)
                if not swept and self.ctx.monotonic() - started >= self.options.cleanup_after:
                    swept = True
                    self._remove_stale_devices()
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a stop's cancel
                # that meets an announce request, and the node ran on
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._announce.wait()
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    # --- discovery --------------------------------------------------------------------------

    def _publish_config(self) -> None:
        if self._link is None or not self._link.connected:
            return
        payload = discovery_config(
            device_id=self.device_id,
            device_name=self.device_name,
            gateway_id=self.ctx.gateway_id,
            components=self.components,
        )
        try:
            self._link.publish(self.config_topic, json.dumps(payload).encode(), qos=1, retain=True)
        except LinkError:
            return  # announced again on the next connect
        self.announced += 1
        self._save()

    def _save(self) -> None:
        record = {
            "device_id": self.device_id,
            "config_topic": self.config_topic,
            "components": self.components,
            "started_at": self.ctx.services.started_at,
        }
        try:
            self._registry.mkdir(parents=True, exist_ok=True)
            tmp = self._record.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self._record)
        except OSError as exc:
            log.warning("homeassistant %s/%s: cannot save %s: %s", self.ctx.pipeline, self.id, self._record, exc)

    def _remove_stale_devices(self) -> None:
        """Devices of sink nodes that this run of the gateway did not start: their pipeline was removed."""
        assert self._link is not None
        this_run = self.ctx.services.started_at
        for path in self._registry.glob("*.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if record.get("started_at", this_run) >= this_run or not self._link.connected:
                continue
            try:
                self._link.publish(record["config_topic"], b"", qos=1, retain=True)
            except (LinkError, KeyError):
                continue
            log.info("homeassistant: removed device %s (its node is no longer configured)", record.get("device_id"))
            path.unlink(missing_ok=True)

    def _component(self, key: str, ev: Event, alert: bool) -> str | None:
        slug = _slug(key)
        if slug in self.components:
            return slug
        comp: dict[str, Any] = {
            "p": "binary_sensor" if alert else "sensor",
            "unique_id": f"{self.device_id}_{slug}",
            "name": key,
            "stat_t": f"{self.state_base}/{slug}",
        }
        if alert:
            comp["dev_cla"] = "problem"
        else:
            unit = self.options.units.get(key) or ((ev.meta or {}).get("unit") if ev.meta else None)
            if unit:
                comp["unit_of_meas"] = unit
            dev_class = self.options.device_classes.get(key) or DEVICE_CLASSES.get(unit or "")
            if dev_class:
                comp["dev_cla"] = dev_class
            comp["stat_cla"] = "total_increasing" if unit in ENERGY_UNITS else "measurement"
        self.components[slug] = comp
        self._publish_config()  # the config goes out with the new component before its state does
        return slug

    # --- states -------------------------------------------------------------------------------

    async def write(self, batch: list[Event]) -> None:
        for ev in batch:
            v = ev.value
            states: list[tuple[str, bytes, bool]] = []
            if type(v) is dict and v.get("state") in ("raised", "cleared") and "alert_key" in v:
                states.append((str(v["alert_key"]), b"ON" if v["state"] == "raised" else b"OFF", True))
            elif type(v) is dict:
                for field, x in v.items():
                    if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x):
                        states.append((f"{ev.key}.{field}", repr(float(x)).encode(), False))
            elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                states.append((ev.key, repr(float(v)).encode(), False))
            for key, payload, alert in states:
                slug = self._component(key, ev, alert)
                self._send_state(slug, payload)

    def _send_state(self, slug: str, payload: bytes) -> None:
        """Publish a state; while disconnected keep only the latest per component, sent on connect."""
        link = self._link
        if link is not None and link.connected:
            try:
                link.publish(f"{self.state_base}/{slug}", payload, qos=0, retain=True)
                return
            except LinkError:
                pass
        if slug in self._waiting:
            self.n_dropped += 1  # replaced by a newer state: Home Assistant shows the latest anyway
        self._waiting[slug] = payload
