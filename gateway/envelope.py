"""The one envelope every message leaving the gateway wears, whichever sink or transport sends it.

A message is a JSON object: ``gateway_id``, ``seq`` (increasing across restarts; ``null`` for
best-effort QoS 0 messages, which skip the outbox), ``replayed`` (whether it may have been sent
before), then the message's own fields — for a forwarded event :func:`event_fields`. Consumers
de-duplicate on ``(gateway_id, seq)``; a result that a restart can compute again (a window's)
also carries ``result_id`` (``pipeline/node/key/start/end``), the same for every computation of
it, which the outbox itself never queues twice (docs/delivery.md).

The fields are encoded once (:func:`encode_fields`, when the message is committed to the outbox)
and the head is spliced in front of those bytes at each send (:meth:`Envelope.wrap`), so a
message replayed after an outage costs no second JSON encoding.
"""

from __future__ import annotations

import json
from typing import Any

try:
    import msgspec
except ImportError:  # an environment installed before msgspec was a dependency: json alone
    msgspec = None  # type: ignore[assignment]

from .events import Event

__all__ = ["Envelope", "encode_fields", "event_fields"]


def event_fields(pipeline: str, ev: Event) -> dict[str, Any]:
    """The fields of a forwarded event, the same for every sink (MQTT, webhook, Kafka, Redis …)."""
    fields = {"pipeline": pipeline, "source": ev.source, "key": ev.key, "ts": ev.ts, "value": ev.value}
    rid = ev.meta.get("result_id") if ev.meta else None
    if rid is not None:
        fields["result_id"] = rid
    return fields


_encode = msgspec.json.Encoder(enc_hook=str).encode if msgspec is not None else None


def encode_fields(fields: dict[str, Any]) -> bytes:
    """A message's own fields as compact JSON, UTF-8 (values JSON cannot hold become strings;
    NaN and infinities become ``null``, which strict JSON parsers accept and ``NaN`` is not).

    msgspec encodes a typical alert about ten times faster than ``json.dumps``; text it cannot
    encode (a lone surrogate) goes to ``json.dumps``, which escapes it."""
    if _encode is not None:
        try:
            return _encode(fields)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
            pass
    return json.dumps(fields, separators=(",", ":"), default=str).encode()


_FRESH = b',"replayed":false,'
_REPLAYED = b',"replayed":true,'


class Envelope:
    """Wraps encoded message fields in the envelope of one gateway."""

    __slots__ = ("_prefix",)

    def __init__(self, gateway_id: str):
        self._prefix = b'{"gateway_id":' + json.dumps(gateway_id).encode() + b',"seq":'

    def wrap(self, body: bytes, seq: int | None, replayed: bool = False) -> bytes:
        """The message as sent: the head, then ``body`` (the encoded fields, a JSON object)."""
        if seq is not None and len(body) > 2:  # every outbox message: one concatenation, no head apart
            return self._prefix + str(seq).encode() + (_REPLAYED if replayed else _FRESH) + body[1:]
        head = (
            self._prefix
            + (b"null" if seq is None else str(seq).encode())
            + (b',"replayed":true' if replayed else b',"replayed":false')
        )
        return head + (b"}" if body == b"{}" else b"," + body[1:])

    def read_head(self, payload: bytes) -> tuple[bytes, bool]:
        """``seq`` (its JSON text) and ``replayed`` read back from an enveloped message without
        parsing it, e.g. for a transport that also carries them as record headers."""
        start = len(self._prefix)
        end = payload.index(b",", start)
        return payload[start:end], payload.startswith(b',"replayed":true', end)

    def event(self, pipeline: str, ev: Event, seq: int | None = None, replayed: bool = False) -> bytes:
        """A forwarded event, enveloped (the best-effort path, which has no seq)."""
        return self.wrap(encode_fields(event_fields(pipeline, ev)), seq, replayed)
