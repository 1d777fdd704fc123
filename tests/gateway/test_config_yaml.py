"""YAML that PyYAML cannot construct is a config error at its line, never an exception (found by fuzzing)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import parse_config
from gateway.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gateway: {id: =}\n", "f.yaml:1: gateway.id: YAML: could not determine a constructor"),
        ("gateway: {id: g}\nconsole: !custom x\n", "f.yaml:2: console: YAML: could not determine"),
        ("=\n", "f.yaml:1: <root>: config must be a mapping of sections"),
    ],
)
def test_unconstructible_yaml_is_a_config_error(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "f.yaml")
    assert any(str(i).startswith(expected) for i in err.value.issues), [str(i) for i in err.value.issues]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "1" * 5000,
            "f.yaml:1: gateway.queue_size: YAML: Exceeds the limit (4300 digits) for integer string conversion",
        ),
        ("2001-13-45", "f.yaml:1: gateway.queue_size: YAML: month must be in 1..12; quote the value if it is text"),
        ("!!int ", "f.yaml:1: gateway.queue_size: YAML: not a valid value; quote the value if it is text"),
        ("!!timestamp ", "f.yaml:1: gateway.queue_size: YAML: not a valid value; quote the value if it is text"),
    ],
)
def test_scalars_python_cannot_convert_are_config_errors(value: str, expected: str) -> None:
    """These raised ValueError out of the loader: a traceback from `sluice validate`, a 500 in the console."""
    with pytest.raises(ConfigError) as err:
        parse_config(f"gateway: {{id: g, queue_size: {value}}}\n", "f.yaml")
    assert any(str(i).startswith(expected) for i in err.value.issues), [str(i) for i in err.value.issues]


_FRAGMENTS = st.sampled_from(
    [
        *["gateway:", " {id: g}", "\n", "  ", "- ", "&a ", "*a", "<<: ", "[", "]", "{", "}", ",", ":", "? ", "'", '"'],
        *["!!int ", "!!float ", "!!timestamp ", "!!binary ", "!!str ", "!!python/object ", "9" * 5000, "1e999"],
        *["2001-13-45", "${X}", "$$", "pipelines:", "nodes:", "id: n", "type: filter", "type: llm", "where: "],
        *["prompt: ", "{{", "}}", "{%", "%}", "\t", "#", "|", ">", "~", "null", "---\n", "...\n", "\x00", "\x85"],
    ]
)


@settings(deadline=None, max_examples=300)  # wall-clock limits flake on a busy 2-core machine
@given(st.lists(_FRAGMENTS, max_size=30).map("".join))
def test_any_text_is_a_config_or_a_config_error(text: str) -> None:
    """Found this way: an empty `!!int` raised IndexError and `!!timestamp` AttributeError out of the loader."""
    try:
        parse_config(text, "f.yaml", env={})
    except ConfigError:
        pass
