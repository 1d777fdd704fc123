"""The LLM stage's machinery: providers behind one small seam, a circuit breaker per provider, the
fallback chain, and the admission queue that sheds by policy so a slow model never slows a pipeline.

A provider is anything with ``stream(request) -> async iterator of Chunk``; closing the iterator
(or cancelling the task consuming it) cancels the generation. :class:`LocalProvider` runs
llama-cpp-python in one dedicated thread per model; :class:`RemoteProvider` speaks the
OpenAI-compatible ``/v1/chat/completions`` streaming API. :class:`LlmHub` owns the configured
providers of a gateway (the top-level ``llm:`` section), each with its breaker, concurrency limit
and statistics; :class:`AdmissionQueue` is the bounded, prioritised, coalescing queue in front.
"""

from __future__ import annotations

from typing import Any

from ..schema import LlmConfig, LocalProviderConfig, RemoteProviderConfig, gguf_problem
from .admission import SHED_REASONS, AdmissionQueue
from .breaker import CircuitBreaker
from .hub import LlmHub, Outcome, ProviderSlot, ProviderStats, metric_families, run_chain
from .provider import Chunk, LlmError, LlmRequest, ModelLoadError, Provider, ProviderError

__all__ = [
    "SHED_REASONS",
    "AdmissionQueue",
    "Chunk",
    "CircuitBreaker",
    "LlmConfig",
    "LlmError",
    "LlmHub",
    "LlmRequest",
    "LocalProvider",
    "LocalProviderConfig",
    "ModelLoadError",
    "Outcome",
    "Provider",
    "ProviderError",
    "ProviderSlot",
    "ProviderStats",
    "RemoteProvider",
    "RemoteProviderConfig",
    "gguf_problem",
    "metric_families",
    "run_chain",
]


def __getattr__(name: str) -> Any:
    """The providers load with the first one a config names (``LlmHub`` imports them then): a
    gateway without an LLM does not carry their code."""
    if name == "LocalProvider":
        from .local import LocalProvider

        return LocalProvider
    if name == "RemoteProvider":
        from .remote import RemoteProvider

        return RemoteProvider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
