"""scripts/install.sh for real: a wheelhouse, an offline install in a network namespace, idempotence,
an upgrade with the backup it takes first, uninstall.

Runs as root (CI does): it creates a system user and installs under a temporary root prefix, so the
machine's /opt, /etc and /var stay untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install.sh"
USER = "sluice-test"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),  # builds a wheelhouse and three venvs: minutes on a busy 2-core machine
    pytest.mark.skipif(os.geteuid() != 0, reason="the installer creates a system user: run as root (CI does)"),
]


def run(*args: str, offline: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [str(SCRIPT), *args]
    if offline:  # a network namespace with no interfaces but a down loopback: no network at all
        cmd = ["unshare", "--net", *cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def tree(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every file and folder under root with its mode, owner, group and content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        if "__pycache__" in p.parts:
            continue
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
        if p.is_symlink():
            digest = os.readlink(p)
        out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, digest)
    return out


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wh = tmp_path_factory.mktemp("wheelhouse")
    run("--download", str(wh))
    return wh


def _upgrade_takes_a_backup(root: Path, data: Path, newer: Path, tmp_path: Path, current: str) -> None:
    venv = root / "opt/sluice/venv"
    backups = root / "var/backups/sluice"
    with sqlite3.connect(data / "state.db") as db:  # what the running gateway has written so far
        db.execute("CREATE TABLE kept (v TEXT)")
        db.execute("INSERT INTO kept VALUES ('before the upgrade')")
    db.close()
    backups.mkdir(parents=True)
    older = [backups / f"sluice-2020010{i}-000000-before-upgrade.tar.gz" for i in (1, 2, 3)]
    for old in older:
        old.write_bytes(b"an older backup")
    out = run("--root", str(root), "--user", USER, "--wheelhouse", str(newer), offline=True)
    said = [line for line in out.stdout.splitlines() if "took a backup before the upgrade: " in line]
    assert len(said) == 1, out.stdout
    archive = Path(said[0].split("took a backup before the upgrade: ", 1)[1])
    assert archive.parent == backups and archive.name.endswith("-before-upgrade.tar.gz")
    assert os.readlink(venv) != current  # and the upgrade went on
    assert (archive.stat().st_mode & 0o777, backups.stat().st_mode & 0o777) == (0o600, 0o700)
    assert sorted(backups.iterdir()) == [*older[1:], archive]  # the oldest one went
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    unpacked = tmp_path / "unpacked"
    manifest = json.loads(next(unpacked.rglob("manifest.json")).read_text())
    assert "data/state.db" in manifest["files"] and "config.yaml" in manifest["files"]
    with sqlite3.connect(next(unpacked.rglob("state.db"))) as db:
        assert db.execute("SELECT v FROM kept").fetchall() == [("before the upgrade",)]
    db.close()

    # a backup that cannot be taken (a damaged database) stops the upgrade before anything changes
    (data / "alerts.db").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    newest = tmp_path / "newest-wheels"
    shutil.copytree(newer, newest)
    shutil.copy(next(newest.glob("sluice_gateway-*.whl")), newest / "zz_marker2-1.0-py3-none-any.whl")
    before = os.readlink(venv)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    cmd = ["unshare", "--net", str(SCRIPT), "--root", str(root), "--user", USER, "--wheelhouse", str(newest)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "could not take a backup before the upgrade" in res.stderr and "alerts.db" in res.stderr, res.stderr
    assert os.readlink(venv) == before and len(list((root / "opt/sluice/venvs").iterdir())) == 2
    assert sorted(backups.iterdir()) == [*older[1:], archive]
    (data / "alerts.db").unlink()


def test_offline_install_is_idempotent_and_uninstall_keeps_data(wheelhouse: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    try:
        first = run("--root", str(root), "--user", USER, "--wheelhouse", str(wheelhouse), offline=True)
        assert "Sluice is installed." in first.stdout
        venv = root / "opt/sluice/venv"
        sluice = venv / "bin/sluice"
        config = root / "etc/sluice/config.yaml"
        data = root / "var/lib/sluice"
        user = pwd.getpwnam(USER)
        # the config: root's, readable by the service's group only; its folder lets the console save
        st = config.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, user.pw_gid, 0o640)
        cst = config.parent.stat()
        assert cst.st_gid == user.pw_gid and cst.st_mode & 0o7777 == 0o2770
        assert data.stat().st_uid == user.pw_uid
        assert "dialout" in subprocess.run(["id", "-nG", USER], capture_output=True, text=True).stdout.split()
        out = subprocess.run([str(sluice), "validate", str(config)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr

        # the unit passes systemd's own checks, with its paths pointed into the test root
        unit = (root / "etc/systemd/system/sluice.service").read_text()
        assert "Type=notify" in unit and "WatchdogSec=" in unit and "\nPrivateDevices=" not in unit
        if shutil.which("systemd-analyze"):
            check = tmp_path / "sluice.service"
            check.write_text(unit.replace("ExecStart=/opt/sluice", f"ExecStart={root}/opt/sluice"))
            res = subprocess.run(["systemd-analyze", "verify", str(check)], capture_output=True, text=True)
            problems = [line for line in res.stderr.splitlines() if str(check) in line]
            assert res.returncode == 0 and not problems, res.stderr

        # twice: nothing changes
        before = tree(root)
        second = run("--root", str(root), "--user", USER, "--wheelhouse", str(wheelhouse), offline=True)
        assert "already installed" in second.stdout
        assert tree(root) == before

        # an upgrade whose new version rejects the config changes nothing (the start check)
        newer = tmp_path / "newer-wheels"
        shutil.copytree(wheelhouse, newer)
        first_wheel = next(newer.glob("*.whl"))
        shutil.copy(first_wheel, newer / "zz_marker-1.0-py3-none-any.whl")  # another set of wheels: a new version
        good = config.read_text()
        config.write_text(good + "bogus_section: 1\n")
        current = os.readlink(venv)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
        cmd = ["unshare", "--net", str(SCRIPT), "--root", str(root), "--user", USER, "--wheelhouse", str(newer)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        assert res.returncode == 1 and "nothing was changed" in res.stderr, res.stdout + res.stderr
        assert os.readlink(venv) == current and (venv / "bin/sluice").exists()
        assert [p.name for p in (root / "opt/sluice/venvs").iterdir()] == [current.removeprefix("venvs/")]
        assert not (root / "var/backups").exists()  # nothing changed: no backup either
        config.write_text(good)

        # an upgrade takes a backup with the installed version first, says where, keeps the last three
        _upgrade_takes_a_backup(root, data, newer, tmp_path, current)

        # a changed config survives an uninstall; the code and the unit go
        config.write_text(config.read_text() + "# kept\n")
        (data / "state.db").write_bytes(b"x")
        run("--root", str(root), "--user", USER, "--uninstall")
        assert not (root / "opt/sluice").exists() and not (root / "etc/systemd/system/sluice.service").exists()
        assert config.read_text().endswith("# kept\n") and (data / "state.db").exists()

        run("--root", str(root), "--user", USER, "--uninstall", "--purge")
        assert not config.parent.exists() and not data.exists()
        with pytest.raises(KeyError):
            pwd.getpwnam(USER)
    finally:
        subprocess.run(["userdel", USER], capture_output=True)
