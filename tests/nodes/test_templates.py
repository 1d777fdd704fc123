"""Prompt templates render on a budget: what would take the gateway's CPU or memory is refused quickly."""

from __future__ import annotations

from typing import Any

import pytest
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from nodes._templates import TemplateBudgetError, make_environment, render
from nodes.llm import _DEFAULT_PROMPT

CTX: dict[str, Any] = {
    "key": "boiler/temp",
    "ts": 1.0,
    "value": {"rule": "boiler/temp above 90", "reading": 93.5, "state": "raised", "items": list(range(50))},
    "source": "hot",
    "meta": {"topic": "sensors/boiler/temp"},
}


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% for a in range(3000) %}{% for b in range(3000) %}{% endfor %}{% endfor %}", "loop iterations"),
        ("{% macro f() %}{{ f() }}{{ f() }}{% endmacro %}{{ f() }}", "nested too deeply"),
        ("{% macro f(n) %}{% if n < 20 %}{{ f(n+1) }}{{ f(n+1) }}{% endif %}{% endmacro %}{{ f(0) }}", "calls"),
        ("{{ 'x' * 1000000000 }}", "* operator"),
        ("{{ 10 ** 10000000 }}", "** operator"),
        ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "~"),
        ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "+"),
        ("{% set ns = namespace(n=10) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}", "bits"),
        ("{{ 'x'|center(1000000000) }}", "filter center"),
        ("{{ range(10)|batch(1000000000, 'x')|list }}", "filter batch"),
        ("{{ ('x' * 50000)|replace('x', 'y' * 50000) }}", "filter replace"),
        ("{{ ('\t' * 50000).expandtabs(9000) }}", "expandtabs"),
        ("{{ (['x' * 50000] * 50000)|join }}", "operator"),
        ("{{ '%0999999999d' % 1 }}", "width"),
        ("{{ '%0999999999d'|format(1) }}", "width"),
        ("{{ '{:>999999999}'.format(1) }}", "width"),
        ("{% for i in range(10) %}{{ 'x' * 9000 }}{% endfor %}", "rendered text is longer than 65,536"),
        ("{{ lipsum(99999) }}", "'lipsum' is undefined"),
        # within the step and size limits, but each step costs milliseconds: the CPU time stops it
        ("{% set b = 'a ' * 49999 %}{% for i in range(9000) %}{{ b.split()|length }}{% endfor %}", "CPU time"),
        ("{% set b = 'a' * 99999 %}{% for i in range(9000) %}{{ b|replace('a', 'b')|length }}{% endfor %}", "CPU"),
    ],
)
def test_hostile_templates_are_refused(template: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message.replace("*", r"\*").replace("+", r"\+")) as err:
        render(make_environment().from_string(template), CTX)
    assert isinstance(err.value, TemplateBudgetError) or "undefined" in message


@pytest.mark.parametrize(
    "template",
    [
        _DEFAULT_PROMPT,
        "{% for k, v in value.items() %}{{ k }}={{ v }} ({{ loop.index }}/{{ loop.length }}){% endfor %}",
        "{{ value|tojson }} {{ key|upper }} {{ value['items']|sum }} {{ '%5.1f' % value.reading }}",
        "{{ '{:>8}'.format(key) }} {{ value['items']|map('string')|join(', ') }} {{ 2 ** 100 }} {{ 'ab' * 3 }}",
        "{% macro row(k) %}- {{ k }}{% endmacro %}{% for k in meta %}{{ row(k) }}{% endfor %}",
        "{{ key ~ ': ' ~ value.reading }} {{ value['items'][:3] + [1] }} {% for x in value['items'] if x > 45 %}{{ x }}"
        "{% else %}none{% endfor %}",
    ],
)
def test_ordinary_templates_render_as_the_plain_sandbox_does(template: str) -> None:
    plain = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, trim_blocks=True, lstrip_blocks=True)
    assert render(make_environment().from_string(template), CTX) == plain.from_string(template).render(CTX)
