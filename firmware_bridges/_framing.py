"""Byte-level helpers for framed binary: COBS, CRC-16/CCITT-FALSE and CRC-32."""

from __future__ import annotations

import binascii
import zlib

__all__ = ["CobsError", "cobs_decode", "cobs_encode", "crc16_ccitt_false", "crc32"]


class CobsError(ValueError):
    """The bytes between two delimiters are not a valid COBS encoding."""


def crc16_ccitt_false(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, not reflected, no final xor (check 0x29B1)."""
    return binascii.crc_hqx(data, 0xFFFF)


def crc32(data: bytes) -> int:
    """CRC-32 (ISO-HDLC, as zlib and Ethernet; check 0xCBF43926)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: the result holds no zero byte (the delimiter is added by the caller)."""
    out = bytearray()
    code_at = 0
    out.append(0)
    code = 1
    for b in data:
        if b == 0:
            out[code_at] = code
            code_at = len(out)
            out.append(0)
            code = 1
            continue
        out.append(b)
        code += 1
        if code == 0xFF:
            out[code_at] = code
            code_at = len(out)
            out.append(0)
            code = 1
    out[code_at] = code
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Inverse of :func:`cobs_encode`; raises :class:`CobsError` on a zero byte or a block past the end."""
    n = len(data)
    if n == 0:
        raise CobsError("empty frame")
    if 0 in data:  # one scan in C; the blocks below can then hold no zero
        at = data.index(0)
        raise CobsError(f"zero byte at offset {at} inside a COBS frame")
    blocks = []
    i = 0
    plain = True  # no full 254-byte block: a zero follows every block but the last
    while i < n:
        code = data[i]
        end = i + code
        if end > n:
            raise CobsError(f"COBS block at offset {i} runs {end - n} byte(s) past the end of the frame")
        blocks.append(data[i + 1 : end])
        if code == 0xFF:
            plain = False
        i = end
    if plain:
        return b"\x00".join(blocks)
    out = bytearray()
    i = 0
    for block in blocks:
        out += block
        i += len(block) + 1
        if len(block) < 0xFE and i < n:
            out.append(0)
    return bytes(out)
