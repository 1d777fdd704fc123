"""JSON from devices and clients, decoded only to text that every store can write.

Policy: a JSON string (an object key or a value) that holds a *lone* UTF-16 surrogate — written
as an escape such as ``"t\\ud800"``, or sent as raw surrogate bytes, which Python's ``json``
accepts from ``bytes`` — is not Unicode text. No UTF-8 file, SQLite column, MQTT topic or log
line can hold it, so such input is **refused as garbage** with a reason that names the escape,
exactly like bytes that are not UTF-8. It is never altered on the way in (no replacement
character, no escaping), so whatever is stored is what the device sent. A surrogate *pair*
(``"\\ud83d\\ude00"``, one emoji) is a valid character and passes.

Every source that reads JSON goes through :func:`loads_json` (MQTT) or the ``json`` line codec
(serial, websocket, ``http``, ``http_poll``), which applies the same :func:`text_fault` check.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

try:
    import msgspec
except ImportError:  # an environment installed before msgspec was a dependency: json alone
    msgspec = None  # type: ignore[assignment]

__all__ = ["NotText", "loads_json", "loads_strict", "text_fault"]

_SCAN = json.JSONDecoder().scan_once  # the C scanner, without json.loads' wrapping
# Strict JSON in strict UTF-8: what msgspec accepts, it decodes exactly as json.loads, and it holds
# no lone surrogate (msgspec refuses them, escaped or not). Everything it refuses — NaN, 1e400,
# a BOM, UTF-16/32, surrogates, an integer over 4,300 digits, malformed text — takes the paths below.
_STRICT = msgspec.json.Decoder().decode if msgspec is not None else None
_SURROGATE = re.compile("[\ud800-\udfff]")


class NotText(ValueError):
    """Decoded JSON holds a string that is not Unicode text (a lone surrogate)."""


def text_fault(obj: Any) -> str | None:
    """Why ``obj`` (decoded JSON) cannot be stored as text, or ``None`` when every string can.

    Walks keys and values without recursion, so any depth the parser accepted is fine here.
    """
    stack = [obj]
    pop = stack.pop
    while stack:
        o = pop()
        t = type(o)
        if t is str:
            # isascii() is O(1) on a str: the common case costs nothing
            if not o.isascii() and (m := _SURROGATE.search(o)) is not None:
                return f"lone surrogate \\u{ord(m.group()):04x} in the JSON string {o[:40]!r} (not Unicode text)"
        elif t is dict:
            stack.extend(o)  # keys (always str in JSON)
            stack.extend(o.values())
        elif t is list:
            stack.extend(o)
    return None


def loads_json(data: bytes | str) -> Any:
    """``json.loads`` that refuses lone surrogates (:class:`NotText`), fast on well-formed UTF-8.

    Raises what ``json.loads`` raises for anything else (``JSONDecodeError``, ``ValueError`` for
    an integer of over 4,300 digits, ``RecursionError`` when nested too deeply).
    """
    if isinstance(data, bytes):
        if _STRICT is not None:
            try:
                return _STRICT(data)
            except msgspec.DecodeError:
                pass
        try:
            s = data.decode()
            obj, end = _SCAN(s, 0)
        except (StopIteration, UnicodeDecodeError):
            return _checked(json.loads(data), data)  # leading whitespace, UTF-16/32, or the exact error
        if end != len(s) and s[end:].strip():
            return json.loads(data)  # trailing data: json says where
        # strict UTF-8 holds no surrogates: only an escape can make one
        return _checked(obj, None) if "\\u" in s else obj
    obj = json.loads(data)
    return _checked(obj, None) if (not data.isascii() or "\\u" in data) else obj


loads_strict: Callable[[bytes], Any] = _STRICT if _STRICT is not None else loads_json
"""For a batch's fast path: what :func:`loads_json` returns for strict JSON in strict UTF-8
bytes, without its checks; raises on anything else, which :func:`loads_json` may still take
(NaN, leading whitespace, UTF-16) or refuse with its own reason."""


def _checked(obj: Any, raw: bytes | None) -> Any:
    # json.loads(bytes) decodes with "surrogatepass": raw surrogate bytes get through without an escape
    if raw is not None and raw.isascii() and b"\\u" not in raw:
        return obj
    why = text_fault(obj)
    if why is not None:
        raise NotText(why)
    return obj
