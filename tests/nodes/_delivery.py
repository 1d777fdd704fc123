"""What the forwarding sinks' tests check of what arrived (kafka_out, redis_out): one envelope per
``seq``, saying what the transport's own fields (Kafka headers, Redis entry fields) say."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# the readings of the two simulated sensors the sink tests forward (s1: 1.0, s2: 2.0)
VALUES = {"s1": 1.0, "s2": 2.0}


def check_envelopes(
    messages: Iterable[tuple[dict[str, Any], dict[str, str]]], n: int, *, replayed: set[int] | None = None
) -> None:
    """Every seq 1..n arrived, a second time only marked ``replayed``; each message is ``(envelope,
    transport fields)``, and the fields (``gateway_id``, ``seq``, ``replayed``, ``pipeline``, ``key``)
    equal the envelope's. With ``replayed``: at least these seqs came again from the outbox."""
    first: dict[int, dict[str, Any]] = {}
    for body, f in messages:
        seq = int(f["seq"])
        assert body["seq"] == seq and body["gateway_id"] == f["gateway_id"] == "gw1"
        assert body["replayed"] == (f["replayed"] == "true") and body["pipeline"] == f["pipeline"] == "p"
        assert body["key"] == f["key"] and body["value"] == VALUES[body["key"]]
        if seq in first:
            assert body["replayed"], f"seq {seq} arrived twice without replayed: true"
        first.setdefault(seq, body)
    assert set(first) == set(range(1, n + 1)), sorted(set(range(1, n + 1)) - set(first))
    if replayed is not None:
        assert {s for s, b in first.items() if b["replayed"]} >= replayed
