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
    """Inverse of :func:`cobs_encode`; raises :class:`CobsError` on a zero byte or a block past the end.

    Each code byte but the first stands where the encoder took out a zero, so zeroing them in
    place decodes the frame in one step per block, with no slices to join. A full 254-byte
    block (code 0xFF) has no zero after it; a frame with one goes to :func:`_cobs_decode_blocks`.
    """
    n = len(data)
    if n == 0:
        raise CobsError("empty frame")
    if 0 in data:  # one scan in C; the blocks below can then hold no zero
        at = data.index(0)
        raise CobsError(f"zero byte at offset {at} inside a COBS frame")
    code = data[0]
    if code == n:
        return data[1:]  # one block: no zero in the payload
    out = bytearray(data)
    i = code
    while i < n:
        if code == 0xFF:
            return _cobs_decode_blocks(data)
        code = out[i]
        out[i] = 0
        i += code
    if i > n:
        raise CobsError(f"COBS block at offset {i - code} runs {i - n} byte(s) past the end of the frame")
    del out[0]
    return bytes(out)


def _cobs_decode_blocks(data: bytes) -> bytes:
    """:func:`cobs_decode` block by block, for a valid zero-free frame that has a full block."""
    n = len(data)
    out = bytearray()
    i = 0
    while i < n:
        code = data[i]
        end = i + code
        if end > n:
            raise CobsError(f"COBS block at offset {i} runs {end - n} byte(s) past the end of the frame")
        out += data[i + 1 : end]
        i = end
        if code < 0xFF and i < n:
            out.append(0)
    return bytes(out)
