"""scripts/install_test_peers.sh: the one list of system packages `make test` and CI install.

The script runs in --check mode against a PATH of stub commands, so no package is installed; the
stubs stand in for the real binaries, which only have to be found.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install_test_peers.sh"


def _table() -> list[tuple[str, str, set[str], str]]:
    """(package, found-by, groups, need) rows of the script's list."""
    text = SCRIPT.read_text()
    body = text.split("cat <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    rows = []
    for line in body.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        pkg, found, groups, need = line.split()[:4]
        rows.append((pkg, found, set(groups.split(",")), need))
    return rows


def _stub_path(tmp_path: Path, group: str, without: set[str] = frozenset()) -> Path:
    """A bin folder holding what the script itself runs plus a stub for every command of GROUP."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("cat", "id", "sed"):
        real = shutil.which(tool)
        assert real, tool
        (bin_dir / tool).symlink_to(Path(real).resolve())
    (bin_dir / "python3").symlink_to(Path(sys.executable).resolve())
    for _pkg, found, groups, _need in _table():
        if group in groups and not found.startswith("python3:") and found not in without:
            stub = bin_dir / found
            stub.write_text("#!/bin/sh\nexit 0\n")
            stub.chmod(0o755)
    return bin_dir


def _run(bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/bash", str(SCRIPT), "--check", *args],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_list_names_every_peer_the_suite_starts() -> None:
    listed = subprocess.run(
        ["/bin/bash", str(SCRIPT), "--list", "test"], capture_output=True, text=True, check=True
    ).stdout.split()
    # tests/conftest.py starts Mosquitto; tests/web/test_browser.py drives Chromium.
    assert {"mosquitto", "chromium"} <= set(listed), listed
    assert "cmake" not in listed  # a `make deps` package, not a test peer


def test_nothing_missing_passes_quietly(tmp_path: Path) -> None:
    res = _run(_stub_path(tmp_path, "test"), "test")
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")


def test_missing_peer_fails_with_the_exact_install_command(tmp_path: Path) -> None:
    res = _run(_stub_path(tmp_path, "test", without={"chromium"}), "test")
    assert res.returncode == 1, res
    assert "install_test_peers: missing: chromium\n" in res.stderr
    assert re.search(r"^    sudo apt-get install --no-install-recommends chromium$", res.stderr, re.M), res.stderr


def test_missing_optional_tool_is_named_but_not_a_failure(tmp_path: Path) -> None:
    res = _run(_stub_path(tmp_path, "test", without={"mosquitto_pub"}), "test")
    assert res.returncode == 0, res
    assert "optional, not installed: mosquitto-clients" in res.stdout


@pytest.mark.parametrize("group", ["deps", "test", "run"])
def test_each_group_checks_only_its_own_rows(tmp_path: Path, group: str) -> None:
    res = _run(_stub_path(tmp_path, group), group)
    assert res.returncode == 0, res


def test_make_test_and_ci_go_through_the_script() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ntest: ", 1)[1].split("\n\n", 1)[0]
    assert "scripts/install_test_peers.sh test" in recipe
    ci = (ROOT / ".ci" / "run").read_text()
    # CI installs nothing by itself: a package missing from the script fails CI as it fails `make test`.
    assert "apt-get" not in ci
    assert "make test" in ci
