"""Config text an admin (or a stolen admin session) sends cannot exhaust the gateway's memory or CPU.

YAML aliases are refused when they would expand into a huge document or into themselves, and the
loader does not keep what it built once a parse is over. Checked through `sluice validate`.
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError

from .test_config import validate

# 9 levels of 9 aliases each: 9**9 (387 million) strings when expanded, in under 400 bytes.
BILLION_LAUGHS = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
)


def test_alias_bomb_is_refused_at_its_line(tmp_path: Path) -> None:
    assert len(BILLION_LAUGHS) < 400
    res = validate(tmp_path, "gateway: {id: g}\n" + BILLION_LAUGHS + "\n")
    assert res.returncode == 1, res.stderr
    # the first line whose expansion passes the cap: 9**6 values under `f`
    assert "sluice.yaml:7: <root>: YAML: aliases expand this to more than 100,000 values" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("gateway: {id: g}\nconsole:\n  users: &u\n    - name: x\n    - *u\n", 5),
        ("gateway: &g {id: g, data_dir: *g}\n", 1),
    ],
)
def test_recursive_alias_is_a_config_error_at_its_line(tmp_path: Path, text: str, line: int) -> None:
    res = validate(tmp_path, text)
    assert res.returncode == 1, res.stderr
    assert f"sluice.yaml:{line}: <root>: YAML: alias *" in res.stderr and "recursive alias" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_deep_nesting_is_a_config_error(tmp_path: Path) -> None:
    res = validate(tmp_path, "gateway: {id: g}\nx: " + "[" * 5000 + "]" * 5000 + "\n")
    assert res.returncode == 1, res.stderr
    assert "sluice.yaml:2: <root>: YAML: nested more than 64 levels deep" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_aliases_within_the_cap_still_work() -> None:
    text = "gateway: &g {id: g}\nconsole: {host: &h 127.0.0.1}\npipelines: []\nx: [*g, *h]\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "f.yaml")
    # the aliases expand fine; only the unknown section is a problem
    assert [i.path for i in err.value.issues] == ["x"], [str(i) for i in err.value.issues]


def test_parsing_keeps_nothing_it_constructed() -> None:
    """A shared loader kept every scalar it ever built: memory grew with each validation."""
    megabyte = 1 << 20

    def parse(i: int) -> None:
        # a distinct 1 MB string each time, so nothing can be shared between the parses
        parse_config(f"gateway: {{id: g}}\npipelines: []\nconsole: {{host: '{chr(97 + i) * megabyte}'}}\n")

    parse(0)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1, 6):
            parse(i)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < megabyte, f"{grown:,} bytes still held after five parses of 1 MB values"


ZEROS = "[" + ",".join(["0"] * 60) + "]"
# 60**4 (13 million) iterations: about 15 s of CEL holding the GIL, when it was evaluated on a sample
HOSTILE_CEL = f"{ZEROS}.all(a, {ZEROS}.all(b, {ZEROS}.all(c, {ZEROS}.exists(d, false) || true)))"


def pipeline_with_filter(where: str) -> str:
    return f"""gateway: {{id: g}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, interval: 1s, sensors: [{{key: t, base: 20}}]}}
      - id: hostile
        type: filter
        input: sim
        where: '{where}'
      - {{id: out, type: log, input: hostile}}
"""


def test_nested_comprehensions_are_refused_naming_node_and_field(tmp_path: Path) -> None:
    res = validate(tmp_path, pipeline_with_filter(HOSTILE_CEL))
    assert res.returncode == 1, res.stderr
    assert "sluice.yaml:9: pipelines.0.nodes.1.where: comprehensions nested 3 deep (.all() inside another)" in (
        res.stderr
    ), res.stderr
    # within the budget, comprehensions still validate
    res = validate(tmp_path, pipeline_with_filter(f"{ZEROS}.all(a, {ZEROS}.exists(b, true))"))
    assert res.returncode == 0, res.stderr
    res = validate(tmp_path, pipeline_with_filter(" || ".join(["value > 1.0"] * 100)))
    assert res.returncode == 1 and "where: expression is 1,496 characters long; the limit is 1,000" in res.stderr
