"""Giving freed heap pages back to the system: glibc's malloc_trim where the C library is glibc,
nothing elsewhere."""

from __future__ import annotations

import os
import sys

import pytest

from gateway import _heap


def _glibc() -> bool:
    try:
        return sys.platform == "linux" and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except ValueError:
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_trim_heap_on_glibc_gives_pages_back() -> None:
    # 1 KiB buffers come from malloc's heap (not Python's small-object pools); ~20 MiB of them
    blocks = [bytearray(1024) for _ in range(20_000)]
    del blocks[:-1]  # freed, but the last one pins the heap's top: glibc keeps the pages below it
    before = _rss_kib()
    assert _heap.trim_heap() is True
    assert _rss_kib() < before - 10 * 1024


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_trim_heap_elsewhere_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Platforms without glibc cannot be run here: the platform check is what is exercised.
    _heap._malloc_trim.cache_clear()
    monkeypatch.setattr(sys, "platform", "darwin")
    try:
        assert _heap.trim_heap() is False
    finally:
        monkeypatch.undo()
        _heap._malloc_trim.cache_clear()
