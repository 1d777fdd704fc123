"""Safe expressions for filters, maps and keys: CEL (Common Expression Language), compiled once.

CEL is a small, sandboxed, side-effect-free language (no attribute access into Python objects, no
imports, no loops), used by Kubernetes and Envoy for the same job. An expression is compiled once
at start; each event costs one call into the compiled program with only the variables the
expression mentions. Variables: ``value``, ``key``, ``ts``, ``source``, ``meta``.
Numbers in readings are doubles, so write literals as doubles too (``value * 1.8 + 32.0``);
mixing ``int`` and ``double`` in arithmetic is a CEL type error, reported at validation time.

Fast path: the common shapes (comparisons, ``&&``/``||``/``!``, ``+ - *`` on doubles, field
access such as ``value.temp``) are also translated into a Python function built from a
whitelisted syntax tree (no calls, no attribute access, only the event's variables and literal
doubles, strings and booleans), which costs ~0.1 µs instead of ~1.3 µs per event. The user's text
never reaches Python's ``eval`` (nothing here calls it): it is tokenized, each token mapped, the result parsed and every
node checked; anything else (functions, macros, ints, division, ternaries) runs on CEL itself.
At compile time both are evaluated on sample inputs and the fast path is dropped if they differ.

Cost budget: CEL's evaluator holds the GIL, so a slow expression stalls every thread and the
event loop alike, wherever it runs. Comprehension macros (``all``, ``exists``, ``exists_one``,
``map``, ``filter``) are the only way to make CEL loop, and nested ones cost the product of
their ranges. So an expression is refused before it is compiled when it is longer than
:data:`MAX_EXPRESSION_LENGTH` characters, nests brackets deeper than :data:`MAX_NESTING` or
comprehensions deeper than :data:`MAX_COMPREHENSION_DEPTH`; and an expression with
comprehensions refuses an input holding more list/map items than its nesting allows within
:data:`EVAL_BUDGET` iterations, before CEL sees it.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import re
import sys
from collections.abc import Callable
from types import CodeType, FunctionType, ModuleType
from typing import Any, NamedTuple

from .errors import ExpressionError
from .events import Event

__all__ = [
    "EVAL_BUDGET",
    "EVENT_VARIABLES",
    "MAX_COMPREHENSION_DEPTH",
    "MAX_EXPRESSION_LENGTH",
    "MAX_NESTING",
    "Expression",
    "check_expression",
]


def _load_cel() -> ModuleType:
    """The CEL extension module, without the package's ``__init__``.

    ``import cel`` also imports its interactive shell (prompt_toolkit, pygments): ~180 ms and
    ~45 MB of resident memory a gateway never uses. The compiled extension alone is all we need.
    """
    if "cel" in sys.modules:
        return sys.modules["cel"]
    spec = importlib.util.find_spec("cel")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        for so in glob.glob(f"{loc}/cel.*.so") + glob.glob(f"{loc}/cel.*.pyd"):
            ext = importlib.util.spec_from_file_location("cel.cel", so)
            if ext is not None and ext.loader is not None:
                mod = importlib.util.module_from_spec(ext)
                ext.loader.exec_module(mod)
                return mod
    import cel  # an unusual layout: fall back to the package itself

    return cel


cel = _load_cel()

EVENT_VARIABLES = ("value", "key", "ts", "source", "meta")
_SAMPLE = Event("sensor/1", 1_700_000_000.0, 21.5, "sample", {"topic": "sensors/1/temp"})
_GETTERS: dict[str, Callable[[Event], Any]] = {
    "value": lambda e: e.value,
    "key": lambda e: e.key,
    "ts": lambda e: e.ts,
    "source": lambda e: e.source,
    "meta": lambda e: e.meta or {},
}

# --- cost budget ----------------------------------------------------------------------------

MAX_EXPRESSION_LENGTH = 1000
MAX_NESTING = 32
MAX_COMPREHENSION_DEPTH = 2
# comprehension iterations one evaluation may cost (about 0.1 s of CEL): N items, counting the
# expression's own literals, at depth d need N**d <= this
EVAL_BUDGET = 100_000
_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
# CEL's lexical shapes, enough to find brackets and macro calls outside string literals and
# comments. Raw strings come first: a backslash in them escapes nothing.
_CEL_LEX = re.compile(
    r"""(?P<str>(?:[rR][bB]?|[bB][rR])(?:\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|"[^"\n]*"|'[^'\n]*')"""
    r"""|[bB]?(?:\"\"\"(?:\\[\s\S]|[^\\])*?\"\"\"|'''(?:\\[\s\S]|[^\\])*?'''|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'))"""
    r"|(?P<comment>//[^\n]*)"
    r"|(?P<space>\s+)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<open>[(\[{])"
    r"|(?P<close>[)\]}])"
    r"|(?P<other>.)",
    re.S,
)


class _Scan(NamedTuple):
    problem: str | None  # why the expression is over the cost budget
    depth: int  # how deep its comprehensions nest
    bound: frozenset[str]  # names its comprehensions bind (``x`` in ``list.all(x, x > 0.0)``)
    literal: int  # an upper bound of the items its own list and map literals hold


def _refused(problem: str) -> _Scan:
    return _Scan(problem, 0, frozenset(), 0)


def _budget(source: str) -> _Scan:
    """What a lexical scan of ``source`` says about its cost (string literals and comments skipped)."""
    if len(source) > MAX_EXPRESSION_LENGTH:
        return _refused(f"expression is {len(source):,} characters long; the limit is {MAX_EXPRESSION_LENGTH:,}")
    brackets: list[bool] = []  # per open bracket: does it hold a comprehension's arguments?
    depth = deepest = 0
    last = before = ""  # the last two significant tokens
    bound: set[str] = set()
    literal = 1
    for m in _CEL_LEX.finditer(source):
        kind = m.lastgroup
        if kind in ("space", "comment"):
            continue
        tok = m.group()
        if tok == ",":
            literal += 1
            if brackets and brackets[-1] and before == "(":
                bound.add(last)  # `.all(x,`: the comprehension's variable
        if kind == "open":
            macro = tok == "(" and before == "." and last in _MACROS
            brackets.append(macro)
            if len(brackets) > MAX_NESTING:
                return _refused(f"brackets nested more than {MAX_NESTING} deep")
            if macro:
                depth += 1
                deepest = max(deepest, depth)
                if depth > MAX_COMPREHENSION_DEPTH:
                    return _refused(
                        f"comprehensions nested {depth} deep (.{last}() inside another); at most "
                        f"{MAX_COMPREHENSION_DEPTH} may nest, as each multiplies the cost of those around it"
                    )
        elif kind == "close" and brackets and brackets.pop():
            depth -= 1
        last, before = tok, last
    if deepest and literal**deepest > EVAL_BUDGET:
        return _refused(
            f"lists of up to {literal:,} items in comprehensions nested {deepest} deep could take over "
            f"{EVAL_BUDGET:,} iterations"
        )
    return _Scan(None, deepest, frozenset(bound), literal)


def _items(roots: list[Any], limit: int) -> int:
    """List elements and mapping entries in and under ``roots`` (counting stops once past ``limit``)."""
    n = 0
    stack = roots
    while stack and n <= limit:
        o = stack.pop()
        if isinstance(o, dict):
            n += len(o)
            stack.extend(o.values())
        elif isinstance(o, list | tuple):
            n += len(o)
            stack.extend(o)
    return n


# --- fast path ------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\.\d+)"
    r"|(?P<int>\d+)"
    r"|(?P<str>\"[^\"\\\\]*\"|'[^'\\\\]*')"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>&&|\|\||==|!=|<=|>=|[<>+\-*().\[\]!]))"
)
_WORDS = {"true": "True", "false": "False", "null": "None"}
_ALLOWED = (
    ast.Expression,
    ast.BoolOp,
    ast.And,
    ast.Or,
    ast.UnaryOp,
    ast.Not,
    ast.USub,
    ast.BinOp,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Compare,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.Attribute,
    ast.Subscript,
)


def _translate(source: str) -> str | None:
    out = []
    pos = 0
    src = source.strip()
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m or m.end() == pos:
            return None
        pos = m.end()
        kind = m.lastgroup
        tok = m.group(kind)  # type: ignore[arg-type]
        if kind == "int":
            return None  # CEL ints do not mix with doubles: let CEL judge
        if kind == "name":
            if tok.startswith("_"):
                return None  # never let dunder names near Python, even as dictionary keys
            if tok in ("and", "or", "not", "in", "is", "lambda", "if", "else", "None", "True", "False"):
                return None
            tok = _WORDS.get(tok, tok)
        elif kind == "op":
            tok = {"&&": " and ", "||": " or ", "!": " not "}.get(tok, tok)
        out.append(tok)
    return " ".join(out).strip()


def _is_boolean(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return type(node.value) is bool
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, ast.Not)
    return isinstance(node, ast.Compare | ast.BoolOp)


class _ToSubscript(ast.NodeTransformer):
    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        return ast.Subscript(value=self.visit(node.value), slice=ast.Constant(node.attr), ctx=ast.Load())


def _fast_function(source: str, variables: tuple[str, ...]) -> Callable[..., Any] | None:
    """A Python function of the used variables equivalent to the CEL expression, or None."""
    text = _translate(source)
    if text is None:
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return None
    used: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            return None
        if isinstance(node, ast.Constant) and type(node.value) not in (float, str, bool, type(None)):
            return None
        if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Constant):
            return None
        if isinstance(node, ast.Compare) and len(node.ops) != 1:
            return None
        # CEL's && || ! take booleans only; Python's take anything. Keep operands boolean-shaped
        # so both give the same result type.
        if isinstance(node, ast.BoolOp) and not all(_is_boolean(v) for v in node.values):
            return None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not) and not _is_boolean(node.operand):
            return None
        if isinstance(node, ast.Name):
            if node.id not in variables:
                return None
            if node.id not in used:
                used.append(node.id)
    tree = ast.fix_missing_locations(_ToSubscript().visit(tree))
    args = ast.arguments(posonlyargs=[], args=[ast.arg(v) for v in used], kwonlyargs=[], kw_defaults=[], defaults=[])
    lam = ast.Expression(ast.Lambda(args=args, body=tree.body))
    module_code = compile(ast.fix_missing_locations(lam), "<expression>", "eval")
    # Take the lambda's code object and make a function of it directly (no eval), with no builtins.
    body = next(c for c in module_code.co_consts if isinstance(c, CodeType))
    fn: Any = FunctionType(body, {"__builtins__": {}})
    fn.variables = tuple(used)
    return fn


class Expression:
    """A compiled CEL expression over an event (or over ``variables`` given explicitly)."""

    __slots__ = ("_cel", "_prog", "depth", "evaluate", "fast", "source", "value_fn", "variables")

    def __init__(self, source: str, variables: tuple[str, ...] = EVENT_VARIABLES):
        self.source = source
        scan = _budget(source)
        if scan.problem:
            raise ExpressionError(_excerpt(source), scan.problem)
        self.depth = scan.depth
        bound = scan.bound
        try:
            self._prog = cel.compile(source)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise ExpressionError(source, _first_line(exc)) from None
        used = [v for v in self._prog.variables() if v in variables or v not in bound]
        unknown = [v for v in used if v not in variables]
        if unknown:
            raise ExpressionError(source, f"unknown name {unknown[0]!r}; available: {', '.join(variables)}")
        self.variables = tuple(used)
        execute = self._prog.execute
        if variables is EVENT_VARIABLES:
            if self.variables == ("value",):
                self._cel: Callable[[Any], Any] = lambda e: execute({"value": e.value})
            else:
                getters = [(name, _GETTERS[name]) for name in self.variables]
                self._cel = lambda e: execute({n: g(e) for n, g in getters})
        else:
            self._cel = execute
        if self.depth:
            self._cel = _guarded(self._cel, self.depth, scan.literal, variables is EVENT_VARIABLES)
        self.evaluate: Callable[[Any], Any] = self._cel
        self.fast = False
        # the fast function of an expression over an event's value alone, called with the value:
        # for a batch in one pass, which hands the batch to ``evaluate`` on any exception
        self.value_fn: Callable[[Any], Any] | None = None
        fn = _fast_function(source, variables)
        if fn is not None:
            # On any exception the fast path hands over to CEL, which has the exact semantics
            # (``false && error`` is false in CEL) and the exact error.
            cel_eval = self._cel
            if variables is EVENT_VARIABLES:
                if fn.variables == ("value",):

                    def fast(e: Any) -> Any:
                        try:
                            return fn(e.value)
                        except Exception:  # judged by CEL below
                            return cel_eval(e)
                else:
                    fgetters = [_GETTERS[name] for name in fn.variables]

                    def fast(e: Any) -> Any:
                        try:
                            return fn(*[g(e) for g in fgetters])
                        except Exception:  # judged by CEL below
                            return cel_eval(e)

                samples: list[Any] = _EVENT_SAMPLES
            else:
                names = fn.variables

                def fast(d: Any) -> Any:
                    try:
                        return fn(*[d[n] for n in names])
                    except Exception:  # judged by CEL below
                        return cel_eval(d)

                samples = []
            if all(_same(self._cel, fast, s) for s in samples):
                self.evaluate = fast
                self.fast = True
                if variables is EVENT_VARIABLES and fn.variables == ("value",):
                    self.value_fn = fn

    def __call__(self, arg: Any) -> Any:
        try:
            return self.evaluate(arg)
        except (ValueError, RuntimeError, TypeError, KeyError, IndexError, ZeroDivisionError, OverflowError) as exc:
            raise ExpressionError(self.source, _describe(exc)) from None

    def try_sample(self, sample: Any = None) -> str | None:
        """Evaluate on a typical reading; a message when that fails on types (e.g. int·double).

        Readings are numbers or objects, so an expression is tried on a number and, when it reads
        fields (``value.temp``), on an object with those fields: it is wrong only if both fail.
        """
        nested = False  # value.a.b: the types inside depend on the data
        if sample is not None:
            samples = [sample]
        else:
            samples = [_SAMPLE]
            fields = dict.fromkeys(_VALUE_FIELD.findall(self.source), 21.5)
            # value.a.b, or a comprehension (over a list the samples do not have)
            nested = bool(_NESTED_FIELD.search(self.source)) or self.depth > 0
            if fields and not nested:
                samples.append(Event(_SAMPLE.key, _SAMPLE.ts, fields, _SAMPLE.source, _SAMPLE.meta))
        problem = None
        for s in samples:
            try:
                self._cel(s)
            except TypeError as exc:
                problem = _first_line(exc)  # the last sample (the object, if any) says it best
                continue
            except (ValueError, RuntimeError, KeyError, IndexError, ZeroDivisionError, OverflowError):
                return None  # depends on the data (missing field in a mapping …): judged per event
            return None
        return None if nested else problem


_VALUE_FIELD = re.compile(r"\bvalue\.([A-Za-z_][A-Za-z0-9_]*)")
_NESTED_FIELD = re.compile(r"\bvalue\.[A-Za-z_][A-Za-z0-9_]*\s*[.\[]")


_EVENT_SAMPLES = [
    _SAMPLE,
    Event("b/2", 1_700_000_001.0, -3.5, "s", None),
    Event("c", 0.0, 0.0, "", {}),
    Event("d/4", 1.0, 1e6, "x", {"topic": "a/b"}),
    Event("e", 2.0, {"temp": 21.5, "humidity": 40.0, "ok": True, "name": "p"}, "s", None),
]


def _same(slow: Callable[[Any], Any], fast: Callable[[Any], Any], sample: Any) -> bool:
    """Both fail, or both give the same value of the same type."""
    try:
        a = slow(sample)
    except Exception:  # CEL's errors are plain ValueError/RuntimeError/TypeError; any is a failure here
        a = _FAILED
    try:
        b = fast(sample)
    except Exception:  # whatever Python raises on this sample
        b = _FAILED
    if a is _FAILED or b is _FAILED:
        return a is b
    return type(a) is type(b) and a == b


_FAILED = object()


def _guarded(evaluate: Callable[[Any], Any], depth: int, literal: int, event: bool) -> Callable[[Any], Any]:
    """``evaluate``, refusing inputs whose lists and maps would cost more than the budget."""
    limit = max(0, int(EVAL_BUDGET ** (1 / depth)) - literal)

    def guarded(arg: Any) -> Any:
        n = _items([arg.value, arg.meta] if event else list(arg.values()), limit)
        if n > limit:
            raise ValueError(
                f"the input holds over {limit:,} list or map items, more than comprehensions nested "
                f"{depth} deep may go through ({EVAL_BUDGET:,} iterations at most)"
            )
        return evaluate(arg)

    return guarded


def _excerpt(source: str) -> str:
    return source if len(source) <= 80 else source[:77] + "..."


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"no such key: {exc.args[0] if exc.args else ''}"
    if isinstance(exc, TypeError) and "not subscriptable" in str(exc):
        return "the value has no fields (it is a number, not an object)"
    return _first_line(exc)


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
