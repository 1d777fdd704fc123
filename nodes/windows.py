"""Window nodes: keyed, event-time windows with aggregates, state that survives restarts (``window``).

One node type, three choices: *which window* (``kind``), *which aggregate* (``aggregate``) and
*when to emit* (``emit``)::

    - {id: avg, type: window, input: temp, kind: tumbling, size: 10s, aggregate: mean}
    - {id: stats, type: window, input: temp, kind: hopping, size: 1m, hop: 10s,
       aggregate: [mean, p90, max], allowed_lateness: 5s, emit: early, early_every: 2s}
"""

from __future__ import annotations

import heapq
import json
import math
import re
from bisect import bisect_right, insort
from collections import deque
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gateway.api import Duration, Event, Expression, NodeOptions, Operator, check_expression, register

__all__ = ["Window", "WindowOptions"]

_PCT = re.compile(r"^p(\d{1,2}(?:\.\d+)?|100)$")
_PLAIN_AGGS = ("count", "sum", "min", "max", "mean", "stddev", "first", "last", "collect")
_NUMERIC = {"sum", "min", "max", "mean", "stddev"}
_SNAPSHOT_VERSION = 1
_META = "#"  # snapshot entry holding the watermark; every other entry is "k:<key>"


class WindowOptions(NodeOptions):
    type: Literal["window"]
    kind: Literal["tumbling", "hopping", "sliding", "count", "session"] = Field(
        description="tumbling: fixed, back to back; hopping: fixed, overlapping every `hop`; sliding: the "
        "`size` before each reading; count: the latest `count` readings; session: readings "
        "closer than `gap`."
    )
    size: Duration | None = Field(None, description="Window length (tumbling, hopping, sliding).")
    hop: Duration | None = Field(None, description="Hopping: distance between window starts (alias: slide).")
    slide: Duration | None = Field(None, description="Alias of `hop`.")
    count: int | None = Field(None, ge=1, description="Count windows: how many readings a window holds.")
    every: int | None = Field(
        None,
        ge=1,
        description="Count windows: emit every N readings; default 1 "
        "(the latest `count`, on each reading); = count: tumbling.",
    )
    gap: Duration | None = Field(None, description="Session: a silence this long (event time) ends a session.")
    key: str | None = Field(None, description="CEL expression for the grouping key; default: the event key.")
    field: str | None = Field(None, description="For object readings: the field to aggregate.")
    aggregate: str | list[str] = Field(
        "mean",
        description="One name, or a list: count, sum, min, max, mean, stddev, p50, p90, p99 (any pNN), "
        "first, last, collect. One name (not a list) makes the output value that number.",
    )
    collect_max: int = Field(
        100, ge=1, le=100_000, description="collect: keep at most this many readings (the latest by event time)."
    )
    allowed_lateness: Duration = Field(
        0.0,
        description="How far behind the newest event time a reading may "
        "be and still count; the watermark lags by this much.",
    )
    idle_timeout: Duration | None = Field(
        None, description="After this long without input (monotonic clock) a source stops holding the watermark back."
    )
    emit: Literal["final", "early"] = Field(
        "final", description="final: once, when the window closes; early: also updates while it is open."
    )
    early_every: Duration = Field(0.0, description="emit: early — at most this often (0: on every update).")
    route_late: bool = Field(
        False,
        description="Pass readings too late for any window downstream, with "
        "meta.late = true (else they are counted and dropped).",
    )

    @field_validator("aggregate")
    @classmethod
    def _known_aggregates(cls, v: str | list[str]) -> str | list[str]:
        names = [v] if isinstance(v, str) else v
        if not names:
            raise ValueError("give at least one aggregate")
        for n in names:
            if n not in _PLAIN_AGGS and not _PCT.match(n):
                raise ValueError(
                    f"unknown aggregate {n!r}; use {', '.join(_PLAIN_AGGS)} or a percentile such as p50, p90, p99"
                )
        if len(set(names)) != len(names):
            raise ValueError("an aggregate is listed twice")
        return v

    @model_validator(mode="after")
    def _kind_options(self) -> WindowOptions:
        k = self.kind
        if self.hop is not None and self.slide is not None:
            raise ValueError("give `hop` or `slide`, not both")
        hop = self.hop if self.hop is not None else self.slide
        need = {
            "tumbling": ("size",),
            "hopping": ("size", "hop"),
            "sliding": ("size",),
            "count": ("count",),
            "session": ("gap",),
        }[k]
        for name in need:
            value = hop if name == "hop" else getattr(self, name)
            if value is None or value == 0:
                raise ValueError(f"kind {k} needs `{name}` (> 0)")
        for name, kinds in (
            ("size", ("tumbling", "hopping", "sliding")),
            ("hop", ("hopping",)),
            ("count", ("count",)),
            ("every", ("count",)),
            ("gap", ("session",)),
        ):
            value = hop if name == "hop" else getattr(self, name)
            if value is not None and k not in kinds:
                raise ValueError(f"`{name}` is for kind {' or '.join(kinds)}, not {k}")
        if k == "hopping" and hop > self.size:  # type: ignore[operator]
            raise ValueError("`hop` must not exceed `size` (readings between windows would be lost)")
        if k == "count" and self.every is not None and self.every > self.count:  # type: ignore[operator]
            raise ValueError("`every` must not exceed `count`")
        return self


class _Spec:
    """Which accumulator parts the requested aggregates need."""

    __slots__ = (
        "collect_max",
        "names",
        "numeric",
        "pcts",
        "scalar",
        "want_first",
        "want_last",
        "want_minmax",
        "want_std",
        "want_values",
    )

    def __init__(self, aggregate: str | list[str], collect_max: int):
        self.scalar = isinstance(aggregate, str)
        self.names: list[str] = [aggregate] if isinstance(aggregate, str) else list(aggregate)
        self.pcts = [(n, float(n[1:])) for n in self.names if _PCT.match(n)]
        self.numeric = bool(_NUMERIC.intersection(self.names) or self.pcts)
        self.want_values = bool(self.pcts)
        self.want_minmax = "min" in self.names or "max" in self.names
        self.want_std = "stddev" in self.names
        self.want_first = "first" in self.names
        self.want_last = "last" in self.names
        self.collect_max = collect_max if "collect" in self.names else 0


class _Acc:
    """A mergeable partial aggregate of one window."""

    __slots__ = ("clean", "coll", "first", "hi", "last", "lo", "m2", "max", "mean", "min", "n", "sum", "values")

    def __init__(self) -> None:
        # the batch path's bookkeeping: False once changed since the last snapshot (then its key
        # is in the node's dirty set); lo/hi bound the readings that certainly fall in this window
        self.clean = True
        self.lo = math.inf
        self.hi = -math.inf
        self.n = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.mean = 0.0
        self.m2 = 0.0
        self.first: list[Any] | None = None  # [ts, seq, value]
        self.last: list[Any] | None = None
        self.values: list[float] | None = None
        self.coll: list[list[Any]] | None = None  # min-heap of [ts, seq, value], the latest collect_max

    def add(self, spec: _Spec, ts: float, seq: int, v: Any) -> None:
        self.n += 1
        if spec.numeric:
            self.sum += v
            if spec.want_minmax:
                if v < self.min:
                    self.min = v
                if v > self.max:
                    self.max = v
            if spec.want_std:
                d = v - self.mean
                self.mean += d / self.n
                self.m2 += d * (v - self.mean)
            if spec.want_values:
                if self.values is None:
                    self.values = [v]
                else:
                    self.values.append(v)
        if spec.want_first and (self.first is None or ts < self.first[0]):
            self.first = [ts, seq, v]
        if spec.want_last and (self.last is None or ts >= self.last[0]):
            self.last = [ts, seq, v]
        if spec.collect_max:
            if self.coll is None:
                self.coll = []
            if len(self.coll) < spec.collect_max:
                heapq.heappush(self.coll, [ts, seq, v])
            elif [ts, seq] > self.coll[0][:2]:
                heapq.heapreplace(self.coll, [ts, seq, v])

    def merge(self, spec: _Spec, o: _Acc) -> None:
        if o.n == 0:
            return
        n = self.n + o.n
        if spec.want_std:
            d = o.mean - self.mean
            self.m2 += o.m2 + d * d * self.n * o.n / n
            self.mean += d * o.n / n
        self.n = n
        self.sum += o.sum
        self.min = min(self.min, o.min)
        self.max = max(self.max, o.max)
        if o.first is not None and (self.first is None or o.first[:2] < self.first[:2]):
            self.first = o.first
        if o.last is not None and (self.last is None or o.last[:2] > self.last[:2]):
            self.last = o.last
        if o.values is not None:
            self.values = (self.values or []) + o.values
        if o.coll is not None:
            both = (self.coll or []) + o.coll
            self.coll = heapq.nlargest(spec.collect_max, both, key=lambda c: (c[0], c[1]))
            heapq.heapify(self.coll)

    def result(self, spec: _Spec) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in spec.names:
            if name == "count":
                out[name] = float(self.n)
            elif name == "sum":
                out[name] = self.sum
            elif name == "min":
                out[name] = self.min
            elif name == "max":
                out[name] = self.max
            elif name == "mean":
                out[name] = self.sum / self.n
            elif name == "stddev":
                out[name] = math.sqrt(max(0.0, self.m2 / self.n))
            elif name == "first":
                out[name] = self.first[2] if self.first else None
            elif name == "last":
                out[name] = self.last[2] if self.last else None
            elif name == "collect":
                out[name] = [{"ts": c[0], "value": c[2]} for c in sorted(self.coll or [], key=lambda c: (c[0], c[1]))]
        if spec.pcts:
            s = sorted(self.values or ())
            for name, q in spec.pcts:
                out[name] = _percentile(s, q)
        return out

    def plain(self) -> list[Any]:
        # copies: the store serialises a snapshot later, while this accumulator keeps changing
        return [
            self.n,
            self.sum,
            _enc(self.min),
            _enc(self.max),
            self.mean,
            self.m2,
            self.first,
            self.last,
            None if self.values is None else list(self.values),
            None if self.coll is None else list(self.coll),
        ]

    @classmethod
    def from_plain(cls, p: list[Any]) -> _Acc:
        a = cls()
        a.n, a.sum, mn, mx, a.mean, a.m2, a.first, a.last, a.values, a.coll = p
        a.min, a.max = _dec(mn), _dec(mx)
        if a.values is not None:
            a.values = list(a.values)
        if a.coll is not None:
            a.coll = [list(c) for c in a.coll]
            heapq.heapify(a.coll)
        return a


def _enc(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # JSON has no infinity


def _dec(x: float | str) -> float:
    return float(x)


def _percentile(s: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (NumPy's default), ``q`` in 0–100."""
    if not s:
        return None
    pos = q / 100.0 * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@register
class Window(Operator):
    """Group readings per key into event-time windows and emit one aggregate event per window.

    **Time.** Event time is ``event.ts``. The watermark is the newest event time seen minus
    ``allowed_lateness``, tracked per source (``event.source``) and taken as the minimum over
    sources; it never goes back. A source that declares its own progress (the ``kafka`` source:
    the slowest of its partitions) counts with that instead of its readings' times. A source
    that sent nothing for ``idle_timeout`` (monotonic clock, checked by ``on_timer``) stops
    holding it back; when every source is idle the watermark moves on with the monotonic clock,
    so the last windows of a quiet sensor still close. Wall-clock jumps change nothing: no wall
    clock is read.

    **Closing and lateness.** A window ``[start, end)`` closes, and emits its final result, once
    the watermark reaches ``end``. A reading is *late* when every window it belongs to has closed
    (tumbling/hopping), or when its time is below the watermark (sliding, session); late readings
    are counted (``late``, and ``dropped`` unless routed) and, with ``route_late``, passed on
    unchanged with ``meta.late = true``. Readings behind the newest time but within
    ``allowed_lateness`` land in their window; with ``emit: early`` the window is re-emitted with
    the update.

    **Kinds.** tumbling/hopping windows are aligned to the epoch (``start = k·hop``). A sliding
    window is defined by each distinct reading time ``t``: ``(t − size, t]``, closed once the
    watermark passes ``t``. A session is ``[first, last + gap)`` and merges with any reading
    closer than ``gap``. Count windows are arrival-ordered (no event time, never late): every
    ``every`` readings, the latest ``count`` of the key, once ``count`` have arrived.

    **Output.** One event per window: the window's key, ``ts`` = window end, ``source`` = node id,
    and ``value`` a mapping of the aggregates plus ``window_start``, ``window_end`` and ``count``.
    When ``aggregate`` is one name (``aggregate: mean``, not ``[mean]``) the value is that
    aggregate alone — a plain number that a threshold or z-score node can take directly — and the
    window bounds and count are only in ``meta``. ``meta`` always holds ``window_start``,
    ``window_end``, ``count`` and ``final`` (false for early updates). Numbers are floats;
    ``stddev`` is the population standard deviation; percentiles interpolate linearly between
    ranks; ``first``/``last`` are by event time (ties: arrival order); ``collect`` is the latest
    ``collect_max`` readings as ``{ts, value}`` in time order.

    **State.** :meth:`snapshot` gives plain data: one entry per key (``k:<key>``) and one for
    the watermark, so the engine writes only the keys that changed; :meth:`restore` takes it back.
    """

    keeps_watermark = True
    Options = WindowOptions
    options: WindowOptions

    @classmethod
    def check(cls, options: NodeOptions, config: Any) -> list[tuple[str, str]]:
        o: WindowOptions = options  # type: ignore[assignment]
        if o.key is not None and (problem := check_expression(o.key)):
            return [("key", problem)]
        return []

    def __init__(self, options: WindowOptions, ctx: Any):
        super().__init__(options, ctx)
        o = options
        self._spec = _Spec(o.aggregate, o.collect_max)
        self._kind = o.kind
        self._size = float(o.size or 0.0)
        hop = o.hop if o.hop is not None else o.slide
        self._hop = float(hop) if hop is not None else self._size
        self._gap = float(o.gap or 0.0)
        self._count = o.count or 0
        self._every = o.every or 1
        self._lateness = float(o.allowed_lateness)
        self._key = Expression(o.key) if o.key else None
        self._field = o.field
        self._early = o.emit == "early"
        self._early_every = float(o.early_every)
        self._scalar_mean = o.aggregate == "mean"
        self.n_late = 0
        self._seq = 0
        self._rid = f"{ctx.pipeline}/{self.id}/"  # result ids: pipeline/node/key/start/end
        # watermark, per source
        self._wm = -math.inf
        self._src_max: dict[str, float] = {}
        self._src_n: dict[str, int] = {}
        self._src_seen: dict[str, tuple[int, float]] = {}  # source -> (count at last tick, monotonic time)
        self._idle: set[str] = set()
        self._declared: set[str] = set()  # sources whose progress comes from on_watermark, not their readings
        # windows
        self._keys: dict[str, Any] = {}  # key -> kind-specific state
        self._cur: dict[str, _Acc] = {}  # tumbling, batch path: key -> its newest open window
        self._heap: list[tuple[float, str, float]] = []  # (close at, key, start); stale entries are skipped
        # tumbling and hopping: the starts of open windows (a heap) and the keys with a window at each
        self._starts: list[float] = []
        self._bucket: dict[float, list[str]] = {}
        self._dirty: set[str] = set()  # keys changed since the last snapshot
        self._plain: dict[str, Any] = {}  # cached snapshot entries
        self._early_dirty: dict[tuple[str, float], None] = {}
        self._last_early = -math.inf
        # the inlined batch path covers tumbling windows of plain aggregates, emitted when final
        self._fast = (
            self._kind == "tumbling"
            and not self._early
            and self._key is None
            and self._field is None
            and set(self._spec.names) <= {"count", "sum", "min", "max", "mean"}
        )
        self._add = {
            "tumbling": self._add_fixed,
            "hopping": self._add_fixed,
            "sliding": self._add_sliding,
            "session": self._add_session,
            "count": self._add_count,
        }[self._kind]

    # --- input ---------------------------------------------------------------------------

    def _value(self, ev: Event) -> Any:
        v = ev.value
        if self._field is not None:
            if type(v) is not dict or self._field not in v:
                raise ValueError(f"window {self.id}: reading has no field {self._field!r}")
            v = v[self._field]
        if self._spec.numeric:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise TypeError(f"window {self.id}: {', '.join(self._spec.names)} need a finite number, got {v!r}")
            v = float(v)
        return v

    def process_batch(self, batch: list[Event]) -> list[Event]:
        """A batch in, a batch out; the common case (tumbling, number readings) inlined for speed.

        Anything unusual (a key expression, a field, late readings, early emission, other
        aggregates, non-float values) goes through :meth:`on_event`, which defines the behaviour;
        the property tests run both paths against the same reference.
        """
        if not self._fast:
            return super().process_batch(batch)
        out: list[Event] = []
        keys = self._keys
        cur = self._cur
        starts = self._starts
        size = self._size
        src_max = self._src_max
        dirty = self._dirty
        lateness = self._lateness
        floor = math.floor
        track_n = self.options.idle_timeout is not None
        minmax = self._spec.want_minmax
        wm = self._wm
        route_late = self.options.route_late
        declared = self._declared
        n_late = 0
        last_src: str | None = None  # the source of the newest maximum, and that maximum
        last_max = -math.inf
        # ``seq`` orders readings for first/last/collect, which this path does not serve: not counted here
        for ev in batch:
            ts = ev.ts
            v = ev.value
            if type(ts) is float and type(v) is float and v - v + ts - ts == 0.0:  # finite floats
                key = ev.key
                acc = cur.get(key)
                if acc is None or not acc.lo <= ts < acc.hi:
                    # not inside the key's newest open window: place it the way on_event does
                    start = floor(ts / size) * size
                    end = start + size
                    if end <= wm:
                        src = ev.source
                        m = src_max.get(src)
                        if route_late or m is None or ts > m:
                            acc = None  # routed to the side output, or it moves a source's maximum: below
                        else:
                            n_late += 1  # late and dropped, as on_event does
                            if track_n:
                                self._src_n[src] = self._src_n.get(src, 0) + 1
                                if self._idle:
                                    self._idle.discard(src)
                            continue
                    else:
                        wins = keys.get(key)
                        if wins is None:
                            wins = keys[key] = {}
                        acc = wins.get(start)
                        if acc is None:
                            acc = wins[start] = _Acc()
                            self._open(key, start)
                        if acc.hi == -math.inf:
                            # readings well inside [start, end) need no floor() to find this window again
                            margin = (abs(start) + abs(end)) * 1e-15
                            acc.lo = start + margin
                            acc.hi = end - margin
                        c = cur.get(key)
                        if c is None or c.hi < acc.lo:
                            cur[key] = acc
                if acc is not None:
                    acc.n += 1
                    acc.sum += v
                    if minmax:
                        if v < acc.min:
                            acc.min = v
                        if v > acc.max:
                            acc.max = v
                    if acc.clean:
                        acc.clean = False
                        dirty.add(key)
                    src = ev.source
                    if track_n:
                        self._src_n[src] = self._src_n.get(src, 0) + 1
                        if self._idle:
                            self._idle.discard(src)
                    if src is last_src:
                        if ts <= last_max:
                            continue
                        m = last_max
                    else:
                        m = src_max.get(src)
                    if m is None or ts > m:
                        if declared and src in declared:
                            last_src, last_max = src, math.inf  # its progress comes from on_watermark
                            continue
                        src_max[src] = last_max = ts
                        last_src = src
                        new = (
                            ts - lateness
                            if len(src_max) == 1 and not self._idle and not declared
                            else self._watermark()
                        )
                        if new > wm:
                            wm = new  # self._wm catches up below, or in _advance
                            if starts and starts[0] + size <= wm:
                                self._advance(wm, out)
                    continue
            # the general path: validation errors, late readings
            if wm > self._wm:
                self._wm = wm
            try:
                r = self.on_event(ev)
            except Exception as exc:  # node boundary: dead-letter and go on
                self.fail(ev, exc)
                r = None
            wm = self._wm
            last_src = None  # on_event may have moved a source's maximum
            if r is not None:
                if type(r) is list:
                    out.extend(r)
                else:
                    out.append(r)  # type: ignore[arg-type]
        if wm > self._wm:
            self._wm = wm
        if n_late:
            self.n_late += n_late
            self.n_dropped += n_late
        return out

    def on_event(self, event: Event) -> Event | list[Event] | None:
        ts = event.ts
        if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
            raise ValueError(f"window {self.id}: event time {ts!r} is not a finite number")
        ts = float(ts)
        key = event.key if self._key is None else str(self._key(event))
        v = self._value(event)
        self._seq += 1
        out: list[Event] = []
        if not self._add(key, ts, self._seq, v, out):
            self.n_late += 1
            if self.options.route_late:
                out.append(Event(event.key, event.ts, event.value, event.source, {**(event.meta or {}), "late": True}))
            else:
                self.n_dropped += 1
        if self._kind != "count":
            src = event.source
            if self.options.idle_timeout is not None:
                self._src_n[src] = self._src_n.get(src, 0) + 1
                if src in self._idle:
                    self._idle.discard(src)
            m = self._src_max.get(src)
            if (m is None or ts > m) and src not in self._declared:
                self._src_max[src] = ts
                self._advance(self._watermark(), out)
        if not out:
            return None
        return out[0] if len(out) == 1 else out

    def on_watermark(self, source: str, progress: float) -> list[Event]:
        """``source`` declares its event-time progress (the slowest of its Kafka partitions, say):
        it counts for that source instead of the newest time among its readings."""
        out: list[Event] = []
        if self._kind == "count":
            return out
        self._declared.add(source)
        m = self._src_max.get(source)
        if progress > -math.inf and (m is None or progress > m):
            self._src_max[source] = progress
            if self.options.idle_timeout is not None:
                self._src_n[source] = self._src_n.get(source, 0) + 1
                self._idle.discard(source)
            self._advance(self._watermark(), out)
        return out

    def _watermark(self) -> float:
        if self._declared and not self._declared <= self._src_max.keys():
            return self._wm  # a source that declares its progress has not declared any yet
        active = [m for s, m in self._src_max.items() if s not in self._idle] if self._idle else self._src_max.values()
        return min(active) - self._lateness if active else self._wm

    def _touch(self, key: str, start: float) -> None:
        self._dirty.add(key)
        if self._early:
            self._early_dirty[(key, start)] = None

    # --- the kinds -------------------------------------------------------------------------

    def _add_fixed(self, key: str, ts: float, seq: int, v: Any, out: list[Event]) -> bool:
        size, hop, wm = self._size, self._hop, self._wm
        if hop == size:
            start = math.floor(ts / size) * size
            starts = [start] if start + size > wm else []
        else:
            k_hi = math.floor(ts / hop)
            k_lo = math.floor((ts - size) / hop)
            starts = [k * hop for k in range(k_lo, k_hi + 1) if k * hop <= ts < k * hop + size and k * hop + size > wm]
        if not starts:
            return False
        wins = self._keys.get(key)
        if wins is None:
            wins = self._keys[key] = {}
        spec = self._spec
        for start in starts:
            acc = wins.get(start)
            if acc is None:
                acc = wins[start] = _Acc()
                self._open(key, start)
            acc.add(spec, ts, seq, v)
            self._touch(key, start)
        if self._early and self._early_every == 0:
            self._emit_early(out)
        return True

    def _open(self, key: str, start: float) -> None:
        b = self._bucket.get(start)
        if b is None:
            self._bucket[start] = [key]
            heapq.heappush(self._starts, start)
        else:
            b.append(key)

    def _add_session(self, key: str, ts: float, seq: int, v: Any, out: list[Event]) -> bool:
        if ts < self._wm:
            return False
        gap, spec = self._gap, self._spec
        sessions = self._keys.get(key)
        if sessions is None:
            sessions = self._keys[key] = []
        merged = _Acc()
        merged.add(spec, ts, seq, v)
        start, last = ts, ts
        keep = []
        for s in sessions:  # [start, last, acc]
            if s[0] < ts + gap and ts < s[1] + gap:
                start, last = min(start, s[0]), max(last, s[1])
                s[2].merge(spec, merged)
                merged = s[2]
            else:
                keep.append(s)
        keep.append([start, last, merged])
        keep.sort(key=lambda s: s[0])
        self._keys[key] = keep
        heapq.heappush(self._heap, (last + gap, key, start))
        self._touch(key, start)
        if self._early and self._early_every == 0:
            self._emit_early(out)
        return True

    def _add_sliding(self, key: str, ts: float, seq: int, v: Any, out: list[Event]) -> bool:
        if ts < self._wm:
            return False
        st = self._keys.get(key)
        if st is None:
            st = self._keys[key] = {"b": [], "p": set()}
        insort(st["b"], [ts, seq, v])
        if ts not in st["p"]:
            st["p"].add(ts)
            # closes once the watermark passes ts; the heap pops at wm >= close, so nudge past it
            heapq.heappush(self._heap, (ts, key, ts - self._size))
        self._touch(key, ts - self._size)
        if self._early and self._early_every == 0:
            self._emit_early(out)
        return True

    def _add_count(self, key: str, ts: float, seq: int, v: Any, out: list[Event]) -> bool:
        st = self._keys.get(key)
        if st is None:
            st = self._keys[key] = [deque(maxlen=self._count), 0]
        st[0].append([ts, seq, v])
        st[1] += 1
        self._dirty.add(key)
        if len(st[0]) == self._count and st[1] >= self._every:
            st[1] = 0
            acc = _Acc()
            for t, s, x in st[0]:
                acc.add(self._spec, t, s, x)
            times = [e[0] for e in st[0]]
            out.append(self._event(key, min(times), max(times), acc, True))
        return True

    def _sliding_acc(self, st: dict[str, Any], t: float) -> _Acc:
        b = st["b"]
        lo = bisect_right(b, [t - self._size, math.inf])
        hi = bisect_right(b, [t, math.inf])
        acc = _Acc()
        for e in b[lo:hi]:
            acc.add(self._spec, e[0], e[1], e[2])
        return acc

    # --- closing ---------------------------------------------------------------------------

    def _advance(self, wm: float, out: list[Event]) -> None:
        if wm <= self._wm:
            return
        self._wm = wm
        if self._kind in ("tumbling", "hopping"):  # the common case, in a loop of its own
            starts, size = self._starts, self._size
            keys, cur, dirty, event, pop = self._keys, self._cur, self._dirty, self._event, heapq.heappop
            early = self._early_dirty if self._early else None
            while starts and starts[0] + size <= wm:
                start = pop(starts)
                end = start + size
                span = f"/{start!r}/{end!r}"  # every key's result id in this bucket ends so: made once
                for key in sorted(self._bucket.pop(start)):  # by key, whatever order they opened in
                    wins = keys.get(key)
                    acc = wins.pop(start, None) if wins else None
                    if acc is None:
                        continue
                    if not wins:
                        del keys[key]
                    if cur.get(key) is acc:
                        del cur[key]
                    out.append(event(key, start, end, acc, True, span))
                    dirty.add(key)
                    if early is not None:
                        early.pop((key, start), None)
            return
        heap = self._heap
        sliding = self._kind == "sliding"
        while heap and (heap[0][0] < wm if sliding else heap[0][0] <= wm):
            end, key, start = heapq.heappop(heap)
            if self._kind == "session":
                sessions = self._keys.get(key) or []
                hit = next((s for s in sessions if s[0] == start and s[1] + self._gap == end), None)
                if hit is None:
                    continue  # merged or extended since: a newer heap entry stands for it
                sessions.remove(hit)
                if not sessions:
                    del self._keys[key]
                out.append(self._event(key, start, end, hit[2], True))
            else:
                st = self._keys.get(key)
                if st is None or end not in st["p"]:
                    continue
                st["p"].discard(end)
                out.append(self._event(key, start, end, self._sliding_acc(st, end), True))
                b = st["b"]
                del b[: bisect_right(b, [start, math.inf])]  # later windows start after this one's start
                if not st["p"] and not b:
                    del self._keys[key]
            self._dirty.add(key)
            self._early_dirty.pop((key, start), None)

    def on_timer(self, now: float) -> list[Event]:
        """Idle sources and periodic early updates; ``now`` is the monotonic clock."""
        out: list[Event] = []
        if self._kind != "count":
            timeout = self.options.idle_timeout
            for src in self._src_max:
                n = self._src_n.get(src, 0)
                seen = self._src_seen.get(src)
                if seen is None or seen[0] != n:
                    self._src_seen[src] = (n, now)
            if timeout is not None and self._src_seen:
                idle = {s for s, (_, t) in self._src_seen.items() if now - t >= timeout}
                if idle != self._idle:
                    self._idle = idle
                if idle and len(idle) == len(self._src_max):
                    quiet = max(t for _, t in self._src_seen.values())
                    self._advance(max(self._src_max.values()) + (now - quiet) - self._lateness, out)
                elif idle:
                    self._advance(self._watermark(), out)
        if self._early and self._early_every > 0 and now - self._last_early >= self._early_every:
            self._last_early = now
            self._emit_early(out)
        return out

    def _emit_early(self, out: list[Event]) -> None:
        if not self._early_dirty:
            return
        for key, start in self._early_dirty:
            st = self._keys.get(key)
            if st is None:
                continue
            if self._kind in ("tumbling", "hopping"):
                acc = st.get(start)
                if acc is not None:
                    out.append(self._event(key, start, start + self._size, acc, False))
            elif self._kind == "session":
                for s in st:
                    if s[0] == start:
                        out.append(self._event(key, s[0], s[1] + self._gap, s[2], False))
            elif self._kind == "sliding":
                t = start + self._size
                if t in st["p"]:
                    out.append(self._event(key, start, t, self._sliding_acc(st, t), False))
        self._early_dirty.clear()

    def _event(self, key: str, start: float, end: float, acc: _Acc, final: bool, span: str | None = None) -> Event:
        # the de-duplication key of this result: a restart that computes the window again gives the same id;
        # ``span`` is its ``/start/end`` part when the caller made it already
        if span is None:
            span = f"/{start!r}/{end!r}"
        rid = f"{self._rid}{key}{span}" if final else f"{self._rid}{key}{span}@{acc.n}"
        meta = {"window_start": start, "window_end": end, "count": float(acc.n), "final": final, "result_id": rid}
        if self._scalar_mean:  # the common `aggregate: mean`, without building a mapping
            return Event(key, end, acc.sum / acc.n, self.id, meta)
        res = acc.result(self._spec)
        if self._spec.scalar:
            value: Any = res[self._spec.names[0]]
        else:
            value = res
            res["window_start"] = start
            res["window_end"] = end
            res["count"] = float(acc.n)
        return Event(key, end, value, self.id, meta)

    # --- state -----------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        c = super().counters()
        c["late"] = self.n_late
        return c

    @property
    def watermark(self) -> float:
        return self._wm

    def open_windows(self) -> int:
        if self._kind in ("tumbling", "hopping", "session"):
            return sum(len(w) for w in self._keys.values())
        return len(self._keys)

    def _shape(self) -> str:
        """The options that decide what the saved windows mean."""
        o = self.options
        return json.dumps(
            [
                self._size,
                self._hop,
                self._gap,
                self._count,
                self._every,
                o.key,
                o.field,
                self._spec.names,
                o.collect_max,
            ]
        )

    def _plain_key(self, key: str) -> Any:
        st = self._keys.get(key)
        if st is None:
            return None
        if self._kind in ("tumbling", "hopping"):
            for acc in st.values():
                acc.clean = True  # saved as of now: the batch path marks it dirty again on change
            return {"w": [[start, acc.plain()] for start, acc in st.items()]}
        if self._kind == "session":
            return {"s": [[s[0], s[1], s[2].plain()] for s in st]}
        if self._kind == "sliding":
            return {"b": [list(e) for e in st["b"]], "p": sorted(st["p"])}
        return {"b": list(st[0]), "n": st[1]}

    def snapshot(self) -> dict[str, Any]:
        """Plain data: ``{"#": watermark and counters, "k:<key>": that key's windows}``.

        Entries of keys that did not change are the same objects as in the previous snapshot,
        so a caller can skip them by identity.
        """
        self.snapshot_changes()
        return dict(self._plain)

    def snapshot_changes(self) -> tuple[dict[str, Any], list[str]]:
        """The entries of :meth:`snapshot` changed since the last snapshot (of either kind), and
        the names of those removed: what a checkpoint must write, without the unchanged keys."""
        changed: dict[str, Any] = {}
        removed: list[str] = []
        for key in self._dirty:
            p = self._plain_key(key)
            name = "k:" + key
            if p is None:
                if self._plain.pop(name, None) is not None:
                    removed.append(name)
            else:
                self._plain[name] = changed[name] = p
        self._dirty.clear()
        meta = {
            "v": _SNAPSHOT_VERSION,
            "kind": self._kind,
            "shape": self._shape(),
            "wm": _enc(self._wm),
            "src": dict(self._src_max),
        }
        if not self._fast:
            meta["seq"] = self._seq  # orders buffered readings; the plain aggregates of the batch path need no order
        if self._plain.get(_META) != meta:
            self._plain[_META] = changed[_META] = meta
        return changed, removed

    def restore(self, state: Any) -> None:
        if not state:
            return
        meta = state.get(_META) or {}
        if meta.get("v") != _SNAPSHOT_VERSION or meta.get("kind") != self._kind or meta.get("shape") != self._shape():
            # windows of another size or aggregates cannot be continued; say so rather than mix them
            self.ctx.logger.warning(
                "window %s: the saved state is for other options (%s %s, format %s; now %s %s); starting empty",
                self.id,
                meta.get("kind"),
                meta.get("shape"),
                meta.get("v"),
                self._kind,
                self._shape(),
            )
            return
        self._wm = _dec(meta["wm"])
        self._src_max = {s: float(m) for s, m in meta.get("src", {}).items()}
        self._seq = int(meta.get("seq", 0))
        self._keys.clear()
        self._cur.clear()
        self._heap.clear()
        self._starts.clear()
        self._bucket.clear()
        for entry, p in state.items():
            if not entry.startswith("k:"):
                continue
            key = entry[2:]
            if self._kind in ("tumbling", "hopping"):
                wins = {float(start): _Acc.from_plain(a) for start, a in p["w"]}
                self._keys[key] = wins
                for start in wins:
                    self._open(key, start)
            elif self._kind == "session":
                sessions = [[float(s), float(last), _Acc.from_plain(a)] for s, last, a in p["s"]]
                self._keys[key] = sessions
                for s in sessions:
                    self._heap.append((s[1] + self._gap, key, s[0]))
            elif self._kind == "sliding":
                pend = {float(t) for t in p["p"]}
                self._keys[key] = {"b": [list(e) for e in p["b"]], "p": pend}
                for t in pend:
                    self._heap.append((t, key, t - self._size))
            else:
                self._keys[key] = [deque((list(e) for e in p["b"]), maxlen=self._count), int(p["n"])]
        heapq.heapify(self._heap)
        self._plain = dict(state)
        self._dirty.clear()
