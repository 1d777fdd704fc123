"""Fixtures shared by every suite: real Mosquitto brokers on free loopback ports.

`mosquitto` is one started broker; `mosquitto_factory(extra="max_connections 2")` starts more,
with extra config lines. Helpers (wait_for, mqtt_client, free_port) live in tests/_util.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests._util import BrokerStartError, MosquittoBroker, find_mosquitto, free_port

# In CI every property test runs the same examples each time (a red build always reproduces, and
# is about the change, not the dice); developers' runs keep exploring new examples.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

MosquittoFactory = Callable[..., MosquittoBroker]
SluiceRunner = Callable[..., "subprocess.Popen[bytes]"]

ROOT = Path(__file__).resolve().parents[1]

_reports_key = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    # Keep each phase's report on the item so fixtures can tell at teardown whether the test failed.
    report: pytest.TestReport = yield
    item.stash.setdefault(_reports_key, {})[report.when] = report
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_reports_key, {})
    return any(r.failed for r in reports.values())


@pytest.fixture(scope="session")
def mosquitto_binary() -> str:
    binary = find_mosquitto()
    if binary is None:
        pytest.fail(
            "mosquitto is not installed: run scripts/install_test_peers.sh test (or sudo apt-get install mosquitto)",
            pytrace=False,
        )
    return binary


@pytest.fixture
def mosquitto_factory(
    mosquitto_binary: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[MosquittoFactory]:
    """Call it to start a broker: `mosquitto_factory(extra="...", persistence=True, port=None)`.

    `extra` is appended to the generated config (after its listener, so listener options apply
    to it). Every broker started here is stopped when the test ends; if the test failed, the
    tail of each broker's log is printed with the report.
    """
    brokers: list[MosquittoBroker] = []

    def start(extra: str = "", *, persistence: bool = False, port: int | None = None) -> MosquittoBroker:
        workdir = tmp_path / f"mosquitto-{len(brokers)}"
        # A free port can be taken between free_port() and mosquitto's bind: try a few.
        attempts = 1 if port is not None else 3
        for attempt in range(attempts):
            broker = MosquittoBroker(
                mosquitto_binary,
                workdir,
                port if port is not None else free_port(),
                extra=extra,
                persistence=persistence,
            )
            brokers.append(broker)
            try:
                return broker.start()
            except BrokerStartError:
                if attempt == attempts - 1 or "Address already in use" not in broker.log_text():
                    raise
        raise AssertionError("unreachable")

    yield start

    failed = _test_failed(request)
    for broker in brokers:
        broker.stop()
        if failed and broker.log_text().strip():
            print(f"--- {broker!r} log ({broker.log_path}), last lines ---")
            print(broker.log_text(tail=40))


@pytest.fixture
def mosquitto(mosquitto_factory: MosquittoFactory) -> MosquittoBroker:
    """One running broker with the default test config."""
    return mosquitto_factory()


@pytest.fixture
def run_sluice(tmp_path: Path) -> Iterator[SluiceRunner]:
    """Call it to start `sluice run CONFIG` as a real process: `run_sluice(path, lean=True)`.

    The Nth process started logs its stderr to tmp_path/runN.log. With `lean` (the default) it
    runs with SLUICE_TLS=auto, so OpenSSL stays out while the config needs none; with
    `lean=False`, SLUICE_TLS is unset; a string is SLUICE_TLS's value. Every process still
    running when the test ends is killed.
    """
    procs: list[subprocess.Popen[bytes]] = []

    def start(cfg: Path, lean: bool | str = True) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != "SLUICE_TLS"}
        if lean:
            env["SLUICE_TLS"] = "auto" if lean is True else str(lean)
        with (tmp_path / f"run{len(procs)}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run", str(cfg)],
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**env, "PYTHONPATH": str(ROOT)},
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
