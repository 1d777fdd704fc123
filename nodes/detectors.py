"""Detector nodes: turn readings into alert events.

``threshold`` (hysteresis, minimum duration), ``zscore`` and ``ewma`` (deviation from a learned
per-key baseline, after a warm-up), ``rate_of_change``, ``stale`` (no reading for a while; fires
from the monotonic timer, not from an event) and ``flatline`` (a value stuck).

An alert event's value is a mapping: ``state`` (``raised`` or ``cleared``), a stable
``alert_key`` (``<pipeline>/<node>/<event key>``), ``severity``, the triggering ``reading``
and a human-readable ``rule`` text, so an alert is meaningful without any model. Only
transitions produce events: one ``raised``, later one ``cleared``.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Literal

from pydantic import Field, model_validator

from gateway.api import Duration, Event, NodeOptions, Operator, register

__all__ = ["Ewma", "Flatline", "RateOfChange", "Stale", "Threshold", "ZScore"]

Severity = Literal["info", "warning", "critical"]


class _DetectorOptions(NodeOptions):
    field: str | None = Field(None, description="For object readings: the field to test.")
    severity: Severity = "warning"
    name: str | None = Field(None, description="What is measured, for the rule text; default: the key.")


class _Detector(Operator):
    """What every detector shares: reading a number out of an event, and shaping an alert."""

    options: Any

    def __init__(self, options: Any, ctx: Any):
        super().__init__(options, ctx)
        self._alert_prefix = f"{ctx.pipeline}/{options.id}/"  # of each alert key and result id

    def _reading(self, event: Event) -> float:
        v = event.value
        f = self.options.field
        if f is not None:
            if type(v) is not dict or f not in v:
                raise ValueError(f"reading has no field {f!r}")
            v = v[f]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise TypeError(f"{self.type_name} needs a finite number, got {v!r}")
        return float(v)

    def _name(self, key: str) -> str:
        return self.options.name or key

    def _alert(
        self,
        key: str,
        ts: float,
        state: str,
        reading: Any,
        rule: str,
        meta: dict[str, Any] | None = None,
        *,
        stable: bool = True,
        **extra: Any,
    ) -> Event:
        # The transition's own result id (a restart that replays the reading makes the same one),
        # never the id of the result it was computed from (a window's), which would make the
        # outbox take the alert for that result again; ``stable=False`` for a transition made
        # by a timer, which a restart does not repeat at the same time.
        meta = dict(meta) if meta else {}
        if stable:
            meta["result_id"] = f"{self._alert_prefix}{key}/{ts!r}/{state}"
        else:
            meta.pop("result_id", None)
        value = {
            "state": state,
            "alert_key": self._alert_prefix + key,
            "severity": self.options.severity,
            "reading": reading,
            "rule": rule,
        }
        if extra:
            value.update(extra)
        return Event(key, ts, value, self.id, meta or None)


# --- threshold -----------------------------------------------------------------------------


class ThresholdOptions(_DetectorOptions):
    type: Literal["threshold"]
    above: float | None = Field(None, description="Raise when the reading goes above this.")
    below: float | None = Field(None, description="Raise when the reading goes below this.")
    clear_below: float | None = Field(
        None, description="With `above`: clear only below this (hysteresis); default: `above`."
    )
    clear_above: float | None = Field(None, description="With `below`: clear only above this; default: `below`.")
    min_duration: Duration = Field(
        0.0,
        description="Raise only once the limit has been crossed for this long "
        "(event time), e.g. 30s; a brief spike raises nothing.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ThresholdOptions:
        if self.above is None and self.below is None:
            raise ValueError("give `above` and/or `below`")
        if self.clear_below is not None and (self.above is None or self.clear_below > self.above):
            raise ValueError("`clear_below` goes with `above` and must not exceed it")
        if self.clear_above is not None and (self.below is None or self.clear_above < self.below):
            raise ValueError("`clear_above` goes with `below` and must not be under it")
        return self


@register
class Threshold(_Detector):
    """Raise an alert when a reading crosses a limit (for at least ``min_duration``); clear it once
    back past the clear level.

    Readings in between pass nothing downstream, so a sensor hovering at the limit cannot cause
    an alert storm.
    """

    Options = ThresholdOptions
    options: ThresholdOptions

    def __init__(self, options: ThresholdOptions, ctx: Any):
        super().__init__(options, ctx)
        o = options
        self._hi = o.above
        self._hi_clear = o.clear_below if o.clear_below is not None else o.above
        self._lo = o.below
        self._lo_clear = o.clear_above if o.clear_above is not None else o.below
        self._active: dict[str, str] = {}  # key -> "high" | "low"
        self._since: dict[str, tuple[str, float]] = {}  # key -> (side, event time the crossing began)
        # (key, side) -> (alert key, rule text): the same few over and over under alert load
        self._texts: dict[tuple[str, str], tuple[str, str]] = {}
        self._severity = o.severity

    def _crossing(
        self, key: str, ts: float, state: str, reading: float, side: str, meta: dict[str, Any] | None
    ) -> Event:
        """The alert of a raise or a clear: what :meth:`_Detector._alert` makes, with the alert key
        and the rule text made once per key and side."""
        texts = self._texts.get((key, side))
        if texts is None:
            if len(self._texts) >= 4096:
                self._texts.clear()
            texts = self._texts[(key, side)] = (self._alert_prefix + key, self._rule_text(key, side))
        m = dict(meta) if meta else {}
        m["result_id"] = f"{self._alert_prefix}{key}/{ts!r}/{state}"
        value = {
            "state": state,
            "alert_key": texts[0],
            "severity": self._severity,
            "reading": reading,
            "rule": texts[1],
        }
        return Event(key, ts, value, self.id, m)

    def _rule_text(self, key: str, side: str) -> str:
        name = self._name(key)
        held = f" for {self.options.min_duration:g}s" if self.options.min_duration else ""
        if side == "high":
            extra = f" (clears below {self._hi_clear:g})" if self._hi_clear != self._hi else ""
            return f"{name} above {self._hi:g}{held}{extra}"
        extra = f" (clears above {self._lo_clear:g})" if self._lo_clear != self._lo else ""
        return f"{name} below {self._lo:g}{held}{extra}"

    def on_event(self, event: Event) -> Event | None:
        v = self._reading(event)
        key = event.key
        active = self._active.get(key)
        if active is None:
            side = (
                "high"
                if self._hi is not None and v > self._hi
                else "low"
                if self._lo is not None and v < self._lo
                else None
            )
            if side is None:
                self._since.pop(key, None)
                return None
            if self.options.min_duration:
                began = self._since.get(key)
                if began is None or began[0] != side:
                    self._since[key] = (side, event.ts)
                    return None
                if event.ts - began[1] < self.options.min_duration:
                    return None
                del self._since[key]
            self._active[key] = side
            return self._crossing(key, event.ts, "raised", v, side, event.meta)
        if (active == "high" and v < self._hi_clear) or (active == "low" and v > self._lo_clear):  # type: ignore[operator]
            del self._active[key]
            return self._crossing(key, event.ts, "cleared", v, active, event.meta)
        return None

    def process_batch(self, batch: list[Event]) -> list[Event]:
        # What on_event does, in one loop for the usual case (a finite float reading, no field, no
        # minimum duration); any other reading goes through on_event, as every event did before.
        o = self.options
        if o.field is not None or o.min_duration:
            return super().process_batch(batch)
        out: list[Event] = []
        active, since, crossing = self._active, self._since, self._crossing
        hi, hi_clear, lo, lo_clear = self._hi, self._hi_clear, self._lo, self._lo_clear
        for ev in batch:
            v = ev.value
            if type(v) is not float or v - v != 0.0:  # not a float, or NaN or an infinity
                try:
                    r = self.on_event(ev)
                except Exception as exc:  # node boundary: dead-letter and go on
                    self.fail(ev, exc)
                    continue
                if r is not None:
                    out.append(r)
                continue
            key = ev.key
            side = active.get(key)
            if side is None:
                if hi is not None and v > hi:
                    side = "high"
                elif lo is not None and v < lo:
                    side = "low"
                else:
                    if since:
                        since.pop(key, None)
                    continue
                active[key] = side
                out.append(crossing(key, ev.ts, "raised", v, side, ev.meta))
            elif (side == "high" and v < hi_clear) or (side == "low" and v > lo_clear):  # type: ignore[operator]
                del active[key]
                out.append(crossing(key, ev.ts, "cleared", v, side, ev.meta))
        return out

    def snapshot(self) -> Any:
        # the plain key -> side mapping of earlier versions, plus pending crossings when any
        snap: dict[str, Any] = dict(self._active)
        if self._since:
            snap["\x00since"] = {k: list(v) for k, v in self._since.items()}
        return snap

    def restore(self, state: Any) -> None:
        state = dict(state or {})
        since = state.pop("\x00since", {})
        self._active = state
        self._since = {k: (v[0], float(v[1])) for k, v in since.items()}


# --- z-score and EWMA --------------------------------------------------------------------------


class _BaselineOptions(_DetectorOptions):
    threshold: float = Field(
        3.0, gt=0, description="Raise when the reading is this many standard deviations from the baseline."
    )
    clear: float | None = Field(
        None, gt=0, description="Clear once back within this many; default: 80 % of `threshold`."
    )
    warmup: int = Field(30, ge=2, description="Readings per key learned before anything is judged.")
    min_std: float = Field(
        1e-9,
        ge=0,
        description="Floor for the standard deviation (a perfectly flat baseline would make any change infinite).",
    )

    @model_validator(mode="after")
    def _clear_under_threshold(self) -> _BaselineOptions:
        if self.clear is not None and self.clear > self.threshold:
            raise ValueError("`clear` must not exceed `threshold`")
        return self


class _Baseline(_Detector):
    """Judge each reading against the key's baseline *before* learning it."""

    options: Any
    baseline = ""  # how the baseline is kept, for the alert's rule text ("rolling", "EWMA")

    def __init__(self, options: Any, ctx: Any):
        super().__init__(options, ctx)
        self._active: dict[str, bool] = {}
        self._clear = options.clear if options.clear is not None else 0.8 * options.threshold

    def _stats(self, key: str) -> tuple[int, float, float] | None:
        raise NotImplementedError

    def _learn(self, key: str, v: float) -> None:
        raise NotImplementedError

    def on_event(self, event: Event) -> Event | None:
        v = self._reading(event)
        key = event.key
        st = self._stats(key)
        self._learn(key, v)
        if st is None or st[0] < self.options.warmup:
            return None
        _, mean, std = st
        z = (v - mean) / max(std, self.options.min_std)
        o = self.options
        extra = {"score": round(z, 3), "baseline": round(mean, 6), "std": round(std, 6)}
        rule = (
            f"{self._name(key)} more than {o.threshold:g} standard deviations from its {self.baseline} baseline "
            f"(clears within {self._clear:g})"
        )
        if not self._active.get(key):
            if abs(z) > o.threshold:
                self._active[key] = True
                return self._alert(key, event.ts, "raised", v, rule, event.meta, **extra)
        elif abs(z) < self._clear:
            del self._active[key]
            return self._alert(key, event.ts, "cleared", v, rule, event.meta, **extra)
        return None


class ZScoreOptions(_BaselineOptions):
    type: Literal["zscore"]
    window: int = Field(100, ge=2, description="The baseline is the mean and spread of the last N readings.")

    @model_validator(mode="after")
    def _warmup_fits(self) -> ZScoreOptions:
        if self.warmup > self.window:
            raise ValueError("`warmup` cannot exceed `window`")
        return self


@register
class ZScore(_Baseline):
    """Raise when a reading is far (in standard deviations) from the mean of the key's last N."""

    Options = ZScoreOptions
    options: ZScoreOptions
    baseline = "rolling"

    def __init__(self, options: ZScoreOptions, ctx: Any):
        super().__init__(options, ctx)
        self._win: dict[str, deque[float]] = {}
        self._sum: dict[str, tuple[float, float]] = {}

    def _stats(self, key: str) -> tuple[int, float, float] | None:
        w = self._win.get(key)
        if not w:
            return None
        n = len(w)
        mean = sum(w) / n
        var = sum((x - mean) ** 2 for x in w) / (n - 1) if n > 1 else 0.0
        return n, mean, math.sqrt(var)

    def _learn(self, key: str, v: float) -> None:
        w = self._win.get(key)
        if w is None:
            w = self._win[key] = deque(maxlen=self.options.window)
        w.append(v)

    def snapshot(self) -> Any:
        return {"windows": {k: list(w) for k, w in self._win.items()}, "active": sorted(self._active)}

    def restore(self, state: Any) -> None:
        state = state or {}
        self._win = {k: deque(v, maxlen=self.options.window) for k, v in state.get("windows", {}).items()}
        self._active = dict.fromkeys(state.get("active", []), True)


class EwmaOptions(_BaselineOptions):
    type: Literal["ewma"]
    alpha: float = Field(
        0.05,
        gt=0,
        le=1,
        description="Weight of each new reading in the moving mean and variance (smaller: a longer memory).",
    )


@register
class Ewma(_Baseline):
    """Raise when a reading is far from the key's exponentially weighted mean (and variance)."""

    Options = EwmaOptions
    options: EwmaOptions
    baseline = "EWMA"

    def __init__(self, options: EwmaOptions, ctx: Any):
        super().__init__(options, ctx)
        self._state: dict[str, list[float]] = {}  # key -> [n, mean, var]

    def _stats(self, key: str) -> tuple[int, float, float] | None:
        s = self._state.get(key)
        return None if s is None else (int(s[0]), s[1], math.sqrt(s[2]))

    def _learn(self, key: str, v: float) -> None:
        s = self._state.get(key)
        if s is None:
            self._state[key] = [1, v, 0.0]
            return
        n, mean, var = s
        # during warm-up a plain running mean, so the first readings do not dominate for long
        a = max(self.options.alpha, 1.0 / (n + 1))
        d = v - mean
        mean += a * d
        var = (1 - a) * (var + a * d * d)
        self._state[key] = [n + 1, mean, var]

    def snapshot(self) -> Any:
        return {"state": dict(self._state), "active": sorted(self._active)}

    def restore(self, state: Any) -> None:
        state = state or {}
        self._state = {k: list(v) for k, v in state.get("state", {}).items()}
        self._active = dict.fromkeys(state.get("active", []), True)


# --- rate of change ----------------------------------------------------------------------------


class RateOfChangeOptions(_DetectorOptions):
    type: Literal["rate_of_change"]
    max_rise: float | None = Field(None, gt=0, description="Raise when the reading rises faster than this per `per`.")
    max_fall: float | None = Field(None, gt=0, description="Raise when it falls faster than this per `per`.")
    per: Duration = Field(1.0, gt=0, description="The time unit of the limits, e.g. 1s, 1m.")

    @model_validator(mode="after")
    def _some_limit(self) -> RateOfChangeOptions:
        if self.max_rise is None and self.max_fall is None:
            raise ValueError("give `max_rise` and/or `max_fall`")
        return self


@register
class RateOfChange(_Detector):
    """Raise when a reading changes faster than allowed between two consecutive readings (event
    time); clear at the first change within the limits again."""

    Options = RateOfChangeOptions
    options: RateOfChangeOptions

    def __init__(self, options: RateOfChangeOptions, ctx: Any):
        super().__init__(options, ctx)
        self._last: dict[str, tuple[float, float]] = {}
        self._active: dict[str, str] = {}

    def _rule(self, key: str, side: str) -> str:
        o = self.options
        limit = o.max_rise if side == "rise" else o.max_fall
        return f"{self._name(key)} {'rises' if side == 'rise' else 'falls'} faster than {limit:g} per {o.per:g}s"

    def on_event(self, event: Event) -> Event | None:
        v = self._reading(event)
        key = event.key
        prev = self._last.get(key)
        if prev is not None and event.ts <= prev[0]:
            return None  # same or older event time: no rate to speak of; keep the newer point
        self._last[key] = (event.ts, v)
        if prev is None:
            return None
        rate = (v - prev[1]) / (event.ts - prev[0]) * self.options.per
        o = self.options
        side = (
            "rise"
            if o.max_rise is not None and rate > o.max_rise
            else "fall"
            if o.max_fall is not None and -rate > o.max_fall
            else None
        )
        active = self._active.get(key)
        if side is not None and active is None:
            self._active[key] = side
            return self._alert(key, event.ts, "raised", v, self._rule(key, side), event.meta, rate=rate)
        if side is None and active is not None:
            del self._active[key]
            return self._alert(key, event.ts, "cleared", v, self._rule(key, active), event.meta, rate=rate)
        return None

    def snapshot(self) -> Any:
        return {"last": {k: list(v) for k, v in self._last.items()}, "active": dict(self._active)}

    def restore(self, state: Any) -> None:
        state = state or {}
        self._last = {k: (float(v[0]), float(v[1])) for k, v in state.get("last", {}).items()}
        self._active = dict(state.get("active", {}))


# --- stale / heartbeat ---------------------------------------------------------------------------


class StaleOptions(_DetectorOptions):
    type: Literal["stale"]
    timeout: Duration = Field(
        gt=0,
        description="Raise when a key has sent nothing for this long (monotonic "
        "clock, so a wall-clock jump changes nothing).",
    )
    keys: list[str] = Field(
        default_factory=list,
        description="Keys expected from the start: they go stale even if they never sent anything.",
    )


@register
class Stale(_Detector):
    """Heartbeat: raise from the timer when a key went quiet for ``timeout``; clear on its next reading.

    Any event counts as a sign of life (its value is not inspected). Timed by the monotonic clock.
    """

    Options = StaleOptions
    options: StaleOptions

    def __init__(self, options: StaleOptions, ctx: Any):
        super().__init__(options, ctx)
        now = ctx.monotonic()
        self._seen: dict[str, float] = dict.fromkeys(options.keys, now)
        self._last_value: dict[str, Any] = {}
        self._active: set[str] = set()

    def _rule(self, key: str) -> str:
        return f"no reading from {self._name(key)} for {self.options.timeout:g}s"

    def on_event(self, event: Event) -> Event | None:
        key = event.key
        self._seen[key] = self.ctx.monotonic()
        self._last_value[key] = event.value
        if key in self._active:
            self._active.discard(key)
            return self._alert(key, event.ts, "cleared", event.value, self._rule(key), event.meta)
        return None

    def on_timer(self, now: float) -> list[Event]:
        out = []
        timeout = self.options.timeout
        for key, seen in self._seen.items():
            if key not in self._active and now - seen >= timeout:
                self._active.add(key)
                out.append(
                    self._alert(
                        key,
                        self.ctx.clock(),
                        "raised",
                        self._last_value.get(key),
                        self._rule(key),
                        stable=False,
                        silent_for=round(now - seen, 3),
                    )
                )
        return out

    def snapshot(self) -> Any:
        # Monotonic times mean nothing after a restart: keep only which keys exist and which are stale;
        # every known key's timeout starts again at restore.
        return {"keys": sorted(self._seen), "active": sorted(self._active)}

    def restore(self, state: Any) -> None:
        state = state or {}
        now = self.ctx.monotonic()
        for k in state.get("keys", []):
            self._seen.setdefault(k, now)
        self._active = set(state.get("active", []))


# --- flatline ----------------------------------------------------------------------------------


class FlatlineOptions(_DetectorOptions):
    type: Literal["flatline"]
    duration: Duration = Field(gt=0, description="Raise when the reading has not moved for this long (event time).")
    tolerance: float = Field(0.0, ge=0, description="Changes up to this much count as not moving.")
    min_readings: int = Field(3, ge=2, description="…and over at least this many readings.")


@register
class Flatline(_Detector):
    """Raise when a key's reading stays stuck (within ``tolerance``) for ``duration``; clear when it moves."""

    Options = FlatlineOptions
    options: FlatlineOptions

    def __init__(self, options: FlatlineOptions, ctx: Any):
        super().__init__(options, ctx)
        self._run: dict[str, list[float]] = {}  # key -> [value at start, start ts, readings]
        self._active: set[str] = set()

    def _rule(self, key: str) -> str:
        tol = f" (±{self.options.tolerance:g})" if self.options.tolerance else ""
        return f"{self._name(key)} stuck{tol} for {self.options.duration:g}s"

    def on_event(self, event: Event) -> Event | None:
        v = self._reading(event)
        key = event.key
        run = self._run.get(key)
        if run is None or abs(v - run[0]) > self.options.tolerance:
            self._run[key] = [v, event.ts, 1]
            if key in self._active:
                self._active.discard(key)
                return self._alert(key, event.ts, "cleared", v, self._rule(key), event.meta)
            return None
        run[2] += 1
        if (
            key not in self._active
            and event.ts - run[1] >= self.options.duration
            and run[2] >= self.options.min_readings
        ):
            self._active.add(key)
            return self._alert(key, event.ts, "raised", v, self._rule(key), event.meta, stuck_since=run[1])
        return None

    def snapshot(self) -> Any:
        return {"run": {k: list(v) for k, v in self._run.items()}, "active": sorted(self._active)}

    def restore(self, state: Any) -> None:
        state = state or {}
        self._run = {k: [float(v[0]), float(v[1]), int(v[2])] for k, v in state.get("run", {}).items()}
        self._active = set(state.get("active", []))
