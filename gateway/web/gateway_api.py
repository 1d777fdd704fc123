"""The gateway's own HTTP API on the console: health, Prometheus metrics, pipelines, dead letters,
history, alerts, logs and the push endpoint of ``http`` sources.

``GET /healthz`` answers 200 with JSON while the gateway runs (``status`` is ``ok`` or
``degraded`` with the list of problems) and 503 while starting or stopping.
``GET /metrics`` is Prometheus text; ``GET /api/pipelines`` describes every node with its
counters, queue and health. Registered through :data:`gateway.web.routes.ROUTES` (owner ``console``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..alerts import SEVERITIES, STATES, AlertError, SuppressCommand, validated
from ..node import ID_PATTERN
from ..redact import redact, redact_text
from .auth import IDENTITY

if TYPE_CHECKING:
    from ..runtime import Gateway

__all__ = ["GatewayApi"]

log = logging.getLogger(__name__)

_ID = re.compile(ID_PATTERN)


class _GatewayCollector:
    """Reads the gateway's own counters at scrape time (no per-event metric calls)."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        import psutil  # at the first scrape

        self._proc = psutil.Process()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        gw = self.gw
        labels = ["pipeline", "node", "type"]
        fams = {
            c: CounterMetricFamily(
                f"sluice_node_{c}",
                f"Events {c} per node" if c != "errors" else "Inputs a node could not handle (dead-lettered)",
                labels=labels,
            )
            for c in ("in", "out", "errors", "dropped")
        }
        malformed = CounterMetricFamily("sluice_node_malformed", "Malformed inputs rejected by a source", labels=labels)
        depth = GaugeMetricFamily(
            "sluice_queue_depth", "Events waiting in a bounded queue", labels=["pipeline", "queue"]
        )
        cap = GaugeMetricFamily("sluice_queue_capacity", "Capacity of a bounded queue", labels=["pipeline", "queue"])
        hw = GaugeMetricFamily("sluice_queue_high_water", "Most events a queue has held", labels=["pipeline", "queue"])
        for p in gw.pipelines.values():
            for n in p.nodes:
                c = n.counters()
                lv = [p.name, n.id, n.type_name]
                for k, fam in fams.items():
                    fam.add_metric(lv, c.get(k, 0))
                if "malformed" in c:
                    malformed.add_metric(lv, c["malformed"])
            for qname, q in (("input", p.queue), *((p.nodes[i].id, q) for i, q in p.sink_queues.items())):
                depth.add_metric([p.name, qname], q.depth)
                cap.add_metric([p.name, qname], q.capacity)
                hw.add_metric([p.name, qname], q.high_water)
        yield from fams.values()
        yield malformed
        yield depth
        yield cap
        yield hw
        dl = CounterMetricFamily("sluice_dead_letters", "Inputs dead-lettered, by node", labels=["pipeline", "node"])
        for (pipe, node), count in gw.dead_letters.counts.items():
            dl.add_metric([pipe, node], count)
        yield dl
        lost = CounterMetricFamily("sluice_dead_letters_unwritten", "Dead letters counted but not written to disk")
        lost.add_metric([], gw.dead_letters.lost)
        yield lost
        ob = gw.outbox
        yield GaugeMetricFamily("sluice_outbox_messages", "Messages in the outbox waiting for a PUBACK", value=ob.count)
        yield GaugeMetricFamily(
            "sluice_outbox_bytes", "Bytes the outbox holds (its quota counts these)", value=ob.bytes
        )
        yield GaugeMetricFamily("sluice_outbox_quota_bytes", "The outbox's disk quota", value=ob.config.max_bytes)
        yield CounterMetricFamily(
            "sluice_outbox_dropped", "Oldest messages dropped because the outbox was full", value=ob.dropped
        )
        yield CounterMetricFamily("sluice_outbox_published", "Messages the broker acknowledged", value=ob.published)
        yield CounterMetricFamily(
            "sluice_outbox_replayed", "Messages sent again with replayed: true", value=ob.replayed
        )
        yield CounterMetricFamily(
            "sluice_outbox_refused", "Messages the broker refused (dead-lettered)", value=ob.refused
        )
        steps = CounterMetricFamily("sluice_alert_steps", "Alert lifecycle steps since start", labels=["action"])
        for action, n in gw.alerts.book.counts.items():
            steps.add_metric([action], n)
        yield steps
        yield CounterMetricFamily(
            "sluice_alert_notifications_suppressed",
            "Alert notifications held back by a suppression window",
            value=gw.alerts.notifications_suppressed,
        )
        yield CounterMetricFamily(
            "sluice_alert_released", "Held alerts published when their suppression ended", value=gw.alerts.released
        )
        w = getattr(gw.console, "web", None)  # None until the console loads
        if w is not None:
            hub = w.hub
            yield GaugeMetricFamily("sluice_console_ws_clients", "Console WebSocket clients", value=len(hub.clients))
            drops = CounterMetricFamily(
                "sluice_console_ws_dropped",
                "Dropped for slow console clients: messages, llm chunks, console-sink events",
                labels=["what"],
            )
            drops.add_metric(["message"], hub.dropped)
            drops.add_metric(["llm_chunk"], hub.llm_dropped)
            drops.add_metric(["console_event"], hub.console_dropped)
            yield drops
        up = GaugeMetricFamily("sluice_mqtt_connected", "1 when the publisher link is connected", labels=["connection"])
        for name, link in gw.links.publishers.items():
            up.add_metric([name], 1 if link.connected else 0)
        yield up
        from ..llm import metric_families
        from ..node import metric_families as node_families

        yield from node_families(gw.pipelines.values())
        yield from metric_families(gw)
        from ..store import metric_families as state_families

        yield from state_families(gw)
        yield GaugeMetricFamily(
            "sluice_clock_offset_seconds",
            "The system clock minus ingest time (non-zero after a step of the system clock)",
            value=gw.clock.health()["offset"],
        )
        yield CounterMetricFamily("sluice_clock_steps", "Steps of the system clock noticed", value=gw.clock.steps)
        yield GaugeMetricFamily(
            "sluice_uptime_seconds", "Seconds since the gateway started", value=time.time() - gw.started_at
        )
        with self._proc.oneshot():
            yield GaugeMetricFamily(
                "sluice_process_resident_memory_bytes", "Resident memory", value=self._proc.memory_info().rss
            )
            t = self._proc.cpu_times()
            yield CounterMetricFamily("sluice_process_cpu_seconds", "CPU time used", value=t.user + t.system)


class GatewayApi:
    """The handlers of the gateway's own routes (the route table's owner ``console``)."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        # prometheus_client costs ~10 MB resident: imported at the first scrape, not at start.
        self._registry: Any = None

    async def healthz(self, request: web.Request) -> web.Response:
        """Status only for anyone; the details (problems, connections, stores) with a session or token."""
        h = self.gw.health()
        status = 200 if self.gw.state == "running" else 503
        if request.get(IDENTITY) is None:
            return web.json_response({"status": h["status"]}, status=status)
        return web.json_response(redact(h), status=status)

    async def metrics(self, request: web.Request) -> web.Response:
        try:
            from prometheus_client import CollectorRegistry, generate_latest
        except ImportError as exc:
            from .. import _tls

            if not _tls.refused(exc):
                raise
            return web.Response(
                status=503,
                text="metrics need OpenSSL (prometheus_client imports ssl), which SLUICE_TLS=auto kept out of this "
                "gateway: start it without SLUICE_TLS=auto to serve /metrics\n",
            )

        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_GatewayCollector(self.gw))  # type: ignore[arg-type]
        body = redact_text(generate_latest(self._registry).decode()).encode()
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def api_pipelines(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "gateway_id": self.gw.id,
                "state": self.gw.state,
                "pipelines": redact([p.describe() for p in self.gw.pipelines.values()]),
            }
        )

    async def api_deadletters(self, request: web.Request) -> web.Response:
        try:
            limit = min(int(request.query.get("limit", "100")), 200)
        except ValueError:
            raise web.HTTPBadRequest(text="limit must be an integer") from None
        rows = list(self.gw.dead_letters.recent)[-limit:][::-1]
        return web.json_response({"total": self.gw.dead_letters.total, "recent": redact(rows)})

    async def api_history(self, request: web.Request) -> web.Response:
        """``GET /api/history?key=&from=&to=&points=``: a key's downsampled history (epoch seconds)."""
        q = request.query
        if not q.get("key"):
            return web.json_response({"error": "give key=<the reading's key>"}, status=400)
        history = self.gw.history
        try:
            end = float(q["to"]) if "to" in q else max(history.newest, 0.0) + 1.0
            start = float(q["from"]) if "from" in q else end - 3600.0
            points = max(1, min(int(q.get("points", "1000")), 10_000))
        except ValueError:
            return web.json_response({"error": "from and to are epoch seconds; points is an integer"}, status=400)
        if not start < end:
            return web.json_response({"error": "from must be before to"}, status=400)
        return web.json_response(await asyncio.to_thread(history.query, q["key"], start, end, points))

    async def api_alerts(self, request: web.Request) -> web.Response:
        """``GET /api/alerts?state=&severity=&pipeline=&key=&since=&until=&limit=`` (newest first)."""
        q = request.query
        for name, allowed in (("state", STATES), ("severity", SEVERITIES)):
            if name in q and q[name] not in allowed:
                return web.json_response({"error": f"{name} must be one of {', '.join(allowed)}"}, status=400)
        try:
            limit = max(1, min(int(q.get("limit", "100")), 1000))
            since = float(q["since"]) if "since" in q else None
            until = float(q["until"]) if "until" in q else None
        except ValueError:
            return web.json_response({"error": "limit is an integer; since and until are epoch seconds"}, status=400)
        alerts = await self.gw.alerts.list(
            state=q.get("state"),
            severity=q.get("severity"),
            pipeline=q.get("pipeline"),
            key=q.get("key"),
            since=since,
            until=until,
            limit=limit,
        )
        return web.json_response({"alerts": alerts, "summary": await self.gw.alerts.book.summary()})

    async def api_alert_action(self, request: web.Request) -> web.Response:
        """``POST /api/alerts/<id>/ack`` or ``…/resolve``, optional JSON body ``{"note": "..."}``."""
        action = request.match_info["action"]
        if action not in ("ack", "resolve"):
            return web.json_response({"error": f"unknown action {action!r}; use ack or resolve"}, status=404)
        alert_id = _row_id(request, "alert")
        if isinstance(alert_id, web.Response):
            return alert_id
        body: Any = {}
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                return web.json_response({"error": "the body must be JSON"}, status=400)
        if not isinstance(body, dict) or not isinstance(body.get("note", ""), str | None):
            return web.json_response({"error": 'the body is {"note": "..."}'}, status=400)
        ident = request.get(IDENTITY)
        by = ident.name if ident is not None and ident.via != "open" else str(body.get("by") or "console")
        try:
            alert = await self.gw.alerts.operator(action, alert_id, by=by, note=body.get("note"))  # type: ignore[arg-type]
        except AlertError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        return web.json_response({"alert": alert})

    async def ingest(self, request: web.Request) -> web.StreamResponse:
        """``POST /ingest/<source id>``: readings pushed to a running ``http`` source (nodes/http.py)."""
        source = request.match_info["source"]
        handler = self.gw.links.ingest.get(source)
        if handler is None:
            # Answered as a running source answers a request without its token: whether a source of
            # that name exists is nobody's business before they hold its token.
            return web.json_response(
                {"error": "send Authorization: Bearer <the source's token>"},
                status=401,
                headers={"WWW-Authenticate": f'Bearer realm="ingest/{source}"' if _ID.match(source) else "Bearer"},
            )
        response: web.StreamResponse = await handler(request)
        return response

    async def api_alert_suppress(self, request: web.Request) -> web.Response:
        """``POST /api/alerts/suppress {"alert_key": glob, "until": epoch|ISO 8601, "note": "..."}`` (admin)."""
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the body must be JSON"}, status=400)
        ident = request.get(IDENTITY)
        if isinstance(body, dict) and ident is not None and ident.via != "open":
            body = {**body, "by": ident.name}
        elif isinstance(body, dict):
            body = {"by": "console", **body}
        try:
            cmd = validated(SuppressCommand, body)
            sup = await self.gw.alerts.suppress(cmd.alert_key, cmd.until, note=cmd.note, by=cmd.by)
        except AlertError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        return web.json_response({"suppression": sup}, status=201)

    async def api_alert_suppressions(self, request: web.Request) -> web.Response:
        return web.json_response({"suppressions": await self.gw.alerts.suppressions()})

    async def api_alert_unsuppress(self, request: web.Request) -> web.Response:
        sup_id = _row_id(request, "suppression")
        if isinstance(sup_id, web.Response):
            return sup_id
        try:
            await self.gw.alerts.unsuppress(sup_id)
        except AlertError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        return web.json_response({"deleted": sup_id})

    async def api_logs(self, request: web.Request) -> web.Response:
        from .._log import RECENT

        level = request.query.get("level")
        lines = [ln for ln in RECENT.lines if level is None or ln["level"] == level]
        return web.json_response({"lines": redact(lines[-200:])})


def _row_id(request: web.Request, what: str) -> int | web.Response:
    """The ``id`` path parameter as a database row id, or the answer to give when it is not one."""
    try:
        n = int(request.match_info["id"])
    except ValueError:
        return web.json_response({"error": f"the {what} id is a number"}, status=400)
    if not 0 < n < 2**63:  # SQLite's integer range: no such row, not an overflow
        return web.json_response({"error": f"no {what} {n}"}, status=404)
    return n
