"""The console's WebSocket ``/ws``: live stats and node event taps, with a bounded buffer per client.

A client subscribes with ``{"op": "subscribe", "topic": "stats"}`` (a ``stats`` message every
second) or ``{"op": "subscribe", "topic": "events", "pipeline": P, "node": N}`` (``events``
messages, ten a second at most, with the latest events node N emitted and how many were skipped:
a live view gets a sample, and tapping costs the pipeline one slice per batch). A slow or
stalled browser never slows the pipeline: each client has a bounded buffer, the oldest message
is dropped when it is full, and every drop is counted (per client, in each ``stats`` message,
and in total on the hub).

``{"op": "subscribe", "topic": "alerts"}`` pushes every alert lifecycle step (``alert`` messages:
``action`` and the ``alert``) as it happens. ``{"op": "subscribe", "topic": "llm"}`` carries every
chunk the ``llm`` nodes stream, unsampled (``llm`` messages, batched each flush), and once a
second ``llm_stats`` (queue depth, sheds by reason, tokens/s of each llm node and provider).
Chunks wait in a bounded per-client buffer while that client's socket is behind; when it is full
the oldest chunks are dropped and counted (``dropped`` in both messages).

``{"op": "subscribe", "topic": "console"}`` carries every event that reaches a ``console`` sink
node (``console`` messages: ``events`` with their pipeline, node and label, and ``dropped``), for
the editor's console panel. Those sinks do nothing while no client follows them; events wait in
a bounded per-client buffer like llm chunks, the oldest dropped and counted when it is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import WSCloseCode, WSMsgType, web

from .._log import RateLimitedLog
from ..redact import redact
from .auth import IDENTITY

if TYPE_CHECKING:
    from ..runtime import Gateway
    from .auth import Auth

__all__ = ["Hub"]

log = logging.getLogger(__name__)

BUFFER = 256  # messages a client may lag behind before the oldest are dropped
TAP_EVENTS = 20  # events per flush and tapped node: a tail view or a chart needs a sample, not every reading
FLUSH = 0.1  # seconds between sending what the taps collected
LLM_CHUNKS = 2048  # llm chunks a client may lag behind before the oldest are dropped
CONSOLE_EVENTS = 1000  # console-sink events a client may lag behind before the oldest are dropped


class _Client:
    __slots__ = (
        "alerts",
        "buf",
        "console",
        "console_dropped",
        "dropped",
        "events",
        "id",
        "llm",
        "llm_dropped",
        "llm_size",
        "remote",
        "sent",
        "stats",
        "user",
        "wake",
        "ws",
    )

    def __init__(
        self, ws: web.WebSocketResponse, cid: int, remote: str | None, size: int = BUFFER, llm_size: int = LLM_CHUNKS
    ):
        self.ws = ws
        self.id = cid
        self.remote = remote
        self.user: str | None = None  # who, when connected with a session: closed when it ends
        self.buf: deque[str] = deque(maxlen=size)
        self.wake = asyncio.Event()
        self.dropped = 0
        self.sent = 0
        self.stats = False
        self.events: set[tuple[str, str]] = set()
        self.alerts = False
        self.llm: deque[dict[str, Any]] | None = None  # chunks not yet sent, while subscribed to llm
        self.llm_size = llm_size
        self.llm_dropped = 0
        self.console: deque[dict[str, Any]] | None = None  # console-sink events not yet sent, while subscribed
        self.console_dropped = 0

    def offer_console(self, item: dict[str, Any]) -> bool:
        assert self.console is not None
        full = len(self.console) == self.console.maxlen
        if full:
            self.console_dropped += 1
        self.console.append(item)
        return not full

    def offer_chunk(self, chunk: dict[str, Any]) -> bool:
        assert self.llm is not None
        full = len(self.llm) == self.llm.maxlen
        if full:
            self.llm_dropped += 1
        self.llm.append(chunk)  # a full deque drops its oldest chunk
        return not full

    def offer(self, text: str) -> bool:
        full = len(self.buf) == self.buf.maxlen
        if full:
            self.dropped += 1
        self.buf.append(text)  # a full deque drops its oldest: the newest state matters most
        self.wake.set()
        return not full

    async def send_loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.buf:
                await self.ws.send_str(self.buf.popleft())
                self.sent += 1


class _Tap:
    """What a tapped node emitted since the last flush: the latest events and how many there were.

    Costs the hot path one slice and one ``extend`` per batch, whatever the batch size and the
    number of clients; serialising and sending happen in the flush, ten times a second.
    """

    __slots__ = ("buf", "n", "pipeline", "undo")

    def __init__(self, undo: Callable[[], None], pipeline: Any = None):
        self.buf: deque[Any] = deque(maxlen=TAP_EVENTS)
        self.n = 0
        self.undo = undo
        self.pipeline = pipeline  # the Pipeline object tapped: a hot reload replaces it

    def add(self, events: list[Any]) -> None:
        self.n += len(events)
        self.buf.extend(events[-TAP_EVENTS:])


class Hub:
    """All connected console clients, the stats ticker and the node taps."""

    def __init__(self, gw: Gateway, auth: Auth, stats: Callable[[], dict[str, Any]], interval: float = 1.0):
        self.gw = gw
        self.auth = auth
        self.stats = stats
        self.interval = interval
        self.clients: set[_Client] = set()
        self.dropped = 0
        self.connections = 0
        self._ids = 0
        self._taps: dict[tuple[str, str], _Tap] = {}
        self._llm_taps: dict[tuple[str, str], tuple[Any, Callable[[], None]]] = {}  # -> (pipeline, undo)
        self.llm_dropped = 0
        self.console_dropped = 0
        self._rl = RateLimitedLog(log)

    # --- console sinks (nodes/sinks.py ConsoleSink) --------------------------------------------

    @property
    def console_watched(self) -> bool:
        """Whether any client follows the console sinks (they skip all work when not)."""
        return any(c.console is not None for c in self.clients)

    def console_publish(self, pipeline: str, node: str, label: str, events: list[Any]) -> None:
        subs = [c for c in self.clients if c.console is not None]
        for ev in events:
            item = {"pipeline": pipeline, "node": node, "label": label, "event": ev.to_dict()}
            for c in subs:
                if not c.offer_console(item):
                    self.console_dropped += 1
                    self._rl.warning(
                        "console-drop",
                        "console client %s is slow: dropped %d console events",
                        c.remote,
                        c.console_dropped,
                    )

    def _flush_console(self) -> None:
        for c in self.clients:
            if not c.console or len(c.buf) >= (c.buf.maxlen or BUFFER) // 2:
                continue
            n = min(len(c.console), CONSOLE_EVENTS // 4)
            events = [c.console.popleft() for _ in range(n)]
            self._offer(c, json.dumps({"type": "console", "events": events, "dropped": c.console_dropped}, default=str))

    # --- lifecycle (owned by the console app: started at startup, cancelled at cleanup) -----

    async def lifespan(self, app: web.Application) -> Any:
        task = asyncio.create_task(self._ticker(), name="console:ws-stats")
        alerts = getattr(self.gw, "alerts", None)
        listeners = getattr(alerts, "listeners", None)
        if listeners is not None:
            listeners.append(self._on_alert)
        try:
            yield
        finally:
            if listeners is not None:
                listeners.remove(self._on_alert)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for key in list(self._taps):
                self._untap(key)
            self._untap_llm()

    async def close_all(self, app: web.Application) -> None:
        for c in list(self.clients):
            await c.ws.close(code=1001, message=b"console stopping")

    async def _ticker(self) -> None:
        next_stats = time.monotonic() + self.interval
        while True:
            await asyncio.sleep(min(FLUSH, self.interval))
            self._flush()
            self._flush_llm()
            self._flush_console()
            if time.monotonic() < next_stats:
                continue
            next_stats = time.monotonic() + self.interval
            self._llm_stats()
            subs = [c for c in self.clients if c.stats]
            if not subs:
                continue
            try:
                payload = self.stats()
            except Exception as exc:  # a reporting bug must not end live updates
                self._rl.log(logging.ERROR, "stats", "building console stats failed: %r", exc)
                continue
            payload["type"] = "stats"
            payload["ws"] = {
                "clients": len(self.clients),
                "dropped": self.dropped,
                "llm_dropped": self.llm_dropped,
                "console_dropped": self.console_dropped,
            }
            text = json.dumps(payload, default=str)
            for c in subs:
                self._offer(c, text)

    def _offer(self, c: _Client, text: str) -> None:
        if not c.offer(text):
            self.dropped += 1
            self._rl.warning("drop", "console client %s is slow: dropped %d messages so far", c.remote, c.dropped)

    # --- the handler ------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        from .auth import AuthError

        try:
            await self.auth.check_ws(request)
        except AuthError as exc:
            return web.json_response({"error": exc.message}, status=exc.status)
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=64 * 1024)
        await ws.prepare(request)
        self._ids += 1
        self.connections += 1
        client = _Client(ws, self._ids, request.remote)
        ident = request.get(IDENTITY)
        if ident is not None and ident.via == "session":
            client.user = ident.name
        self.clients.add(client)
        client.offer(json.dumps({"type": "hello", "client": client.id, "interval": self.interval}))
        try:
            async with asyncio.TaskGroup() as tg:
                sender = tg.create_task(client.send_loop(), name=f"console:ws:{client.id}")
                async for msg in ws:
                    if msg.type == WSMsgType.TEXT:
                        self._command(client, msg.data)
                    elif msg.type == WSMsgType.ERROR:
                        break
                sender.cancel()
        except* (ConnectionResetError, RuntimeError):
            pass  # the browser went away mid-send
        finally:
            self.clients.discard(client)
            for key in list(client.events):
                self._unsubscribe(client, key)
            if client.llm is not None:
                self._unsubscribe_llm(client)
        return ws

    async def end_user(self, name: str) -> None:
        """``name``'s sessions have ended (logout, password or role change, removal): close their sockets."""
        for c in [c for c in self.clients if c.user == name]:
            await c.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"session ended")

    def _command(self, c: _Client, data: str) -> None:
        try:
            msg = json.loads(data)
            op, topic = msg["op"], msg["topic"]
        except (ValueError, KeyError, TypeError):
            c.offer(
                json.dumps(
                    {
                        "type": "error",
                        "message": 'expected {"op": "subscribe"|"unsubscribe", '
                        '"topic": "stats"|"events"|"alerts"|"llm"|"console", ...}',
                    }
                )
            )
            return
        if topic == "stats" and op in ("subscribe", "unsubscribe"):
            c.stats = op == "subscribe"
        elif topic == "alerts" and op in ("subscribe", "unsubscribe"):
            c.alerts = op == "subscribe"
        elif topic == "console" and op in ("subscribe", "unsubscribe"):
            if op == "subscribe":
                if c.console is None:
                    c.console = deque(maxlen=CONSOLE_EVENTS)
            else:
                c.console = None
        elif topic == "llm" and op in ("subscribe", "unsubscribe"):
            if op == "subscribe":
                self._subscribe_llm(c)
            else:
                self._unsubscribe_llm(c)
        elif topic == "events" and op in ("subscribe", "unsubscribe"):
            key = (str(msg.get("pipeline")), str(msg.get("node")))
            if op == "unsubscribe":
                self._unsubscribe(c, key)
                return
            err = self._subscribe(c, key)
            if err:
                c.offer(json.dumps({"type": "error", "message": err}))
                return
        else:
            c.offer(json.dumps({"type": "error", "message": f"unknown op/topic {op!r}/{topic!r}"}))
            return
        where = {"pipeline": msg.get("pipeline"), "node": msg.get("node")} if topic == "events" else {}
        c.offer(json.dumps({"type": "ok", "op": op, "topic": topic, **where}))

    # --- alerts ------------------------------------------------------------------------------

    def _on_alert(self, action: str, alert: dict[str, Any]) -> None:
        """An alert lifecycle step (AlertService listener): to every client that follows alerts."""
        subs = [c for c in self.clients if c.alerts]
        if not subs:
            return
        text = json.dumps({"type": "alert", "action": action, "alert": alert}, default=str)
        for c in subs:
            self._offer(c, text)

    # --- llm token stream ---------------------------------------------------------------------

    def _llm_nodes(self) -> list[tuple[str, str, Any]]:
        return [(p.name, n.id, n) for p in self.gw.pipelines.values() for n in p.nodes if "llm" in n.live_topics()]

    def _subscribe_llm(self, c: _Client) -> None:
        if c.llm is None:
            c.llm = deque(maxlen=c.llm_size)
        self._tap_llm()

    def _unsubscribe_llm(self, c: _Client) -> None:
        c.llm = None
        if not any(o.llm is not None for o in self.clients if o is not c):
            self._untap_llm()

    def _tap_llm(self) -> None:
        """Hook every llm node's ``ctx.emit`` (where its chunks and results go out), once.

        Also after a hot reload: nodes of replaced pipelines are unhooked, new ones hooked.
        """
        nodes = self._llm_nodes()
        current = {(pname, nid) for pname, nid, _ in nodes}
        for key in [k for k in self._llm_taps if k not in current]:
            self._llm_taps.pop(key)[1]()
        for pname, nid, node in nodes:
            key = (pname, nid)
            pipeline = self.gw.pipelines[pname]
            tapped = self._llm_taps.get(key)
            if tapped is not None and tapped[0] is pipeline:
                continue
            if tapped is not None:
                tapped[1]()
            self._llm_taps[key] = (pipeline, _hook_emit(node, self._llm_collector(pname, nid)))

    def _untap_llm(self) -> None:
        for _, undo in self._llm_taps.values():
            undo()
        self._llm_taps.clear()

    def _llm_collector(self, pipeline: str, node: str) -> Callable[[list[Any]], None]:
        def collect(events: list[Any]) -> None:
            subs = [c for c in self.clients if c.llm is not None]
            if not subs:
                return
            for ev in events:
                v = ev.value
                if type(v) is not dict:
                    continue
                kind = v.get("llm")
                if kind == "chunk":
                    item = {"text": v.get("text"), "seq": v.get("seq")}
                elif kind in ("ok", "error", "shed"):
                    item = {"done": kind, "tokens": v.get("tokens"), "tokens_per_s": v.get("tokens_per_s")}
                    if kind != "ok":
                        item["reason"] = v.get("llm_reason") or v.get("llm_error")
                else:
                    continue
                item.update(
                    pipeline=pipeline, node=node, key=ev.key, request=v.get("request"), provider=v.get("provider")
                )
                for c in subs:
                    if not c.offer_chunk(item):
                        self.llm_dropped += 1
                        self._rl.warning(
                            "llm-drop", "console client %s is slow: dropped %d llm chunks", c.remote, c.llm_dropped
                        )

        return collect

    def _flush_llm(self) -> None:
        """Send each llm client what it has waiting, unless its socket is still behind (then it waits, bounded)."""
        for c in self.clients:
            if not c.llm or len(c.buf) >= (c.buf.maxlen or BUFFER) // 2:
                continue
            n = min(len(c.llm), LLM_CHUNKS // 4)
            chunks = [c.llm.popleft() for _ in range(n)]
            self._offer(c, json.dumps({"type": "llm", "chunks": chunks, "dropped": c.llm_dropped}, default=str))

    def _llm_stats(self) -> None:
        subs = [c for c in self.clients if c.llm is not None]
        if not subs:
            return
        self._tap_llm()  # llm nodes a hot reload added
        nodes = []
        for pname, nid, node in self._llm_nodes():
            try:
                st = node.stats()
            except Exception as exc:  # a reporting bug must not end live updates
                self._rl.log(logging.ERROR, "llm-stats", "llm stats of %s/%s failed: %r", pname, nid, exc)
                continue
            q = st.get("queue") or {}
            nodes.append(
                {
                    "pipeline": pname,
                    "node": nid,
                    "depth": q.get("depth"),
                    "max_depth": q.get("max_depth"),
                    "shed": q.get("shed") or {},
                    "in_flight": st.get("in_flight"),
                    "ok": st.get("ok"),
                    "failed": st.get("failed"),
                    "tokens_per_s": st.get("tokens_per_s"),
                    "first_token_s": st.get("first_token_s"),
                    "wait_p50_s": st.get("wait_p50_s"),
                }
            )
        hub = getattr(self.gw, "llm", None)
        providers = redact(hub.describe()) if hub is not None else []  # urls and errors of remote models
        for c in subs:
            text = json.dumps(
                {"type": "llm_stats", "nodes": nodes, "providers": providers, "dropped": c.llm_dropped}, default=str
            )
            self._offer(c, text)

    # --- node taps --------------------------------------------------------------------------

    def _subscribe(self, c: _Client, key: tuple[str, str]) -> str | None:
        p = self.gw.pipelines.get(key[0])
        if p is None or key[1] not in p.index:
            return f"no node {key[1]!r} in pipeline {key[0]!r}"
        c.events.add(key)
        if key not in self._taps:
            self._taps[key] = self._tap(key)
        return None

    def _unsubscribe(self, c: _Client, key: tuple[str, str]) -> None:
        c.events.discard(key)
        if not any(key in o.events for o in self.clients if o is not c) and key in self._taps:
            self._untap(key)

    def _untap(self, key: tuple[str, str]) -> None:
        tap = self._taps.pop(key, None)
        if tap is not None:
            tap.undo()

    def _flush(self) -> None:
        for key, tap in self._taps.items():
            if not tap.n:
                continue
            events, n = list(tap.buf), tap.n
            tap.buf.clear()
            tap.n = 0
            text = json.dumps(
                {
                    "type": "events",
                    "pipeline": key[0],
                    "node": key[1],
                    "events": [e.to_dict() for e in events],
                    "skipped": n - len(events),
                },
                default=str,
            )
            for c in self.clients:
                if key in c.events:
                    self._offer(c, text)

    def _tap(self, key: tuple[str, str]) -> _Tap:
        """Wrap the node's output on the instance only while someone listens."""
        tap = _Tap(lambda: None, self.gw.pipelines[key[0]])
        tap.undo = self._wrap(key, tap.add)
        return tap

    def retap(self) -> None:
        """After a hot reload: move taps to the pipelines that replaced theirs; end those whose node is gone."""
        if any(c.llm is not None for c in self.clients):
            self._tap_llm()
        for key, tap in list(self._taps.items()):
            current = self.gw.pipelines.get(key[0])
            if current is tap.pipeline:
                continue
            tap.undo()
            if current is not None and key[1] in current.index:
                tap.pipeline = current
                tap.undo = self._wrap(key, tap.add)
                continue
            del self._taps[key]
            gone = json.dumps(
                {"type": "error", "message": f"node {key[1]!r} of pipeline {key[0]!r} is gone after a config reload"}
            )
            for c in self.clients:
                if key in c.events:
                    c.events.discard(key)
                    self._offer(c, gone)

    def _wrap(self, key: tuple[str, str], add: Callable[[list[Any]], None]) -> Callable[[], None]:
        """Install ``add`` on the node's output; returns the undo."""
        from ..node import Operator, Sink, Source

        p = self.gw.pipelines[key[0]]
        idx = p.index[key[1]]
        node: Any = p.nodes[idx]
        if isinstance(node, Operator):
            orig = node.process_batch

            def process_batch(batch: list[Any]) -> list[Any]:
                out = orig(batch)
                if out:
                    add(out)
                return out

            node.process_batch = process_batch
            # what an operator emits later from its own task (the llm node's answers and tokens)
            undo_emit = _hook_emit(node, add)

            def undo_operator() -> None:
                node.__dict__.pop("process_batch", None)
                undo_emit()

            return undo_operator
        if isinstance(node, Sink):
            orig_write = node.write

            async def write(batch: list[Any]) -> None:
                add(batch)
                await orig_write(batch)

            node.write = write
            return lambda: node.__dict__.pop("write", None)
        assert isinstance(node, Source)
        # A source's batches enter the chain through the pipeline's _process with the source as origin.
        tapped: dict[int, Callable[[list[Any]], None]] = p.__dict__.setdefault("_console_tapped", {})
        tapped[idx] = add
        if "_process" not in p.__dict__:
            orig_process = p._process

            def _process(item: Any) -> Any:
                add_for = tapped.get(item.origin)
                if add_for is not None:
                    add_for(item.events)
                return orig_process(item)

            p._process = _process  # type: ignore[method-assign]

        def undo() -> None:
            tapped.pop(idx, None)
            if not tapped:
                p.__dict__.pop("_process", None)

        return undo


def _hook_emit(node: Any, fn: Callable[[list[Any]], None]) -> Callable[[], None]:
    """Call ``fn`` with what ``node`` emits from its own tasks; returns the undo.

    One wrapper per node dispatches to every hook (the events tap and the llm stream), so hooks
    come and go in any order without unwrapping each other.
    """
    hooks: list[Callable[[list[Any]], None]] | None = node.__dict__.get("_console_emit_hooks")
    if hooks is None:
        hooks = node.__dict__["_console_emit_hooks"] = []
        orig = node.ctx.emit
        node.__dict__["_console_emit_orig"] = orig

        def emit(events: list[Any]) -> bool:
            if events:
                for hook in hooks:
                    hook(events)
            return orig(events)  # False: refused by a full queue (the node counts it)

        node.ctx.emit = emit
    hooks.append(fn)

    def undo() -> None:
        if fn in hooks:
            hooks.remove(fn)
        if not hooks and node.__dict__.get("_console_emit_hooks") is hooks:
            node.ctx.emit = node.__dict__.pop("_console_emit_orig")
            del node.__dict__["_console_emit_hooks"]

    return undo
