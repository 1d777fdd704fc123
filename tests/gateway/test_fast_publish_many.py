"""The QoS 0 fast path with ``on_messages`` (a read's messages in one call) hands over exactly what
the per-message ``on_message`` path does, in the same order relative to PUBACKs and to the packets
left to gmqtt, for any byte stream cut into reads anywhere.

The read loop is driven here with stand-ins for gmqtt's connection and handler (recording what
reaches them), not a broker: a broker cannot be made to cut its stream at chosen bytes or to send
malformed packets, and the property compares two paths of our parser on the same bytes. The same
path against a real Mosquitto: tests/gateway/test_mqtt_fast_publish.py.
"""

from __future__ import annotations

import logging
from functools import partial
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import _gmqtt_compat as compat


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _publish(topic: bytes, payload: bytes, flags: int, qos: int, props: bytes | None) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (b"\x00\x07" if qos else b"")
    if props is not None:  # MQTT 5: the property block
        body += _varint(len(props)) + props
    return _packet(0x30 | (qos << 1) | flags, body + payload)


topics = st.one_of(
    st.text(min_size=0, max_size=12).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.just(b"bad/\xff"),  # not UTF-8: left to gmqtt
)
payloads = st.one_of(st.binary(max_size=40), st.binary(min_size=120, max_size=400))  # 1- and 2-byte lengths


@st.composite
def streams(draw: Any) -> tuple[int, bytes, list[int]]:
    version = draw(st.sampled_from([4, 5]))
    packets = []
    for _ in range(draw(st.integers(0, 30))):
        kind = draw(st.sampled_from(["qos0", "qos0", "qos0", "qos1", "puback", "refused", "ping", "props"]))
        if kind in ("qos0", "qos1", "props"):
            props = None
            if version == 5:
                props = b"\x01\x01" if kind == "props" else b""
            flags = draw(st.sampled_from([0, 1, 8, 9])) if kind != "qos1" else 0
            packets.append(_publish(draw(topics), draw(payloads), flags, 1 if kind == "qos1" else 0, props))
        elif kind == "puback":
            mid = draw(st.integers(1, 65535)).to_bytes(2, "big")
            packets.append(_packet(0x40, mid + (b"\x00" if draw(st.booleans()) else b"")))
        elif kind == "refused":
            packets.append(_packet(0x40, b"\x00\x09\x87"))
        else:
            packets.append(b"\xd0\x00")
    data = b"".join(packets)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    return version, data, cuts


def _drive(version: int, data: bytes, cuts: list[int], many: bool) -> tuple[list[Any], list[int], int]:
    """Feed ``data`` to the fast path in reads ending at ``cuts``, as gmqtt's read loop does:
    what reached the receivers in order, each read's parsed size, and the calls to ``on_messages``."""
    seen: list[Any] = []
    calls = [0]

    def on_message(client: Any, topic: str, payload: bytes, qos: int, props: Any) -> None:
        seen.append(("message", topic, payload))

    def on_messages(messages: list[tuple[str, bytes]]) -> None:
        calls[0] += 1
        seen.extend(("message", t, p) for t, p in messages)

    handler = SimpleNamespace(
        on_message=partial(on_message, None),
        _connection_state=SimpleNamespace(protocol_version=version),
        _logger=logging.getLogger("test.fast_publish"),
        _handle_puback_packet=lambda cmd, packet: seen.append(("puback packet", cmd, bytes(packet))),
        _last_msg_in=0.0,
    )
    proto = SimpleNamespace(_read_packet=None, write_data=lambda b: None)
    conn = SimpleNamespace(
        _protocol=proto,
        put_package=lambda pkg: seen.append(("gmqtt", pkg.cmd, bytes(pkg.data))),
        is_closing=lambda: False,
        _last_data_in=0.0,
        _send_ping_request=lambda: None,
    )
    handler.current_connection = conn
    client = SimpleNamespace(_connection=conn, _package_handler=handler)
    compat.install_fast_publish(
        client,  # type: ignore[arg-type]
        None,
        lambda mids: seen.append(("acks", list(mids))),
        on_messages if many else None,
    )
    read = proto._read_packet
    parsed = []
    buf = b""
    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
        buf += data[a:b]
        n = read(buf)
        parsed.append(n)
        if n < 0:
            break
        buf = buf[n:]
    # PUBACKs handed over in one list may split differently only where messages now come in
    # one call: compare the acknowledgements one by one
    flat: list[Any] = []
    for item in seen:
        if item[0] == "acks":
            flat.extend(("ack", m) for m in item[1])
        else:
            flat.append(item)
    return flat, parsed, calls[0]


@settings(max_examples=400, deadline=None, derandomize=True)
@given(streams())
def test_messages_of_a_read_in_one_call_are_those_of_one_call_each(stream: tuple[int, bytes, list[int]]) -> None:
    version, data, cuts = stream
    one_each = _drive(version, data, cuts, many=False)
    together = _drive(version, data, cuts, many=True)
    assert together[0] == one_each[0]
    assert together[1] == one_each[1]
    messages = sum(1 for item in one_each[0] if item[0] == "message")
    assert together[2] <= messages


def test_a_whole_read_of_plain_messages_is_one_call() -> None:
    data = b"".join(_publish(b"t/%d" % i, b'{"v": 1.0}', 0, 0, b"") for i in range(50))
    seen, parsed, calls = _drive(5, data, [], many=True)
    assert calls == 1
    assert parsed == [len(data)]
    assert seen == [("message", f"t/{i}", b'{"v": 1.0}') for i in range(50)]
