"""The gateway process: connections, pipelines, dead letters and the console under one owner.

:class:`Gateway` starts everything inside one ``asyncio.TaskGroup`` and stops it in order on
SIGINT/SIGTERM: sources stop first, queued events drain through the chain and the sinks (bounded
by ``gateway.shutdown_timeout``), then the links say goodbye with a retained ``offline`` status.
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import __version__, _tls
from ._heap import trim_heap
from ._migrate import refuse_newer_files
from ._state_tools import data_dir_lock
from .alerts import AlertService
from .clock import CHECK_INTERVAL, FLOOR_INTERVAL, IngestClock
from .config import LoadedConfig, MqttConnection
from .deadletter import DeadLetters
from .engine import Pipeline
from .errors import ReloadError, RestartNeeded, SluiceError
from .history import History
from .llm import LlmHub
from .mqtt import MqttLink, json_bytes, status_topic
from .node import NodeContext, _Node, get_node_type
from .outbox import Outbox
from .service import Notifier, ServiceReporter, status_line
from .store import StateStore

__all__ = ["Gateway", "Links", "ReloadError"]

log = logging.getLogger(__name__)


# Container objects allocated, net, between two young-generation collections while running
# (CPython's default is 700). A pipeline allocates an event, and often a dict, per reading;
# each young collection walks what is still alive, and a micro-batch of events in flight is
# alive, so at 700 the collector walked most events once or twice: ~9 % of COBS serial decode's
# CPU. 10,000 keeps a collection's pause well under a millisecond and its garbage to a few MB.
YOUNG_GENERATION_THRESHOLD = 10_000
_thresholds: tuple[int, int, int] | None = None  # what settle_heap replaced, for release_heap
_settled = 0  # gateways running in this process that settled the heap (tests run several)


def settle_heap() -> int:
    """Collect once, then take every object alive now out of the cyclic collector's view.

    What the gateway builds at start (modules, config models, pipelines, the console) lives as
    long as the process, yet every full collection walks all of it, and a pipeline that makes
    an event per reading triggers full collections steadily: serial decode with one event per
    field spent about a fifth of its CPU in them. ``gc.freeze`` leaves those objects to
    reference counting alone. Frozen objects that later die in a reference cycle are never
    collected, so this is done once, at start, when what is alive is what lives on;
    :func:`release_heap` hands everything back at a reload (whose dropped pipelines are such
    cycles) and at a stop. It also spaces young collections out
    (:data:`YOUNG_GENERATION_THRESHOLD`) until the stop. Returns the frozen count.
    """
    global _thresholds, _settled
    gc.collect()
    gc.freeze()
    if _settled == 0:
        _thresholds = gc.get_threshold()
        young, middle, old = _thresholds
        gc.set_threshold(max(young, YOUNG_GENERATION_THRESHOLD), middle, old)
    _settled += 1
    return gc.get_freeze_count()


def release_heap(*, stopping: bool = False) -> None:
    """Undo :func:`settle_heap`: what it froze is again seen (and collected) by full collections.

    ``stopping`` (a gateway that settled the heap is stopping) gives back the collector
    thresholds the process had before, once no other settled gateway runs in it.
    """
    global _thresholds, _settled
    gc.unfreeze()
    if stopping and _settled:
        _settled -= 1
        if _settled == 0 and _thresholds is not None:
            gc.set_threshold(*_thresholds)
            _thresholds = None


def _command_connections(loaded: LoadedConfig) -> list[str]:
    """The connections some node needs commands from (its ``command_connections`` hook)."""
    names: set[str] = set()
    for opts in loaded.nodes.values():
        for o in opts:
            cls = get_node_type(o.type)
            if cls is not None:
                names.update(cls.command_connections(o))
    return sorted(names)


class Links:
    """The runtime's services to nodes (:class:`gateway.api.Services`): shared connections by name
    (one publisher link per broker), the outbox that feeds them, alerts, LLM, history, ingest routes."""

    def __init__(self, gateway_id: str, connections: dict[str, MqttConnection], data_dir: Path, started_at: float):
        self.gateway_id = gateway_id
        self._conns = connections
        self.started_at = started_at
        self.outbox: Outbox | None = None  # set by the Gateway; numbers outgoing messages (seq)
        self.alerts: AlertService | None = None  # set by the Gateway: the alert book alert sinks use
        self.llm: LlmHub | None = None  # set by the Gateway: the providers llm nodes use
        self.history: Any = None  # set by the Gateway: gateway.history.History, for history sinks
        self.console: Any = None  # set by the console: gateway.web.Hub, where `console` sinks send events
        # POST /ingest/<source id> handlers: an http source adds its own while it runs
        self.ingest: dict[str, Callable[[Any], Awaitable[Any]]] = {}
        self.publishers: dict[str, MqttLink] = {}
        for name, conn in connections.items():
            will = birth = None
            if conn.status:
                topic = status_topic(gateway_id)
                will = (topic, self._status("offline"), True)

                def birth(topic: str = topic) -> tuple[str, bytes, bool]:
                    return topic, self._status("online"), True

            prefix = conn.client_id or gateway_id
            self.publishers[name] = MqttLink(name, conn, f"{prefix}-pub", will=will, birth=birth, clean_session=True)

    def _status(self, state: str) -> bytes:
        return json_bytes(
            {
                "state": state,
                "gateway_id": self.gateway_id,
                "version": __version__,
                "started_at": self.started_at,
                "ts": time.time(),
            }
        )

    def connection(self, name: str) -> MqttConnection:
        try:
            return self._conns[name]
        except KeyError:
            raise SluiceError(f"unknown connection {name!r}") from None

    def publisher(self, name: str) -> MqttLink:
        try:
            return self.publishers[name]
        except KeyError:
            raise SluiceError(f"unknown connection {name!r}") from None

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
    ) -> MqttLink:
        """A receiving link of a node's own to broker ``connection``; the node runs and closes it."""
        return MqttLink(
            connection,
            self.connection(connection),
            client_id,
            on_message=on_message,
            clean_session=clean_session,
            session_expiry=session_expiry,
            ack_after_processing=ack_after_processing,
            on_publish_qos1=on_publish_qos1,
            on_messages=on_messages,
        )

    async def close(self) -> None:
        for link in self.publishers.values():
            status = (status_topic(self.gateway_id), self._status("offline")) if link.conn.status else None
            await link.close(status=status)


class Gateway:
    """One running gateway built from a validated config."""

    def __init__(self, loaded: LoadedConfig):
        self.loaded = loaded
        cfg = loaded.config
        self.id = cfg.gateway.id
        self.data_dir = Path(cfg.gateway.data_dir)
        self.state = "created"
        self.started_at = time.time()
        # ingest time for readings without their own: never below what a previous run handed out
        self.clock = IngestClock(IngestClock.read_floor(self.data_dir / "clock"))
        self.dead_letters = DeadLetters(self.data_dir / "deadletter.db")
        self.links = Links(self.id, cfg.connections, self.data_dir, self.started_at)
        # low_wear: commits wait for the OS, not the disk (a power cut may take the last second)
        sync = "NORMAL" if cfg.gateway.storage == "low_wear" else "FULL"
        self.outbox = Outbox(
            self.data_dir / "outbox.db",
            self.id,
            self.links.publishers,
            cfg.gateway.outbox,
            seq_path=self.data_dir / "seq",
            on_refused=self._refused,
            synchronous=sync,
        )
        self.links.outbox = self.outbox
        self.alerts = AlertService(
            self.data_dir / "alerts.db", self.id, self.outbox, self.links.publishers, synchronous=sync
        )
        self._inputs_seen = 0
        self.service = ServiceReporter(Notifier(), ready=self._service_ready, status=self._service_status)
        # acknowledgements over MQTT arrive on the connections alert sinks publish to
        for name in _command_connections(loaded):
            conn = cfg.connections[name]
            self.alerts.command_links[name] = MqttLink(
                name, conn, f"{conn.client_id or self.id}-cmd", on_message=self.alerts.on_command
            )
        self.links.alerts = self.alerts
        self.llm = LlmHub(cfg.llm)
        self.links.llm = self.llm
        st = cfg.gateway.state
        self.store = StateStore(
            self.data_dir / "state.db",
            commit_interval=st.commit_interval,
            commit_size=st.commit_size,
            quota_bytes=st.max_bytes,
        )
        self.history = History(self.store)
        self.links.history = self.history  # the history sink writes through it
        self.pipelines: dict[str, Pipeline] = {
            p.name: self._pipeline(loaded, p.name) for p in cfg.pipelines if p.enabled
        }
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._reloading = asyncio.Lock()
        # Called after every reload that stopped or started pipelines, failed ones included, once
        # ``pipelines`` holds what runs now (the console moves its live taps here).
        self.reload_hooks: list[Callable[[], None]] = []
        self.console: Any = None
        self._stop = asyncio.Event()
        self._signals = 0

    def _pipeline(self, loaded: LoadedConfig, name: str) -> Pipeline:
        g = loaded.config.gateway
        p = Pipeline(
            name,
            loaded.nodes[name],
            self._ctx_factory(name),
            queue_size=g.queue_size,
            sink_queue_size=g.sink_queue_size,
            store=self.store,
        )
        if p.checkpointer is not None:
            p.checkpointer.interval = g.state.checkpoint_interval
        return p

    def _ctx_factory(self, pipeline: str) -> Any:
        def make(node_id: str) -> NodeContext:
            return NodeContext(
                self.id,
                pipeline,
                node_id,
                str(self.data_dir),
                self.links,
                self.dead_letters,
                clock=self.clock,
                logger=logging.getLogger(f"sluice.{pipeline}.{node_id}"),
            )

        return make

    def _refused(self, connection: str, topic: str, payload: bytes, reason: str) -> None:
        self.dead_letters.record("outbox", connection, f"{reason} (topic {topic})", raw=payload)

    def stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does)."""
        self._stop.set()

    # --- hot reload ---------------------------------------------------------------------

    @staticmethod
    def _fixed_parts(loaded: LoadedConfig) -> dict[str, Any]:
        """What a reload cannot change: every section but the pipelines, and where alerts take commands."""
        cfg = loaded.config
        parts = cfg.model_dump(mode="json", exclude={"pipelines"})
        parts["alert command connections"] = _command_connections(loaded)
        return parts

    @staticmethod
    def _pipeline_spec(loaded: LoadedConfig, name: str) -> Any:
        return [o.model_dump(mode="json") for o in loaded.nodes[name]]

    async def reload(self, loaded: LoadedConfig) -> dict[str, list[str]]:
        """Apply a new config's pipelines while running: unchanged pipelines keep running (and
        their state); changed ones stop (draining and checkpointing), and start again from the
        new definition and their saved state; removed ones stop; new ones start.

        Only ``pipelines`` may differ; anything else raises :class:`ReloadError` and changes
        nothing. If a new pipeline cannot be built or restored, the old ones are put back and
        :class:`ReloadError` says why.
        """
        async with self._reloading:
            if self.state != "running" or self._tg is None:
                raise ReloadError(f"the gateway is {self.state}, not running")
            old, new = self._fixed_parts(self.loaded), self._fixed_parts(loaded)
            differ = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            if differ:
                raise ReloadError(f"changing {', '.join(differ)} needs a restart; only pipelines reload live")
            if _tls.blocked() and _tls.nodes_may_use_tls(o for nodes in loaded.nodes.values() for o in nodes):
                raise RestartNeeded(
                    "the new pipelines may use TLS, which this gateway did not load (its config used none when "
                    "it started): save the config and restart the gateway"
                )
            # a disabled pipeline (`enabled: false`) counts as absent: disabling stops it, enabling starts it
            before = {p.name for p in self.loaded.config.pipelines if p.enabled}
            after = {p.name for p in loaded.config.pipelines if p.enabled}
            changed = sorted(
                n for n in before & after if self._pipeline_spec(self.loaded, n) != self._pipeline_spec(loaded, n)
            )
            added, removed = sorted(after - before), sorted(before - after)
            summary = {
                "changed": changed,
                "added": added,
                "removed": removed,
                "unchanged": sorted((before & after) - set(changed)),
            }
            if not (changed or added or removed):
                self.loaded = loaded
                return summary
            try:
                fresh = {n: self._pipeline(loaded, n) for n in (*changed, *added)}
            except Exception as exc:  # a node that cannot be built: nothing has changed yet
                raise ReloadError(f"a new pipeline cannot be built: {exc}") from exc
            gone = self._gone_nodes(loaded, after, [*changed, *removed])
            log.info("reloading: %s", ", ".join(f"{k} {v}" for k, v in summary.items() if v and k != "unchanged"))
            # The pipelines about to stop become collectable garbage. The heap is not frozen
            # again: connections and requests alive now end later, and frozen cycles would stay.
            release_heap()
            try:
                summary = await self._swap(loaded, fresh, changed, removed, summary)
                await self._retire(gone)
                return summary
            finally:
                try:
                    await self.outbox.retire_idle_links()
                except Exception:  # closing an unused link must not fail the reload
                    log.exception("could not close the outbox links the reload left unused")
                for hook in self.reload_hooks:
                    try:
                        hook()
                    except Exception:  # one hook must not keep the others from running
                        log.exception("a reload hook failed")
                # The stopped pipelines are cycles now: collect them and give their pages back.
                gc.collect()
                trim_heap()

    def _gone_nodes(self, loaded: LoadedConfig, after: set[str], stopping: list[str]) -> list[_Node]:
        """Running nodes of the pipelines about to stop that the new config no longer runs: their
        pipeline is removed or disabled, or they are (or their id now names another kind of node)."""
        gone = []
        for name in stopping:
            p = self.pipelines.get(name)
            if p is None:
                continue
            staying = {(o.id, type(o)) for o in loaded.nodes.get(name, [])} if name in after else set()
            gone.extend(n for n in p.nodes if (n.id, type(n.options)) not in staying)
        return gone

    @staticmethod
    async def _retire(gone: list[_Node]) -> None:
        """Tell nodes a reload took out that they are gone for good (``removed()``), once they are closed."""
        for n in gone:
            try:
                await n.removed()
            except Exception:  # one node's tidying up must not fail the reload that worked
                log.exception("node %s/%s: its removal hook failed", n.ctx.pipeline, n.id)

    async def _swap(
        self,
        loaded: LoadedConfig,
        fresh: dict[str, Pipeline],
        changed: list[str],
        removed: list[str],
        summary: dict[str, list[str]],
    ) -> dict[str, list[str]]:
        """Stop the changed and removed pipelines and start the fresh ones; roll back on failure."""
        previous = self.loaded
        await self._stop_pipelines([*changed, *removed])
        try:
            await self._start_pipelines(fresh)
        except Exception as exc:  # roll back to what ran before
            log.error("reload failed (%s); restarting the previous pipelines", exc)
            await self._stop_pipelines(list(fresh))
            try:
                await self._start_pipelines({n: self._pipeline(previous, n) for n in (*changed, *removed)})
            except Exception as again:
                log.error("the previous pipelines did not start again either: %s", again)
                raise ReloadError(
                    f"the new pipelines did not start ({exc}), nor the previous ones ({again}): "
                    f"{', '.join([*changed, *removed])} stopped; restart the gateway"
                ) from exc
            raise ReloadError(f"the new pipelines did not start: {exc}; the previous ones run again") from exc
        self.loaded = loaded
        kept = {p.name for p in loaded.config.pipelines}  # disabled, not removed: its state stays
        for name in removed:  # their final checkpoint is queued before these deletions
            if name in kept:
                continue
            try:
                n = await asyncio.to_thread(self.store.drop_pipeline, name)
            except Exception as exc:  # the reload itself worked: say it, and keep the rows
                log.error("pipeline %s was removed, but its saved state could not be dropped: %s", name, exc)
                continue
            if n:
                log.info("pipeline %s was removed: dropping its saved state (%d rows)", name, n)
        return summary

    async def _stop_pipelines(self, names: list[str]) -> None:
        for n in names:
            if n in self.pipelines:
                self.pipelines[n].stop()
        tasks = [self._tasks.pop(n) for n in names if n in self._tasks]
        if tasks:
            await self._drain_tasks(tasks, self.loaded.config.gateway.shutdown_timeout)
        for n in names:
            self.pipelines.pop(n, None)

    @staticmethod
    async def _restore(pipelines: list[Pipeline]) -> None:
        # in its own frame: a loop variable in run() would keep the last pipeline alive after
        # a reload removes it
        for p in pipelines:
            await p.restore()

    async def _start_pipelines(self, fresh: dict[str, Pipeline]) -> None:
        assert self._tg is not None
        await self._restore(list(fresh.values()))
        for name, p in fresh.items():
            self.pipelines[name] = p
            self._tasks[name] = self._tg.create_task(p.run(), name=f"pipeline:{name}")

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info(
                "%s received: stopping (draining queues, at most %gs); signal again to exit now",
                signal.Signals(signum).name,
                self.loaded.config.gateway.shutdown_timeout,
            )
            self.stop()
        else:
            log.warning("second signal: exiting now without draining")
            os._exit(1)

    async def run(self, install_signals: bool = True) -> None:
        cfg = self.loaded.config
        loop = asyncio.get_running_loop()
        if install_signals:
            for s in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(s, self._on_signal, s)
        self.state = "starting"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        settled = False  # whether this run settled the heap, so its stop gives the thresholds back
        held = contextlib.ExitStack()
        try:
            # shared: `sluice state …` takes it exclusively, so it cannot change state.db under us
            held.enter_context(data_dir_lock(self.data_dir, exclusive=False))
            # every file is checked before any is upgraded: after a downgrade nothing gets half-converted
            await asyncio.to_thread(refuse_newer_files, self.data_dir)
            await self.dead_letters.open()
            await self.store.start()
            await self._restore(list(self.pipelines.values()))  # state back before anything runs
            orphans = await asyncio.to_thread(self.store.pipeline_names)
            orphans -= {p.name for p in self.loaded.config.pipelines}  # disabled ones keep theirs
            if orphans - set(self.pipelines):
                log.warning(
                    "the state store holds saved state of pipelines not in this config: %s; it is kept "
                    "(and counts against the store's quota) and restored if a pipeline of that name "
                    "comes back; removing a pipeline by a live reload drops its state",
                    ", ".join(sorted(orphans - set(self.pipelines))),
                )
            await self.llm.start()  # a local model that cannot load stops the start here, clearly
            # Before the task group: a busy port is then a plain OSError the CLI reports in one
            # line, not an exception group with a traceback.
            if cfg.console.enabled:
                from .console import Console

                self.console = Console(self, cfg.console)
                await self.console.start()
            # before the task group too: a database that cannot be opened or upgraded is one line
            await self.outbox.open()
            await self.alerts.open()
            async with asyncio.TaskGroup() as tg:
                aux = [
                    tg.create_task(self.dead_letters.run(), name="deadletters"),
                    tg.create_task(self._watch_clock(), name="clock"),
                ]
                aux.append(tg.create_task(self.outbox.run(), name="outbox"))
                alerts_task = tg.create_task(self.alerts.run(), name="alerts")
                for name, link in self.links.publishers.items():
                    aux.append(tg.create_task(link.run(), name=f"mqtt:{name}:pub"))
                self._tg = tg
                self._tasks.update(  # a comprehension, so no loop variable outlives it here
                    {p.name: tg.create_task(p.run(), name=f"pipeline:{p.name}") for p in self.pipelines.values()}
                )
                self.state = "running"
                aux.append(tg.create_task(self.service.run(), name="systemd"))
                log.debug("heap settled: %d objects left to reference counting", settle_heap())
                trim_heap()  # what building it all freed goes back to the system
                settled = True
                log.info(
                    "gateway %s running: %d pipelines%s",
                    self.id,
                    len(self.pipelines),
                    f"; console at {self.console.url}" if self.console else "",
                )
                await self._stop.wait()
                async with self._reloading:  # a reload in progress finishes first
                    self.state = "stopping"
                self.service.stopping(f"stopping: draining {len(self.pipelines)} pipelines")
                await self._drain(list(self._tasks.values()), self.loaded.config.gateway.shutdown_timeout)
                await self.alerts.stop_links()
                alerts_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await alerts_task
                await self.outbox.close()
                await self.links.close()
                for t in aux:
                    t.cancel()
        finally:
            release_heap(stopping=settled)
            # The console first: a page still polling must not reach stores that are closing.
            if self.console is not None:
                await self.console.stop()
            await self.alerts.close()
            await self.outbox.close()
            await self.llm.close()
            await self.store.close()
            await self.dead_letters.close()
            if settled:
                await asyncio.to_thread(self.clock.save_floor, self.data_dir / "clock", final=True)
            if install_signals:
                for s in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(s)
            held.close()
            self.state = "stopped"
        log.info("gateway %s stopped", self.id)

    def _service_ready(self) -> bool:
        return self.state == "running" and all(p.state == "running" for p in self.pipelines.values())

    def _service_status(self, elapsed: float) -> str:
        total = sum(n.n_out for p in self.pipelines.values() for n in p.nodes if n.kind == "source")
        delta, self._inputs_seen = total - self._inputs_seen, total
        counts = self.alerts.book.counts
        return status_line(self.pipelines, delta, elapsed, counts["opened"] + counts["reopened"], self.outbox.count)

    async def _watch_clock(self) -> None:
        """Notice steps of the system clock (logged), and save the ingest clock's floor for the next start."""
        saved: float | None = None
        while True:
            now = self.clock.check()
            if saved is None or now - saved >= FLOOR_INTERVAL:
                saved = now
                await asyncio.to_thread(self.clock.save_floor, self.data_dir / "clock")
            await asyncio.sleep(CHECK_INTERVAL)

    async def _drain(self, running: list[asyncio.Task[None]], limit: float) -> None:
        for p in self.pipelines.values():
            p.stop()
        await self._drain_tasks(running, limit)

    async def _drain_tasks(self, running: list[asyncio.Task[None]], limit: float) -> None:
        if not running:
            return
        _, pending = await asyncio.wait(running, timeout=limit)
        if pending:
            # not yet through the chain, plus what each sink was given and has not finished
            left = sum(
                p.queue.depth + sum(n.n_in - n.n_out - n.n_errors for n in p.nodes if n.kind == "sink")
                for p in self.pipelines.values()
            )
            log.error(
                "stop took longer than %gs; abandoning %d queued events (raise "
                "gateway.shutdown_timeout, or check the sinks' connections)",
                limit,
                left,
            )
            for t in pending:
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*pending, return_exceptions=True)

    # --- reporting ----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        problems = []
        links = {}
        for name, link in self.links.publishers.items():
            links[name] = link.health()
            if not link.connected:
                why = f" ({link.last_error})" if link.last_error else ""
                problems.append(f"connection {name}: {link.state}{why}")
        problems.extend(self.outbox.problems())
        problems.extend(self.llm.problems())
        if self.store.state not in ("ok", "closed"):
            problems.append(f"state store: {self.store.state} ({self.store.last_error})")
        pipes = {}
        for p in self.pipelines.values():
            pipes[p.name] = p.state
            if p.state != "running":
                problems.append(f"pipeline {p.name}: {p.state}")
            for sid, st in p.source_state.items():
                if st.startswith("failed"):
                    problems.append(f"source {p.name}/{sid}: {st}")
            for n in p.nodes:  # a device source that keeps retrying is running but not healthy
                h = n.health() if n.kind == "source" else {}
                if h.get("state") == "down":
                    problems.append(f"source {p.name}/{n.id}: down ({h.get('reason') or 'no reason given'})")
        status = (
            "ok"
            if self.state == "running" and not problems
            else ("degraded" if self.state == "running" else self.state)
        )
        return {
            "status": status,
            "gateway_id": self.id,
            "version": __version__,
            "state": self.state,
            "started_at": self.started_at,
            "uptime": time.time() - self.started_at,
            "problems": problems,
            "connections": links,
            "pipelines": pipes,
            "dead_letters": self.dead_letters.total,
            "outbox": self.outbox.health(),
            "alerts": self.alerts.health(),
            "state_store": self.store.health(),
            "clock": self.clock.health(),
        }
