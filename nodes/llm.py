"""The ``llm`` node: asks a model about each event without ever making the pipeline wait.

``on_event`` only renders the prompt and offers the event to the node's admission queue; the
node's own worker tasks (``run``) take requests from there, stream them through the provider
chain and emit the results later through ``ctx.emit``. What the queue sheds (full, coalesced,
past its deadline, every provider's breaker open) goes downstream at once with a rule-based text
and ``llm: shed``, so an alert never depends on the model.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from typing import Any, Literal

from jinja2 import TemplateError, nodes
from pydantic import Field, field_validator

from gateway.api import (
    SHED_REASONS,
    AdmissionQueue,
    Chunk,
    Duration,
    Event,
    LlmHub,
    LlmRequest,
    Metric,
    NodeContext,
    NodeOptions,
    Operator,
    Outcome,
    ProviderSlot,
    RateLimitedLog,
    register,
    run_chain,
)

from ._templates import TemplateBudgetError, make_environment, render

__all__ = ["Llm"]

log = logging.getLogger(__name__)
_LIVE_TOPICS = frozenset({"llm"})

_ENV = make_environment()  # sandboxed, every render on a budget (see nodes/_templates.py)

_DEFAULT_PROMPT = (
    "{% if value is mapping and value.rule is defined %}"
    "Alert {{ value.state | default('raised') }} ({{ value.severity | default('info') }}) on {{ key }}: "
    "{{ value.rule }}; reading {{ value.reading | default('?') }}. "
    "{% else %}Reading from {{ key }}: {{ value }}. {% endif %}"
    "In one or two short sentences, say what may be going on and what to check first."
)
_DEFAULT_SYSTEM = "You are the assistant of an industrial IoT gateway. Answer briefly and concretely."


def _may_be_slow(source: str) -> bool:
    """Whether a template loops or defines macros (the parts whose cost grows with the data)."""
    return any(True for _ in _ENV.parse(source).find_all((nodes.For, nodes.Macro, nodes.CallBlock)))


class LlmOptions(NodeOptions):
    type: Literal["llm"]
    provider: list[str] = Field(
        min_length=1,
        description="Provider name, or a fallback chain tried in order (names from the top-level llm.providers).",
    )
    prompt: str = Field(
        _DEFAULT_PROMPT,
        description="Jinja2 template (sandboxed, rendered on a budget) over key, ts, value, source, meta; "
        "the default explains an alert.",
    )
    system: str | None = Field(_DEFAULT_SYSTEM, description="System prompt; null for none.")
    max_tokens: int = Field(128, ge=1, le=32_768)
    temperature: float = Field(0.2, ge=0, le=2)
    stop: list[str] = Field(default_factory=list)
    json_schema: dict[str, Any] | None = Field(
        None, description="Constrain the output to JSON of this schema; it is parsed into the result's `json` field."
    )
    output: Literal["joined", "stream"] = Field(
        "joined", description="joined: one event with the whole text; stream: an event per chunk, then the result."
    )
    rule_text: str | None = Field(
        None,
        description="Jinja2 template of the text used when the model is not "
        "asked (shed) or fails; default: the alert's rule.",
    )
    max_queue: int = Field(
        16, ge=1, le=100_000, description="Admission queue depth; beyond it, lowest priority is shed first."
    )
    deadline: Duration | None = Field(30.0, description="Longest wait in the queue before an event is shed.")
    coalesce_by: str | None = Field(
        "key",
        description="`key` (event key), a value field such as alert_key, "
        "or null: a newer event with the same one replaces a "
        "queued older one.",
    )
    priority: int = Field(0, description="Priority of events without a priority field.")
    priority_field: str | None = Field("severity", description="Value (or meta) field that sets the priority.")
    priorities: dict[str, int] = Field(
        default_factory=lambda: {"critical": 2, "warning": 1, "info": 0},
        description="Priority of each text value of priority_field.",
    )
    concurrency: int | None = Field(
        None, ge=1, le=64, description="Requests this node runs at once; default: the first provider's concurrency."
    )

    @field_validator("provider", mode="before")
    @classmethod
    def _one_provider(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("prompt", "system", "rule_text")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                _ENV.from_string(v)  # parsed and compiled: nesting too deep for Python is caught here
            except TemplateError as exc:
                raise ValueError(f"template does not compile: {exc}") from None
        return v

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type", "object") != "object":
            raise ValueError("json_schema must describe an object (type: object)")
        return v


def _validate(obj: Any, schema: dict[str, Any], path: str = "$") -> str | None:
    """A small JSON Schema check (type, required, properties, items, enum): the first problem or None."""
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    t = schema.get("type")
    if isinstance(t, str):
        if t in ("integer", "number"):
            ok = isinstance(obj, int | float) and not isinstance(obj, bool)
            ok = ok and (t == "number" or float(obj).is_integer())
        else:
            ok = isinstance(obj, kinds.get(t, object))
        if not ok:
            return f"{path} should be {t}, got {type(obj).__name__}"
    if "enum" in schema and obj not in schema["enum"]:
        return f"{path} should be one of {schema['enum']}"
    if isinstance(obj, dict):
        for req in schema.get("required", ()):
            if req not in obj:
                return f"{path}.{req} is missing"
        for name, sub in (schema.get("properties") or {}).items():
            if name in obj and isinstance(sub, dict):
                problem = _validate(obj[name], sub, f"{path}.{name}")
                if problem:
                    return problem
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            problem = _validate(item, schema["items"], f"{path}[{i}]")
            if problem:
                return problem
    return None


class _Pending:
    __slots__ = ("answered", "event", "id", "priority")

    def __init__(self, event: Event, priority: int, rid: int):
        self.event = event
        self.priority = priority
        self.id = rid
        self.answered = False  # its result or fallback has been handed downstream


@register
class Llm(Operator):
    """Ask a model about each event, behind an admission queue that sheds by policy.

    Results (and shed or failed events, with their rule text) are emitted later, as a mapping:
    the input's fields (a non-mapping value goes under ``value``) plus ``llm`` (``ok``, ``shed``
    or ``error``), ``text``, ``provider``, timings (``queued_s``, ``first_token_s``,
    ``total_s``, ``tokens``, ``tokens_per_s``), ``json`` with a schema, ``llm_reason`` when shed
    and ``llm_error`` on failure. With ``output: stream`` each chunk first goes out as its own
    event (``llm: chunk``, ``text``, ``seq``, ``request``).
    """

    Options = LlmOptions
    options: LlmOptions

    @classmethod
    def check(cls, options: NodeOptions, config: Any) -> list[tuple[str, str]]:
        o: LlmOptions = options  # type: ignore[assignment]
        llm = config.get("llm") if isinstance(config, dict) else None
        providers = llm.get("providers") if isinstance(llm, dict) else None
        known = list(providers) if isinstance(providers, dict) else []
        issues = []
        for i, name in enumerate(o.provider):
            if name not in known:
                where = "provider" if len(o.provider) == 1 else f"provider.{i}"
                hint = f"known: {', '.join(known)}" if known else "define it under llm.providers"
                issues.append((where, f"unknown llm provider {name!r}; {hint}"))
        return issues

    def __init__(self, options: LlmOptions, ctx: NodeContext):
        super().__init__(options, ctx)
        o = options
        self._prompt = _ENV.from_string(o.prompt)
        self._system = _ENV.from_string(o.system) if o.system else None
        self._rule = _ENV.from_string(o.rule_text) if o.rule_text else None
        # loops and macros can take a while even on budget: those prompts render in a thread
        self._render_in_thread = any(_may_be_slow(t) for t in (o.prompt, o.system) if t)
        self.n_over_budget = 0  # renders refused by the template budget
        hub = getattr(ctx.services, "llm", None)
        self.hub: LlmHub | None = hub
        self.slots: list[ProviderSlot] = [hub.slot(n) for n in o.provider] if hub is not None else []
        self.concurrency = o.concurrency or (self.slots[0].concurrency if self.slots else 1)
        self.queue: AdmissionQueue[_Pending] = AdmissionQueue(
            o.max_queue, o.deadline, self._on_shed, coalesce=o.coalesce_by is not None
        )
        self._out: list[Event] = []  # shed results to hand out with the current on_event/on_timer
        self._rl = RateLimitedLog(ctx.logger, 30.0)  # sheds are counted per event, logged now and then
        self._ids = itertools.count(1)
        self.in_flight = 0
        self.n_ok = 0
        self.n_failed = 0
        self.n_shed_other: dict[str, int] = {}
        self.tokens = 0
        self.last_first_token_s: float | None = None
        self.last_tokens_per_s: float | None = None

    # --- synchronous side: never waits ---------------------------------------------------------

    def on_event(self, event: Event) -> list[Event] | None:
        # the prompt is rendered only for what the model will see: under overload most events are
        # shed, and they should cost next to nothing
        item = _Pending(event, self._priority(event), next(self._ids))
        if self.slots and all(s.breaker.is_open() for s in self.slots):
            # known down: costs nothing per event, and the alert goes out now
            self.queue.count_shed(item, "breaker_open")
        else:
            self.queue.put(item, self._coalesce_key(event), item.priority)
        return self._take_out()

    def on_timer(self, now: float) -> list[Event]:
        self.queue.expire()
        return self._take_out() or []

    def _take_out(self) -> list[Event] | None:
        if not self._out:
            return None
        out, self._out = self._out, []
        return out

    def _on_shed(self, item: _Pending, reason: str) -> None:
        self._out.append(self._fallback(item, "shed", {"llm_reason": reason}))
        self._rl.log(
            logging.INFO,
            reason,
            "llm %s: shedding (%s); e.g. %s goes out with its rule text",
            self.id,
            reason,
            item.event.key,
        )

    @staticmethod
    def _context(event: Event) -> dict[str, Any]:
        return {
            "key": event.key,
            "ts": event.ts,
            "value": event.value,
            "source": event.source,
            "meta": event.meta or {},
        }

    def _priority(self, event: Event) -> int:
        f = self.options.priority_field
        if f:
            v = event.value.get(f) if isinstance(event.value, dict) else None
            if v is None and event.meta:
                v = event.meta.get(f)
            if isinstance(v, str) and v in self.options.priorities:
                return self.options.priorities[v]
            if isinstance(v, int | float) and not isinstance(v, bool):
                return int(v)
        return self.options.priority

    def _coalesce_key(self, event: Event) -> str | None:
        by = self.options.coalesce_by
        if by is None:
            return None
        if by == "key":
            return event.key
        v = event.value.get(by) if isinstance(event.value, dict) else None
        return str(v) if v is not None else event.key

    # --- results -------------------------------------------------------------------------------

    def _base(self, event: Event) -> dict[str, Any]:
        return dict(event.value) if isinstance(event.value, dict) else {"value": event.value}

    def _rule_text(self, event: Event) -> str:
        if self._rule is not None:
            try:
                return render(self._rule, self._context(event))
            except (TemplateError, TypeError, ValueError) as exc:
                if isinstance(exc, TemplateBudgetError):
                    self.n_over_budget += 1
                return f"{event.key}: {event.value!r} (rule_text failed: {exc})"
        v = event.value
        if isinstance(v, dict) and isinstance(v.get("rule"), str):
            state = v.get("state")
            return f"{v['rule']}" + (f" ({state})" if state else "")
        return f"{event.key}: {v!r}"

    def _fallback(self, item: _Pending, status: str, extra: dict[str, Any]) -> Event:
        out = self._base(item.event)
        out.update({"llm": status, "text": self._rule_text(item.event), "request": item.id})
        out.update(extra)
        ev = item.event
        return Event(ev.key, ev.ts, out, self.id, _own_meta(ev))

    def _result(self, item: _Pending, o: Outcome, waited: float) -> Event:
        ev = item.event
        out = self._base(ev)
        tps = o.tokens / o.total_s if o.tokens and o.total_s > 0 else 0.0
        out.update(
            {
                "llm": "ok",
                "text": o.text.strip(),
                "provider": o.provider,
                "request": item.id,
                "queued_s": round(waited, 4),
                "first_token_s": round(o.first_token_s, 4) if o.first_token_s is not None else None,
                "total_s": round(o.total_s, 4),
                "tokens": o.tokens,
                "tokens_per_s": round(tps, 2),
            }
        )
        if self.options.json_schema is not None:
            try:
                parsed = json.loads(o.text, strict=False)
            except ValueError as exc:
                problem: str | None = f"model output is not valid JSON ({exc})"
            else:
                problem = _validate(parsed, self.options.json_schema)
                if problem is None:
                    out["json"] = parsed
                else:
                    problem = f"model output does not match json_schema: {problem}"
            if problem is not None:
                self.n_errors += 1
                self.ctx.logger.warning("llm %s: %s", self.id, problem)
                out.update(
                    {"llm": "error", "llm_error": problem, "model_text": out["text"], "text": self._rule_text(ev)}
                )
        return Event(ev.key, ev.ts, out, self.id, _own_meta(ev))

    # --- the workers -----------------------------------------------------------------------------

    async def run(self) -> None:
        if not self.slots:
            raise RuntimeError(f"llm node {self.id!r} has no providers (is the llm: section configured?)")
        async with asyncio.TaskGroup() as tg:
            for n in range(self.concurrency):
                tg.create_task(self._worker(), name=f"llm:{self.ctx.pipeline}:{self.id}:{n}")

    async def _worker(self) -> None:
        try:
            while True:
                item, waited = await self.queue.get()
                late = self._take_out()  # items that passed their deadline on the way out
                if late:
                    await self._hand_out(late)
                self.in_flight += 1
                try:
                    await self._handle(item, waited)
                except asyncio.CancelledError:
                    self._shed_for_shutdown(item)
                    raise
                except Exception as exc:  # node boundary: the alert still goes out, the failure is recorded
                    self.n_failed += 1
                    self.ctx.logger.exception("llm %s: request for %s failed", self.id, item.event.key)
                    self.fail(item.event, exc)
                    await self._hand_out(
                        [self._fallback(item, "error", {"llm_error": f"{type(exc).__name__}: {exc}"})], item
                    )
                finally:
                    self.in_flight -= 1
        except asyncio.CancelledError:
            # stopping: what is still queued goes out with its rule text, never silently lost
            for left in self.queue.drain():
                self._shed_for_shutdown(left)
            raise

    def _shed_for_shutdown(self, item: _Pending) -> None:
        if item.answered:
            return
        self.n_shed_other["shutdown"] = self.n_shed_other.get("shutdown", 0) + 1
        self.ctx.emit([self._fallback(item, "shed", {"llm_reason": "shutdown"})])  # stopping: always taken

    async def _hand_out(self, events: list[Event], item: _Pending | None = None) -> None:
        """Results and fallbacks carry the alert: wait for room downstream rather than lose one.

        A slow sink so makes the workers wait, the admission queue fill, and the shedding policy
        decide what the model skips: backpressure ends at this stage, the one allowed to shed.
        """
        if not events:
            return
        try:
            await self.ctx.room()
        finally:
            # also when cancelled while waiting: the pipeline is stopping and takes them
            self.ctx.emit(events)
            if item is not None:
                item.answered = True

    def _shed_chunk(self, n: int) -> None:
        # a stream chunk is a preview: the result that follows has the whole text. The pipeline
        # counted it as dropped and logged it; this counts it among the stage's sheds (/metrics).
        self.n_shed_other["chunk"] = self.n_shed_other.get("chunk", 0) + n

    def _messages(self, event: Event) -> list[dict[str, str]]:
        ctx = self._context(event)
        messages = [{"role": "user", "content": render(self._prompt, ctx)}]
        if self._system is not None:
            messages.insert(0, {"role": "system", "content": render(self._system, ctx)})
        return messages

    async def _handle(self, item: _Pending, waited: float) -> None:
        o = self.options
        try:
            if self._render_in_thread:
                messages = await asyncio.to_thread(self._messages, item.event)
            else:
                messages = self._messages(item.event)
        except (TemplateError, TypeError, ValueError) as exc:
            if isinstance(exc, TemplateBudgetError):
                self.n_over_budget += 1
            problem = f"prompt template failed on this event: {exc}"
            self.fail(item.event, ValueError(problem))  # dead-lettered with the reason, to fix the template
            await self._hand_out([self._fallback(item, "error", {"llm_error": problem})], item)
            return
        req = LlmRequest(messages, o.max_tokens, o.temperature, list(o.stop), o.json_schema)
        on_chunk = None
        if o.output == "stream":
            seq = itertools.count()
            ev = item.event

            def on_chunk(provider: str, chunk: Chunk) -> None:
                if chunk.text:
                    value = {
                        "llm": "chunk",
                        "text": chunk.text,
                        "seq": next(seq),
                        "request": item.id,
                        "provider": provider,
                    }
                    if not self.ctx.emit([Event(ev.key, ev.ts, value, self.id, _own_meta(ev))]):
                        self._shed_chunk(1)

        outcome = await run_chain(self.slots, req, on_chunk, self.ctx.monotonic)
        if outcome.status == "ok":
            self.n_ok += 1
            self.tokens += outcome.tokens
            self.last_first_token_s = outcome.first_token_s
            if outcome.tokens and outcome.total_s > 0:
                self.last_tokens_per_s = outcome.tokens / outcome.total_s
            await self._hand_out([self._result(item, outcome, waited)], item)
        elif outcome.status == "breaker_open":
            self.queue.count_shed(item, "breaker_open")
            await self._hand_out(self._take_out() or [], item)
        else:
            self.n_failed += 1
            self.ctx.logger.warning("llm %s: every provider failed for %s: %s", self.id, item.event.key, outcome.error)
            extra: dict[str, Any] = {"llm_error": outcome.error, "queued_s": round(waited, 4)}
            if outcome.text:
                extra["model_text"] = outcome.text
                extra["provider"] = outcome.provider
            await self._hand_out([self._fallback(item, "error", extra)], item)

    # --- reporting -------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        c = super().counters()
        c.update(
            {
                "llm_ok": self.n_ok,
                "llm_failed": self.n_failed,
                "llm_in_flight": self.in_flight,
                "llm_queue_depth": len(self.queue),
                "llm_tokens": self.tokens,
                "template_over_budget": self.n_over_budget,
            }
        )
        for reason in SHED_REASONS:
            c[f"shed_{reason}"] = self.queue.shed[reason]
        for reason, n in self.n_shed_other.items():
            c[f"shed_{reason}"] = n
        return c

    def live_topics(self) -> frozenset[str]:
        return _LIVE_TOPICS  # the console's token stream taps this node's output

    def metrics(self) -> list[Metric]:
        s = self.stats()
        out = [
            Metric(
                "sluice_llm_queue_depth",
                "Requests waiting in an llm node's admission queue",
                "gauge",
                s["queue"]["depth"],
            ),
            Metric(
                "sluice_llm_queue_max_depth", "Admission queue bound of an llm node", "gauge", s["queue"]["max_depth"]
            ),
            Metric("sluice_llm_in_flight", "Requests an llm node has with a model", "gauge", s["in_flight"]),
        ]
        shed = "Events answered with rule text instead of the model, by reason"
        for name, count in self.counters().items():
            if name.startswith("shed_"):
                out.append(Metric("sluice_llm_shed", shed, "counter", count, (("reason", name[5:]),)))
        done = "Model requests finished, by status"
        out.append(Metric("sluice_llm_results", done, "counter", s["ok"], (("status", "ok"),)))
        out.append(Metric("sluice_llm_results", done, "counter", s["failed"], (("status", "error"),)))
        wait = "Recent admission queue wait of answered events"
        for q, field in (("0.5", "wait_p50_s"), ("0.99", "wait_p99_s")):
            if s[field] is not None:
                out.append(Metric("sluice_llm_queue_wait_seconds", wait, "gauge", s[field], (("quantile", q),)))
        if s["first_token_s"] is not None:
            ttft = "Time to first token of the last answer"
            out.append(Metric("sluice_llm_first_token_seconds", ttft, "gauge", s["first_token_s"]))
        if s["tokens_per_s"] is not None:
            tps = "Tokens per second of the last answer"
            out.append(Metric("sluice_llm_tokens_per_second", tps, "gauge", s["tokens_per_s"]))
        return out

    def stats(self) -> dict[str, Any]:
        """Admission and timing statistics, for /metrics and the console."""
        waits = sorted(self.queue.wait_s)

        def p(q: float) -> float | None:
            return waits[min(len(waits) - 1, int(q * len(waits)))] if waits else None

        return {
            "queue": self.queue.stats(),
            "in_flight": self.in_flight,
            "ok": self.n_ok,
            "failed": self.n_failed,
            "wait_p50_s": p(0.5),
            "wait_p99_s": p(0.99),
            "first_token_s": self.last_first_token_s,
            "tokens_per_s": self.last_tokens_per_s,
            "providers": [s.describe() for s in self.slots],
        }


def _own_meta(ev: Event) -> dict[str, Any] | None:
    """The input's meta for an output of this node, without its ``result_id``: every chunk and the
    answer are messages of their own, which the outbox would otherwise take as repeats of the input."""
    if not ev.meta or "result_id" not in ev.meta:
        return ev.meta
    return {k: v for k, v in ev.meta.items() if k != "result_id"}
