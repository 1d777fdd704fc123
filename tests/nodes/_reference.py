"""What windows over given readings must produce, computed plainly (the event-time tests of the
consumer-group sources compare the gateway's windows with it)."""

from __future__ import annotations


def tumbling_sums(readings: list[tuple[str, float, float]], size: float) -> dict[tuple[str, float], float]:
    """The sum of each key's readings (key, event time, value) per tumbling window of ``size``
    seconds, by (key, window end)."""
    out: dict[tuple[str, float], float] = {}
    for key, ts, value in readings:
        end = (ts // size + 1) * size
        out[(key, end)] = out.get((key, end), 0.0) + value
    return out
