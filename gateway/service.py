"""Tell systemd how the gateway is doing: ``READY=1``, ``STATUS=…``, ``WATCHDOG=1``, ``STOPPING=1``.

The notify protocol is one datagram per message on the unix socket named by ``$NOTIFY_SOCKET``
(``@`` at its start means Linux's abstract namespace). Without that variable, as under ``make
run`` or in a terminal, every call here does nothing. The watchdog pings come from a task on the
gateway's own event loop, so a loop blocked by a stuck callback stops them and systemd restarts the
service after ``WatchdogSec``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Notifier", "ServiceReporter"]

log = logging.getLogger(__name__)

# how often the status line is refreshed when no watchdog asks for more often
STATUS_INTERVAL = 5.0


class Notifier:
    """Sends sd_notify messages; a no-op when the process was not started by systemd with a socket."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if addr.startswith("@"):  # abstract namespace: a leading NUL byte
            self.address = "\0" + addr[1:]
        elif addr.startswith("/"):
            self.address = addr
        self.watchdog: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is meant for; a child of ours must not ping
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog = int(usec) / 1e6
        self._sock: socket.socket | None = None
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``fields`` as one message (``KEY=value`` lines); False when not sent."""
        if self.address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        try:
            self._sock.sendto("\n".join(fields).encode("utf-8", "replace"), self.address)
        except OSError as exc:
            # systemd gone or the socket full: say it once, keep running (the gateway is still fine)
            if not self.failed:
                log.warning("systemd notify socket %s: %s", self.address.lstrip("\0"), exc)
            self.failed += 1
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class ServiceReporter:
    """Runs beside the pipelines: ``READY=1`` once every pipeline runs, then pings and status lines.

    ``status`` returns the text of the status line; ``ready`` says whether every pipeline started.
    """

    def __init__(
        self,
        notifier: Notifier,
        *,
        ready: Callable[[], bool],
        status: Callable[[float], str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier
        self._ready = ready
        self._status = status
        self._clock = clock
        self.is_ready = False
        self.pings = 0

    @property
    def interval(self) -> float:
        """Seconds between wake-ups: half the watchdog period (systemd's advice), or the status period."""
        wd = self.notifier.watchdog
        return min(STATUS_INTERVAL, wd / 2) if wd else STATUS_INTERVAL

    async def run(self) -> None:
        if not self.notifier.enabled:
            return
        if self.notifier.watchdog:
            log.info(
                "systemd watchdog: %gs; pinging every %gs from the event loop", self.notifier.watchdog, self.interval
            )
        last_status = -1e18
        while True:
            now = self._clock()
            if not self.is_ready and self._ready():
                self.is_ready = True
                self.notifier.send("READY=1", f"STATUS={self._status(0.0)}")
                last_status = now
            if self.notifier.watchdog:
                self.notifier.send("WATCHDOG=1")
                self.pings += 1
            if self.is_ready and now - last_status >= STATUS_INTERVAL:
                self.notifier.send(f"STATUS={self._status(now - last_status)}")
                last_status = now
            # Before READY, look again soon: systemd waits for it (TimeoutStartSec).
            await asyncio.sleep(self.interval if self.is_ready else min(self.interval, 0.2))

    def stopping(self, why: str = "stopping") -> None:
        self.notifier.send("STOPPING=1", f"STATUS={why}")


def status_line(pipelines: Mapping[str, Any], inputs: int, elapsed: float, alerts_raised: int, outbox: int) -> str:
    """One line for ``systemctl status``: what runs, how fast readings come in, what waits to go out."""
    running = sum(1 for p in pipelines.values() if getattr(p, "state", "") == "running")
    parts = [f"{running}/{len(pipelines)} pipelines running"]
    if elapsed > 0:
        parts.append(f"{inputs / elapsed:,.0f} readings/s")
    parts.append(f"{alerts_raised} alert{'s' if alerts_raised != 1 else ''} raised since start")
    parts.append(f"outbox {outbox} queued")
    return ", ".join(parts)
