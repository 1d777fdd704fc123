"""A gateway's providers (the ``llm:`` section) with their breakers and statistics, the fallback
chain over them, and their Prometheus families."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..schema import LlmConfig, LocalProviderConfig
from .breaker import CircuitBreaker
from .provider import Chunk, LlmError, LlmRequest

log = logging.getLogger(__name__)


# --- the hub: a gateway's providers --------------------------------------------------------


@dataclass(slots=True)
class ProviderStats:
    requests: int = 0
    errors: int = 0
    in_flight: int = 0
    tokens: int = 0
    first_token_s: float = 0.0  # last observed
    tokens_per_s: float = 0.0  # last observed
    last_error: str | None = None


class ProviderSlot:
    """A provider with what the gateway keeps around it: breaker, concurrency limit, statistics."""

    def __init__(self, provider: Any, breaker: CircuitBreaker, concurrency: int):
        self.provider = provider
        self.name: str = provider.name
        self.breaker = breaker
        self.concurrency = concurrency
        self.semaphore = asyncio.Semaphore(concurrency)
        self.stats = ProviderStats()

    def describe(self) -> dict[str, Any]:
        s = self.stats
        return {
            "name": self.name,
            "breaker": self.breaker.state,
            "concurrency": self.concurrency,
            "requests": s.requests,
            "errors": s.errors,
            "in_flight": s.in_flight,
            "tokens": s.tokens,
            "first_token_s": s.first_token_s,
            "tokens_per_s": s.tokens_per_s,
            "last_error": s.last_error,
        }


class LlmHub:
    """The providers of one gateway, built from the ``llm:`` section; shared by all ``llm`` nodes."""

    def __init__(self, config: LlmConfig | None, clock: Callable[[], float] = time.monotonic):
        self.config = config or LlmConfig()
        self.slots: dict[str, ProviderSlot] = {}
        for name, pc in self.config.providers.items():
            # imported here: a gateway without an LLM does not carry the providers' code
            if isinstance(pc, LocalProviderConfig):
                from .local import LocalProvider

                provider: Any = LocalProvider(name, pc)
            else:
                from .remote import RemoteProvider

                provider = RemoteProvider(name, pc)
            self.add(provider, CircuitBreaker(pc.breaker_failures, pc.breaker_reset, clock, name))

    def add(self, provider: Any, breaker: CircuitBreaker | None = None, concurrency: int | None = None) -> ProviderSlot:
        """Register a provider (any object with ``name`` and ``stream``)."""
        slot = ProviderSlot(
            provider, breaker or CircuitBreaker(name=provider.name), concurrency or getattr(provider, "concurrency", 1)
        )
        self.slots[provider.name] = slot
        return slot

    def slot(self, name: str) -> ProviderSlot:
        try:
            return self.slots[name]
        except KeyError:
            raise LlmError(f"unknown llm provider {name!r}; known: {', '.join(self.slots) or 'none'}") from None

    async def start(self) -> None:
        """Start every provider; a local model that cannot load raises :class:`ModelLoadError` here."""
        for slot in self.slots.values():
            start = getattr(slot.provider, "start", None)
            if start is not None:
                await start()

    async def close(self) -> None:
        for slot in self.slots.values():
            close = getattr(slot.provider, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:  # closing one provider must not keep the others open
                    log.exception("llm provider %s failed to close", slot.name)

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self.slots.values()]

    def problems(self) -> list[str]:
        """One line per provider that is known down, for /healthz."""
        out = []
        for s in self.slots.values():
            if s.breaker.state != "closed":
                why = f": {s.stats.last_error}" if s.stats.last_error else ""
                out.append(f"llm provider {s.name}: breaker {s.breaker.state.replace('_', '-')}{why}")
        return out


# --- fallback chain ------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """How a request through a fallback chain ended."""

    status: Literal["ok", "error", "breaker_open"] = "ok"
    provider: str | None = None
    text: str = ""
    tokens: int = 0
    first_token_s: float | None = None
    total_s: float = 0.0
    error: str | None = None
    finish_reason: str | None = None
    attempts: list[str] = field(default_factory=list)


async def run_chain(
    slots: list[ProviderSlot],
    request: LlmRequest,
    on_chunk: Callable[[str, Chunk], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Outcome:
    """Try each provider in order, skipping those whose breaker is open.

    A provider that fails before its first token hands over to the next; once tokens went out
    (``on_chunk``), a failure ends the request as an error with the partial text.
    """
    out = Outcome()
    start = clock()
    skipped = 0
    for slot in slots:
        if not slot.breaker.allow():
            skipped += 1
            out.attempts.append(f"{slot.name}: breaker open")
            continue
        async with slot.semaphore:
            st = slot.stats
            st.requests += 1
            st.in_flight += 1
            t0 = clock()
            first: float | None = None
            tokens = 0
            parts: list[str] = []
            reason: str | None = None
            verdict = False  # whether the breaker heard how this attempt went
            try:
                agen = slot.provider.stream(request)
                try:
                    async for chunk in agen:
                        if chunk.text:
                            if first is None:
                                first = clock() - t0
                            tokens += 1
                            parts.append(chunk.text)
                        if chunk.finish_reason:
                            reason = chunk.finish_reason
                        if on_chunk is not None:
                            on_chunk(slot.name, chunk)
                finally:
                    await agen.aclose()
            except (LlmError, OSError) as exc:
                st.errors += 1
                st.last_error = str(exc)
                slot.breaker.failure()
                verdict = True
                out.attempts.append(f"{slot.name}: {exc}")
                if tokens:
                    out.status, out.provider, out.text, out.tokens = "error", slot.name, "".join(parts), tokens
                    out.first_token_s, out.error = first, str(exc)
                    out.total_s = clock() - start
                    return out
                continue
            else:
                slot.breaker.success()
                verdict = True
            finally:
                st.in_flight -= 1
                if not verdict:  # cancelled: no verdict on the provider
                    slot.breaker.release()
            elapsed = clock() - t0
            st.tokens += tokens
            if first is not None:
                st.first_token_s = first
            if tokens and elapsed > 0:
                st.tokens_per_s = tokens / elapsed
            out.status, out.provider, out.text, out.tokens = "ok", slot.name, "".join(parts), tokens
            out.first_token_s, out.finish_reason = first, reason
            out.total_s = clock() - start
            return out
    out.total_s = clock() - start
    if skipped == len(slots):
        out.status = "breaker_open"
        out.error = "every provider's breaker is open"
    else:
        out.status = "error"
        out.error = "; ".join(out.attempts)
    return out


# --- metrics -------------------------------------------------------------------------------


def metric_families(gw: Any) -> Iterable[Any]:
    """Prometheus families for the LLM providers of a running gateway (read at scrape time);
    each llm node reports its own admission queue through its ``metrics()`` hook."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    hub = getattr(gw, "llm", None)
    if not isinstance(hub, LlmHub):
        return
    pl = ["provider"]
    req = CounterMetricFamily("sluice_llm_provider_requests", "Requests sent to a provider", labels=pl)
    err = CounterMetricFamily("sluice_llm_provider_errors", "Provider requests that failed", labels=pl)
    pin = GaugeMetricFamily("sluice_llm_provider_in_flight", "Requests a provider is working on", labels=pl)
    tok = CounterMetricFamily("sluice_llm_provider_tokens", "Tokens a provider generated", labels=pl)
    brk = GaugeMetricFamily("sluice_llm_breaker_open", "Circuit breaker: 0 closed, 1 half-open, 2 open", labels=pl)
    level = {"closed": 0, "half_open": 1, "open": 2}
    for slot in hub.slots.values():
        req.add_metric([slot.name], slot.stats.requests)
        err.add_metric([slot.name], slot.stats.errors)
        pin.add_metric([slot.name], slot.stats.in_flight)
        tok.add_metric([slot.name], slot.stats.tokens)
        brk.add_metric([slot.name], level[slot.breaker.state])
    yield from (req, err, pin, tok, brk)
