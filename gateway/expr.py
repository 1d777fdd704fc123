"""Safe expressions for filters, maps and keys: CEL (Common Expression Language), compiled once.

CEL is a small, sandboxed, side-effect-free language (no attribute access into Python objects, no
imports, no loops), used by Kubernetes and Envoy for the same job. An expression is compiled once
at start; each event costs one call into the compiled program with only the variables the
expression mentions. Variables: ``value``, ``key``, ``ts``, ``source``, ``meta``.
Numbers in readings are doubles, so write literals as doubles too (``value * 1.8 + 32.0``);
mixing ``int`` and ``double`` in arithmetic is a CEL type error, reported at validation time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cel

from .errors import ExpressionError
from .events import Event

__all__ = ["EVENT_VARIABLES", "Expression"]

EVENT_VARIABLES = ("value", "key", "ts", "source", "meta")
_SAMPLE = Event("sensor/1", 1_700_000_000.0, 21.5, "sample", {"topic": "sensors/1/temp"})
_GETTERS: dict[str, Callable[[Event], Any]] = {
    "value": lambda e: e.value,
    "key": lambda e: e.key,
    "ts": lambda e: e.ts,
    "source": lambda e: e.source,
    "meta": lambda e: e.meta or {},
}


class Expression:
    """A compiled CEL expression over an event (or over ``variables`` given explicitly)."""

    __slots__ = ("_prog", "evaluate", "source", "variables")

    def __init__(self, source: str, variables: tuple[str, ...] = EVENT_VARIABLES):
        self.source = source
        try:
            self._prog = cel.compile(source)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise ExpressionError(source, _first_line(exc)) from None
        used = list(self._prog.variables())
        unknown = [v for v in used if v not in variables]
        if unknown:
            raise ExpressionError(source, f"unknown name {unknown[0]!r}; available: {', '.join(variables)}")
        self.variables = tuple(used)
        execute = self._prog.execute
        if variables is EVENT_VARIABLES:
            if self.variables == ("value",):
                self.evaluate: Callable[[Any], Any] = lambda e: execute({"value": e.value})
            else:
                getters = [(name, _GETTERS[name]) for name in self.variables]
                self.evaluate = lambda e: execute({n: g(e) for n, g in getters})
        else:
            self.evaluate = execute

    def __call__(self, arg: Any) -> Any:
        try:
            return self.evaluate(arg)
        except (ValueError, RuntimeError, TypeError, ZeroDivisionError, OverflowError) as exc:
            raise ExpressionError(self.source, _first_line(exc)) from None

    def try_sample(self, sample: Any = None) -> str | None:
        """Evaluate on a typical reading; a message when that fails on types (e.g. int·double)."""
        try:
            self.evaluate(_SAMPLE if sample is None else sample)
        except TypeError as exc:
            return _first_line(exc)
        except (ValueError, RuntimeError, ZeroDivisionError, OverflowError):
            return None  # depends on the data (missing field in a mapping …): judged per event
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def check_expression(source: str, variables: tuple[str, ...] = EVENT_VARIABLES, sample: Any = None) -> str | None:
    """A validation message for ``source``, or None when it compiles and type-checks on a sample."""
    try:
        expr = Expression(source, variables)
    except ExpressionError as exc:
        return str(exc)
    problem = expr.try_sample(sample)
    if problem:
        return f"{problem} (in expression {source!r}; numbers are doubles: write 2.0, not 2)"
    return None
