"""Register maps: decoding against struct as the plain reference, read planning, device profiles."""

from __future__ import annotations

import itertools
import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from firmware_bridges.modbus import (
    DeviceMap,
    Point,
    decode_point,
    encode_point,
    load_profile,
    plan_reads,
    profile_names,
)

FMT = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}


def ref_decode(kind: str, regs: list[int], word_order: str, byte_order: str) -> float:
    """Plain reference: lay the registers out as the device's memory and unpack big-endian."""
    words = list(regs)
    if byte_order == "little":
        words = [((w >> 8) | ((w & 0xFF) << 8)) for w in words]
    if word_order == "little":
        words.reverse()
    return struct.unpack(">" + FMT[kind], b"".join(w.to_bytes(2, "big") for w in words))[0]


@settings(deadline=None)  # wall-clock limits flake on a busy 2-core machine
@given(
    st.sampled_from(sorted(FMT)),
    st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4),
    st.sampled_from(["big", "little"]),
    st.sampled_from(["big", "little"]),
)
def test_decode_matches_struct_reference(kind: str, regs: list[int], wo: str, bo: str) -> None:
    p = Point(name="x", address=10, type=kind)  # type: ignore[arg-type]
    got = decode_point(p, regs, (wo, bo))  # type: ignore[arg-type]
    want = ref_decode(kind, regs[: p.count], wo, bo)
    if isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got)
    else:
        assert got == float(want)
    # and the encoder is its inverse on the raw registers
    if not (isinstance(got, float) and (math.isnan(got) or math.isinf(got))):
        assert decode_point(p, encode_point(p, got, (wo, bo)), (wo, bo)) == got  # type: ignore[arg-type]


@settings(deadline=None)  # wall-clock limits flake on a busy 2-core machine
@given(
    st.floats(-1e6, 1e6),
    st.sampled_from(["int32", "float64", "int16"]),
    st.sampled_from([0.1, 0.01, 2.0]),
    st.floats(-100, 100),
)
def test_scale_and_offset_round_trip(value: float, kind: str, scale: float, offset: float) -> None:
    p = Point(name="x", address=0, type=kind, scale=scale, offset=offset)  # type: ignore[arg-type]
    raw = (value - offset) / scale
    if kind == "int16" and not -32768 <= round(raw) <= 32767:
        return
    got = decode_point(p, encode_point(p, value))
    assert got == pytest.approx(value, abs=scale / 2 + 1e-6)


def test_bits_strings_and_short_replies() -> None:
    b = Point(name="alarm", address=3, type="bit", bit=5)
    assert decode_point(b, [0b100000]) == 1.0 and decode_point(b, [0b011111]) == 0.0
    coil = Point(name="relay", table="coil", address=7)
    assert decode_point(coil, [True]) == 1.0 and coil.count == 1
    s = Point(name="serial", address=0, type="string", length=4)
    regs = encode_point(s, "AB12x")
    assert regs == [0x4142, 0x3132, 0x7800, 0] and decode_point(s, regs) == "AB12x"
    assert decode_point(s, encode_point(s, "AB", ("big", "little")), ("big", "little")) == "AB"
    with pytest.raises(ValueError, match="needs 2"):
        decode_point(Point(name="f", address=0, type="float32"), [1])
    nan = encode_point(Point(name="f", address=0, type="float32"), math.nan)
    assert math.isnan(decode_point(Point(name="f", address=0, type="float32"), nan))  # type: ignore[arg-type]


def test_point_validation() -> None:
    with pytest.raises(ValidationError, match="needs `bit`"):
        Point(name="x", address=0, type="bit")
    with pytest.raises(ValidationError, match="needs `length`"):
        Point(name="x", address=0, type="string")
    with pytest.raises(ValidationError, match="past address 65535"):
        Point(name="x", address=65535, type="float32")
    with pytest.raises(ValidationError, match="defined twice"):
        DeviceMap(points=[Point(name="x", address=0), Point(name="x", address=1)])


_points = st.lists(
    st.builds(
        lambda a, t, tab: Point(name="p", address=a, type=t, table=tab),  # type: ignore[arg-type]
        st.integers(0, 600),
        st.sampled_from(["uint16", "float32", "float64", "int32"]),
        st.sampled_from(["holding", "input", "coil"]),
    ),
    max_size=40,
)


@settings(deadline=None)  # wall-clock limits flake on a busy 2-core machine
@given(_points, st.integers(1, 125), st.integers(0, 10))
def test_plan_covers_every_point_within_limits(points: list[Point], limit: int, gap: int) -> None:
    points = [p.model_copy(update={"name": f"p{i}"}) for i, p in enumerate(points)]
    blocks = plan_reads(points, max_registers=max(limit, 4), max_gap=gap, max_bits=max(limit, 4))
    covered = [p.name for b in blocks for p in b.points]
    assert sorted(covered) == sorted(p.name for p in points)  # each point in exactly one read
    for b in blocks:
        assert b.count <= max(limit, 4)
        for p in b.points:
            assert p.table == b.table and b.start <= p.address and p.address + p.count <= b.start + b.count
    # maximal batching: two consecutive reads of a table could not have been merged
    for t in ("holding", "input", "coil"):
        tb = sorted((b for b in blocks if b.table == t), key=lambda b: b.start)
        for x, y in itertools.pairwise(tb):
            merged = max(x.start + x.count, y.start + y.count) - x.start
            assert y.start > x.start + x.count + gap or merged > max(limit, 4)


def test_plan_batches_adjacent_and_splits_at_125() -> None:
    pts = [Point(name=f"r{i}", address=i * 2, type="float32", table="input") for i in range(100)]
    blocks = plan_reads(pts)
    assert [(b.start, b.count) for b in blocks] == [(0, 124), (124, 76)]
    assert [(b.start, b.count) for b in plan_reads([*pts[:3], Point(name="far", address=50)])] == [(50, 1), (0, 6)]


def test_profiles_load_and_plan() -> None:
    assert {"sdm120", "xy-md02", "pzem016", "sdm630"} <= set(profile_names())
    sdm = load_profile("sdm120")
    assert sdm.points[0].name == "voltage" and sdm.points[0].type == "float32" and sdm.points[0].table == "input"
    assert [(b.start, b.count) for b in plan_reads(sdm.points, sdm.max_registers, sdm.max_gap)] == [(0, 80), (342, 4)]
    pz = load_profile("pzem016")
    assert pz.order(pz.points[1]) == ("little", "big")
    # PZEM-016 current 0x0001–0x0002, low word first: 0x0000_3039 -> 12345 mA
    assert decode_point(pz.points[1], [0x3039, 0x0000], pz.order(pz.points[1])) == pytest.approx(12.345)
    with pytest.raises(ValueError, match=r"known: .*sdm120"):
        load_profile("nope")
