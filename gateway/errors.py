"""The exception hierarchy, one branch per boundary; each carries its context as attributes."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "ExpressionError",
    "LinkError",
    "NodeError",
    "ReloadError",
    "SluiceError",
]

from dataclasses import dataclass


class SluiceError(Exception):
    """Base of every error Sluice raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file, located by line and dotted field path."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.path or '<root>'}: {self.message}"


class ConfigError(SluiceError):
    """A config file that cannot be used; ``issues`` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


class ExpressionError(SluiceError):
    """An expression that does not compile, or fails on an event."""

    def __init__(self, expression: str, message: str):
        self.expression = expression
        super().__init__(f"{message} (in expression {expression!r})")


class NodeError(SluiceError):
    """A node failed on an input; the event is dead-lettered with this reason."""

    def __init__(self, node_id: str, message: str):
        self.node_id = node_id
        super().__init__(message)


class LinkError(SluiceError):
    """A connection to an outside peer (broker, device) failed."""

    def __init__(self, connection: str, message: str):
        self.connection = connection
        super().__init__(f"connection {connection!r}: {message}")


class ReloadError(SluiceError):
    """A config the running gateway cannot take without a restart, or that failed to start."""


class RestartNeeded(ReloadError):
    """A valid config the running gateway takes only at its next start (its pipelines may use TLS,
    which this process did not load): the editor saves it and says a restart applies it."""
