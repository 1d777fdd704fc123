"""Streaming decoders (and encoders, for simulators) for what serial firmware sends.

A decoder is fed raw bytes in whatever chunks the port delivers and returns the readings of every
complete line or frame, plus a :class:`DecodeError` for each piece it had to reject (garbage,
over-long line, bad checksum, wrong length, NaN/inf). It never raises on bad input and always
resynchronises on the next line (``\\n``) or frame delimiter (``0x00`` for COBS).

Codecs, chosen by ``type`` in the codec options:

- ``json``: one JSON object per line; every numeric field is a reading (or ``key_field``/``value_field``).
- ``csv``: comma-separated values (RFC 4180 quoting), with a header row or configured ``columns``.
- ``kv``: ``key=value`` pairs per line (``t=21.5 rh=40``).
- ``nmea``: NMEA 0183 with checksum; GGA, RMC, MWV and XDR become readings.
- ``cobs``: COBS-framed binary with CRC-16/CCITT-FALSE or CRC-32 and a struct payload layout.
"""

from __future__ import annotations

import binascii
import csv
import json
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from json.scanner import make_scanner
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from ._framing import CobsError, cobs_decode, cobs_encode, crc16_ccitt_false, crc32
from ._json import NotText, loads_json, text_fault

__all__ = [
    "CobsCodec",
    "CodecOptions",
    "CsvCodec",
    "DecodeError",
    "Decoder",
    "Encoder",
    "JsonCodec",
    "KeyValueCodec",
    "NmeaCodec",
    "RawReading",
    "Reading",
    "StructField",
    "make_decoder",
    "make_encoder",
    "nmea_sentence",
]

_EXCERPT = 80


class Reading(NamedTuple):
    """One decoded value: ``ts`` is the device's event time when it sent one, else ``None``.

    Decoders return plain ``(key, value, ts)`` tuples of this shape: a tuple costs a third of
    any object with named fields, on a path taken for every value read. ``Reading(*r)`` names
    the parts, and a ``Reading`` compares equal to the plain tuple.
    """

    key: str
    value: float | dict[str, float]  # a dict when the codec's `record` option is set
    ts: float | None = None


RawReading = tuple[str, "float | dict[str, float]", "float | None"]
"""What decoders return per value: ``(key, value, ts)``, the fields of :class:`Reading`."""
Make = Callable[[str, float, "float | dict[str, float]", str], Any]
"""What :meth:`Decoder.feed_as` builds each reading with: ``make(key, ts, value, tag)``."""


@dataclass(slots=True)
class DecodeError:
    """A rejected piece of input. ``kind`` is one of garbage, overlong, checksum, malformed, length, nonfinite."""

    kind: str
    message: str
    raw: bytes = b""

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


class _Invalid(ValueError):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# --- options ---------------------------------------------------------------------------------


class _Codec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = Field("", description="Prepended to every reading's key (e.g. `boiler.`).")


class _LineCodec(_Codec):
    max_line: int = Field(4096, ge=16, le=1_048_576, description="Longer lines are rejected as over-long.")
    ts_field: str | None = Field("ts", description="Field holding event time (epoch s/ms or ISO 8601).")
    device_field: str | None = Field(None, description="Field naming the device; keys become `<device>.<field>`.")
    record: str | None = Field(
        None,
        description="Emit one object reading per line/frame under this key (its numeric fields as the "
        "value's fields, e.g. `value.temp` in expressions) instead of one reading per field.",
    )


class JsonCodec(_LineCodec):
    type: Literal["json"]
    key_field: str | None = Field(None, description="If set, each line is one reading: key from this field …")

    @model_validator(mode="after")
    def _one_shape(self) -> JsonCodec:
        if self.key_field is not None and self.record is not None:
            raise ValueError("give either `key_field` (one reading per line) or `record` (one object per line)")
        return self

    value_field: str = Field("value", description="… and value from this one.")


class CsvCodec(_LineCodec):
    type: Literal["csv"]
    columns: list[str] | None = Field(None, description="Column names; absent: taken from the header row.")
    delimiter: str = Field(
        ",", min_length=1, max_length=1, description='Between cells; a cell may quote it: `"a,b"` (`""` is a quote).'
    )

    @model_validator(mode="after")
    def _usable_delimiter(self) -> CsvCodec:
        if self.delimiter in ('"', "\r", "\n"):
            raise ValueError(f"delimiter {self.delimiter!r} cannot separate cells (it quotes or ends a line)")
        return self


class KeyValueCodec(_LineCodec):
    type: Literal["kv"]
    separator: str | None = Field(None, description="Between pairs; default: whitespace, comma or semicolon.")


class NmeaCodec(_Codec):
    type: Literal["nmea"]
    max_line: int = Field(164, ge=16, le=65536, description="NMEA allows 82 characters; some devices send more.")
    require_checksum: bool = Field(True, description="Reject sentences without a `*hh` checksum.")
    sentences: list[str] | None = Field(None, description="Sentence types to read (default GGA, RMC, MWV, XDR).")


_STRUCT = {
    "u8": "B",
    "i8": "b",
    "u16": "H",
    "i16": "h",
    "u32": "I",
    "i32": "i",
    "u64": "Q",
    "i64": "q",
    "f32": "f",
    "f64": "d",
    "pad": "x",
}


class StructField(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("", description="Reading key (after the codec prefix); empty for padding.")
    type: Literal["u8", "i8", "u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64", "pad"]
    scale: float = Field(1.0, description="value = raw * scale + offset")
    offset: float = 0.0
    unit: str | None = None

    @model_validator(mode="after")
    def _named(self) -> StructField:
        if self.type != "pad" and not self.name:
            raise ValueError("a struct field needs a `name` (only `pad` fields may go without)")
        return self


class CobsCodec(_Codec):
    type: Literal["cobs"]
    record: str | None = Field(
        None,
        description="Emit one object reading per line/frame under this key (its numeric fields as the "
        "value's fields, e.g. `value.temp` in expressions) instead of one reading per field.",
    )
    fields: list[StructField] = Field(min_length=1, description="Payload layout, in order.")
    byte_order: Literal["little", "big"] = Field("little", description="Of the payload fields.")
    crc: Literal["crc16", "crc32", "none"] = Field("crc16", description="crc16: CRC-16/CCITT-FALSE; crc32: zlib's.")
    crc_byte_order: Literal["little", "big"] = "little"
    max_frame: int = Field(1024, ge=4, le=65536, description="Longer frames are rejected as over-long.")
    ts_field: str | None = Field(None, description="A field holding event time (epoch s or ms).")

    @model_validator(mode="after")
    def _ts_known(self) -> CobsCodec:
        named = [f.name for f in self.fields if f.type != "pad"]
        if self.ts_field and self.ts_field not in named:
            raise ValueError(f"ts_field {self.ts_field!r} is not one of the (non-pad) fields")
        if not [n for n in named if n != self.ts_field]:
            raise ValueError("the layout has no field besides ts_field and padding: its frames would give no readings")
        encoded = self.encoded_size
        if self.max_frame < encoded:
            raise ValueError(
                f"max_frame {self.max_frame} is below this layout's encoded frame ({encoded} bytes): "
                "every frame would be rejected as over-long"
            )
        return self

    def payload_struct(self) -> struct.Struct:
        """The payload's fields (and pads) in their byte order, without the CRC."""
        order = "<" if self.byte_order == "little" else ">"
        return struct.Struct(order + "".join(_STRUCT[f.type] for f in self.fields))

    @property
    def crc_len(self) -> int:
        return {"crc16": 2, "crc32": 4, "none": 0}[self.crc]

    @property
    def encoded_size(self) -> int:
        """The most bytes a frame of this layout takes on the wire, without its delimiter."""
        n = self.payload_struct().size + self.crc_len
        return n + 1 + n // 254  # COBS adds a code byte per block of up to 254


def _shorthand(v: Any) -> Any:
    return {"type": v} if isinstance(v, str) else v


CodecOptions = Annotated[
    JsonCodec | CsvCodec | KeyValueCodec | NmeaCodec | CobsCodec,
    Field(discriminator="type"),
    BeforeValidator(_shorthand),
]
"""A codec's options; a bare name (``codec: nmea``) stands for its defaults."""


# --- shared helpers --------------------------------------------------------------------------


def _ts(raw: Any) -> float:
    if isinstance(raw, bool):
        raise _Invalid("malformed", f"timestamp {raw!r} is not a time")
    if isinstance(raw, str):
        try:
            return _ts(float(raw))
        except ValueError:
            pass
        try:
            dt = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise _Invalid("malformed", f"timestamp {raw!r} is neither epoch seconds/ms nor ISO 8601") from None
        if dt.tzinfo is None:
            raise _Invalid("malformed", f"timestamp {raw!r} has no time zone")
        return dt.timestamp()
    if isinstance(raw, int | float):
        t = _float(raw)
        if not math.isfinite(t):
            raise _Invalid("malformed", f"timestamp {t!r} is not finite")
        return t / 1000.0 if t > 1e11 else t
    raise _Invalid("malformed", f"timestamp {raw!r} is not a time")


def _scaled(raw: int | float, scale: float, offset: float) -> float:
    """``raw * scale + offset`` as the compiled COBS loop computes it (no ``+ 0.0``, so -0.0 stays -0.0)."""
    v = float(raw) * scale
    return v + offset if offset else v


def _float(v: int | float) -> float:
    """``float(v)``, with ints too large for a float (JSON allows 400 digits) as infinity."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _excerpt(raw: bytes) -> bytes:
    return raw if len(raw) <= _EXCERPT else raw[:_EXCERPT]


class Decoder:
    """Base of every streaming decoder: ``feed`` bytes, get readings and errors back."""

    delimiter = b"\n"
    text = True  # lines: an unfinished piece of only whitespace is an idle line, not a truncated one

    def __init__(self, max_len: int):
        self.max_len = max_len
        self._buf = b""  # an unfinished piece
        self._skipping = False  # inside an over-long piece: drop bytes until the next delimiter
        self.stats: dict[str, int] = {"pieces": 0, "readings": 0, "errors": 0, "skipped": 0}

    def feed(self, data: bytes) -> tuple[list[RawReading], list[DecodeError]]:
        """The readings and errors of every line/frame that ``data`` completes."""
        return self._feed(data, None, 0.0, "")

    def feed_as(self, data: bytes, make: Make, now: float, tag: str) -> tuple[list[Any], list[DecodeError]]:
        """:meth:`feed`, with each reading built by the caller as ``make(key, ts, value, tag)``.

        ``ts`` is ``now`` where the device sent no time. A source passes its event class, so a
        reading becomes an event without a tuple in between (the COBS loop builds it directly).
        """
        return self._feed(data, make, now, tag)

    def _feed(self, data: bytes, make: Make | None, now: float, tag: str) -> tuple[list[Any], list[DecodeError]]:
        readings: list[Any] = []
        errors: list[DecodeError] = []
        parts = (self._buf + data if self._buf else data).split(self.delimiter)
        tail = parts.pop()  # after the last delimiter: unfinished
        if self._skipping and parts:
            self._skipping = False
            del parts[0]  # the end of an over-long piece
        if parts:
            if make is None:
                self._pieces(parts, readings, errors)
            else:
                self._pieces_as(parts, readings, errors, make, now, tag)
        if self._skipping:
            tail = b""
        elif len(tail) > self.max_len:
            errors.append(
                DecodeError("overlong", f"more than {self.max_len} bytes without a delimiter", _excerpt(tail))
            )
            tail = b""
            self._skipping = True
        self._buf = tail
        stats = self.stats
        stats["readings"] += len(readings)
        stats["errors"] += len(errors)
        return readings, errors

    def flush(self) -> list[DecodeError]:
        """End of input: an unfinished line or frame is reported as truncated."""
        pending = self._buf
        self._buf = b""
        skipping, self._skipping = self._skipping, False
        if (pending.strip() if self.text else pending) and not skipping:
            self.stats["errors"] += 1
            return [DecodeError("truncated", f"input ended inside a piece of {len(pending)} bytes", _excerpt(pending))]
        return []

    def _pieces(self, pieces: list[bytes], readings: list[RawReading], errors: list[DecodeError]) -> None:
        for piece in pieces:
            self._piece(piece, readings, errors)

    def _pieces_as(
        self, pieces: list[bytes], out: list[Any], errors: list[DecodeError], make: Make, now: float, tag: str
    ) -> None:
        raw: list[RawReading] = []
        self._pieces(pieces, raw, errors)
        _made(raw, out, make, now, tag)

    def _piece(self, piece: bytes, readings: list[RawReading], errors: list[DecodeError]) -> None:
        if len(piece) > self.max_len:
            errors.append(DecodeError("overlong", f"{len(piece)} bytes, more than {self.max_len}", _excerpt(piece)))
            return
        self.stats["pieces"] += 1
        try:
            self._decode(piece, readings, errors)
        except _Invalid as exc:
            errors.append(DecodeError(exc.kind, str(exc), _excerpt(piece)))
        except RecursionError:  # a nested label (device_field, key_field) too deep to turn into text
            errors.append(DecodeError("malformed", "JSON nested too deeply", _excerpt(piece)))

    def _decode(self, piece: bytes, readings: list[RawReading], errors: list[DecodeError]) -> None:
        raise NotImplementedError


def _made(raw: list[RawReading], out: list[Any], make: Make, now: float, tag: str) -> None:
    """Append ``make(key, ts, value, tag)`` per reading to ``out``, with ``now`` where there is no time."""
    out.extend([make(key, now if ts is None else ts, value, tag) for key, value, ts in raw])


def _finite(
    key: str, value: float, ts: float | None, readings: list[RawReading], errors: list[DecodeError], piece: bytes
) -> None:
    if math.isfinite(value):
        readings.append((key, value, ts))
    else:
        errors.append(DecodeError("nonfinite", f"{key} is {value!r}", _excerpt(piece)))


class _RecordDecoder(Decoder):
    """Text lines that decode to a record (field -> value), each numeric field a reading."""

    def __init__(self, o: _LineCodec):
        super().__init__(o.max_line)
        self.o = o
        self.prefix = o.prefix

    def _decode(self, piece: bytes, readings: list[RawReading], errors: list[DecodeError]) -> None:
        try:
            text = piece.strip().decode("utf-8")  # ASCII whitespace only: a stray control byte is garbage
        except UnicodeDecodeError as exc:
            raise _Invalid("garbage", f"not UTF-8 text (byte {exc.start})") from None
        if not text:
            return
        rec = self._record(text)
        if rec is None:
            return
        o = self.o
        ts = None
        if o.ts_field and o.ts_field in rec:
            ts = _ts(rec.pop(o.ts_field))
        prefix = self.prefix
        if o.device_field and o.device_field in rec:
            prefix = f"{prefix}{rec.pop(o.device_field)}."
        n = len(readings) + len(errors)
        if o.record is not None:
            fields: dict[str, float] = {}
            for name, v in rec.items():
                value = self._number(name, v)
                if value is None:
                    continue
                if math.isfinite(value):
                    fields[name] = value
                else:
                    errors.append(DecodeError("nonfinite", f"{prefix}{o.record}.{name} is {value!r}", _excerpt(piece)))
            if fields:
                readings.append((prefix + o.record, fields, ts))
        else:
            for name, v in rec.items():
                value = self._number(name, v)
                if value is not None:
                    _finite(prefix + name, value, ts, readings, errors, piece)
        if len(readings) + len(errors) == n:
            raise _Invalid("malformed", "no numeric field in the line")

    def _record(self, text: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def _number(self, name: str, v: Any) -> float | None:
        """A field's reading, or None when it is a label (a non-numeric string)."""
        t = type(v)
        if t is float or t is int:
            return _float(v)
        if t is str:
            try:
                return float(v)
            except ValueError:
                return None
        return None


_JSON_SCAN = make_scanner(json.JSONDecoder())  # (text, index) -> (value, end)
_FLOAT_ONLY = {float}


class _JsonDecoder(_RecordDecoder):
    o: JsonCodec

    def _pieces(self, pieces: list[bytes], readings: list[RawReading], errors: list[DecodeError]) -> None:
        """Every line of one read in one loop; anything unusual goes through :meth:`_piece`."""
        o = self.o
        if o.key_field is not None or o.device_field is not None:
            super()._pieces(pieces, readings, errors)
            return
        scan = _JSON_SCAN
        tsf = o.ts_field
        record_key = None if o.record is None else self.prefix + o.record
        prefix = self.prefix
        max_len = self.max_len
        isfinite = math.isfinite
        append = readings.append
        count = 0
        for piece in pieces:
            if len(piece) > max_len:
                self._piece(piece, readings, errors)
                continue
            try:
                text = piece.decode()
                rec, end = scan(text, 0)  # json.loads without its encoding sniffing and whitespace regexes
            except (ValueError, StopIteration, RecursionError):  # not UTF-8, not JSON, too deep, blank
                self._piece(piece, readings, errors)  # says what is wrong, or skips the blank line
                continue
            if (
                type(rec) is not dict
                or (end != len(text) and not text[end:].isspace())
                or ("\\u" in text and text_fault(rec) is not None)  # a lone surrogate: _record says which
            ):
                self._piece(piece, readings, errors)
                continue
            ts = None
            if tsf is not None and tsf in rec:
                t = rec.pop(tsf)
                if type(t) is float and 0.0 <= t < 1e11:  # epoch seconds, the common case of _ts
                    ts = t
                else:
                    try:
                        ts = _ts(t)
                    except _Invalid:
                        self._piece(piece, readings, errors)  # says what is wrong with the time
                        continue
            # numbers (not bools) become readings, other fields are labels; NaN/Infinity go the long way
            if set(map(type, rec.values())) == _FLOAT_ONLY:
                fields = rec
            else:
                try:
                    fields = {k: float(v) for k, v in rec.items() if type(v) is float or type(v) is int}
                except OverflowError:  # an integer beyond any float
                    fields = {}
            if not fields or not isfinite(sum(fields.values())):
                self._piece(piece, readings, errors)
                continue
            count += 1
            if record_key is not None:
                append((record_key, fields, ts))
            else:
                for k, v in fields.items():
                    append((prefix + k, v, ts))
        self.stats["pieces"] += count

    def _record(self, text: str) -> dict[str, Any] | None:
        try:
            rec = loads_json(text)
        except NotText as exc:  # see firmware_bridges._json: refused, never altered
            raise _Invalid("garbage", str(exc)) from None
        except json.JSONDecodeError as exc:
            raise _Invalid("garbage", f"not JSON ({exc.msg} at char {exc.pos})") from None
        except ValueError as exc:  # an integer of over 4,300 digits: Python will not convert it
            raise _Invalid("malformed", f"JSON the decoder refuses ({exc})") from None
        except RecursionError:
            raise _Invalid("malformed", "JSON nested too deeply") from None
        if type(rec) is not dict:
            raise _Invalid("malformed", f"a JSON {type(rec).__name__}, not an object")
        kf = self.o.key_field
        if kf is not None:
            if kf not in rec or self.o.value_field not in rec:
                raise _Invalid("malformed", f"needs fields {kf!r} and {self.o.value_field!r}")
            out = {str(rec[kf]): rec[self.o.value_field]}
            if self.o.ts_field and self.o.ts_field in rec:
                out[self.o.ts_field] = rec[self.o.ts_field]
            return out
        return rec

    def _number(self, name: str, v: Any) -> float | None:
        t = type(v)
        return _float(v) if t is float or t is int else None


class _KvDecoder(_RecordDecoder):
    o: KeyValueCodec

    def _record(self, text: str) -> dict[str, Any] | None:
        sep = self.o.separator
        parts = text.split(sep) if sep else text.replace(",", " ").replace(";", " ").split()
        rec: dict[str, Any] = {}
        for part in parts:
            part = part.strip()
            if not part:
                continue
            k, eq, v = part.partition("=")
            k = k.strip()
            if not eq or not k:
                raise _Invalid("malformed", f"{part[:40]!r} is not key=value")
            rec[k] = v.strip()
        return rec


class _CsvDecoder(_RecordDecoder):
    o: CsvCodec

    def __init__(self, o: CsvCodec):
        super().__init__(o)
        self.columns: list[str] | None = list(o.columns) if o.columns else None
        self._delimiter = o.delimiter
        self._delimiter_b = o.delimiter.encode()
        self._built_for: list[str] | None = None
        self._build: tuple[Any, Any] | None = None  # the compiled loops for those columns (_layout)

    def _plain_cells(self, pieces: list[bytes]) -> list[float] | None:
        """The cells of a read that is nothing but rows of plain numbers, as floats, row after row;
        None when anything in it is otherwise (a header, a label, a quote, an empty or non-finite
        cell, a wrong cell count, an over-long line), which the per-line loop then says.

        Without a quote character a row has exactly the cells ``split`` gives (RFC 4180 needs the
        csv module only where a quote is); the cells of the whole read are split and converted in
        one C-level pass, and every line's own cell count is checked, so no row borrows a cell
        from its neighbour.
        """
        cols = self.columns
        if cols is None or self._build is None:
            return None
        delimiter = self._delimiter_b
        blob = delimiter.join(pieces)
        if b'"' in blob or max(map(len, pieces)) > self.max_len:
            return None
        # a carriage return only as a CRLF line's last byte (elsewhere the csv module decides)
        crs = blob.count(b"\r")
        if crs and crs != sum(map(bytes.endswith, pieces, repeat(b"\r"))):
            return None
        if set(map(bytes.count, pieces, repeat(delimiter))) != {len(cols) - 1}:
            return None
        try:
            cells = list(map(float, blob.split(delimiter)))  # float() reads ASCII bytes, spaces around too
        except ValueError:
            return None
        if not math.isfinite(sum(cells)):  # NaN, infinity, or a sum too large: said per line
            return None
        return cells

    def _layout(self) -> None:
        """Compile the loop that turns plain rows into readings for the current columns.

        As for the COBS layouts (and ``namedtuple``), the source is generated: the cells of a row
        unpacked into locals, the time converted once, each reading or record built as a literal,
        with no per-cell loop. Only ``repr`` of the column names (from the config or the device's
        header row) and of the keys goes into the source. ``None`` when a line has no reading
        (only the time column, or no columns yet): the per-line loop says so.
        """
        self._built_for = cols = self.columns
        self._build = None
        o = self.o
        if cols is None or o.device_field is not None or len(set(cols)) != len(cols):
            return  # (configured columns named twice: the per-line loop keeps the last of each)
        ts_i = cols.index(o.ts_field) if o.ts_field in cols else -1
        values = [(f"c{i}", c) for i, c in enumerate(cols) if i != ts_i]
        if not values:
            return
        cells = ", ".join(f"c{i}" for i in range(len(cols)))
        row = f"    for {cells}, in zip({', '.join(['it'] * len(cols))}):"
        when = "now"
        ts = "None"
        if ts_i >= 0:
            when = ts = f"(c{ts_i} / 1000.0 if c{ts_i} > 1e11 else c{ts_i})"  # epoch seconds or ms, as _ts
        if o.record is not None:
            record = "{" + ", ".join(f"{name!r}: {var}" for var, name in values) + "}"
            key = repr(self.prefix + o.record)
            made = [f"make({key}, {when}, {record}, tag)"]
            plain = [f"({key}, {record}, {ts})"]
        else:
            made = [f"make({self.prefix + name!r}, {when if ts_i < 0 else 't'}, {var}, tag)" for var, name in values]
            plain = [f"({self.prefix + name!r}, {var}, {ts if ts_i < 0 else 't'})" for var, name in values]
        src = []
        for head, items in (("run(cells, out)", plain), ("run_as(cells, out, make, now, tag)", made)):
            src += [f"def {head}:", "    it = iter(cells)", row]
            if ts_i >= 0 and o.record is None:
                src.append(f"        t = {ts}")
            src.append(f"        out += ({', '.join(items)},)")
        ns: dict[str, Any] = {}
        exec(compile("\n".join(src) + "\n", "<csv layout>", "exec"), ns)  # generated above from the columns
        self._build = (ns["run"], ns["run_as"])

    def _pieces_as(
        self, pieces: list[bytes], out: list[Any], errors: list[DecodeError], make: Make, now: float, tag: str
    ) -> None:
        if self.columns is not self._built_for:
            self._layout()
        cells = self._plain_cells(pieces)
        if cells is None or self._build is None:
            raw: list[RawReading] = []
            self._by_line(pieces, raw, errors)
            _made(raw, out, make, now, tag)
            return
        self.stats["pieces"] += len(pieces)
        self._build[1](cells, out, make, now, tag)

    def _pieces(self, pieces: list[bytes], readings: list[RawReading], errors: list[DecodeError]) -> None:
        if self.columns is not self._built_for:
            self._layout()
        cells = self._plain_cells(pieces)
        if cells is None or self._build is None:
            self._by_line(pieces, readings, errors)
            return
        self.stats["pieces"] += len(pieces)
        self._build[0](cells, readings)

    def _by_line(self, pieces: list[bytes], readings: list[RawReading], errors: list[DecodeError]) -> None:
        """Rows of plain numbers in one loop; headers, quotes, labels and problems go through :meth:`_piece`.

        A row without a quote character has exactly the cells ``split`` gives, so the csv module is
        needed only where a quote is.
        """
        o = self.o
        if o.device_field is not None:
            super()._pieces(pieces, readings, errors)
            return
        delimiter = o.delimiter.encode()
        tsf = o.ts_field
        record_key = None if o.record is None else self.prefix + o.record
        prefix = self.prefix
        max_len = self.max_len
        isfinite = math.isfinite
        append = readings.append
        count = 0
        cols: list[str] | None = None
        n_cols = 0
        ts_i = -1
        names: list[tuple[int, str]] = []
        for piece in pieces:
            if self.columns is not cols:  # learned (again) from a header row
                cols = self.columns
                n_cols = len(cols) if cols else 0
                ts_i = cols.index(tsf) if cols and tsf in cols else -1
                names = [(i, c) for i, c in enumerate(cols or ()) if i != ts_i]
            # a quote, or a carriage return before the end (not a CRLF line's own), takes the csv path
            if cols is None or len(piece) > max_len or b'"' in piece or piece.find(b"\r", 0, -1) >= 0:
                self._piece(piece, readings, errors)
                continue
            try:
                vals = [float(c) for c in piece.split(delimiter)]  # float() reads ASCII bytes
            except ValueError:  # a header, a label, an empty cell, garbage: said there
                self._piece(piece, readings, errors)
                continue
            if len(vals) != n_cols:
                self._piece(piece, readings, errors)
                continue
            fields = {c: vals[i] for i, c in names}
            if not fields or not isfinite(sum(vals)):
                self._piece(piece, readings, errors)
                continue
            ts = None
            if ts_i >= 0:
                t = vals[ts_i]
                ts = t / 1000.0 if t > 1e11 else t  # as _ts reads epoch seconds or milliseconds
            count += 1
            if record_key is not None:
                append((record_key, fields, ts))
            else:
                for k, v in fields.items():
                    append((prefix + k, v, ts))
        self.stats["pieces"] += count

    def _record(self, text: str) -> dict[str, Any] | None:
        try:
            # strict: an unterminated quote or text after a closing quote is a malformed line, not a cell
            row = next(csv.reader((text,), delimiter=self._delimiter, skipinitialspace=True, strict=True))
        except csv.Error as exc:
            raise _Invalid("malformed", f"not CSV ({exc})") from None
        cells = [c.strip() for c in row]
        if _header_like(cells):
            # A header row: learn it (again after a device reboot) unless columns are configured.
            if self.o.columns is None:
                self.columns = cells
                return None
            if cells == self.columns:
                return None
        if self.columns is None:
            raise _Invalid("malformed", "a data row before any header row")
        if len(cells) != len(self.columns):
            raise _Invalid("malformed", f"{len(cells)} cells, expected {len(self.columns)} ({', '.join(self.columns)})")
        rec: dict[str, Any] = {}
        labels = {self.o.ts_field, self.o.device_field}
        for name, cell in zip(self.columns, cells, strict=True):
            if cell == "":
                continue
            if name not in labels and not _numeric(cell):
                raise _Invalid("malformed", f"column {name}: {cell[:40]!r} is not a number")
            rec[name] = cell
        return rec


def _numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


# what sensors print while not ready; a row of these is bad data, not a new header
_PLACEHOLDERS = {"n/a", "na", "null", "none", "err", "error", "ovf", "overflow"}


def _header_like(cells: list[str]) -> bool:
    """Column names: each non-numeric with a letter or ``_`` in it, no placeholder, no two alike."""
    return len(set(cells)) == len(cells) and all(
        c and not _numeric(c) and c.lower() not in _PLACEHOLDERS and any(ch.isalpha() or ch == "_" for ch in c)
        for c in cells
    )


# --- NMEA 0183 -------------------------------------------------------------------------------

_KNOTS = 0.514444
_WIND_UNIT = {"M": 1.0, "K": 1 / 3.6, "N": _KNOTS, "S": 0.44704}  # S: statute miles per hour


def nmea_checksum(body: str) -> int:
    c = 0
    for ch in body.encode("ascii"):
        c ^= ch
    return c


def nmea_sentence(body: str) -> str:
    """``GPGGA,...`` -> ``$GPGGA,...*hh`` (without line ending)."""
    return f"${body}*{nmea_checksum(body):02X}"


def _f(s: str, what: str) -> float | None:
    if s == "":
        return None
    try:
        return float(s)
    except ValueError:
        raise _Invalid("malformed", f"{what}: {s[:20]!r} is not a number") from None


def _coord(value: str, hemi: str, what: str) -> float | None:
    if value == "":
        return None
    dot = value.find(".")
    deg_len = (dot if dot >= 0 else len(value)) - 2
    if deg_len < 1:
        raise _Invalid("malformed", f"{what}: {value!r} is not ddmm.mmmm")
    try:
        deg = int(value[:deg_len])
        minutes = float(value[deg_len:])
    except ValueError:
        raise _Invalid("malformed", f"{what}: {value!r} is not ddmm.mmmm") from None
    if minutes >= 60:
        raise _Invalid("malformed", f"{what}: {value!r} has {minutes} minutes")
    v = deg + minutes / 60.0
    if hemi in ("S", "W"):
        return -v
    if hemi not in ("N", "E"):
        raise _Invalid("malformed", f"{what}: hemisphere {hemi!r} is not N/S/E/W")
    return v


class _NmeaDecoder(Decoder):
    def __init__(self, o: NmeaCodec):
        super().__init__(o.max_line)
        self.o = o
        self.p = o.prefix
        self.wanted = {s.upper() for s in (o.sentences or ("GGA", "RMC", "MWV", "XDR"))}

    def _decode(self, piece: bytes, readings: list[RawReading], errors: list[DecodeError]) -> None:
        try:
            text = piece.decode("ascii").strip()
        except UnicodeDecodeError:
            # Line noise before a sentence: resynchronise on its '$'.
            at = piece.rfind(b"$")
            if at < 0:
                raise _Invalid("garbage", "not an NMEA sentence (non-ASCII bytes)") from None
            if at == 0:  # the noise is inside the sentence itself: nothing to resynchronise on
                raise _Invalid("garbage", "non-ASCII bytes inside an NMEA sentence") from None
            errors.append(DecodeError("garbage", f"{at} byte(s) of noise before a sentence", _excerpt(piece[:at])))
            self._decode(piece[at:], readings, errors)
            return
        if not text:
            return
        at = text.find("$")
        if at < 0:
            raise _Invalid("garbage", "not an NMEA sentence (no '$')")
        if at > 0:
            errors.append(DecodeError("garbage", f"{at} byte(s) of noise before a sentence", _excerpt(piece[:at])))
            text = text[at:]
        star = text.rfind("*")
        if star >= 0:
            body = text[1:star]
            given = text[star + 1 :]
            try:
                want = int(given, 16)
            except ValueError:
                raise _Invalid("checksum", f"checksum {given!r} is not hex") from None
            if len(given) != 2 or nmea_checksum(body) != want:
                raise _Invalid("checksum", f"checksum {given} does not match {nmea_checksum(body):02X}")
        elif self.o.require_checksum:
            raise _Invalid("checksum", "sentence has no *hh checksum")
        else:
            body = text[1:]
        f = body.split(",")
        addr = f[0]
        if len(addr) < 5 or addr.startswith("P"):
            self.stats["skipped"] += 1
            return
        kind = addr[-3:]
        if kind not in self.wanted:
            self.stats["skipped"] += 1
            return
        handler = getattr(self, "_" + kind.lower(), None)
        if handler is None:
            self.stats["skipped"] += 1
            return
        n = len(readings) + len(errors)
        handler(f, piece, readings, errors)
        if len(readings) + len(errors) == n:
            self.stats["skipped"] += 1  # a valid sentence without data (no fix, status V)

    def _need(self, f: list[str], n: int) -> None:
        if len(f) < n:
            raise _Invalid("malformed", f"{f[0]} has {len(f) - 1} fields, expected at least {n - 1}")

    def _gga(self, f: list[str], piece: bytes, readings: list[RawReading], errors: list[DecodeError]) -> None:
        self._need(f, 10)
        p = self.p
        fix = _f(f[6], "GGA fix quality")
        lat = _coord(f[2], f[3], "GGA latitude")
        lon = _coord(f[4], f[5], "GGA longitude")
        vals = [("gps.fix", fix), ("gps.sats", _f(f[7], "GGA satellites")), ("gps.hdop", _f(f[8], "GGA HDOP"))]
        if fix:
            vals += [("gps.lat", lat), ("gps.lon", lon), ("gps.alt", _f(f[9], "GGA altitude"))]
        for k, v in vals:
            if v is not None:
                _finite(p + k, v, None, readings, errors, piece)

    def _rmc(self, f: list[str], piece: bytes, readings: list[RawReading], errors: list[DecodeError]) -> None:
        self._need(f, 10)
        p = self.p
        if f[2] != "A":
            return
        ts = None
        if len(f[1]) >= 6 and len(f[9]) == 6:
            try:
                hh, mm, ss = int(f[1][:2]), int(f[1][2:4]), float(f[1][4:])
                if not 0.0 <= ss < 61.0:  # also NaN; 60.x is a leap second
                    raise ValueError(ss)
                dd, mo, yy = int(f[9][:2]), int(f[9][2:4]), int(f[9][4:6])
                day = datetime(yy + (2000 if yy < 80 else 1900), mo, dd, hh, mm, tzinfo=UTC)  # NMEA's 2-digit year
                ts = day.timestamp() + ss
            except ValueError:
                raise _Invalid("malformed", f"RMC time {f[1]!r} / date {f[9]!r} is not hhmmss / ddmmyy") from None
        speed = _f(f[7], "RMC speed")
        vals = [
            ("gps.lat", _coord(f[3], f[4], "RMC latitude")),
            ("gps.lon", _coord(f[5], f[6], "RMC longitude")),
            ("gps.speed", None if speed is None else speed * _KNOTS),
            ("gps.course", _f(f[8], "RMC course")),
        ]
        for k, v in vals:
            if v is not None:
                _finite(p + k, v, ts, readings, errors, piece)

    def _mwv(self, f: list[str], piece: bytes, readings: list[RawReading], errors: list[DecodeError]) -> None:
        self._need(f, 6)
        if f[5] != "A":
            return
        ref = {"R": "rel", "T": "true"}.get(f[2])
        if ref is None:
            raise _Invalid("malformed", f"MWV reference {f[2]!r} is not R or T")
        unit = _WIND_UNIT.get(f[4])
        if unit is None:
            raise _Invalid("malformed", f"MWV speed unit {f[4]!r} is not K/M/N/S")
        angle = _f(f[1], "MWV angle")
        speed = _f(f[3], "MWV speed")
        p = f"{self.p}wind.{ref}."
        if angle is not None:
            _finite(p + "angle", angle, None, readings, errors, piece)
        if speed is not None:
            _finite(p + "speed", speed * unit, None, readings, errors, piece)

    def _xdr(self, f: list[str], piece: bytes, readings: list[RawReading], errors: list[DecodeError]) -> None:
        if (len(f) - 1) % 4 != 0 or len(f) < 5:
            raise _Invalid("malformed", f"XDR has {len(f) - 1} fields, expected groups of 4")
        for i in range(1, len(f), 4):
            kind, value, _unit, name = f[i : i + 4]
            v = _f(value, f"XDR {name or kind}")
            if v is not None:
                _finite(f"{self.p}xdr.{name or kind + str(i // 4)}", v, None, readings, errors, piece)


# --- COBS + CRC + struct ---------------------------------------------------------------------


class _CobsDecoder(Decoder):
    delimiter = b"\x00"
    text = False

    def __init__(self, o: CobsCodec):
        super().__init__(o.max_frame)
        self.o = o
        self.struct = o.payload_struct()
        self.fields = [
            (o.prefix + f.name, f.scale, f.offset, f.name == o.ts_field) for f in o.fields if f.type != "pad"
        ]
        self.names = [f.name for f in o.fields if f.type != "pad"]
        self.record_key = None if o.record is None else o.prefix + o.record
        self.crc_len = o.crc_len
        self.crc = {"crc16": crc16_ccitt_false, "crc32": crc32, "none": None}[o.crc]
        # NaN/inf can only come from float fields, or from a scale big enough to overflow an integer
        self._check_finite = any(f.type in ("f32", "f64") for f in o.fields) or any(
            abs(scale) * 2.0**64 + abs(offset) > 1e300 for _key, scale, offset, _ts in self.fields
        )
        self._run, self._run_as = self._compile_loop() or (None, None)

    def _compile_loop(self) -> tuple[Any, Any] | None:
        """``run(pieces, append, slow) -> frames decoded``: the batch loop for this layout, compiled once.

        Like ``namedtuple`` and ``dataclasses``, the source is generated from the field list: the
        COBS unstuffing (in place, for a layout too short for a full block), the unpack into named
        locals, the CRC check, the scales as constants and the readings it appends are
        straight-line code, with no per-field loop and no Python call per frame. A frame
        that fails any check goes to ``slow`` (the general path, which says what is wrong).
        Only ``repr`` of validated names and finite numbers goes into the source. ``None`` (the
        general path does all the work) when a layout has nothing to build. The loop comes twice:
        ``run`` appends ``(key, value, ts)`` tuples, ``run_as`` appends ``make(key, ts, value, tag)``.
        """
        o = self.o
        values = [
            (i, key, name, scale, offset)
            for i, ((key, scale, offset, is_ts), name) in enumerate(zip(self.fields, self.names, strict=True))
            if not is_ts
        ]
        size = self.struct.size
        whole = size + self.crc_len
        if not values or not all(math.isfinite(x) for _k, sc, off, _t in self.fields for x in (sc, off)):
            return None
        if self.max_len < o.encoded_size:  # a valid frame can be over-long (validation refuses this)
            return None
        raws = [f"a{i}" for i in range(len(self.fields))]
        fmt = self.struct.format
        crc_in_struct = self.crc is not None and o.crc_byte_order == o.byte_order
        if crc_in_struct:
            fmt += "H" if o.crc == "crc16" else "I"
            raws.append("got")
        ns: dict[str, Any] = {
            "cobs_decode": cobs_decode,
            "CobsError": CobsError,
            "unpack_from": struct.Struct(fmt).unpack_from,
            "crc_hqx": binascii.crc_hqx,
            "crc32": zlib.crc32,
            "from_bytes": int.from_bytes,
            "isfinite": math.isfinite,
            "ts_of": _ts,
            "Invalid": _Invalid,
        }

        def scaled(i: int, scale: float, offset: float) -> str:
            return f"a{i} * {scale!r}" + (f" + {offset!r}" if offset else "")

        def reject(why: str, indent: str = "            ") -> list[str]:
            return [f"{indent}slow(piece)  # {why}", f"{indent}bad += 1", f"{indent}continue"]

        body = ["    bad = 0", "    for piece in pieces:"]
        if whole < 0xFE:
            # A valid frame is one code byte per zero plus one: exactly whole + 1 bytes, with no
            # full block, so each code byte after the first is zeroed in place (as cobs_decode
            # does) and the payload is read at offset 1. Any other length, an idle line included,
            # and a code chain that does not end at the frame's end go to the general path.
            end = whole + 1
            at = 1
            body += [
                f"        if len(piece) != {end}:",
                *reject("idle line, or the wrong length"),
                "        i = piece[0]",
                f"        if i == {end}:",
                "            frame = piece  # no zero in the payload",
                "        else:",
                "            frame = bytearray(piece)",
                f"            while i < {end}:",
                "                code = frame[i]",
                "                frame[i] = 0",
                "                i += code",
                f"            if i != {end}:",
                *reject("garbage", "                "),
            ]
        else:  # a full block is possible: the general unstuffing, then the length
            at = 0
            body += [
                "        try:",
                "            frame = cobs_decode(piece)",
                "        except CobsError:",
                *reject("idle line, or garbage", "            "),
                f"        if len(frame) != {whole}:",
                *reject("the wrong length"),
            ]
        body.append(f"        {', '.join(raws)}, = unpack_from(frame, {at})")
        if self.crc is not None:
            payload = f"frame[{at}:{at + size}]"
            calc = f"crc_hqx({payload}, 0xFFFF)" if o.crc == "crc16" else f"crc32({payload})"
            if not crc_in_struct:
                body.append(f"        got = from_bytes(frame[{at + size}:], {o.crc_byte_order!r})")
            body += [f"        if {calc} != got:", *reject("says what the CRC was")]
        if self._check_finite:  # the sum is NaN/inf when any value is
            body += [f"        v{i} = {scaled(i, sc, off)}" for i, _k, _n, sc, off in values]
            total = " + ".join(f"v{i}" for i, *_ in values)
            body += [f"        if not isfinite({total}):", *reject("says which is NaN/inf")]
            value_of = {i: f"v{i}" for i, *_ in values}
        else:  # nothing to check: each value is computed where it is used
            value_of = {i: scaled(i, sc, off) for i, _k, _n, sc, off in values}
        ts = "None"
        for i, (_key, scale, offset, is_ts) in enumerate(self.fields):
            if is_ts:
                ts = "ts"
                body += [
                    "        try:",
                    f"            ts = ts_of({scaled(i, scale, offset)})",
                    "        except Invalid:",
                    *reject("says what is wrong with the time"),
                ]
        if self.record_key is not None:
            items = ", ".join(f"{name!r}: {value_of[i]}" for i, _k, name, _s, _o in values)
            out = [(repr(self.record_key), f"{{{items}}}")]
        else:
            out = [(repr(key), value_of[i]) for i, key, _n, _s, _o in values]
        ret = "    return len(pieces) - bad  # frames decoded here; the slow path counts its own"
        src = ["def run(pieces, append, slow):", *body]
        src += [f"        append(({key}, {value}, {ts}))" for key, value in out]
        when = "now" if ts == "None" else "ts"
        src += [ret, "def run_as(pieces, append, slow, make, now, tag):", *body]
        src += [f"        append(make({key}, {when}, {value}, tag))" for key, value in out]
        src += [ret]
        exec(compile("\n".join(src) + "\n", "<cobs layout>", "exec"), ns)  # generated above from the layout
        return ns["run"], ns["run_as"]

    def _pieces(self, pieces: list[bytes], readings: list[RawReading], errors: list[DecodeError]) -> None:
        """Every frame of one read in the compiled loop; anything unusual goes through :meth:`_piece`."""
        if self._run is None:
            super()._pieces(pieces, readings, errors)
            return
        n = self._run(pieces, readings.append, lambda piece: self._piece(piece, readings, errors))
        self.stats["pieces"] += n  # after the call: the slow path counts its own pieces

    def _pieces_as(
        self, pieces: list[bytes], out: list[Any], errors: list[DecodeError], make: Make, now: float, tag: str
    ) -> None:
        if self._run_as is None:
            super()._pieces_as(pieces, out, errors, make, now, tag)
            return

        def slow(piece: bytes) -> None:  # made in place, so the readings keep their order
            raw: list[RawReading] = []
            self._piece(piece, raw, errors)
            _made(raw, out, make, now, tag)

        n = self._run_as(pieces, out.append, slow, make, now, tag)
        self.stats["pieces"] += n

    def _decode(self, piece: bytes, readings: list[RawReading], errors: list[DecodeError]) -> None:
        if not piece:
            return  # back-to-back delimiters: an idle line, not an error
        try:
            frame = cobs_decode(piece)
        except CobsError as exc:
            raise _Invalid("garbage", str(exc)) from None
        n = self.crc_len
        if len(frame) < n + 1:
            raise _Invalid("length", f"frame of {len(frame)} bytes is too short for its CRC")
        if self.crc is not None:
            body, tail = frame[:-n], frame[-n:]
            got = int.from_bytes(tail, self.o.crc_byte_order)
            want = self.crc(body)
            if got != want:
                raise _Invalid("checksum", f"CRC {got:0{2 * n}x} does not match {want:0{2 * n}x}")
        else:
            body = frame
        if len(body) != self.struct.size:
            raise _Invalid("length", f"payload of {len(body)} bytes, the layout needs {self.struct.size}")
        raw = self.struct.unpack(body)
        ts = None
        for (_key, scale, offset, is_ts), r in zip(self.fields, raw, strict=True):
            if is_ts:
                ts = _ts(_scaled(r, scale, offset))
        if self.record_key is not None:
            fields: dict[str, float] = {}
            for (key, scale, offset, is_ts), name, r in zip(self.fields, self.names, raw, strict=True):
                if is_ts:
                    continue
                v = _scaled(r, scale, offset)
                if math.isfinite(v):
                    fields[name] = v
                else:
                    errors.append(DecodeError("nonfinite", f"{key} is {v!r}", _excerpt(piece)))
            if fields:
                readings.append((self.record_key, fields, ts))
            return
        for (key, scale, offset, is_ts), r in zip(self.fields, raw, strict=True):
            if not is_ts:
                _finite(key, _scaled(r, scale, offset), ts, readings, errors, piece)


def make_decoder(options: JsonCodec | CsvCodec | KeyValueCodec | NmeaCodec | CobsCodec) -> Decoder:
    """A fresh streaming decoder for these codec options."""
    if isinstance(options, JsonCodec):
        return _JsonDecoder(options)
    if isinstance(options, CsvCodec):
        return _CsvDecoder(options)
    if isinstance(options, KeyValueCodec):
        return _KvDecoder(options)
    if isinstance(options, NmeaCodec):
        return _NmeaDecoder(options)
    return _CobsDecoder(options)


# --- encoders (simulators, tests, benchmarks) ------------------------------------------------


class Encoder:
    """Turns a record (field -> number) into the bytes a device with this codec would send."""

    def __init__(self, options: JsonCodec | CsvCodec | KeyValueCodec | NmeaCodec | CobsCodec):
        self.o = options
        self._header_sent = False
        if isinstance(options, CobsCodec):
            self._struct = options.payload_struct()

    def encode(self, record: dict[str, float]) -> bytes:
        o = self.o
        if isinstance(o, JsonCodec):
            return json.dumps(record, separators=(",", ":")).encode() + b"\n"
        if isinstance(o, KeyValueCodec):
            sep = o.separator or " "
            return sep.join(f"{k}={_num(v)}" for k, v in record.items()).encode() + b"\n"
        if isinstance(o, CsvCodec):
            cols = o.columns or list(record)
            line = o.delimiter.join(_num(record[c]) if c in record else "" for c in cols).encode() + b"\n"
            if o.columns is None and not self._header_sent:
                self._header_sent = True
                return o.delimiter.join(cols).encode() + b"\n" + line
            return line
        if isinstance(o, NmeaCodec):
            return _nmea_encode(record)
        return self.frame(record)

    def frame(self, record: dict[str, float]) -> bytes:
        """COBS: pack the layout (inverse scale/offset), append the CRC, stuff, add the delimiter."""
        o = self.o
        assert isinstance(o, CobsCodec)
        raw: list[Any] = []
        for f in o.fields:
            if f.type == "pad":
                continue
            v = (record.get(f.name, 0.0) - f.offset) / f.scale
            raw.append(v if f.type.startswith("f") else round(v))
        body = self._struct.pack(*raw)
        if o.crc == "crc16":
            body += crc16_ccitt_false(body).to_bytes(2, o.crc_byte_order)
        elif o.crc == "crc32":
            body += crc32(body).to_bytes(4, o.crc_byte_order)
        return cobs_encode(body) + b"\x00"


def make_encoder(options: JsonCodec | CsvCodec | KeyValueCodec | NmeaCodec | CobsCodec) -> Encoder:
    return Encoder(options)


def _num(v: float) -> str:
    return repr(float(v))  # round-trips exactly


def _nmea_coord(v: float, lat: bool) -> tuple[str, str]:
    hemi = ("N" if v >= 0 else "S") if lat else ("E" if v >= 0 else "W")
    # Work in ten-thousandths of a minute so rounding can never print "60.0000" minutes.
    units = round(abs(v) * 600_000)
    deg, rest = divmod(units, 600_000)
    minutes = rest / 10_000
    return (f"{deg:02d}{minutes:07.4f}" if lat else f"{deg:03d}{minutes:07.4f}"), hemi


def _nmea_encode(record: dict[str, float]) -> bytes:
    """Sentences for the fields present: gps.* -> GGA (+ RMC with a ts), wind.rel.* -> MWV, xdr.* -> XDR."""
    out: list[str] = []
    if "gps.lat" in record and "gps.lon" in record:
        lat, ns = _nmea_coord(record["gps.lat"], True)
        lon, ew = _nmea_coord(record["gps.lon"], False)
        ts = record.get("ts")
        t = datetime.fromtimestamp(ts, UTC) if ts is not None else None
        hms = t.strftime("%H%M%S") + f".{t.microsecond // 10000:02d}" if t else ""
        alt = record.get("gps.alt", 0.0)
        out.append(
            nmea_sentence(
                f"GPGGA,{hms},{lat},{ns},{lon},{ew},1,{int(record.get('gps.sats', 8)):02d},"
                f"{record.get('gps.hdop', 0.9):.1f},{alt:.1f},M,47.0,M,,"
            )
        )
        if t is not None:
            knots = record.get("gps.speed", 0.0) / _KNOTS
            out.append(
                nmea_sentence(
                    f"GPRMC,{hms},A,{lat},{ns},{lon},{ew},{knots:.2f},"
                    f"{record.get('gps.course', 0.0):.1f},{t.strftime('%d%m%y')},,,A"
                )
            )
    if "wind.rel.angle" in record:
        out.append(nmea_sentence(f"WIMWV,{record['wind.rel.angle']:.1f},R,{record.get('wind.rel.speed', 0.0):.2f},M,A"))
    xdr = [(k[4:], v) for k, v in record.items() if k.startswith("xdr.")]
    if xdr:
        out.append(nmea_sentence("YXXDR," + ",".join(f"G,{_num(v)},,{name}" for name, v in xdr)))
    return "".join(s + "\r\n" for s in out).encode("ascii")
