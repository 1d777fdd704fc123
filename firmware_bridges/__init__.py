"""What device firmware speaks (line codecs, framed binary, Modbus register maps), turned into readings."""

from typing import TYPE_CHECKING, Any

from ._json import NotText, loads_json, loads_strict, text_fault

# The codecs (and the pydantic models of their options) load on first use: a gateway whose sources
# only need loads_json (MQTT) does not pay for them.
if TYPE_CHECKING:
    from .codecs import (
        CobsCodec,
        CodecOptions,
        CsvCodec,
        DecodeError,
        Decoder,
        Encoder,
        JsonCodec,
        KeyValueCodec,
        NmeaCodec,
        RawReading,
        Reading,
        StructField,
        make_decoder,
        make_encoder,
        nmea_sentence,
    )

_CODECS = frozenset(
    {
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
    }
)


def __getattr__(name: str) -> Any:
    if name in _CODECS:
        from . import codecs

        return getattr(codecs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "NotText",
    "RawReading",
    "Reading",
    "StructField",
    "loads_json",
    "loads_strict",
    "make_decoder",
    "make_encoder",
    "nmea_sentence",
    "text_fault",
]
