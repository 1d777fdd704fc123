"""What device firmware speaks (line codecs, framed binary, Modbus register maps), turned into readings."""

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
    "RawReading",
    "Reading",
    "StructField",
    "make_decoder",
    "make_encoder",
    "nmea_sentence",
]
