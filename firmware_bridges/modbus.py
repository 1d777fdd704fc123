"""Modbus register maps: points, data types, word/byte order, read planning and device profiles.

A :class:`DeviceMap` lists a device's points (name, table, address, type, order, scale/offset,
unit, poll group). :func:`plan_reads` batches adjacent points of a poll group into as few reads
as the protocol allows (≤ 125 registers, ≤ 2000 bits); :func:`decode_point` turns the registers
or bits of a read into a value and :func:`encode_point` does the inverse for simulators. Device
profiles (``config/devices/<name>.yaml``) are device maps from published register tables.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "PROFILE_DIR",
    "DeviceMap",
    "Point",
    "ReadBlock",
    "decode_point",
    "encode_point",
    "load_profile",
    "plan_reads",
    "profile_names",
]

PROFILE_DIR = Path(__file__).resolve().parent.parent / "config" / "devices"

Table = Literal["coil", "discrete", "holding", "input"]
DataType = Literal["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "bit", "string"]
Order = Literal["big", "little"]

_WORDS = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "int64": 4,
    "uint64": 4,
    "float32": 2,
    "float64": 4,
    "bit": 1,
}
_STRUCT = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}
_RANGE = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
MAX_REGISTERS = 125
MAX_BITS = 2000


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Point(_Model):
    """One value in a device's register map."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]*$", description="Reading key (after the slave's name).")
    table: Table = Field("holding", description="coil, discrete (input), holding or input (register).")
    address: int = Field(ge=0, le=65535, description="0-based protocol address (register 40001 is holding 0).")
    type: DataType = Field("uint16", description="Ignored for coil/discrete (always a bit).")
    bit: int | None = Field(None, ge=0, le=15, description="For type bit: which bit of the register (0 = LSB).")
    length: int | None = Field(None, ge=1, le=MAX_REGISTERS, description="For type string: registers.")
    word_order: Order | None = Field(None, description="big: high word first (default, Modbus convention).")
    byte_order: Order | None = Field(None, description="big: high byte first within a register (default).")
    scale: float = Field(1.0, description="value = raw * scale + offset")
    offset: float = 0.0
    unit: str | None = None
    group: str = Field("default", description="Poll group; its interval comes from the device map or source.")

    @model_validator(mode="after")
    def _consistent(self) -> Point:
        if self.table in ("coil", "discrete"):
            return self
        if self.type == "bit" and self.bit is None:
            raise ValueError(f"point {self.name}: type bit needs `bit` (0–15)")
        if self.type == "string" and self.length is None:
            raise ValueError(f"point {self.name}: type string needs `length` (registers)")
        if self.address + self.count > 65536:
            raise ValueError(f"point {self.name}: runs past address 65535")
        return self

    @property
    def is_bit_table(self) -> bool:
        return self.table in ("coil", "discrete")

    @property
    def count(self) -> int:
        """Registers (or bits, for coil/discrete) the point occupies."""
        if self.table in ("coil", "discrete"):
            return 1
        if self.type == "string":
            return self.length or 1
        return _WORDS[self.type]


class DeviceMap(_Model):
    """A device's register map; also the shape of a profile file in ``config/devices/``."""

    name: str | None = Field(None, description="Profile name (profiles only).")
    manufacturer: str | None = None
    model: str | None = None
    description: str | None = None
    word_order: Order = Field("big", description="Default for the points.")
    byte_order: Order = Field("big", description="Default for the points.")
    max_gap: int = Field(
        0,
        ge=0,
        le=MAX_REGISTERS,
        description="Unmapped registers a batched read may span; "
        "0 for devices that reject reads of unmapped addresses.",
    )
    max_registers: int = Field(MAX_REGISTERS, ge=1, le=MAX_REGISTERS, description="Largest read the device accepts.")
    groups: dict[str, float] = Field(default_factory=dict, description="Poll group -> interval in seconds.")
    points: list[Point] = Field(min_length=1)
    defaults: dict[str, Any] = Field(
        default_factory=dict,
        description="Serial settings the device ships with "
        "(baud, parity, stopbits, unit), for documentation and the simulator.",
    )

    @model_validator(mode="after")
    def _unique(self) -> DeviceMap:
        seen: set[str] = set()
        for p in self.points:
            if p.name in seen:
                raise ValueError(f"point {p.name!r} is defined twice")
            seen.add(p.name)
        return self

    def order(self, p: Point) -> tuple[Order, Order]:
        return p.word_order or self.word_order, p.byte_order or self.byte_order


@dataclass(slots=True)
class ReadBlock:
    """One request: ``count`` registers or bits of ``table`` from ``start``, covering ``points``."""

    table: Table
    start: int
    count: int
    points: list[Point] = field(default_factory=list)


def plan_reads(
    points: list[Point], max_registers: int = MAX_REGISTERS, max_gap: int = 0, max_bits: int = MAX_BITS
) -> list[ReadBlock]:
    """Batch points into reads: same table, adjacent (or within ``max_gap``), within the size limit.

    Points may overlap (several bits of one register); a point larger than the limit is impossible
    (its own validation caps strings at 125 registers).
    """
    blocks: list[ReadBlock] = []
    by_table: dict[str, list[Point]] = {}
    for p in points:
        by_table.setdefault(p.table, []).append(p)
    for table in ("coil", "discrete", "holding", "input"):
        pts = sorted(by_table.get(table, ()), key=lambda p: (p.address, p.count))
        limit = max_bits if table in ("coil", "discrete") else max_registers
        gap = max_gap
        cur: ReadBlock | None = None
        for p in pts:
            end = p.address + p.count
            if (
                cur is not None
                and p.address <= cur.start + cur.count + gap
                and max(end, cur.start + cur.count) - cur.start <= limit
            ):
                cur.count = max(end, cur.start + cur.count) - cur.start
                cur.points.append(p)
                continue
            cur = ReadBlock(table, p.address, p.count, [p])  # type: ignore[arg-type]
            blocks.append(cur)
    return blocks


def _regs_to_bytes(regs: list[int], word_order: Order, byte_order: Order) -> bytes:
    words = regs if word_order == "big" else list(reversed(regs))
    bo: Literal["big", "little"] = byte_order
    return b"".join(int(w).to_bytes(2, bo) for w in words)


def decode_point(p: Point, data: list[int] | list[bool], order: tuple[Order, Order] = ("big", "big")) -> float | str:
    """The point's value from its own registers (or bit). Raises ValueError if they are too few."""
    if len(data) < p.count:
        raise ValueError(f"{p.name}: {len(data)} values, needs {p.count}")
    if p.is_bit_table:
        return 1.0 if data[0] else 0.0
    regs = [int(x) for x in data[: p.count]]
    if p.type == "bit":
        assert p.bit is not None
        return float((regs[0] >> p.bit) & 1)
    word_order, byte_order = order
    if p.type == "string":
        raw = b"".join(r.to_bytes(2, byte_order) for r in regs)
        return raw.split(b"\0", 1)[0].decode("latin-1").strip()
    raw = _regs_to_bytes(regs, word_order, byte_order)
    (v,) = struct.unpack(">" + _STRUCT[p.type], raw)
    return float(v) * p.scale + p.offset


def encode_point(p: Point, value: float | str, order: tuple[Order, Order] = ("big", "big")) -> list[int]:
    """Registers (or a one-bit list) holding ``value`` — what a device would store; for simulators."""
    if p.is_bit_table:
        return [1 if value else 0]
    word_order, byte_order = order
    if p.type == "bit":
        return [(1 << (p.bit or 0)) if value else 0]
    if p.type == "string":
        raw = str(value).encode("latin-1")[: 2 * p.count].ljust(2 * p.count, b"\0")
        return [int.from_bytes(raw[i : i + 2], byte_order) for i in range(0, len(raw), 2)]
    assert not isinstance(value, str)
    raw_v: float | int = (float(value) - p.offset) / p.scale
    if not p.type.startswith("float"):
        if not math.isfinite(raw_v):
            raise ValueError(f"{p.name}: {value!r} does not fit {p.type}")
        lo, hi = _RANGE[p.type]
        raw_v = min(max(round(raw_v), lo), hi)  # a register holds no more; float(2**64 - 1) rounds up
    raw = struct.pack(">" + _STRUCT[p.type], raw_v)
    words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    if word_order == "little":
        words.reverse()
    if byte_order == "little":
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    return words


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str, directory: Path | None = None) -> DeviceMap:
    """A device profile by name (``sdm120``) from ``config/devices/``; ValueError names the known ones."""
    d = directory or PROFILE_DIR
    path = d / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(profile_names()) or "none"
        raise ValueError(f"unknown device profile {name!r} (known: {known})")
    with path.open(encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return DeviceMap.model_validate({"name": name, **data})
