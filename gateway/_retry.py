"""Capped exponential backoff with full jitter, shared by every reconnect loop."""

from __future__ import annotations

import random

__all__ = ["backoff"]


def backoff(attempt: int, cap: float, base: float = 0.5) -> float:
    """Delay before retry number ``attempt`` (0-based): base·2^attempt capped, jittered to 50–100 %."""
    return random.uniform(0.5, 1.0) * min(cap, base * 2**attempt)
