"""`sluice run` reads its usual arguments without argparse (which a running gateway would keep in
memory); what it does not read itself — help, a mistake — goes to argparse as before."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import _plain_run_arguments, _run_arguments

ROOT = Path(__file__).resolve().parents[2]


def argparse_reading(argv: list[str]) -> dict[str, object]:
    run = argparse.ArgumentParser(prog="sluice run")
    _run_arguments(run)
    return vars(run.parse_args(argv))


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["gw.yaml"],
        ["gw.yaml", "--log-level", "warning"],
        ["--log-level", "debug", "gw.yaml", "--log-format", "json"],
        ["--log-format=text", "/etc/sluice/config.yaml", "--log-level=error"],
        ["--log-level", "info"],
    ],
)
def test_the_usual_arguments_read_as_argparse_reads_them(argv: list[str]) -> None:
    plain = _plain_run_arguments(argv)
    assert plain is not None
    assert vars(plain) == argparse_reading(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["-h"],
        ["--help"],
        ["--log-level", "loud"],
        ["--log-level"],
        ["--log-level", "info", "--log-level", "debug"],
        ["a.yaml", "b.yaml"],
        ["--bogus"],
        ["--", "gw.yaml"],
    ],
)
def test_anything_else_is_left_to_argparse(argv: list[str]) -> None:
    assert _plain_run_arguments(argv) is None


def test_a_wrong_choice_gets_argparse_s_message() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "run", "--log-level", "loud"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert "usage: sluice run" in out.stderr and "invalid choice: 'loud'" in out.stderr
