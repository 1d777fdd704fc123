"""systemd integration through a real notify socket: READY, STATUS, watchdog pings from the loop, STOPPING."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from gateway.service import Notifier
from tests._util import wait_for_sync as wait_for

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(
        f"""\
gateway: {{id: gw-svc, data_dir: "{tmp_path}/data"}}
console: {{enabled: false}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, interval: 20ms, seed: 1, sensors: [{{key: t, base: 20.0}}]}}
      - {{id: blk, type: t_block, input: sim}}
"""
    )
    return path


class Socket:
    """The test's side of NOTIFY_SOCKET: collects what the gateway sends."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def has(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for m in self.poll() for line in m.splitlines())

    def count(self, line: str) -> int:
        return sum(m.splitlines().count(line) for m in self.poll())


def test_notify_is_a_no_op_without_a_socket() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog is None
    assert n.send("READY=1") is False


def test_watchdog_interval_is_for_this_process_only() -> None:
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000"}).watchdog == 2.0
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}).watchdog is None
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).address == "\0abstract"


def test_ready_status_watchdog_and_stopping_through_a_real_socket(tmp_path: Path) -> None:
    sock = Socket(tmp_path / "notify.sock")
    arm, release = tmp_path / "arm", tmp_path / "release"
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        "WATCHDOG_USEC": "300000",  # pings every 0.15 s
        "SLUICE_TEST_BLOCK_ARM": str(arm),
        "SLUICE_TEST_BLOCK_RELEASE": str(release),
    }
    script = "import sys, tests.gateway._block_node; from gateway.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "run", str(_config(tmp_path))],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: sock.has("READY=1"), timeout=60)
        ready = next(m for m in sock.messages if "READY=1" in m)
        assert "STATUS=1/1 pipelines running" in ready, ready
        wait_for(lambda: sock.count("WATCHDOG=1") >= 3, timeout=30)
        wait_for(lambda: any("readings/s" in m for m in sock.poll()), timeout=30)

        # a node blocks the event loop: the pings must stop, so systemd would restart the service
        arm.touch()
        wait_for(lambda: Path(str(arm) + ".blocked").exists(), timeout=30)
        sock.poll()
        before = sock.count("WATCHDOG=1")
        time.sleep(1.0)  # more than six ping intervals while the loop is held
        assert sock.count("WATCHDOG=1") == before, "pings went on while the event loop was blocked"
        release.touch()
        wait_for(lambda: sock.count("WATCHDOG=1") > before, timeout=30)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert sock.has("STOPPING=1"), sock.messages
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
        sock.sock.close()
    assert "Traceback" not in out, out[-3000:]


def test_log_lines_carry_the_journals_priority_under_systemd(tmp_path: Path) -> None:
    """With stderr connected to the journal (JOURNAL_STREAM names it), lines start with <N>, not a time."""
    script = (
        "import logging, os, sys\n"
        "st = os.fstat(2)\n"
        "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}' if sys.argv[1] == 'journal' else ''\n"
        "from gateway._log import setup_logging\n"
        "setup_logging('info')\n"
        "logging.getLogger('t').warning('careful')\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n    logging.getLogger('t').exception('broke')\n"
    )
    for mode in ("journal", "terminal"):
        err = tmp_path / f"{mode}.err"
        with err.open("w") as f:
            subprocess.run([sys.executable, "-c", script, mode], cwd=ROOT, stderr=f, check=True, timeout=60)
        lines = err.read_text().splitlines()
        if mode == "journal":
            assert lines[0] == "<4>WARNING t: careful", lines
            assert all(line.startswith("<3>") for line in lines[1:]), lines  # the traceback too
        else:
            assert lines[0].endswith("WARNING t: careful") and lines[0][:2].isdigit(), lines
