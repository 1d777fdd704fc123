"""The seam every model endpoint sits behind: a request, a stream of chunks, and the errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import SluiceError

# --- errors --------------------------------------------------------------------------------


class LlmError(SluiceError):
    """Something in the LLM stage failed; ``provider`` names the provider when known."""

    def __init__(self, message: str, provider: str | None = None):
        self.provider = provider
        super().__init__(f"llm provider {provider!r}: {message}" if provider else message)


class ModelLoadError(LlmError):
    """A local model file is missing, unreadable or not a model llama.cpp can load."""


class ProviderError(LlmError):
    """A generation failed. ``retryable`` says whether trying again (or elsewhere) may help."""

    def __init__(
        self, message: str, provider: str | None = None, *, retryable: bool = True, retry_after: float | None = None
    ):
        super().__init__(message, provider)
        self.retryable = retryable
        self.retry_after = retry_after


# --- the seam ------------------------------------------------------------------------------


@dataclass(slots=True)
class LlmRequest:
    """One chat completion to run."""

    messages: list[dict[str, str]]
    max_tokens: int = 256
    temperature: float = 0.2
    stop: list[str] = field(default_factory=list)
    json_schema: dict[str, Any] | None = None


@dataclass(slots=True)
class Chunk:
    """A piece of generated text; the last one of a stream carries ``finish_reason``."""

    text: str
    finish_reason: str | None = None


class Provider(Protocol):
    """One model endpoint. Closing the returned iterator cancels the generation."""

    name: str

    def stream(self, request: LlmRequest) -> AsyncIterator[Chunk]: ...
