"""JSON on the hot path is msgspec's; what it decodes equals ``json.loads``, what it refuses goes to
``json.loads``; encoded fields read back as the same object, with NaN as ``null``."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridges._json import NotText, loads_json
from gateway.envelope import encode_fields

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(derandomize=True, max_examples=300)
@given(_json, st.booleans())
def test_decoding_equals_jsonloads_json(value: Any, ascii_only: bool) -> None:
    payload = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert loads_json(payload) == json.loads(payload)


def test_what_strict_json_refuses_decodes_as_json_loads_does() -> None:
    for payload in (b"NaN", b"1e400", b'\xef\xbb\xbf{"a": 1}', b'{"value": Infinity}', b"7" * 5000):
        try:
            want = repr(json.loads(payload))
        except ValueError as exc:
            want = type(exc).__name__
        try:
            got = repr(loads_json(payload))
        except ValueError as exc:
            got = type(exc).__name__
        assert got == want, payload
    for payload in (b'"\\ud800"', b'{"k": "a\\udfff"}'):
        with pytest.raises(NotText):
            loads_json(payload)
    assert loads_json(b'"\\ud83d\\ude00"') == "\U0001f600"  # a pair is one character


def test_malformed_payloads_raise_what_json_raises() -> None:
    for payload in (b"[1,2", b'{"a": 1} x', b"", b"\xff"):
        try:
            json.loads(payload)
        except ValueError as exc:
            want: type[BaseException] = type(exc)
        try:
            loads_json(payload)
        except ValueError as exc:
            assert type(exc) is want
        else:
            raise AssertionError(f"{payload!r} decoded")


@settings(derandomize=True, max_examples=300)
@given(st.dictionaries(st.text(), _json, max_size=6))
def test_encoded_fields_read_back_as_the_same_object(fields: dict[str, Any]) -> None:
    assert json.loads(encode_fields(fields)) == fields


def test_encoding_edge_cases() -> None:
    assert json.loads(encode_fields({"v": math.nan, "w": math.inf})) == {"v": None, "w": None}
    assert encode_fields({"s": "\ud800"}) == b'{"s":"\\ud800"}'  # kept as json.dumps escapes it
    assert json.loads(encode_fields({"x": object})) == {"x": str(object)}
