"""Operator nodes: synchronous steps fused into their pipeline's chain (``filter``, ``map``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from gateway.api import Event, Expression, NodeOptions, Operator, check_expression, register

__all__ = ["Filter", "Map"]


class FilterOptions(NodeOptions):
    type: Literal["filter"]
    where: str = Field(description="CEL expression over value, key, ts, source, meta; keeps events where true.")


@register
class Filter(Operator):
    """Keep events for which ``where`` is true; the others are counted as dropped."""

    Options = FilterOptions
    options: FilterOptions

    @classmethod
    def check(cls, options: NodeOptions, config: Any) -> list[tuple[str, str]]:
        problem = check_expression(options.where)  # type: ignore[attr-defined]
        return [("where", problem)] if problem else []

    def __init__(self, options: FilterOptions, ctx: Any):
        super().__init__(options, ctx)
        self._where = Expression(options.where)

    def process_batch(self, batch: list[Event]) -> list[Event]:
        # Whole batch in one pass; anything unusual (an error, a non-boolean) replays it event by
        # event so each failure is dead-lettered on its own. Expressions are pure: replaying is safe.
        where, vf = self._where.evaluate, self._where.value_fn
        try:
            results = [vf(e.value) for e in batch] if vf is not None else [where(e) for e in batch]
        except Exception:  # judged per event below
            return super().process_batch(batch)
        out = [e for e, r in zip(batch, results, strict=True) if r is True]
        if len(out) != len(batch) and len(out) + sum(r is False for r in results) != len(batch):
            return super().process_batch(batch)  # a result neither True nor False (not count(False): 0.0 == False)
        self.n_dropped += len(batch) - len(out)
        return out

    def on_event(self, event: Event) -> Event | None:
        r = self._where(event)
        if r is True:
            return event
        if r is False:
            self.n_dropped += 1
            return None
        raise TypeError(f"filter {self.options.where!r} must give true or false, gave {r!r}")


class MapOptions(NodeOptions):
    type: Literal["map"]
    value: str | None = Field(None, description="CEL expression: the new value.")
    key: str | None = Field(None, description="CEL expression: the new key (a string).")
    fields: dict[str, str] | None = Field(
        None, description="Field name -> CEL expression: the new value becomes an object of these fields."
    )


@register
class Map(Operator):
    """Compute a new value (or fields) and/or key from each event."""

    Options = MapOptions
    options: MapOptions

    @classmethod
    def check(cls, options: NodeOptions, config: Any) -> list[tuple[str, str]]:
        o: MapOptions = options  # type: ignore[assignment]
        issues = []
        if o.value is None and o.key is None and not o.fields:
            issues.append(("", "map needs `value`, `key` or `fields`"))
        if o.value is not None and o.fields:
            issues.append(("fields", "give either `value` or `fields`, not both"))
        for name, src in (("value", o.value), ("key", o.key)):
            if src is not None and (problem := check_expression(src)):
                issues.append((name, problem))
        for name, src in (o.fields or {}).items():
            if problem := check_expression(src):
                issues.append((f"fields.{name}", problem))
        return issues

    def __init__(self, options: MapOptions, ctx: Any):
        super().__init__(options, ctx)
        self._value = Expression(options.value) if options.value else None
        self._key = Expression(options.key) if options.key else None
        self._fields = {k: Expression(v) for k, v in (options.fields or {}).items()}

    def process_batch(self, batch: list[Event]) -> list[Event]:
        if self._value is None or self._key is not None:
            return super().process_batch(batch)
        f, vf = self._value.evaluate, self._value.value_fn
        try:
            values = [vf(e.value) for e in batch] if vf is not None else [f(e) for e in batch]
        except Exception:  # replayed per event, so each failure is dead-lettered
            return super().process_batch(batch)
        return [
            Event(e.key, e.ts, float(v) if type(v) is int else v, e.source, e.meta)
            for e, v in zip(batch, values, strict=True)
        ]

    def on_event(self, event: Event) -> Event:
        value = event.value
        if self._value is not None:
            value = self._value(event)
        elif self._fields:
            value = {k: e(event) for k, e in self._fields.items()}
        key = str(self._key(event)) if self._key is not None else event.key
        if type(value) is int:
            value = float(value)
        return Event(key, event.ts, value, event.source, event.meta)
