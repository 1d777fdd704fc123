"""What device firmware speaks (line codecs, framed binary, Modbus register maps), turned into readings."""

from ._json import NotText, loads_json, text_fault
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
    "make_decoder",
    "make_encoder",
    "nmea_sentence",
    "text_fault",
]
