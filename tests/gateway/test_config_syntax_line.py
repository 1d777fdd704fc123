"""A YAML syntax error is reported at the line that has it, not at the next token's line where
the parser noticed it (the console links each error to its line)."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, parse_config

HEAD = "gateway: {id: gw}\n"


def _issue(text: str) -> tuple[int, str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "c.yaml", {})
    issue = err.value.issues[0]
    return issue.line, issue.message


@pytest.mark.parametrize(
    ("text", "line", "noticed"),
    [
        # an unclosed flow sequence: noticed at the next key, 2 lines on (a blank and a comment between)
        (HEAD + "pipelines: [a, b\n\n# note\nconsole: {}\n", 2, 5),
        # an unclosed flow mapping, at the end of the text
        (HEAD + "console: {port: 1\n", 2, 3),
        # an unclosed quote runs to the end of the text: the line where it opened
        (HEAD + 'console: {host: "abc}\npipelines: []\n', 2, 4),
    ],
)
def test_the_syntax_error_is_on_the_line_that_has_it(text: str, line: int, noticed: int) -> None:
    got, message = _issue(text)
    assert got == line, message
    assert message.startswith("YAML syntax: ")
    assert f"(noticed at line {noticed})" in message


def test_an_error_inside_a_line_keeps_that_line() -> None:
    got, message = _issue(HEAD + "console: a: b\n")
    assert got == 2 and "noticed" not in message, message
