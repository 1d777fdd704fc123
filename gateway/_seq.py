"""The gateway's outgoing sequence number: strictly increasing across restarts and power cuts.

Numbers are reserved in blocks: the file holds the end of the reserved block, written
atomically (temp file, fsync, rename) before any number of the block is used. A crash wastes
the rest of a block, never reuses a number.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

__all__ = ["SeqCounter"]


class SeqCounter:
    def __init__(self, path: Path, block: int = 1000):
        self.path = path
        self.block = block
        self._next = 0
        self._reserved = 0
        self._lock = asyncio.Lock()
        self._loaded = False

    def _load(self) -> None:
        try:
            self._next = self._reserved = int(self.path.read_text().strip() or 0)
        except FileNotFoundError:
            self._next = self._reserved = 0
        except ValueError:
            # A torn or edited file: do not go backwards, start past anything plausible.
            self._next = self._reserved = int(os.path.getmtime(self.path) * 1000)
        self._loaded = True

    def _reserve(self, upto: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(str(upto))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._reserved = upto

    async def take(self, n: int = 1) -> int:
        """Reserve ``n`` consecutive numbers; returns the first."""
        async with self._lock:
            if not self._loaded:
                await asyncio.to_thread(self._load)
            if self._next + n > self._reserved:
                await asyncio.to_thread(self._reserve, self._next + max(n, self.block))
            first = self._next + 1
            self._next += n
            return first
