"""What the benchmarks share: free loopback ports, waiting for a server to listen, stopping a
child process, pinning one to a core, and a Mosquitto broker of their own.

Not a benchmark itself (`make bench` skips files named _*.py). A benchmark run as
`python scripts/bench/NAME.py` has this folder on its path and imports it as `_common`.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

__all__ = [
    "Mosquitto",
    "Server",
    "at_rate",
    "checkpoint_summary",
    "checkpointed_source",
    "compile_sources",
    "find_mosquitto",
    "free_port",
    "log",
    "outbox_with_link",
    "pinned",
    "port_open",
    "source_cost",
    "stop_process",
    "until",
    "wait_port",
]


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout holds only the table and the closing JSON line."""
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (another process may still
    take it before the caller binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float, proc: subprocess.Popen[Any] | None = None) -> bool:
    """Wait until something accepts connections on `port`; False on timeout, or as soon as
    `proc` (the server expected to listen there) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if port_open(port):
            return True
        time.sleep(0.02)
    return False


def pinned(core: int | None, argv: list[str]) -> list[str]:
    """`argv` run on one CPU core, where the machine has more than one and taskset is there."""
    if core is None or shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        return argv
    return ["taskset", "-c", str(core), *argv]


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """SIGINT (a clean shutdown), then SIGKILL if it has not exited within `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (it lives in /usr/sbin, often not on PATH), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class Server:
    """A server process of the benchmark's own on a loopback port: `start()` runs `argv()` and
    waits until the port accepts connections, `stop()` ends it.

    With no `port` it takes a free one (and another if that one was taken meanwhile); `stop()`
    then `start()` brings it back on the same port, for benchmarks that play an outage."""

    name = "server"

    def __init__(self, workdir: Path, *, port: int = 0, core: int | None = None) -> None:
        self.workdir = workdir
        self.port = port
        self.core = core
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        fixed = self.port != 0
        for _attempt in range(1 if fixed else 5):
            if not fixed:
                self.port = free_port()
            with open(self.workdir / f"{self.name}.stderr", "wb") as stderr:
                self.proc = subprocess.Popen(pinned(self.core, self.argv()), stdout=subprocess.DEVNULL, stderr=stderr)
            if wait_port(self.port, 10, self.proc):
                return self
            stop_process(self.proc)
        raise RuntimeError(f"{self.name} did not start on port {self.port}; see {self.workdir}")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


class Mosquitto(Server):
    """A Mosquitto of our own, its config and log in `workdir`. Queues are deep enough that the
    broker never drops what a benchmark sends, and persistence is off so it writes nothing to
    disk; `extra` lines are added to its config."""

    name = "mosquitto"

    def __init__(self, workdir: Path, *, port: int = 0, core: int | None = None, extra: str = "") -> None:
        super().__init__(workdir, port=port, core=core)
        self.extra = extra

    def argv(self) -> list[str]:
        binary = find_mosquitto()
        if binary is None:
            raise SystemExit("mosquitto not found: run scripts/ensure_mosquitto.sh (or apt-get install mosquitto)")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_queued_messages 10000000\n"
            "max_inflight_messages 0\n"
            "sys_interval 1\n"
            f"log_dest file {self.workdir / 'mosquitto.log'}\n"
            "log_type error\nlog_type warning\n"
            # as root, mosquitto would switch to the 'mosquitto' user, who cannot write its log here
            f"user {getpass.getuser()}\n" + (self.extra.strip() + "\n" if self.extra else "")
        )
        return [binary, "-c", str(conf)]


# --- the gateway's own parts, in this process ----------------------------------------------------


@contextlib.asynccontextmanager
async def outbox_with_link(workdir: Path, name: str, link: Any) -> AsyncIterator[Any]:
    """A running outbox (``workdir/outbox.db``, a quota no benchmark reaches) with ``link``
    registered as ``name``: what a sink node's messages go through."""
    from gateway.outbox import Outbox, OutboxConfig

    outbox = Outbox(workdir / "outbox.db", "gw", {}, OutboxConfig(max_bytes=2_000_000_000, inflight=1000))
    await outbox.open()
    task = asyncio.create_task(outbox.run())
    outbox.register_link(name, link)
    try:
        yield outbox
    finally:
        await outbox.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def source_cost(source: str, workdir: Path, done: Callable[[Any], bool]) -> tuple[float, float]:
    """(wall, CPU) seconds a gateway in this process spends from the moment its source node
    ``source`` (YAML flow mapping with ``id: src``) says it is running until ``done(node)``; the
    source feeds a sink that does nothing (log at debug), so what is measured is the source.
    Connecting and joining a consumer group come before and are idle time, not counted."""
    from gateway.config import parse_config
    from gateway.runtime import Gateway

    text = f"""\
gateway: {{id: bench, data_dir: "{workdir}"}}
pipelines:
  - name: c
    nodes:
      - {source}
      - {{id: out, type: log, input: src, level: debug}}
console: {{enabled: false}}
"""
    gw = Gateway(parse_config(text, "bench.yaml", {}))
    task = asyncio.create_task(gw.run(install_signals=False))
    t = c = None
    try:
        while True:
            p = gw.pipelines.get("c")
            src = p.nodes[p.index["src"]] if p is not None else None
            if t is None and src is not None and src.health().get("state") == "running":
                t, c = time.perf_counter(), time.process_time()
            if t is not None and done(src):
                return time.perf_counter() - t, time.process_time() - (c or 0.0)
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
    finally:
        gw.stop()
        await asyncio.wait_for(task, 30)


# --- what a source's checkpoints hold, phase by phase --------------------------------------------


async def until(condition: Callable[[], object], every: float = 0.01) -> None:
    """Polls ``condition`` (the bench's own loop: polling costs the subject nothing)."""
    while not condition():  # noqa: ASYNC110 -- polling costs the subject nothing
        await asyncio.sleep(every)


async def at_rate(rate: int, seconds: float, send: Callable[[int], Awaitable[None] | None]) -> None:
    """Calls ``send(n)`` every 50 ms for ``seconds``, with n such that ``rate`` items a second go
    out on average (it catches up after a slow call)."""
    n = int(rate * 0.05)
    sent = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        result = send(n)
        if result is not None:
            await result
        sent += n
        await asyncio.sleep(max(0.0, t0 + sent / rate - time.monotonic()))


@dataclass
class CheckpointSamples:
    """What ``measure(pipeline)`` gave after each checkpoint, under the phase set at the time."""

    src: Any
    phase: str
    samples: dict[str, list[Any]] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def checkpointed_source(
    source: str, workdir: Path, measure: Callable[[Any], Any], phase: str, connections: str = ""
) -> AsyncIterator[CheckpointSamples]:
    """A gateway in this process whose source node ``source`` (YAML flow mapping with ``id: src``)
    feeds a 10 s tumbling window (a stateful node: the source acknowledges what it read only after
    the checkpoint that holds it, about a second later) and a sink that does nothing. After every
    checkpoint, ``measure(pipeline)`` is appended to ``samples[phase]``; set ``.phase`` to move on.
    Yields once the source node exists."""
    from gateway.config import parse_config
    from gateway.runtime import Gateway

    text = f"""\
gateway: {{id: bench, data_dir: "{workdir}"}}
{connections}pipelines:
  - name: c
    nodes:
      - {source}
      - {{id: w, type: window, input: src, kind: tumbling, size: 10s, aggregate: mean}}
      - {{id: out, type: log, input: w, level: debug}}
console: {{enabled: false}}
"""
    gw = Gateway(parse_config(text, "bench.yaml", {}))
    task = asyncio.create_task(gw.run(install_signals=False))
    watcher: asyncio.Task[None] | None = None
    try:
        await until(lambda: gw.pipelines.get("c") is not None or task.done())
        if task.done():
            task.result()
        pipeline = gw.pipelines["c"]
        got = CheckpointSamples(pipeline.nodes[pipeline.index["src"]], phase)

        async def watch() -> None:
            seen = -1
            while True:
                if pipeline.checkpointer is not None and pipeline.checkpointer.checkpoints != seen:
                    seen = pipeline.checkpointer.checkpoints
                    got.samples.setdefault(got.phase, []).append(measure(pipeline))
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        yield got
    finally:
        if watcher is not None:
            watcher.cancel()
        gw.stop()
        await asyncio.wait_for(task, 60)


def checkpoint_summary(samples: list[tuple[int, ...]], columns: tuple[str, ...]) -> dict[str, Any]:
    """How many checkpoints, and the median and largest of each column over those that held
    anything (the first column is how many items a checkpoint held)."""
    busy = [s for s in samples if s[0]] or [(0,) * len(columns)]
    out: dict[str, Any] = {"checkpoints": len(samples)}
    for i, name in enumerate(columns):
        column = [s[i] for s in busy]
        out[f"{name}_median"] = int(statistics.median(column))
        out[f"{name}_max"] = max(column)
    return out


def compile_sources(python: Path | str, root: Path) -> None:
    """Write the ``.pyc`` files of the source tree's packages (gateway, nodes, firmware_bridges)
    with ``python``, as pip does for an installed gateway.

    An editable install runs from the tree; where ``PYTHONDONTWRITEBYTECODE`` is set, or after a
    change, each start compiles the changed modules from source, which costs start time and
    leaves about 1 MiB more resident in a running gateway than an installed one has."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    dirs = [str(root / d) for d in ("gateway", "nodes", "firmware_bridges") if (root / d).is_dir()]
    if dirs:
        python = python if Path(python).exists() else sys.executable  # SLUICE_BENCH_BIN may be a script
        subprocess.run([str(python), "-m", "compileall", "-q", *dirs], env=env, capture_output=True, timeout=300)
