"""SIGKILL a real gateway subprocess a few times mid-stream: state.db stays sound, window results match one clean run.

The full version (50 rounds) is `scripts/crash_windows.py`; this runs three rounds of it. Each kill
lands at a point the script observes (the source has read past a chosen reading, the child is
stopped, a checkpoint of this run, readings past it and input left are checked, then SIGKILL),
not after a delay: the same kinds of kill on a busy machine as on a quiet one.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "crash_windows.py"


def test_sigkill_rounds_lose_nothing_and_invent_nothing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--rounds",
            "3",
            "--events",
            "4000",
            "--rate",
            "1000",
            "--seed",
            "7",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == {"crash": "windows", "rounds": 3, "kills": summary["kills"], "ok": True}, report
    assert summary["kills"] == 3, report  # every round killed mid-stream
    kills = re.findall(
        r"restored at (\d+), killed at reading (\d+) of 4000 \((\d+) past the checkpoint at (\d+)\); "
        r"quick_check: ok",
        report,
    )
    assert len(kills) == 3, report
    restored_from = 0
    for start, read, past, saved in (map(int, k) for k in kills):
        # each round went on from where the last one's checkpoint left it, checkpointed on its own,
        # had readings past that checkpoint to read again after the kill, and input left
        assert start == restored_from and start < saved < read < 4000 and saved + past == read, report
        restored_from = saved
