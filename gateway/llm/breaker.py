"""A circuit breaker per provider: a failing provider is skipped for a while, then probed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

log = logging.getLogger(__name__)


# --- circuit breaker -----------------------------------------------------------------------


class CircuitBreaker:
    """Closed → (``failures`` in a row) → open → (after ``reset`` s) half-open: one probe decides."""

    def __init__(
        self, failures: int = 3, reset: float = 30.0, clock: Callable[[], float] = time.monotonic, name: str = ""
    ):
        self.failures = failures
        self.reset = reset
        self.clock = clock
        self.name = name
        self.state: Literal["closed", "open", "half_open"] = "closed"
        self.consecutive = 0
        self.opened_at = 0.0
        self.opened = 0
        self._probing = False

    def allow(self) -> bool:
        if self.state == "closed":
            return True
        if self.state == "open":
            if self.clock() - self.opened_at < self.reset:
                return False
            self.state = "half_open"
            log.info("llm provider %s: breaker half-open, probing", self.name)
        if self._probing:
            return False
        self._probing = True
        return True

    def is_open(self) -> bool:
        """Open and not yet due for a probe; unlike :meth:`allow`, changes nothing."""
        return self.state == "open" and self.clock() - self.opened_at < self.reset

    def success(self) -> None:
        if self.state != "closed":
            log.info("llm provider %s: breaker closed", self.name)
        self.state = "closed"
        self.consecutive = 0
        self._probing = False

    def failure(self) -> None:
        self.consecutive += 1
        self._probing = False
        if self.state == "half_open" or (self.state == "closed" and self.consecutive >= self.failures):
            self.state = "open"
            self.opened_at = self.clock()
            self.opened += 1
            log.warning(
                "llm provider %s: breaker open for %.0fs after %d failures", self.name, self.reset, self.consecutive
            )

    def release(self) -> None:
        """A probe that ended without a verdict (cancelled): let another one through."""
        self._probing = False
