"""Jinja2 templates for prompts: sandboxed, and rendered on a budget.

The sandbox keeps a template away from Python's internals; it does not bound what a render costs.
A prompt written by an admin (or with a stolen admin session) must not be able to freeze the
gateway, so every render here is budgeted:

- loop iterations and calls (macros, methods, functions) together: :data:`MAX_STEPS`;
- the CPU time of the rendering thread: :data:`MAX_CPU_SECONDS` (checked at every step, filter
  and operator, so a render overruns it by at most one bounded piece of work);
- the text a render produces: :data:`MAX_OUTPUT` characters;
- any string or list a filter, call or operator makes: :data:`MAX_VALUE` characters or items,
  judged before the work where the arguments say how big the result will be (``"x" * n``,
  ``center(n)``, ``replace``, ``%`` widths, ``**``), and after it otherwise;
- ``recursive`` loops are refused when the template is compiled (their inner iterations could not
  be counted), and so is a template longer than :data:`MAX_TEMPLATE` characters.

Going over any of these raises :class:`TemplateBudgetError` (a :class:`jinja2.TemplateError`)
with what was exceeded; the caller counts it and dead-letters the event.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from functools import wraps
from types import CodeType
from typing import Any

from jinja2 import StrictUndefined, nodes
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment
from jinja2.visitor import NodeTransformer

__all__ = [
    "MAX_CPU_SECONDS",
    "MAX_OUTPUT",
    "MAX_STEPS",
    "MAX_TEMPLATE",
    "MAX_VALUE",
    "TemplateBudgetError",
    "make_environment",
    "render",
]

MAX_STEPS = 10_000
MAX_CPU_SECONDS = 0.25
MAX_OUTPUT = 64 * 1024
MAX_VALUE = 100_000
MAX_TEMPLATE = 16 * 1024
_MAX_WORK = 10 * MAX_VALUE  # estimated result size of one call before it runs
_MAX_BITS = 64 * 1024  # an integer result of more bits than this is refused
_WIDTH = re.compile(r"\d{6,}")  # a format width or precision of 100,000 or more


class TemplateBudgetError(SecurityError):
    """A render went over its budget; the message says which."""


# thread CPU time at which the current render (see :func:`render`) is over budget
_DEADLINE: ContextVar[float] = ContextVar("template_deadline", default=math.inf)


def _check_time() -> None:
    if time.thread_time() > _DEADLINE.get():
        raise TemplateBudgetError(f"the render took more than {MAX_CPU_SECONDS:g} s of CPU time")


def _size(obj: Any, limit: int = _MAX_WORK) -> int:
    """Characters of text and items of containers in ``obj`` (counting stops past ``limit``)."""
    n = 0
    stack = [obj]
    while stack and n <= limit:
        o = stack.pop()
        if isinstance(o, str | bytes):
            n += len(o)
        elif isinstance(o, list | tuple | dict | set | frozenset):
            n += len(o)
            stack.extend(o.values() if isinstance(o, dict) else o)
    return n


def _precheck(what: str, args: Iterable[Any]) -> None:
    """Refuse a call whose arguments promise a result over the budget, before it runs."""
    sizes: list[int] = []
    biggest_int = 0
    for a in args:
        if isinstance(a, bool):
            continue
        if isinstance(a, int):
            biggest_int = max(biggest_int, abs(a))
        elif isinstance(a, str | bytes | list | tuple | dict | set | frozenset):
            sizes.append(_size(a))
    if biggest_int > MAX_VALUE:
        raise TemplateBudgetError(f"{what}: a number argument over {MAX_VALUE:,} is beyond the render budget")
    sizes.sort(reverse=True)
    first = sizes[0] if sizes else 1
    second = max(sizes[1] if len(sizes) > 1 else 1, biggest_int, 1)
    if first > _MAX_WORK or first * second > _MAX_WORK:
        raise TemplateBudgetError(f"{what}: its arguments would make a result beyond the render budget")


def _postcheck(what: str, result: Any) -> Any:
    if isinstance(result, int) and not isinstance(result, bool) and result.bit_length() > _MAX_BITS:
        raise TemplateBudgetError(f"{what}: a number of over {_MAX_BITS:,} bits is beyond the render budget")
    if _size(result, MAX_VALUE) > MAX_VALUE:
        raise TemplateBudgetError(f"{what} made a value of over {MAX_VALUE:,} characters or items")
    return result


def _budgeted_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(func)  # keeps jinja's pass_context/pass_eval_context/pass_environment marker
    def filtered(*args: Any, **kwargs: Any) -> Any:
        _check_time()
        plain = [a for a in args if not isinstance(a, Context | EvalContext | SandboxedEnvironment)]
        _precheck(f"filter {name}", [*plain, *kwargs.values()])
        if name == "format" and plain and isinstance(plain[0], str) and _WIDTH.search(plain[0]):
            raise TemplateBudgetError("filter format: a width of 100,000 or more is beyond the render budget")
        return _postcheck(f"filter {name}", func(*args, **kwargs))

    return filtered


def _receiver(obj: Any) -> Any:
    return getattr(obj, "__self__", None)


class _Budgeter(NodeTransformer):
    """Routes every loop's iterable and every ``~`` through the environment's budget checks."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        if node.recursive:
            raise TemplateSyntaxError("recursive loops are not allowed in these templates", node.lineno)
        self.generic_visit(node)
        call = nodes.Call(
            nodes.EnvironmentAttribute("budget_loop"), [nodes.ContextReference(), node.iter], [], None, None
        )
        node.iter = call.set_lineno(node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        call = nodes.Call(nodes.EnvironmentAttribute("budget_value"), [node], [], None, None)
        return call.set_lineno(node.lineno)


class _BudgetedEnvironment(SandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.filters = {name: _budgeted_filter(name, f) for name, f in self.filters.items()}
        # lipsum(n) writes n paragraphs in one call, past any check between steps (16 s for 99,999)
        del self.globals["lipsum"]

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        if len(source) > MAX_TEMPLATE:
            raise TemplateSyntaxError(
                f"the template is {len(source):,} characters long; the limit is {MAX_TEMPLATE:,}", 1, name, filename
            )
        try:
            return _Budgeter().visit(super()._parse(source, name, filename))  # type: ignore[no-any-return]
        except TemplateSyntaxError as exc:
            exc.name, exc.filename = name, filename
            raise
        except RecursionError:  # ((((…)))) thousands deep: the parser recurses per level
            raise TemplateSyntaxError("the template is nested too deeply", 1, name, filename) from None

    def _generate(
        self, source: nodes.Template, name: str | None, filename: str | None, defer_init: bool = False
    ) -> str:
        try:
            return super()._generate(source, name, filename, defer_init)
        except RecursionError:
            raise TemplateSyntaxError("the template is nested too deeply", 1, name, filename) from None

    def _compile(self, source: str, filename: str) -> CodeType:
        try:
            return super()._compile(source, filename)
        except (SyntaxError, RecursionError, MemoryError):  # e.g. "too many levels of indentation"
            raise TemplateSyntaxError("the template is nested too deeply", 1, None, filename) from None

    # --- the budget of one render, kept on its evaluation context ---

    @staticmethod
    def _step(context: Context, n: int = 1) -> None:
        _check_time()
        ev = context.eval_ctx
        steps = getattr(ev, "budget_steps", 0) + n
        if steps > MAX_STEPS:
            raise TemplateBudgetError(f"more than {MAX_STEPS:,} loop iterations and calls in one render")
        ev.budget_steps = steps  # type: ignore[attr-defined]

    def budget_loop(self, context: Context, iterable: Any) -> Iterator[Any]:
        step = self._step
        for item in iterable:
            step(context)
            yield item

    @staticmethod
    def budget_value(value: Any) -> Any:
        _check_time()
        return _postcheck("joining with ~", value)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None and _WIDTH.search(value.__self__):

            def refused(*args: Any, **kwargs: Any) -> str:
                raise TemplateBudgetError(f"{value.__name__}: a width of 100,000 or more is beyond the render budget")

            return refused
        return wrapped

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        __self._step(__context)
        name = getattr(__obj, "__name__", type(__obj).__name__)
        if __obj is not __self.budget_loop:
            receiver = _receiver(__obj)
            _precheck(name, [*(() if receiver is None else (receiver,)), *args, *kwargs.values()])
            if name == "format" and isinstance(receiver, str) and _WIDTH.search(receiver):
                raise TemplateBudgetError("format: a width of 100,000 or more is beyond the render budget")
        return _postcheck(name, super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_time()
        what = f"the {operator} operator"
        if operator == "*":
            n = right if isinstance(right, int) else left if isinstance(left, int) else None
            other = left if n is right else right
            if isinstance(n, int) and not isinstance(n, bool) and isinstance(other, str | bytes | list | tuple):
                if len(other) * n > MAX_VALUE:
                    raise TemplateBudgetError(f"{what} would make over {MAX_VALUE:,} characters or items")
            elif isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > _MAX_BITS:
                    raise TemplateBudgetError(f"{what} would make a number of over {_MAX_BITS:,} bits")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0:
                if max(left.bit_length(), 1) * right > _MAX_BITS:
                    raise TemplateBudgetError(f"{what} would make a number of over {_MAX_BITS:,} bits")
            elif isinstance(right, int | float) and abs(right) > _MAX_BITS:
                raise TemplateBudgetError(f"{what}: an exponent over {_MAX_BITS:,} is beyond the render budget")
        elif operator == "%" and isinstance(left, str):
            if _WIDTH.search(left):
                raise TemplateBudgetError(f"{what}: a width of 100,000 or more is beyond the render budget")
            _precheck(what, right if isinstance(right, tuple) else (right,))
        return _postcheck(what, super().call_binop(context, operator, left, right))


def make_environment() -> SandboxedEnvironment:
    """A sandboxed environment whose templates render on the budget described above."""
    return _BudgetedEnvironment(undefined=StrictUndefined, autoescape=False, trim_blocks=True, lstrip_blocks=True)


def render(template: Any, context: dict[str, Any]) -> str:
    """``template.render(context)`` on the whole budget, output and CPU time included."""
    out: list[str] = []
    n = 0
    deadline = _DEADLINE.set(time.thread_time() + MAX_CPU_SECONDS)
    try:
        for chunk in template.generate(context):
            n += len(chunk)
            if n > MAX_OUTPUT:
                raise TemplateBudgetError(f"the rendered text is longer than {MAX_OUTPUT:,} characters")
            out.append(chunk)
    except RecursionError:  # macros calling themselves
        raise TemplateBudgetError("macro calls nested too deeply") from None
    finally:
        _DEADLINE.reset(deadline)
    return "".join(out)
