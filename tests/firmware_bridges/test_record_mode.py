"""`record` mode: one object reading per line/frame must carry exactly what per-field mode gives."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridges.codecs import CobsCodec, JsonCodec, make_decoder, make_encoder

FIELDS = [{"name": "flow", "type": "u16", "scale": 0.1}, {"name": "p", "type": "i16", "scale": 0.01}]


def _group(readings, prefix: str) -> list[dict[str, float]]:  # type: ignore[no-untyped-def]
    """Per-field readings of consecutive records, regrouped into one dict per record."""
    out: list[dict[str, float]] = []
    for key, value, _ts in readings:
        name = key[len(prefix) :]
        if not out or name in out[-1]:
            out.append({})
        out[-1][name] = value
    return out


@settings(max_examples=150, deadline=None)
@given(
    recs=st.lists(
        st.fixed_dictionaries(
            {
                "flow": st.integers(0, 65535).map(lambda i: i / 10),
                "p": st.integers(-32768, 32767).map(lambda i: i / 100),
            }
        ),
        max_size=20,
    ),
    chunk=st.integers(1, 64),
)
def test_cobs_record_mode_equals_per_field_mode(recs: list[dict[str, float]], chunk: int) -> None:
    per_field = CobsCodec(type="cobs", prefix="skid.", fields=FIELDS)
    record = CobsCodec(type="cobs", prefix="skid.", fields=FIELDS, record="all")
    enc = make_encoder(per_field)
    blob = b"".join(enc.encode(r) for r in recs)
    a, b = make_decoder(per_field), make_decoder(record)
    ra, rb = [], []
    for i in range(0, len(blob), chunk):
        ra += a.feed(blob[i : i + chunk])[0]
        rb += b.feed(blob[i : i + chunk])[0]
    assert [key for key, _v, _ts in rb] == ["skid.all"] * len(recs)
    assert [value for _k, value, _ts in rb] == _group(ra, "skid.")


@settings(max_examples=150, deadline=None)
@given(
    recs=st.lists(
        st.dictionaries(
            st.sampled_from(["t", "rh", "co2", "label"]),
            st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=3),
            min_size=1,
        ),
        max_size=10,
    )
)
def test_json_record_mode_groups_the_numeric_fields(recs: list[dict[str, object]]) -> None:
    import json

    blob = "".join(json.dumps(r) + "\n" for r in recs).encode()
    readings, errors = make_decoder(JsonCodec(type="json", record="env", ts_field=None)).feed(blob)
    want = []
    for r in recs:
        fields = {k: float(v) for k, v in r.items() if isinstance(v, float) and math.isfinite(v)}
        if fields:
            want.append(fields)
    assert [value for _k, value, _ts in readings] == want
    assert all(key == "env" for key, _v, _ts in readings)
    nonfinite = sum(1 for r in recs for v in r.values() if isinstance(v, float) and not math.isfinite(v))
    assert sum(1 for e in errors if e.kind == "nonfinite") == nonfinite


def test_record_and_key_field_are_exclusive() -> None:
    with pytest.raises(ValueError, match="either `key_field`"):
        JsonCodec(type="json", record="env", key_field="k")
