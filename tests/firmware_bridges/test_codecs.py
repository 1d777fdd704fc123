"""Codecs: streaming decoders agree with plain whole-input references for any chunking, and resync."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from firmware_bridges import CodecOptions, Reading, make_decoder, make_encoder, nmea_sentence
from firmware_bridges._framing import CobsError, cobs_decode, cobs_encode, crc16_ccitt_false, crc32
from gateway.events import Event

CODEC: TypeAdapter[Any] = TypeAdapter(CodecOptions)


def codec(spec: Any) -> Any:
    return CODEC.validate_python(spec)


def feed_chunked(dec: Any, data: bytes, cuts: list[int]) -> tuple[list[Reading], list[str]]:
    readings: list[Reading] = []
    kinds: list[str] = []
    points = sorted({c % (len(data) + 1) for c in cuts})
    prev = 0
    for p in [*points, len(data)]:
        r, e = dec.feed(data[prev:p])
        readings += [Reading(*x) for x in r]  # decoders return plain (key, value, ts) tuples
        kinds += [x.kind for x in e]
        prev = p
    return readings, kinds


def as_tuples(readings: list[Reading]) -> list[tuple[str, float, float | None]]:
    return [tuple(r) for r in readings]


# --- plain references ------------------------------------------------------------------------


def ref_crc16(data: bytes) -> int:
    crc = 0xFFFF
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def ref_crc32(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xEDB88320 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def ref_cobs_decode(data: bytes) -> bytes | None:
    out = b""
    i = 0
    while i < len(data):
        code = data[i]
        if code == 0 or i + code > len(data) or 0 in data[i + 1 : i + code]:
            return None
        out += data[i + 1 : i + code]
        i += code
        if code != 0xFF and i != len(data):
            out += b"\0"
    return out if data else None


def ref_json_lines(stream: bytes, max_line: int) -> tuple[list[tuple[str, float, float | None]], int]:
    """Whole input at once: split lines, json.loads each, numeric fields (minus ts) are readings."""
    out = []
    errors = 0
    for line in stream.split(b"\n")[:-1]:
        if len(line) > max_line:
            errors += 1
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            if line.strip():
                errors += 1
            continue
        if not isinstance(obj, dict):
            errors += 1
            continue
        ts = obj.pop("ts", None)
        nums = [(k, float(v)) for k, v in obj.items() if type(v) in (int, float)]
        if not nums:
            errors += 1
        for k, v in nums:
            if math.isfinite(v):
                out.append((k, v, None if ts is None else float(ts)))
            else:
                errors += 1
    return out, errors


# --- CRC and COBS ----------------------------------------------------------------------------


def test_crc_check_values() -> None:
    assert crc16_ccitt_false(b"123456789") == 0x29B1
    assert crc32(b"123456789") == 0xCBF43926


@settings(deadline=None)  # wall-clock limits flake on a busy 2-core machine
@given(st.binary(max_size=600))
def test_crc_matches_bitwise_reference(data: bytes) -> None:
    assert crc16_ccitt_false(data) == ref_crc16(data)
    assert crc32(data) == ref_crc32(data)


@settings(deadline=None)  # wall-clock limits flake on a busy 2-core machine
@given(st.binary(max_size=1200))
def test_cobs_round_trip_and_no_zero(data: bytes) -> None:
    enc = cobs_encode(data)
    assert 0 not in enc
    assert cobs_decode(enc) == data
    assert ref_cobs_decode(enc) == data
    assert len(enc) <= len(data) + len(data) // 254 + 1


@pytest.mark.parametrize("run", [253, 254, 255, 508, 509, 700])
@pytest.mark.parametrize("tail", [b"", b"\0", b"\0\x07", b"\x07\0\0"])
def test_cobs_full_blocks_round_trip(run: int, tail: bytes) -> None:
    """Runs of 254+ non-zero bytes make full blocks (code 0xFF, no zero after): the block-by-block path."""
    data = bytes(1 + i % 255 for i in range(run)) + tail
    enc = cobs_encode(data)
    assert cobs_decode(enc) == data == ref_cobs_decode(enc)
    for cut in (enc[:-1], enc[:-2], enc[:255], enc[:256]):  # truncated: valid or not, as the reference says
        try:
            got: bytes | None = cobs_decode(cut)
        except CobsError:
            got = None
        assert got == ref_cobs_decode(cut), cut


@settings(deadline=None)  # wall-clock limits flake on a busy 2-core machine
@given(st.binary(min_size=1, max_size=300))
def test_cobs_decode_agrees_with_reference_on_any_bytes(data: bytes) -> None:
    want = ref_cobs_decode(data)
    try:
        got: bytes | None = cobs_decode(data)
    except CobsError:
        got = None
    assert got == want


# --- JSON lines ------------------------------------------------------------------------------

_names = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)
_floats = st.floats(allow_nan=False, allow_infinity=False, width=64) | st.integers(-(10**6), 10**6)
_records = st.dictionaries(_names, _floats, min_size=1, max_size=5)


@st.composite
def json_streams(draw: st.DrawFn) -> bytes:
    """Valid lines mixed with garbage, over-long lines, blank lines, NaN and non-objects."""
    parts: list[bytes] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["ok", "ok", "ok", "garbage", "long", "blank", "nan", "list", "crlf"]))
        if kind == "ok":
            parts.append(json.dumps(draw(_records)).encode())
        elif kind == "crlf":
            parts.append(json.dumps(draw(_records)).encode() + b"\r")
        elif kind == "garbage":
            parts.append(draw(st.binary(max_size=40)).replace(b"\n", b""))
        elif kind == "long":
            parts.append(b'{"a": "' + b"x" * draw(st.integers(200, 400)) + b'"}')
        elif kind == "blank":
            parts.append(b"   ")
        elif kind == "nan":
            parts.append(b'{"a": NaN, "b": 1}')
        else:
            parts.append(b"[1, 2]")
    return b"".join(p + b"\n" for p in parts)


@settings(deadline=None, max_examples=200)
@given(json_streams(), st.lists(st.integers(0, 10_000), max_size=8))
def test_json_streaming_equals_reference(stream: bytes, cuts: list[int]) -> None:
    dec = make_decoder(codec({"type": "json", "max_line": 128}))
    readings, kinds = feed_chunked(dec, stream, cuts)
    want, n_errors = ref_json_lines(stream, 128)
    assert as_tuples(readings) == want
    assert len(kinds) == n_errors


@settings(deadline=None)  # wall-clock limits flake on a busy 2-core machine
@given(
    st.lists(_records, min_size=1, max_size=10),
    st.lists(st.integers(0, 5000), max_size=6),
    st.sampled_from(["json", "kv", "csv"]),
)
def test_encode_then_decode_round_trips(records: list[dict[str, float]], cuts: list[int], kind: str) -> None:
    if kind == "csv":  # one fixed set of columns, as a CSV device has
        cols = sorted({k for r in records for k in r})
        records = [{c: r.get(c, 1.5) for c in cols} for r in records]
    opts = codec({"type": kind, "ts_field": None})
    enc = make_encoder(opts)
    stream = b"".join(enc.encode(r) for r in records)
    readings, kinds = feed_chunked(make_decoder(opts), stream, cuts)
    assert kinds == []
    assert as_tuples(readings) == [(k, float(v), None) for r in records for k, v in r.items()]


def test_over_long_line_is_one_error_then_resync() -> None:
    dec = make_decoder(codec({"type": "json", "max_line": 32}))
    r1, e1 = dec.feed(b'{"a": 1}\n' + b"x" * 40)
    r2, e2 = dec.feed(b"y" * 100)
    r3, e3 = dec.feed(b'zz\n{"b": 2}\n')
    assert [key for key, _v, _ts in r1 + r2 + r3] == ["a", "b"]
    assert [x.kind for x in e1 + e2 + e3] == ["overlong"]


def test_truncated_line_at_end_is_reported() -> None:
    dec = make_decoder(codec("json"))
    assert dec.feed(b'{"a": 1}\n{"a": ') == ([Reading("a", 1.0)], [])
    assert [e.kind for e in dec.flush()] == ["truncated"]
    assert dec.flush() == []
    dec.feed(b"  \r")
    assert dec.flush() == []  # whitespace between lines is idle, not a truncated line


def test_truncated_cobs_frame_of_whitespace_bytes_is_reported() -> None:
    """0x09-0x0D and 0x20 are ordinary bytes in a binary frame: a piece of them left at the end is truncated."""
    dec = make_decoder(codec({"type": "cobs", "fields": [{"name": "x", "type": "u8"}], "crc": "none"}))
    assert dec.feed(b"\x02\x05\x00\n \t") == ([Reading("x", 5.0)], [])
    assert [e.kind for e in dec.flush()] == ["truncated"]


def test_json_fields_and_errors() -> None:
    dec = make_decoder(codec({"type": "json", "device_field": "dev", "prefix": "p."}))
    r, e = dec.feed(
        b'{"dev": "s1", "t": 21.5, "ok": true, "ts": "2024-01-01T00:00:00Z"}\n'
        b'{"t": Infinity}\n{"name": "x"}\n\xff\xfe\n'
    )
    assert as_tuples(r) == [("p.s1.t", 21.5, 1704067200.0)]
    assert [x.kind for x in e] == ["nonfinite", "malformed", "garbage"]
    assert "t is inf" in e[0].message
    kv = make_decoder(codec({"type": "json", "key_field": "sensor", "value_field": "v"}))
    r, e = kv.feed(b'{"sensor": "a", "v": 3, "ts": 1700000000000}\n{"sensor": "a"}\n')
    assert as_tuples(r) == [("a", 3.0, 1700000000.0)] and [x.kind for x in e] == ["malformed"]


# --- key=value and CSV -----------------------------------------------------------------------


def test_kv_lines() -> None:
    dec = make_decoder(codec({"type": "kv", "device_field": "id"}))
    r, e = dec.feed(b"id=n1 t=21.5, rh=40;v=3.3\nt=nan\nno pairs here\nid=x\n")
    assert as_tuples(r) == [("n1.t", 21.5, None), ("n1.rh", 40.0, None), ("n1.v", 3.3, None)]
    assert [x.kind for x in e] == ["nonfinite", "malformed", "malformed"]
    semi = make_decoder(codec({"type": "kv", "separator": "|"}))
    assert as_tuples(semi.feed(b"a=1|b = 2\n")[0]) == [("a", 1.0, None), ("b", 2.0, None)]


def test_csv_header_learned_and_relearned() -> None:
    dec = make_decoder(codec({"type": "csv", "ts_field": "time"}))
    r, e = dec.feed(b"1,2\ntime,t,rh\n1700000000,21.5,40\n1700000001,,41\n1,2\n1,x,3\nt,rh\n22,50\n")
    assert as_tuples(r) == [
        ("t", 21.5, 1700000000.0),
        ("rh", 40.0, 1700000000.0),
        ("rh", 41.0, 1700000001.0),
        ("t", 22.0, None),
        ("rh", 50.0, None),
    ]
    assert [x.kind for x in e] == ["malformed", "malformed", "malformed"]
    assert "before any header" in e[0].message and "expected 3" in e[1].message and "column t" in e[2].message


def test_csv_configured_columns_skip_matching_header() -> None:
    dec = make_decoder(codec({"type": "csv", "columns": ["a", "b"], "delimiter": ";"}))
    r, e = dec.feed(b"a;b\n1;2\nc;d\n")
    assert as_tuples(r) == [("a", 1.0, None), ("b", 2.0, None)]
    assert [x.kind for x in e] == ["malformed"]  # a header-looking row of other names is not data


# --- NMEA 0183 -------------------------------------------------------------------------------

GGA = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"
RMC = b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A\r\n"


def test_nmea_reference_sentences() -> None:
    dec = make_decoder(codec("nmea"))
    more = [
        nmea_sentence(b)
        for b in ("WIMWV,214.8,R,10.0,N,A", "YXXDR,C,19.5,C,AIRT,P,1.013,B,BARO", "GPGSV,3,1,11,03,03,111,00")
    ]
    r, e = dec.feed(GGA + RMC + "".join(m + "\r\n" for m in more).encode())
    assert e == []
    got = {(key, ts): v for key, v, ts in r}
    assert got[("gps.lat", None)] == pytest.approx(48.1173)
    assert got[("gps.lon", None)] == pytest.approx(11.516667, abs=1e-6)
    assert got[("gps.alt", None)] == 545.4 and got[("gps.sats", None)] == 8.0
    rmc_ts = 764426119.0  # 1994-03-23 12:35:19 UTC
    assert got[("gps.speed", rmc_ts)] == pytest.approx(22.4 * 0.514444)
    assert got[("wind.rel.angle", None)] == 214.8
    assert got[("wind.rel.speed", None)] == pytest.approx(5.14444)
    assert got[("xdr.AIRT", None)] == 19.5 and got[("xdr.BARO", None)] == 1.013
    assert dec.stats["skipped"] == 1  # GSV is not read, and not an error


def test_nmea_bad_input() -> None:
    dec = make_decoder(codec("nmea"))
    r, e = dec.feed(
        GGA.replace(b"*47", b"*48")
        + GGA.replace(b"*47", b"")
        + b"\x00\xff\x13"
        + GGA
        + b"hello\r\n"
        + b"$GPGGA,1,2*"
        + b"%02X" % (0)
        + b"\r\n"
        + nmea_sentence("GPGGA,1,4807.038,N,01131.000,E,1,08,0.9,5x5,M,,M,,").encode()
        + b"\r\n"
    )
    assert [key for key, _v, _ts in r] == ["gps.fix", "gps.sats", "gps.hdop", "gps.lat", "gps.lon", "gps.alt"]
    assert [x.kind for x in e] == ["checksum", "checksum", "garbage", "garbage", "checksum", "malformed"]
    lenient = make_decoder(codec({"type": "nmea", "require_checksum": False}))
    assert len(lenient.feed(GGA.replace(b"*47", b""))[0]) == 6


def test_nmea_no_fix_and_void_status_give_no_position() -> None:
    dec = make_decoder(codec("nmea"))
    r, e = dec.feed(
        nmea_sentence("GPGGA,123519,,,,,0,00,,,M,,M,,").encode()
        + b"\n"
        + nmea_sentence("GPRMC,123519,V,,,,,,,230394,,").encode()
        + b"\n"
        + nmea_sentence("WIMWV,10,T,3,M,V").encode()
        + b"\n"
    )
    assert as_tuples(r) == [("gps.fix", 0.0, None), ("gps.sats", 0.0, None)] and e == []


@settings(deadline=None)  # wall-clock limits flake on a busy 2-core machine
@given(
    st.floats(-89.9, 89.9),
    st.floats(-179.9, 179.9),
    st.floats(0, 359),
    st.floats(0, 60),
    st.lists(st.integers(0, 2000), max_size=5),
)
def test_nmea_encoder_round_trip(lat: float, lon: float, angle: float, speed: float, cuts: list[int]) -> None:
    opts = codec("nmea")
    data = make_encoder(opts).encode(
        {
            "gps.lat": lat,
            "gps.lon": lon,
            "ts": 1_700_000_000.25,
            "wind.rel.angle": angle,
            "wind.rel.speed": speed,
            "xdr.T": 1.5,
        }
    )
    r, kinds = feed_chunked(make_decoder(opts), data, cuts)
    assert kinds == []
    got = {(x.key, x.ts is not None): x.value for x in r}
    assert got[("gps.lat", True)] == pytest.approx(lat, abs=1e-5)
    assert got[("gps.lon", False)] == pytest.approx(lon, abs=1e-5)
    assert got[("wind.rel.angle", False)] == pytest.approx(angle, abs=0.051)
    assert got[("wind.rel.speed", False)] == pytest.approx(speed, abs=0.0051)
    assert [x.ts for x in r if x.key == "gps.course"] == [1_700_000_000.25]


# --- COBS + CRC + struct ---------------------------------------------------------------------

LAYOUT = {
    "type": "cobs",
    "crc": "crc16",
    "byte_order": "little",
    "fields": [
        {"name": "seq", "type": "u16"},
        {"name": "t", "type": "i16", "scale": 0.01},
        {"type": "pad"},
        {"name": "p", "type": "f32"},
        {"name": "e", "type": "u32", "offset": -5},
    ],
}


def ref_cobs_frames(stream: bytes, crc: str, fmt: str, max_frame: int) -> tuple[list[tuple[float, ...]], int]:
    """Whole input at once: split on zero bytes, unstuff, check the CRC bitwise, struct.unpack."""
    out = []
    errors = 0
    n = {"crc16": 2, "crc32": 4}[crc]
    for piece in stream.split(b"\0")[:-1]:
        if not piece:
            continue
        if len(piece) > max_frame:
            errors += 1
            continue
        frame = ref_cobs_decode(piece)
        if frame is None or len(frame) <= n:
            errors += 1
            continue
        body, tail = frame[:-n], frame[-n:]
        if int.from_bytes(tail, "little") != (ref_crc16 if crc == "crc16" else ref_crc32)(body):
            errors += 1
            continue
        if len(body) != struct.calcsize(fmt):
            errors += 1
            continue
        vals = struct.unpack(fmt, body)
        if not all(math.isfinite(v) for v in vals):
            errors += sum(not math.isfinite(v) for v in vals)
            vals = tuple(v for v in vals if math.isfinite(v))
        out.append(vals)
    return out, errors


@st.composite
def cobs_streams(draw: st.DrawFn) -> tuple[bytes, str]:
    crc = draw(st.sampled_from(["crc16", "crc32"]))
    enc = make_encoder(
        codec({"type": "cobs", "crc": crc, "fields": [{"name": "a", "type": "i32"}, {"name": "b", "type": "f32"}]})
    )
    parts = []
    for _ in range(draw(st.integers(0, 10))):
        kind = draw(st.sampled_from(["ok", "ok", "ok", "noise", "flip", "cut", "long", "nan"]))
        a = draw(st.integers(-(2**31), 2**31 - 1))
        b = draw(st.floats(width=32, allow_nan=False, allow_infinity=False))
        frame = enc.encode({"a": a, "b": b})
        if kind == "noise":
            frame = draw(st.binary(max_size=30)) + b"\0"
        elif kind == "flip":
            i = draw(st.integers(0, len(frame) - 2))
            frame = frame[:i] + bytes([(frame[i] ^ draw(st.integers(1, 255))) or 1]) + frame[i + 1 :]
        elif kind == "cut":
            frame = frame[: draw(st.integers(1, len(frame) - 2))] + b"\0"
        elif kind == "long":
            frame = b"\x01" * draw(st.integers(70, 200)) + b"\0"
        elif kind == "nan":
            frame = enc.encode({"a": a, "b": math.nan})
        parts.append(frame)
    return b"".join(parts), crc


@settings(deadline=None, max_examples=300)
@given(cobs_streams(), st.lists(st.integers(0, 10_000), max_size=8))
def test_cobs_streaming_equals_reference(case: tuple[bytes, str], cuts: list[int]) -> None:
    stream, crc = case
    opts = codec(
        {
            "type": "cobs",
            "crc": crc,
            "max_frame": 64,
            "fields": [{"name": "a", "type": "i32"}, {"name": "b", "type": "f32"}],
        }
    )
    readings, kinds = feed_chunked(make_decoder(opts), stream, cuts)
    frames, n_errors = ref_cobs_frames(stream, crc, "<if", 64)
    assert [r.value for r in readings] == [float(v) for f in frames for v in f]
    assert len(kinds) == n_errors


@settings(deadline=None)  # wall-clock limits flake on a busy 2-core machine
@given(
    st.integers(0, 65535),
    st.integers(-32768, 32767),
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["little", "big"]),
    st.sampled_from(["little", "big"]),
)
def test_cobs_layout_scale_offset_and_byte_order(
    seq: int, t: int, p: float, e: int, order: str, crc_order: str
) -> None:
    opts = codec({**LAYOUT, "byte_order": order, "crc_byte_order": crc_order})
    frame = make_encoder(opts).encode({"seq": seq, "t": t * 0.01, "p": p, "e": e - 5})
    fmt = ("<" if order == "little" else ">") + "Hhxfl".replace("l", "I")
    body = struct.pack(fmt, seq, t, p, e)
    assert cobs_decode(frame[:-1]) == body + ref_crc16(body).to_bytes(2, crc_order)
    raw, errs = make_decoder(opts).feed(frame)
    assert errs == []
    r = [Reading(*x) for x in raw]
    assert [x.key for x in r] == ["seq", "t", "p", "e"]
    assert r[0].value == seq and r[1].value == pytest.approx(t * 0.01) and r[2].value == p and r[3].value == e - 5


def test_cobs_timestamp_field_and_idle_delimiters() -> None:
    opts = codec(
        {
            "type": "cobs",
            "crc": "crc32",
            "ts_field": "ts",
            "fields": [{"name": "ts", "type": "u32"}, {"name": "v", "type": "u8", "unit": "%"}],
        }
    )
    frame = make_encoder(opts).encode({"ts": 1_700_000_000, "v": 7})
    assert make_decoder(opts).feed(b"\0\0" + frame + b"\0") == ([Reading("v", 7.0, 1_700_000_000.0)], [])


def test_codec_options_are_checked() -> None:
    with pytest.raises(ValidationError, match="needs a `name`"):
        codec({"type": "cobs", "fields": [{"type": "u8"}]})
    with pytest.raises(ValidationError, match="ts_field"):
        codec({"type": "cobs", "ts_field": "x", "fields": [{"name": "a", "type": "u8"}]})
    with pytest.raises(ValidationError, match="non-pad"):
        codec({"type": "cobs", "ts_field": "p", "fields": [{"name": "a", "type": "u8"}, {"name": "p", "type": "pad"}]})
    with pytest.raises(ValidationError, match="no field besides ts_field"):
        codec({"type": "cobs", "ts_field": "t", "fields": [{"name": "t", "type": "u32"}, {"type": "pad"}]})
    with pytest.raises(ValidationError, match="max_frame 16 is below this layout's encoded frame \\(19 bytes\\)"):
        codec({"type": "cobs", "max_frame": 16, "fields": [{"name": "a", "type": "f64"}, {"name": "b", "type": "f64"}]})
    codec({"type": "cobs", "max_frame": 19, "fields": [{"name": "a", "type": "f64"}, {"name": "b", "type": "f64"}]})
    with pytest.raises(ValidationError):
        codec("morse")


@pytest.mark.parametrize("record", [None, "r"])
def test_integers_beyond_a_float_are_rejected_not_raised(record: str | None) -> None:
    """JSON allows a 400-digit integer; float() of it raises OverflowError. It is a bad value, not a crash."""
    dec = make_decoder(codec({"type": "json", "record": record}))
    huge = b"1" + b"0" * 400
    r, e = dec.feed(b'{"a": ' + huge + b', "b": 2.0}\n{"c": 3}\n{"ts": ' + huge + b', "d": 4}\n')
    assert [x.kind for x in e] == ["nonfinite", "malformed"]
    if record is None:
        assert [tuple(x) for x in r] == [("b", 2.0, None), ("c", 3.0, None)]
    else:
        assert [tuple(x) for x in r] == [("r", {"b": 2.0}, None), ("r", {"c": 3.0}, None)]


def test_json_nested_too_deeply_is_one_bad_line() -> None:
    """The JSON parser recurses per level and raises RecursionError: one malformed line, the next one reads."""
    deep = b"[" * 100_000 + b"]" * 100_000
    dec = make_decoder(codec({"type": "json", "max_line": 1_000_000}))
    r, e = dec.feed(b'{"a": ' + deep + b', "b": 1.0}\n{"c": 3}\n')
    assert [x.kind for x in e] == ["malformed"] and "nested too deeply" in e[0].message
    assert [tuple(x) for x in r] == [("c", 3.0, None)]


@st.composite
def cobs_layouts(draw: st.DrawFn) -> tuple[Any, bytes]:
    """Any layout (types, scales, orders, CRC, record, time field) and a stream of good and bad frames.

    Some layouts are over 254 bytes, so that a valid frame can hold a full COBS block.
    """
    big = draw(st.integers(0, 4)) == 0
    types = draw(
        st.lists(
            st.sampled_from(["u8", "i8", "u16", "i16", "u32", "i32", "u64", "f32", "f64", "pad"]),
            min_size=33 if big else 1,
            max_size=40 if big else 5,
        )
    )
    if big:
        types[:32] = ["f64"] * 32  # at least 256 bytes
    scale = st.sampled_from([1.0, 0.1, 0.01, -2.5, 1e300])
    fields = [
        {"type": t}
        if t == "pad"
        else {"name": f"f{i}", "type": t, "scale": draw(scale), "offset": draw(st.sampled_from([0.0, -5.0]))}
        for i, t in enumerate(types)
    ]
    named = [f["name"] for f in fields if "name" in f]
    spec = {
        "type": "cobs",
        "fields": fields,
        "prefix": draw(st.sampled_from(["", "dev."])),
        "byte_order": draw(st.sampled_from(["little", "big"])),
        "crc": draw(st.sampled_from(["crc16", "crc32", "none"])),
        "crc_byte_order": draw(st.sampled_from(["little", "big"])),
        "record": draw(st.sampled_from([None, "rec"])),
        "ts_field": draw(st.sampled_from([None, *named])),
        "max_frame": 400 if big else 64,
    }
    try:
        opts = codec(spec)
    except ValidationError:
        assume(False)  # e.g. only a time field: refused by the config, nothing to compare
    size = make_decoder(opts).struct.size  # payload bytes: any bytes of that length are a payload
    parts = []
    for _ in range(draw(st.integers(0, 8))):
        body = draw(st.binary(min_size=size, max_size=size))
        body += draw(st.binary(max_size=1)) if draw(st.integers(0, 9)) == 0 else b""  # sometimes the wrong length
        n = {"crc16": 2, "crc32": 4, "none": 0}[opts.crc]
        check = (crc16_ccitt_false if opts.crc == "crc16" else crc32)(body) if n else 0
        if n and draw(st.integers(0, 9)) == 0:
            check ^= 1
        frame = cobs_encode(body + (check.to_bytes(n, opts.crc_byte_order) if n else b"")) + b"\0"
        kind = draw(st.sampled_from(["ok", "ok", "ok", "noise", "flip", "idle", "long"]))
        if kind == "noise":
            frame = draw(st.binary(max_size=20)) + b"\0"
        elif kind == "flip":  # one byte changed, the length kept: a broken code chain, or a bad CRC
            at = draw(st.integers(0, len(frame) - 2))
            frame = frame[:at] + bytes([draw(st.integers(1, 255))]) + frame[at + 1 :]
        elif kind == "idle":
            frame = b"\0"
        elif kind == "long":
            frame = b"\x01" * (spec["max_frame"] + 16) + b"\0"
        parts.append(frame)
    return opts, b"".join(parts)


@settings(deadline=None, max_examples=400)
@given(cobs_layouts(), st.lists(st.integers(0, 10_000), max_size=4))
def test_cobs_compiled_loop_equals_the_general_path(case: tuple[Any, bytes], cuts: list[int]) -> None:
    """The loops compiled from a layout give exactly the readings and errors of the per-frame path."""
    opts, stream = case
    fast, fast_as = make_decoder(opts), make_decoder(opts)
    general, general_as = make_decoder(opts), make_decoder(opts)
    for dec in (general, general_as):
        dec._run = dec._run_as = None  # every frame through _piece/_decode

    def make(key: str, ts: float, value: Any, tag: str) -> tuple[Any, ...]:
        return ("made", key, ts, value, tag)

    points = sorted({c % (len(stream) + 1) for c in cuts})
    results: dict[Any, list[Any]] = {d: [[], []] for d in (fast, fast_as, general, general_as)}
    prev = 0
    for p in [*points, len(stream)]:
        for dec, out in results.items():
            chunk = stream[prev:p]
            r, e = dec.feed_as(chunk, make, 123.5, "dev") if dec in (fast_as, general_as) else dec.feed(chunk)
            out[0] += r
            out[1] += [(x.kind, str(x)) for x in e]
        prev = p
    assert repr(results[fast]) == repr(results[general]), (opts, stream)
    assert repr(results[fast_as]) == repr(results[general_as]), (opts, stream)
    assert fast.stats == general.stats == fast_as.stats == general_as.stats, (opts, stream)
    # feed_as makes exactly what feed returns, with the default time filled in
    assert [make(k, 123.5 if t is None else t, v, "dev") for k, v, t in results[fast][0]] == results[fast_as][0]


def test_nmea_noise_inside_a_sentence_is_one_bad_line() -> None:
    """Non-ASCII bytes after the last '$' used to make the resync call itself forever (RecursionError)."""
    dec = make_decoder(codec("nmea"))
    r, e = dec.feed(GGA + b"$GPGGA,\xff\r\n" + GGA.replace(b"\r\n", b"\xff\r\n") + GGA)
    assert [x.kind for x in e] == ["garbage", "garbage"]
    assert [key for key, _v, _ts in r].count("gps.lat") == 2


@pytest.mark.parametrize("seconds", ["19inf", "19nan", "1999"])
def test_nmea_rmc_time_out_of_range_is_malformed(seconds: str) -> None:
    dec = make_decoder(codec({"type": "nmea", "require_checksum": False}))
    r, e = dec.feed(RMC.replace(b"123519", b"12" + seconds.encode()).replace(b"*6A", b""))
    assert r == [] and [x.kind for x in e] == ["malformed"], (r, e)


def test_json_integer_python_refuses_to_convert_is_one_bad_line() -> None:
    """Over 4,300 digits, int() raises a plain ValueError, not JSONDecodeError: one malformed line."""
    dec = make_decoder(codec({"type": "json", "max_line": 20_000}))
    r, e = dec.feed(b'{"a": ' + b"1" * 5000 + b'}\n{"b": 2}\n')
    assert [x.kind for x in e] == ["malformed"] and [tuple(x) for x in r] == [("b", 2.0, None)]


def test_csv_placeholder_row_is_bad_data_not_a_new_header() -> None:
    """A sensor printing '--' or 'ERR' while not ready used to become the header, renaming the columns."""
    dec = make_decoder(codec("csv"))
    r, e = dec.feed(b"t,rh\n21.5,40\n--,--\nERR,ERR\n22.0,41\n")
    want = [("t", 21.5, None), ("rh", 40.0, None), ("t", 22.0, None), ("rh", 41.0, None)]
    assert as_tuples([Reading(*x) for x in r]) == want
    assert [x.kind for x in e] == ["malformed", "malformed"]


def test_csv_quoted_cells() -> None:
    """Quoted numbers are numbers: before, every quoted row looked like a header and all data was dropped."""
    r, e = make_decoder(codec("csv")).feed(b'"a","b"\n"1.5","2"\n')
    assert as_tuples([Reading(*x) for x in r]) == [("a", 1.5, None), ("b", 2.0, None)] and e == []


def test_csv_delimiter_inside_quotes_stays_in_its_cell() -> None:
    """Cells were split with str.split: a quoted delimiter broke the row into too many cells."""
    dec = make_decoder(codec({"type": "csv", "device_field": "site"}))
    r, e = dec.feed(b'site,t,rh\n"kiln, north",21.5,40\n"say ""hi""; ok", "1.5",2\n')
    assert as_tuples([Reading(*x) for x in r]) == [
        ("kiln, north.t", 21.5, None),
        ("kiln, north.rh", 40.0, None),
        ('say "hi"; ok.t', 1.5, None),
        ('say "hi"; ok.rh', 2.0, None),
    ]
    assert e == []
    # an unterminated quote, or text after a closing quote, is a malformed line (and the next one is read)
    r, e = dec.feed(b'"north,21.5,40\n"a" b,1,2\nx,3,4\n')
    assert [x.kind for x in e] == ["malformed", "malformed"] and "not CSV" in e[0].message
    assert as_tuples([Reading(*x) for x in r]) == [("x.t", 3.0, None), ("x.rh", 4.0, None)]
    with pytest.raises(ValidationError, match="cannot separate cells"):
        codec({"type": "csv", "delimiter": '"'})


_LABELS = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12).filter(
    lambda s: s == s.strip()
)


@settings(deadline=None)  # wall-clock limits flake on a busy 2-core machine
@given(
    st.lists(st.tuples(_LABELS, st.floats(allow_nan=False, allow_infinity=False)), min_size=1, max_size=8),
    st.sampled_from([",", ";", "\t", "|"]),
)
def test_csv_written_by_a_csv_writer_decodes_cell_for_cell(rows: list[tuple[str, float]], delimiter: str) -> None:
    """Reference: Python's csv writer, which quotes labels holding the delimiter, quotes or spaces."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    w.writerow(["site", "v"])
    for label, v in rows:
        w.writerow([label, repr(v)])
    dec = make_decoder(codec({"type": "csv", "device_field": "site", "delimiter": delimiter, "ts_field": None}))
    r, e = dec.feed(buf.getvalue().encode())
    assert [x.message for x in e] == []
    assert as_tuples([Reading(*x) for x in r]) == [(f"{label}.v", v, None) for label, v in rows]


_CELLS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**13), 10**13).map(str),
    st.sampled_from(["", " 1.5", "2.5 ", "ERR", "t", '"3.5"', '"a,b"', "1e400", "x\ry", "1_0", "--", "\u0661", "2\r"]),
)


@settings(deadline=None)  # wall-clock limits flake on a busy 2-core machine
@given(
    st.lists(st.lists(_CELLS, min_size=2, max_size=4), max_size=12),
    st.booleans(),
    st.sampled_from([None, "rec"]),
    st.sampled_from([b"\n", b"\r\n"]),
)
def test_csv_batch_loop_agrees_with_the_line_path(
    rows: list[list[str]], header: bool, record: str | None, eol: bytes
) -> None:
    """Whole reads go through a loop for plain numeric rows; it must say what the general path says."""
    opts = codec({"type": "csv", "ts_field": "ts", "record": record, **({} if header else {"columns": ["ts", "a"]})})
    lines = [line + eol[:-1] for line in ([b"ts,a,b,c"] if header else []) + [",".join(r).encode() for r in rows]]
    fast = make_decoder(opts)
    r1, e1 = fast.feed(b"".join(line + b"\n" for line in lines))
    slow = make_decoder(opts)
    r2: list[Any] = []
    e2: list[Any] = []
    for line in lines:
        slow._piece(line, r2, e2)  # the general path, one line at a time
    assert r1 == r2
    assert [(e.kind, e.message) for e in e1] == [(e.kind, e.message) for e in e2]
    assert fast.stats["pieces"] == slow.stats["pieces"]


_SPOILS = ["<short>", "<long>", "x", "nan", '"1"', "1,2", "1\r2", "1;2", "", "a"]
_PLAIN = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(-(10**13), 10**13).map(str),
    st.sampled_from([" 1.5", "2.5 ", "1700000000123", "-0.0", "1e308"]),
)


@settings(deadline=None)  # wall-clock limits flake on a busy 2-core machine
@given(
    st.lists(st.lists(_PLAIN, min_size=3, max_size=3), min_size=1, max_size=30),
    st.lists(st.tuples(st.integers(0, 29), st.sampled_from(_SPOILS)), max_size=2),
    st.lists(st.integers(0, 2000), max_size=4),
    st.sampled_from([None, "rec"]),
    st.sampled_from([b"\n", b"\r\n"]),
    st.sampled_from(["ts", None]),
    st.booleans(),
)
def test_csv_whole_read_of_plain_rows_agrees_with_the_line_path(
    rows: list[list[str]],
    spoil: list[tuple[int, str]],
    cuts: list[int],
    record: str | None,
    eol: bytes,
    ts_field: str | None,
    as_events: bool,
) -> None:
    """A read of plain numeric rows is decoded at once (cells split and converted together, one
    compiled loop per header): for any read, in any chunks, readings and errors are what the line
    path gives. Spoiled rows (a short row beside a long one, a quote, a stray CR, a header) send
    the whole read the long way."""
    lines = [",".join(r) for r in rows]
    for i, cell in spoil:
        if i < len(lines):
            rest = lines[i].rsplit(",", 1)[0]
            lines[i] = {"<short>": rest, "<long>": lines[i] + ",1.0"}.get(cell, rest + "," + cell)
    data = b"ts,a,b\n" + b"".join(line.encode() + eol for line in lines)
    cuts = [7, *cuts]  # the header in a read of its own, as a device sends it once
    opts = codec({"type": "csv", "ts_field": ts_field, "record": record})
    fast = make_decoder(opts)
    r1: list[Any] = []
    e1: list[Any] = []
    at = 0
    for cut in [*sorted(cuts), len(data)]:
        if as_events:
            r, e = fast.feed_as(data[at:cut], Event, 5.0, "dev")
        else:
            r, e = fast.feed(data[at:cut])
        r1 += r
        e1 += e
        at = max(at, cut)
    slow = make_decoder(opts)
    r2: list[Any] = []
    e2: list[Any] = []
    for piece in data.split(b"\n")[:-1]:
        slow._piece(piece, r2, e2)  # the general path, one line at a time
    if as_events:
        r2 = [Event(k, 5.0 if ts is None else ts, v, "dev") for k, v, ts in r2]
    assert r1 == r2
    assert [(e.kind, e.message) for e in e1] == [(e.kind, e.message) for e in e2]
    assert fast.stats["pieces"] == slow.stats["pieces"]


@pytest.mark.parametrize("as_events", [False, True])
def test_csv_a_short_row_beside_a_long_one_borrows_no_cell(as_events: bool) -> None:
    """The read has as many cells as its rows need, but one row is short and the next long:
    both are malformed (as the line path says), the others are read."""
    dec = make_decoder(codec({"type": "csv", "ts_field": None}))
    assert dec.feed(b"a,b,c\n") == ([], [])  # the header in a read of its own: the next is all numbers
    data = b"1,2,3\n4,5\n6,7,8,9\n10,11,12\n"
    r, e = dec.feed_as(data, Event, 5.0, "dev") if as_events else dec.feed(data)
    got = [(x.key, x.value) for x in r] if as_events else [(k, v) for k, v, _ts in r]
    assert got == [("a", 1.0), ("b", 2.0), ("c", 3.0), ("a", 10.0), ("b", 11.0), ("c", 12.0)]
    assert [x.message for x in e] == ["2 cells, expected 3 (a, b, c)", "4 cells, expected 3 (a, b, c)"]
